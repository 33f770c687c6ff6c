"""Contexts and keys: create, serialise, load and fingerprint them (TenSEAL).

Key files: ``coordinator.ctx`` is TenSEAL's serialisation of the evaluation
context (public and relinearisation keys); ``participant.ctx`` holds the
TenSEAL context with the secret key plus SEAL's serialisation of the
relinearisation keys in ``coordinator.ctx`` (:func:`serialize_secret`), so that
both sides hash the same keys into the fingerprint (:func:`fingerprint`).
Also the byte-level helpers the backend shares (sealapi objects save and load
only through paths).
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from dataclasses import dataclass
from typing import Any

import tenseal as ts
import tenseal.sealapi as sealapi

from protocol.errors import KeyMaterialError, SecretKeyRefused
from protocol.params import ParamSet
from protocol.seal_format import (
    check_record,
    check_seal_header,
)

_TMP_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None

#: the SEAL version this TenSEAL's SEAL writes into its headers
SEAL_VERSION = (
    sealapi.Serialization.SEALHeader().version_major,
    sealapi.Serialization.SEALHeader().version_minor,
)
#: first bytes of a participant.ctx (protocol 4 on): the TenSEAL secret context
#: and the evaluation context's relinearisation keys follow
PARTICIPANT_MAGIC = b"HEDRL-CKKS-PARTICIPANT-4\n"
_LENGTH = struct.Struct("<Q")
_CHECKSUM_BYTES = 32  # participant.ctx ends with a SHA-256 of what precedes it


def _check_seal_header(head: bytes, total: int) -> None:
    """:func:`protocol.seal_format.check_seal_header` for this TenSEAL's SEAL."""
    check_seal_header(head, total, SEAL_VERSION)


def _save_bytes(obj: Any) -> bytes:
    """Serialise a sealapi object (they only save to a path)."""
    fd, path = tempfile.mkstemp(dir=_TMP_DIR, prefix="hedrl-")
    os.close(fd)
    try:
        obj.save(path)
        with open(path, "rb") as fh:
            return fh.read()
    finally:
        os.unlink(path)


def _load_bytes(obj: Any, seal_ctx: Any, data: bytes) -> None:
    """Load ``data`` into the sealapi object ``obj`` (they only load from a path);
    SEAL validates it for ``seal_ctx``."""
    fd, path = tempfile.mkstemp(dir=_TMP_DIR, prefix="hedrl-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        obj.load(seal_ctx, path)
    finally:
        os.unlink(path)


def create_context(params: ParamSet) -> ts.Context:
    """A fresh secret CKKS context with relinearisation keys, no Galois keys."""
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
    )
    ctx.global_scale = params.scale
    ctx.generate_relin_keys()
    return ctx


def relin_key_bytes(ctx: ts.Context) -> bytes:
    """SEAL's serialisation of ``ctx``'s relinearisation keys."""
    if not ctx.has_relin_keys():
        raise KeyMaterialError("context has no relinearisation keys")
    return _save_bytes(ctx.relin_keys().data)


def fingerprint(ctx: ts.Context, param_set_id: str, relin_keys: bytes) -> str:
    """SHA-256 (hex) over the parameter-set id and SEAL's serialisations of the
    public key and of the relinearisation keys ``relin_keys``: every key the
    coordinator loads.

    Both serialisations are deterministic (the same bytes after load → save,
    tests/protocol/test_keys.py), so a participant hashes the relinearisation
    keys as stored in its participant.ctx and the coordinator the ones it
    loaded.
    """
    h = hashlib.sha256()
    h.update(param_set_id.encode() + b"\0")
    for part in (_save_bytes(ctx.public_key().data), relin_keys):
        h.update(_LENGTH.pack(len(part)))
        h.update(part)
    return h.hexdigest()


def secret_key_bytes(ctx: ts.Context) -> bytes:
    """SEAL's serialisation of the secret key (participants only: MAC key)."""
    return _save_bytes(ctx.secret_key().data)


def serialize_secret(ctx: ts.Context, relin_keys: bytes) -> bytes:
    """Bytes of participant.ctx: :data:`PARTICIPANT_MAGIC`, the length of the
    TenSEAL context with the secret key (without relinearisation keys: TenSEAL
    regenerates them at random when it loads a secret context), that context,
    then ``relin_keys``, the evaluation context's relinearisation keys, and a
    SHA-256 of all that: the fingerprint covers the public keys, the checksum
    the secret key (a damaged one would decrypt garbage, or tag the final θ
    with a MAC key no other participant shares)."""
    body = ctx.serialize(save_secret_key=True, save_relin_keys=False)
    data = PARTICIPANT_MAGIC + _LENGTH.pack(len(body)) + body + relin_keys
    return data + hashlib.sha256(data).digest()


def serialize_public(ctx: ts.Context, relin_keys: bytes) -> bytes:
    """Bytes of the evaluation context: ``ctx``'s public key and the
    relinearisation keys ``relin_keys`` (the ones participant.ctx stores)."""
    pub = ctx.copy()
    if not pub.has_relin_keys():  # a participant's context loads without them
        pub.generate_relin_keys()  # a slot the stored keys are loaded into
    try:
        _load_bytes(pub.relin_keys().data, pub.seal_context().data, relin_keys)
    except Exception as exc:  # SEAL raises bare ValueError/RuntimeError
        raise KeyMaterialError(f"stored relinearisation keys unusable: {exc}") from exc
    pub.make_context_public()
    return _public_bytes(pub)


def _public_bytes(ctx: ts.Context) -> bytes:
    return ctx.serialize(
        save_public_key=True, save_relin_keys=True, save_galois_keys=False
    )


@dataclass(frozen=True)
class SecretContext:
    """A loaded participant.ctx: the TenSEAL context with the secret key (and
    no relinearisation keys) and the stored relinearisation keys' bytes."""

    ctx: ts.Context
    relin_keys: bytes


def load_secret_context(data: bytes) -> SecretContext:
    """Load a participant context; it must hold the secret key.

    Relinearisation keys stay bytes: participants only encrypt and decrypt
    (generating them cost ~35 ms per message in deployment, where every
    message is a fresh process); they are hashed into the fingerprint and
    copied into the evaluation context (:func:`serialize_public`).
    """
    if not data.startswith(PARTICIPANT_MAGIC):
        raise KeyMaterialError(
            "participant context is not a protocol-4 key file (it must start with "
            f"{PARTICIPANT_MAGIC!r} and store the relinearisation keys); "
            "provision a new key with hedrl-keygen"
        )
    at = len(PARTICIPANT_MAGIC)
    if len(data) < at + _LENGTH.size + _CHECKSUM_BYTES:
        raise KeyMaterialError(f"participant context truncated at {len(data)} bytes")
    data, checksum = data[:-_CHECKSUM_BYTES], data[-_CHECKSUM_BYTES:]
    if hashlib.sha256(data).digest() != checksum:
        raise KeyMaterialError(
            "participant context damaged (its checksum does not match): restore "
            "it from the provisioned bundle"
        )
    (n,) = _LENGTH.unpack_from(data, at)
    at += _LENGTH.size
    body, relin_keys = data[at : at + n], data[at + n :]
    if len(body) != n or not relin_keys:
        raise KeyMaterialError(
            f"participant context: a {n}-byte TenSEAL context and relinearisation "
            f"keys expected, {len(data) - at} bytes follow the length"
        )
    check_record(body, None, secret=True)
    try:
        ctx = ts.context_from(body)
    except Exception as exc:  # TenSEAL raises bare ValueError/RuntimeError
        raise KeyMaterialError(f"not a TenSEAL context: {exc}") from exc
    if not ctx.is_private():
        raise KeyMaterialError("participant context holds no secret key")
    return SecretContext(ctx, relin_keys)


def check_params(ctx: ts.Context, params: ParamSet) -> None:
    """Raise KeyMaterialError unless ``ctx`` was made for parameter set ``params``."""
    parms = ctx.seal_context().data.key_context_data().parms()
    degree = int(parms.poly_modulus_degree())
    bits = tuple(int(m.bit_count()) for m in parms.coeff_modulus())
    if (degree, bits) != (params.poly_modulus_degree, params.coeff_mod_bit_sizes):
        raise KeyMaterialError(
            f"key has N={degree} and primes of {bits} bits; parameter set "
            f"{params.id!r} has N={params.poly_modulus_degree} and "
            f"{params.coeff_mod_bit_sizes}"
        )


def load_public_context(data: bytes, params: ParamSet) -> ts.Context:
    """Load an evaluation context for ``params``; refuse one that holds a secret
    key, lacks relinearisation keys, differs from the parameter set, or is not
    exactly what :func:`serialize_public` writes for the keys it holds (so that
    every byte of it is covered by the fingerprint)."""
    if data.startswith(PARTICIPANT_MAGIC):
        raise SecretKeyRefused(
            "evaluation context is a participant.ctx, which holds a secret key; the "
            "coordinator only accepts a public context (coordinator.ctx)"
        )
    check_record(data, params, secret=False)
    try:
        ctx = ts.context_from(data)
    except Exception as exc:
        raise KeyMaterialError(f"not a TenSEAL context: {exc}") from exc
    if ctx.is_private() or ctx.has_secret_key():  # the record check says no
        raise SecretKeyRefused("evaluation context holds a secret key")
    if not ctx.has_relin_keys() or ctx.has_galois_keys():
        raise KeyMaterialError(
            "evaluation context: relinearisation keys and no Galois keys expected"
        )
    _check_parameters(ctx, params)
    try:
        again = _public_bytes(ctx)
    except Exception as exc:
        raise KeyMaterialError(f"evaluation context unusable: {exc}") from exc
    if again != data:
        raise KeyMaterialError(
            f"evaluation context of {len(data)} bytes is not in canonical form "
            f"(it serialises back to {len(again)} different bytes): corrupted, "
            "or not written by hedrl"
        )
    return ctx


def _check_parameters(ctx: ts.Context, params: ParamSet) -> None:
    """The loaded context's CKKS parameters are those of ``params``."""
    try:  # TenSEAL raises bare ValueError for a field it did not load
        parms = ctx.seal_context().data.key_context_data().parms()
        got = {
            "scheme": parms.scheme().name,
            "poly_modulus_degree": parms.poly_modulus_degree(),
            "coeff_modulus": [m.value() for m in parms.coeff_modulus()],
        }
    except Exception as exc:
        raise KeyMaterialError(f"evaluation context incomplete: {exc}") from exc
    primes = sealapi.CoeffModulus.Create(
        params.poly_modulus_degree, list(params.coeff_mod_bit_sizes)
    )
    want = {
        "scheme": "CKKS",
        "poly_modulus_degree": params.poly_modulus_degree,
        "coeff_modulus": [m.value() for m in primes],
    }
    for name, expected in want.items():
        if got[name] != expected:
            raise KeyMaterialError(
                f"evaluation context {name} {got[name]}, expected {expected} "
                f"(parameter set {params.id!r})"
            )
