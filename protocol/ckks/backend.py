"""The CKKS backend: SEAL ciphertexts through ``tenseal.sealapi``.

Wire chunks are SEAL's own ciphertext serialisations, one per slot-chunk.
Participants encrypt with *seeded symmetric* encryption (half the bytes of
TenSEAL's public-key ciphertexts, docs/design.md#tenseal-facts); the
coordinator loads those bytes as SEAL ciphertexts under its public context and
evaluates on them. Every chunk a peer sends passes two checks before it is
used (docs/threat-model.md, "What participants do"): its SEAL header is read
before SEAL parses anything, and the parsed ciphertext must be exactly what
hedrl sends at the expected level (:meth:`CkksBackend.check`) — on the
coordinator before it computes with it, on a participant before it decrypts.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from protocol.backend import Backend, Ct
from protocol.ckks.context import _TMP_DIR, _check_seal_header, _save_bytes
from protocol.errors import CiphertextError, KeyMaterialError
from protocol.params import ParamSet
from protocol.seal_format import SEAL_HEADER, describe_scale, hex_id


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
