"""The only module that imports TenSEAL: contexts, keys and the CKKS backend.

Wire chunks are SEAL's own ciphertext serialisations, one per slot-chunk.
Participants encrypt with *seeded symmetric* encryption through
``tenseal.sealapi`` (half the bytes of TenSEAL's public-key ciphertexts,
docs/design.md#tenseal-facts); the coordinator loads those bytes as SEAL
ciphertexts under its public context and evaluates on them with ``sealapi``.

Every chunk a peer sends passes two checks before it is used
(docs/threat-model.md, "What participants do"): its SEAL header is read here
before SEAL parses anything (:func:`check_seal_header`), and the parsed
ciphertext must be exactly what hedrl sends at the expected level
(:meth:`CkksBackend.check`) — on the coordinator before it computes with it,
on a participant before it decrypts.

Key files: ``coordinator.ctx`` is TenSEAL's serialisation of the evaluation
context (public and relinearisation keys); ``participant.ctx`` holds the
TenSEAL context with the secret key plus SEAL's serialisation of the
relinearisation keys in ``coordinator.ctx`` (:func:`serialize_secret`), so that
both sides hash the same keys into the fingerprint (:func:`fingerprint`).
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from protocol.backend import Backend, Ct
from protocol.errors import CiphertextError, KeyMaterialError, SecretKeyRefused
from protocol.params import ParamSet
from protocol.seal_format import (
    SEAL_HEADER,
    check_record,
    check_seal_header,
    describe_scale,
    hex_id,
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


class CkksBackend(Backend):
    """CKKS on ``tenseal.sealapi`` ciphertexts, one per chunk of ``slots`` values.

    The circuit works on SEAL ciphertexts directly (not TenSEAL's
    ``CKKSVector``): modulus switching needs no serialise/parse round trip, and
    chunks below the top level are saved in a fraction of a millisecond
    (TenSEAL's vector serialisation took ~6 ms per chunk, measured). Products are
    relinearised and rescaled, and the scale is reset to the nominal Δ after
    each rescale like TenSEAL does; the resulting bias Δ/q_l is what
    :meth:`rescale_bias` reports and the circuit folds into its scalars. So every
    ciphertext hedrl produces — fresh encryptions, the circuit's outputs, masked
    state — has scale exactly Δ, which :meth:`check` requires of every chunk.

    ``relin_keys`` (participants): the stored relinearisation keys of the
    evaluation context, as bytes (:class:`SecretContext`).
    """

    name = "ckks"

    def __init__(
        self, params: ParamSet, ctx: ts.Context, relin_keys: bytes | None = None
    ) -> None:
        super().__init__(params)
        self.ctx = ctx
        self.relin_key_bytes = relin_keys
        seal_ctx = ctx.seal_context().data
        self._seal_ctx = seal_ctx
        self._evaluator = sealapi.Evaluator(seal_ctx)
        self._encoder = sealapi.CKKSEncoder(seal_ctx)
        self._relin_keys = ctx.relin_keys().data if ctx.has_relin_keys() else None
        primes = [
            m.value()
            for m in sealapi.CoeffModulus.Create(
                params.poly_modulus_degree, list(params.coeff_mod_bit_sizes)
            )
        ][:-1]  # the last prime is the special (key-switching) one
        self._primes = primes
        self._parms_by_level: dict[int, Any] = {}
        cd = seal_ctx.first_context_data()
        while cd is not None:
            self._parms_by_level[cd.chain_index()] = cd.parms_id()
            cd = cd.next_context_data()
        self._encryptor: Any = None
        self._decryptor: Any = None

    # ---- bookkeeping ----------------------------------------------------
    def rescale_bias(self, level: int) -> float:
        return self.params.scale / self._primes[level]

    @staticmethod
    def _level_of(ct: Any) -> int:
        return int(ct.coeff_modulus_size()) - 1

    def _at(self, a: Ct, level: int) -> Any:
        """``a``'s ciphertext at ``level`` (a modulus-switched copy if higher)."""
        if a.level == level:
            return a.data
        out = sealapi.Ciphertext()
        self._evaluator.mod_switch_to(a.data, self._parms_by_level[level], out)
        return out

    def _plain(self, value: Any, level: int) -> Any:
        pt = sealapi.Plaintext()
        self._encoder.encode(value, self._parms_by_level[level], self.params.scale, pt)
        return pt

    def _rescaled(self, ct: Any) -> Any:
        self._evaluator.rescale_to_next_inplace(ct)
        ct.scale = self.params.scale  # the bias Δ/q_l is tracked as a factor
        return ct

    # ---- arithmetic ------------------------------------------------------
    def _mul(self, a: Ct, b: Ct) -> Any:
        if self._relin_keys is None:
            raise KeyMaterialError("products need relinearisation keys")
        lvl = min(a.level, b.level)
        out = sealapi.Ciphertext()
        if a is b:
            self._evaluator.square(a.data, out)
        else:
            self._evaluator.multiply(self._at(a, lvl), self._at(b, lvl), out)
        self._evaluator.relinearize_inplace(out, self._relin_keys)
        return self._rescaled(out)

    def _mul_scalar(self, a: Ct, c: float) -> Any:
        out = sealapi.Ciphertext()
        self._evaluator.multiply_plain(a.data, self._plain(float(c), a.level), out)
        return self._rescaled(out)

    def _add(self, a: Ct, b: Ct) -> Any:
        lvl = min(a.level, b.level)
        out = sealapi.Ciphertext()
        self._evaluator.add(self._at(a, lvl), self._at(b, lvl), out)
        return out

    def _sub(self, a: Ct, b: Ct) -> Any:
        lvl = min(a.level, b.level)
        out = sealapi.Ciphertext()
        self._evaluator.sub(self._at(a, lvl), self._at(b, lvl), out)
        return out

    def _add_plain(self, a: Ct, values: np.ndarray) -> Any:
        out = sealapi.Ciphertext()
        pt = self._plain(np.asarray(values, dtype=np.float64).tolist(), a.level)
        self._evaluator.add_plain(a.data, pt, out)
        return out

    def _neg(self, a: Ct) -> Any:
        out = sealapi.Ciphertext()
        self._evaluator.negate(a.data, out)
        return out

    def _add_const(self, a: Ct, c: float) -> Any:
        out = sealapi.Ciphertext()
        self._evaluator.add_plain(a.data, self._plain(float(c), a.level), out)
        return out

    def _to_level(self, a: Ct, level: int) -> Any:
        return self._at(a, level)

    # ---- serialisation and the checks of every received chunk ---------------
    def _parse(self, chunk: bytes) -> Any:
        """A SEAL ciphertext from its serialisation (header checked first)."""
        _check_seal_header(chunk[: SEAL_HEADER.size], len(chunk))
        fd, path = tempfile.mkstemp(dir=_TMP_DIR, prefix="hedrl-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(chunk)
            return self._parse_file(path, len(chunk))
        finally:
            os.unlink(path)

    def _parse_file(self, path: str, size: int) -> Any:
        ct = sealapi.Ciphertext()
        try:
            ct.load(self._seal_ctx, path)
        except Exception as exc:  # SEAL raises bare ValueError/RuntimeError
            raise CiphertextError(
                f"chunk of {size} bytes is not a ciphertext of parameter set "
                f"{self.params.id!r}: {exc}"
            ) from exc
        return ct

    def load(self, chunk: bytes, *, level: int) -> Ct:
        return self.check(self._parse(chunk), level)

    def load_file(self, path: str | os.PathLike[str], *, level: int) -> Ct:
        # SEAL reads the file itself: no copy through Python and a temporary file
        path = os.fspath(path)
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                head = fh.read(SEAL_HEADER.size)
        except OSError as exc:
            raise CiphertextError(
                f"chunk of no bytes is not a ciphertext: {exc}"
            ) from exc
        _check_seal_header(head, size)
        return self.check(self._parse_file(path, size), level)

    def check(self, ct: Any, level: int) -> Ct:
        """``ct`` as a chunk at ``level``, or :class:`CiphertextError` naming the
        field that differs from what hedrl sends: polynomial degree, level
        (coefficient moduli), parms_id of that level, size 2, NTT form, and a
        scale of exactly Δ (finite; a product's true scale Δ²/q is refused)."""
        n, want_n = ct.poly_modulus_degree(), self.params.poly_modulus_degree
        if n != want_n:
            raise CiphertextError(
                f"ciphertext polynomial degree {n}, expected {want_n}"
            )
        got = self._level_of(ct)
        if got != level:
            raise CiphertextError(f"ciphertext at level {got}, expected level {level}")
        want_id = self._parms_by_level.get(level)
        if want_id is None or list(ct.parms_id()) != list(want_id):
            raise CiphertextError(
                f"ciphertext parms_id {hex_id(ct.parms_id())}, expected "
                f"{'none' if want_id is None else hex_id(want_id)} (level {level})"
            )
        if ct.size() != 2:
            raise CiphertextError(f"ciphertext of size {ct.size()}, expected 2")
        if not ct.is_ntt_form():
            raise CiphertextError("ciphertext not in NTT form, expected NTT form")
        scale = ct.scale
        if scale != self.params.scale:  # also NaN
            raise CiphertextError(
                f"ciphertext scale {describe_scale(scale, self.params.scale)}, "
                f"expected 2^{self.params.scale_bits}"
            )
        return Ct(ct, level)

    def dump(self, a: Ct) -> bytes:
        if abs(a.factor - 1.0) > 1e-12:
            raise ValueError(f"refusing to serialise a chunk with factor {a.factor}")
        return _save_bytes(a.data)

    def dump_file(self, a: Ct, path: str | os.PathLike[str]) -> None:
        if abs(a.factor - 1.0) > 1e-12:
            raise ValueError(f"refusing to serialise a chunk with factor {a.factor}")
        a.data.save(os.fspath(path))

    # ---- participant side --------------------------------------------------
    def _need_secret(self) -> None:
        if not self.ctx.is_private():
            raise KeyMaterialError(
                "encrypting and decrypting need the participant's context"
            )

    def encrypt(self, values: np.ndarray, level: int | None = None) -> bytes:
        if self._encryptor is None:
            self._need_secret()
            self._encryptor = sealapi.Encryptor(
                self._seal_ctx, self.ctx.secret_key().data
            )
        pt = sealapi.Plaintext()
        lvl = self.top_level if level is None else level
        self._encoder.encode(
            np.asarray(values, dtype=np.float64).tolist(),
            self._parms_by_level[lvl],
            self.params.scale,
            pt,
        )
        return _save_bytes(self._encryptor.encrypt_symmetric(pt))

    def decrypt_ct(self, a: Ct) -> np.ndarray:
        """Decrypt a handle (participant side and tests); the factor is removed."""
        if self._decryptor is None:
            self._need_secret()
            self._decryptor = sealapi.Decryptor(
                self._seal_ctx, self.ctx.secret_key().data
            )
        pt = sealapi.Plaintext()
        self._decryptor.decrypt(a.data, pt)
        values = np.asarray(self._encoder.decode_double(pt), dtype=np.float64)
        return values / a.factor

    def decrypt(self, chunk: bytes, *, level: int) -> np.ndarray:
        self._need_secret()
        return self.decrypt_ct(self.load(chunk, level=level))
