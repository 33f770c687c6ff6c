"""The only module that imports TenSEAL: contexts, keys and the CKKS backend.

Wire chunks are SEAL's own ciphertext serialisations, one per slot-chunk,
encrypted by participants with seeded symmetric encryption through
``tenseal.sealapi`` and evaluated on by the coordinator under its public
context (docs/design.md#tenseal-facts). Every chunk a peer sends has its SEAL
header checked before SEAL parses it and must parse to exactly what hedrl sends
at the expected level (:meth:`CkksBackend.check`), on the coordinator before it
computes, on a participant before it decrypts (docs/threat-model.md).
``coordinator.ctx`` is TenSEAL's serialisation of the evaluation context;
``participant.ctx`` is laid out in :mod:`protocol.keyfile`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from protocol import keyfile
from protocol.backend import Backend, Ct
from protocol.errors import CiphertextError, KeyMaterialError, SecretKeyRefused
from protocol.files import saved_bytes, through_file
from protocol.params import ParamSet
from protocol.seal_format import (
    SEAL_HEADER,
    check_ciphertext,
    check_record,
    check_seal_header,
    read_seal_header,
)

#: the SEAL version this TenSEAL's SEAL writes into its headers
_HEADER = sealapi.Serialization.SEALHeader()
SEAL_VERSION = (_HEADER.version_major, _HEADER.version_minor)


def _check_seal_header(head: bytes, total: int) -> None:
    """:func:`protocol.seal_format.check_seal_header` for this TenSEAL's SEAL."""
    check_seal_header(head, total, SEAL_VERSION)


def _save_bytes(obj: Any) -> bytes:
    """SEAL's serialisation of the sealapi object ``obj``."""
    return saved_bytes(obj.save)


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
    """:func:`protocol.keyfile.fingerprint` of ``ctx``'s public key and
    ``relin_keys``: every key the coordinator loads. SEAL's serialisations are
    deterministic (tests/protocol/test_keys.py), so a participant hashes the
    keys its participant.ctx stores and the coordinator the ones it loaded."""
    public_key = _save_bytes(ctx.public_key().data)
    return keyfile.fingerprint(param_set_id, public_key, relin_keys)


def secret_key_bytes(ctx: ts.Context) -> bytes:
    """SEAL's serialisation of the secret key (participants only: MAC key)."""
    return _save_bytes(ctx.secret_key().data)


def serialize_secret(ctx: ts.Context, relin_keys: bytes) -> bytes:
    """Bytes of participant.ctx (:func:`protocol.keyfile.frame_secret`)."""
    body = ctx.serialize(save_secret_key=True, save_relin_keys=False)
    return keyfile.frame_secret(body, relin_keys)


def serialize_public(ctx: ts.Context, relin_keys: bytes) -> bytes:
    """Bytes of the evaluation context: ``ctx``'s public key and the
    relinearisation keys ``relin_keys`` (the ones participant.ctx stores)."""
    pub = ctx.copy()
    if not pub.has_relin_keys():  # a participant's context loads without them
        pub.generate_relin_keys()  # a slot the stored keys are loaded into
    slot, seal_ctx = pub.relin_keys().data, pub.seal_context().data
    try:
        through_file(relin_keys, lambda path: slot.load(seal_ctx, path))
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
    """Load a participant context; it must hold the secret key. Its
    relinearisation keys stay bytes (participants never multiply): they are
    hashed into the fingerprint and copied into the evaluation context."""
    body, relin_keys = keyfile.unframe_secret(data)
    check_record(body, None, secret=True)
    try:
        ctx = ts.context_from(body)
    except Exception as exc:  # TenSEAL raises bare ValueError/RuntimeError
        raise KeyMaterialError(f"not a TenSEAL context: {exc}") from exc
    if not ctx.is_private():
        raise KeyMaterialError("participant context holds no secret key")
    return SecretContext(ctx, relin_keys)


def check_params(ctx: ts.Context, params: ParamSet) -> None:
    """Raise KeyMaterialError unless ``ctx`` is a CKKS context with the degree
    and coefficient moduli of parameter set ``params``."""
    try:  # TenSEAL raises bare ValueError for a field it did not load
        parms = ctx.seal_context().data.key_context_data().parms()
        scheme, degree = parms.scheme().name, int(parms.poly_modulus_degree())
        primes = [int(m.value()) for m in parms.coeff_modulus()]
    except Exception as exc:
        raise KeyMaterialError(f"context incomplete: {exc}") from exc
    want = [int(m.value()) for m in _coeff_modulus(params)]
    if (scheme, degree, primes) != ("CKKS", params.poly_modulus_degree, want):
        bits = [p.bit_length() for p in primes]
        raise KeyMaterialError(
            f"key is {scheme} with N={degree} and primes of {bits} bits; parameter "
            f"set {params.id!r} is CKKS with N={params.poly_modulus_degree} and "
            f"primes of {list(params.coeff_mod_bit_sizes)} bits"
            + (" (other primes of the same sizes)" if bits == want else "")
        )


def _coeff_modulus(params: ParamSet) -> Any:
    return sealapi.CoeffModulus.Create(
        params.poly_modulus_degree, list(params.coeff_mod_bit_sizes)
    )


def load_public_context(data: bytes, params: ParamSet) -> ts.Context:
    """Load an evaluation context for ``params``; refuse one that holds a secret
    key, lacks relinearisation keys, differs from the parameter set, or is not
    exactly what :func:`serialize_public` writes for the keys it holds (so that
    every byte of it is covered by the fingerprint)."""
    if data.startswith(keyfile.PARTICIPANT_MAGIC):
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
    check_params(ctx, params)
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


class CkksBackend(Backend):
    """CKKS on ``tenseal.sealapi`` ciphertexts, one per chunk of ``slots`` values
    (docs/design.md#tenseal-facts). Products are relinearised and rescaled and
    the scale reset to Δ; the bias Δ/q_l is :meth:`rescale_bias`, folded into
    the circuit's scalars, so every ciphertext hedrl produces has scale exactly
    Δ, which :meth:`check` requires of every chunk. ``relin_keys``
    (participants): the evaluation context's relinearisation keys as bytes."""

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
        # the last prime is the special (key-switching) one
        self._primes = [m.value() for m in _coeff_modulus(params)][:-1]
        self._parms_by_level: dict[int, Any] = {}
        cd = seal_ctx.first_context_data()
        while cd is not None:
            self._parms_by_level[cd.chain_index()] = cd.parms_id()
            cd = cd.next_context_data()
        self._encryptor: Any = None
        self._decryptor: Any = None
        if ctx.is_private():
            secret = ctx.secret_key().data
            self._encryptor = sealapi.Encryptor(seal_ctx, secret)
            self._decryptor = sealapi.Decryptor(seal_ctx, secret)

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

    def _binary(self, op: Callable[[Any, Any, Any], None], a: Ct, b: Ct) -> Any:
        lvl = min(a.level, b.level)
        out = sealapi.Ciphertext()
        op(self._at(a, lvl), self._at(b, lvl), out)
        return out

    def _add(self, a: Ct, b: Ct) -> Any:
        return self._binary(self._evaluator.add, a, b)

    def _sub(self, a: Ct, b: Ct) -> Any:
        return self._binary(self._evaluator.sub, a, b)

    def _add_plain(self, a: Ct, values: np.ndarray) -> Any:
        return self._plus(a, np.asarray(values, dtype=np.float64).tolist())

    def _add_const(self, a: Ct, c: float) -> Any:
        return self._plus(a, float(c))

    def _plus(self, a: Ct, value: Any) -> Any:
        out = sealapi.Ciphertext()
        self._evaluator.add_plain(a.data, self._plain(value, a.level), out)
        return out

    def _neg(self, a: Ct) -> Any:
        out = sealapi.Ciphertext()
        self._evaluator.negate(a.data, out)
        return out

    _to_level = _at

    # ---- serialisation and the checks of every received chunk ---------------
    def _parse(self, chunk: bytes) -> Any:
        """A SEAL ciphertext from its serialisation (header checked first)."""
        _check_seal_header(chunk[: SEAL_HEADER.size], len(chunk))
        return through_file(chunk, lambda path: self._parse_file(path, len(chunk)))

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
        head, size = read_seal_header(path)
        _check_seal_header(head, size)
        return self.check(self._parse_file(path, size), level)

    def check(self, ct: Any, level: int) -> Ct:
        """``ct`` as a chunk at ``level``, or :class:`CiphertextError` naming the
        field that differs from what hedrl sends
        (:func:`protocol.seal_format.check_ciphertext`)."""
        check_ciphertext(
            self.params,
            level,
            self._parms_by_level.get(level),
            degree=ct.poly_modulus_degree(),
            at_level=self._level_of(ct),
            parms_id=ct.parms_id(),
            size=ct.size(),
            ntt=ct.is_ntt_form(),
            scale=ct.scale,
        )
        return Ct(ct, level)

    @staticmethod
    def _unit(a: Ct) -> Any:
        if abs(a.factor - 1.0) > 1e-12:
            raise ValueError(f"refusing to serialise a chunk with factor {a.factor}")
        return a.data

    def dump(self, a: Ct) -> bytes:
        return _save_bytes(self._unit(a))

    def dump_file(self, a: Ct, path: str | os.PathLike[str]) -> None:
        self._unit(a).save(os.fspath(path))

    # ---- participant side --------------------------------------------------
    @staticmethod
    def _secret(tool: Any) -> Any:
        if tool is None:
            raise KeyMaterialError(
                "encrypting and decrypting need the participant's context"
            )
        return tool

    def encrypt(self, values: np.ndarray, level: int | None = None) -> bytes:
        encryptor = self._secret(self._encryptor)
        pt = sealapi.Plaintext()
        lvl = self.top_level if level is None else level
        self._encoder.encode(
            np.asarray(values, dtype=np.float64).tolist(),
            self._parms_by_level[lvl],
            self.params.scale,
            pt,
        )
        return _save_bytes(encryptor.encrypt_symmetric(pt))

    def decrypt_ct(self, a: Ct) -> np.ndarray:
        """Decrypt a handle (participant side and tests); the factor is removed."""
        pt = sealapi.Plaintext()
        self._secret(self._decryptor).decrypt(a.data, pt)
        values = np.asarray(self._encoder.decode_double(pt), dtype=np.float64)
        return values / a.factor

    def decrypt(self, chunk: bytes, *, level: int) -> np.ndarray:
        self._secret(self._decryptor)
        return self.decrypt_ct(self.load(chunk, level=level))
