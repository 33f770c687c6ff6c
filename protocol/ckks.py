"""The only module that imports TenSEAL: contexts, keys and the CKKS backend.

Wire chunks are SEAL's own ciphertext serialisations, one per slot-chunk.
Participants encrypt with *seeded symmetric* encryption through
``tenseal.sealapi`` (half the bytes of TenSEAL's public-key ciphertexts,
ARCHITECTURE §5); the coordinator rebuilds a ``CKKSVector`` under its public
context from those bytes by wrapping them in TenSEAL's ``CKKSVectorProto``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from typing import Any

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from protocol.backend import Backend, Ct
from protocol.errors import CiphertextError, KeyMaterialError, SecretKeyRefused
from protocol.params import ParamSet
from protocol.wire import CKKSVectorProto

_TMP_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None
_lock = threading.Lock()


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


def fingerprint(ctx: ts.Context, param_set_id: str) -> str:
    """SHA-256 over the parameter-set id and the public-key bytes (hex).

    Relinearisation keys are left out: TenSEAL regenerates them when it loads
    a secret context, so they differ between the two sides.
    """
    h = hashlib.sha256()
    h.update(param_set_id.encode() + b"\0")
    h.update(_save_bytes(ctx.public_key().data))
    return h.hexdigest()


def serialize_secret(ctx: ts.Context) -> bytes:
    """Bytes of the full context including the secret key (participants only)."""
    return ctx.serialize(save_secret_key=True, save_relin_keys=False)


def serialize_public(ctx: ts.Context) -> bytes:
    """Bytes of the evaluation context: public + relinearisation keys only."""
    pub = ctx.copy()
    pub.make_context_public()
    return pub.serialize(
        save_public_key=True, save_relin_keys=True, save_galois_keys=False
    )


def load_secret_context(data: bytes) -> ts.Context:
    """Load a participant context; it must hold the secret key."""
    try:
        ctx = ts.context_from(data)
    except Exception as exc:  # TenSEAL raises bare ValueError/RuntimeError
        raise KeyMaterialError(f"not a TenSEAL context: {exc}") from exc
    if not ctx.is_private():
        raise KeyMaterialError("participant context holds no secret key")
    if not ctx.has_relin_keys():
        ctx.generate_relin_keys()
    return ctx


def load_public_context(data: bytes) -> ts.Context:
    """Load an evaluation context; refuse one that holds a secret key."""
    try:
        ctx = ts.context_from(data)
    except Exception as exc:
        raise KeyMaterialError(f"not a TenSEAL context: {exc}") from exc
    if ctx.is_private() or ctx.has_secret_key():
        raise SecretKeyRefused(
            "evaluation context holds a secret key; the coordinator only accepts "
            "a public context (public key + relinearisation keys)"
        )
    if not ctx.has_relin_keys():
        raise KeyMaterialError("evaluation context has no relinearisation keys")
    return ctx


class CkksBackend(Backend):
    """CKKS through TenSEAL; one ``CKKSVector`` of ``slots`` values per chunk."""

    name = "ckks"

    def __init__(self, params: ParamSet, ctx: ts.Context) -> None:
        super().__init__(params)
        self.ctx = ctx
        seal_ctx = ctx.seal_context().data
        self._seal_ctx = seal_ctx
        self._evaluator = sealapi.Evaluator(seal_ctx)
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
        self._encoder: Any = None
        self._encryptor: Any = None

    # ---- bookkeeping ----------------------------------------------------
    def rescale_bias(self, level: int) -> float:
        return self.params.scale / self._primes[level]

    @staticmethod
    def _level_of(vec: ts.CKKSVector) -> int:
        return int(vec.ciphertext()[0].coeff_modulus_size()) - 1

    # ---- arithmetic ------------------------------------------------------
    # TenSEAL mod-switches the right operand *in place* when it sits higher
    # (ARCHITECTURE §5): keep the lower-level operand on the right.
    @staticmethod
    def _ordered(a: Ct, b: Ct) -> tuple[Any, Any]:
        return (b.data, a.data) if b.level > a.level else (a.data, b.data)

    def _mul(self, a: Ct, b: Ct) -> Any:
        x, y = self._ordered(a, b)
        return x * y

    def _mul_scalar(self, a: Ct, c: float) -> Any:
        return a.data * float(c)

    def _add(self, a: Ct, b: Ct) -> Any:
        x, y = self._ordered(a, b)
        return x + y

    def _sub(self, a: Ct, b: Ct) -> Any:
        if b.level > a.level:
            return -b.data + a.data  # the negation is a fresh temporary
        return a.data - b.data

    def _add_plain(self, a: Ct, values: np.ndarray) -> Any:
        return a.data + values.tolist()

    def _neg(self, a: Ct) -> Any:
        return -a.data

    def _add_const(self, a: Ct, c: float) -> Any:
        return a.data + float(c)

    def _to_level(self, a: Ct, level: int) -> Any:
        ct = a.data.ciphertext()[0]
        self._evaluator.mod_switch_to_inplace(ct, self._parms_by_level[level])
        return self._vector_from_seal_bytes(_save_bytes(ct))

    # ---- serialisation ----------------------------------------------------
    def _vector_from_seal_bytes(self, chunk: bytes) -> Any:
        proto = CKKSVectorProto(
            sizes=[self.slots], ciphertexts=[chunk], scale=self.params.scale
        )
        return ts.ckks_vector_from(self.ctx, proto.SerializeToString())

    def load(self, chunk: bytes, *, level: int) -> Ct:
        try:
            vec = self._vector_from_seal_bytes(chunk)
            ct = vec.ciphertext()[0]
        except Exception as exc:
            raise CiphertextError(
                f"chunk of {len(chunk)} bytes is not a ciphertext of parameter set "
                f"{self.params.id!r}: {exc}"
            ) from exc
        got = int(ct.coeff_modulus_size()) - 1
        if got != level:
            raise CiphertextError(f"ciphertext at level {got}, expected level {level}")
        if ct.size() != 2:
            raise CiphertextError(f"ciphertext of size {ct.size()}, expected 2")
        if abs(ct.scale / self.params.scale - 1) > 1e-6:
            raise CiphertextError(
                f"ciphertext scale 2^{np.log2(ct.scale):.7f} "
                f"(x{ct.scale / self.params.scale:.7f} of Δ), "
                f"expected 2^{self.params.scale_bits}"
            )
        return Ct(vec, level)

    def dump(self, a: Ct) -> bytes:
        if abs(a.factor - 1.0) > 1e-12:
            raise ValueError(f"refusing to serialise a chunk with factor {a.factor}")
        proto = CKKSVectorProto()
        proto.ParseFromString(a.data.serialize())
        return bytes(proto.ciphertexts[0])

    # ---- participant side --------------------------------------------------
    def encrypt(self, values: np.ndarray) -> bytes:
        if self._encryptor is None:
            if not self.ctx.is_private():
                raise KeyMaterialError("encrypting needs the participant's context")
            self._encoder = sealapi.CKKSEncoder(self._seal_ctx)
            self._encryptor = sealapi.Encryptor(
                self._seal_ctx, self.ctx.secret_key().data
            )
        pt = sealapi.Plaintext()
        self._encoder.encode(
            np.asarray(values, dtype=np.float64).tolist(), self.params.scale, pt
        )
        return _save_bytes(self._encryptor.encrypt_symmetric(pt))

    def decrypt(self, chunk: bytes) -> np.ndarray:
        try:
            vec = self._vector_from_seal_bytes(chunk)
        except Exception as exc:
            raise CiphertextError(
                f"cannot parse chunk of {len(chunk)} bytes: {exc}"
            ) from exc
        return np.asarray(vec.decrypt(), dtype=np.float64)
