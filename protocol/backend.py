"""Backends: the arithmetic interface shared by CKKS and its plaintext twin.

The coordinator's circuit and the participants' codec are written once against
:class:`Backend`. :class:`PlainBackend` stores float64 arrays and applies the
same level accounting as CKKS (a product past the depth raises), so a plaintext
run exercises the same code path with exact arithmetic.

Every handle is a :class:`Ct` that carries a known multiplicative ``factor``:
after each rescale TenSEAL resets the scale to the nominal Δ although the true
scale is Δ²/q_l, which multiplies the decoded value by Δ/q_l (≈ 1 + 1e-5 at
35-bit primes, measured). The circuit tracks that factor exactly and folds it
into the public scalars (``scal(..., out_factor=...)``) so that outputs carry
factor 1 (docs/design.md#tenseal-facts).
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocol.errors import CiphertextError, HedrlError
from protocol.params import ParamSet

BACKENDS = ("ckks", "plain")


class DepthExceeded(HedrlError):
    """A product would need a level below the bottom one."""


@dataclass
class Ct:
    """One slot-chunk handle: backend data, its level and its known factor."""

    data: Any
    level: int
    factor: float = 1.0


class Backend(abc.ABC):
    """Arithmetic on slot chunks plus (de)serialisation of chunks."""

    name: str
    #: a key holder's MAC key, derived from its secret key (None on the
    #: coordinator): participants tag the final θ with it
    mac_key: bytes | None = None

    def __init__(self, params: ParamSet) -> None:
        self.params = params
        self.slots = params.slots
        self.top_level = params.depth

    # ---- primitives each backend implements --------------------------------
    @abc.abstractmethod
    def rescale_bias(self, level: int) -> float:
        """Factor a rescale from ``level`` multiplies the decoded value by."""

    @abc.abstractmethod
    def _mul(self, a: Ct, b: Ct) -> Any: ...

    @abc.abstractmethod
    def _mul_scalar(self, a: Ct, c: float) -> Any: ...

    @abc.abstractmethod
    def _add(self, a: Ct, b: Ct) -> Any: ...

    @abc.abstractmethod
    def _sub(self, a: Ct, b: Ct) -> Any: ...

    @abc.abstractmethod
    def _add_plain(self, a: Ct, values: np.ndarray) -> Any: ...

    @abc.abstractmethod
    def _neg(self, a: Ct) -> Any: ...

    @abc.abstractmethod
    def _add_const(self, a: Ct, c: float) -> Any: ...

    @property
    def gradient_factor(self) -> float:
        """Factor participants pre-multiply the gradient term x by.

        In P = q·r + p·p the two products pick up rescale biases that differ by
        one factor b_top (q = (V+c²δ)·r vs p = x·r, squared); sending x·b_top^(−½)
        makes them equal, and every other use of x folds the factor into a scalar.
        """
        return 1.0 / float(np.sqrt(self.rescale_bias(self.top_level)))

    @abc.abstractmethod
    def _to_level(self, a: Ct, level: int) -> Any: ...

    @abc.abstractmethod
    def load(self, chunk: bytes, *, level: int) -> Ct:
        """Parse one chunk, checking it sits at ``level`` (raise CiphertextError)."""

    @abc.abstractmethod
    def dump(self, a: Ct) -> bytes:
        """Serialise one chunk (factor must be 1)."""

    def to_bytes(self, c: Ct | bytes) -> bytes:
        """A chunk's serialisation: :meth:`dump` of a handle, or the chunk itself
        if it is one already (the coordinator keeps θ from its workers so)."""
        return c if isinstance(c, bytes) else self.dump(c)

    def load_file(self, path: str | os.PathLike[str], *, level: int) -> Ct:
        """:meth:`load` of a chunk stored alone in a file."""
        with open(path, "rb") as fh:
            return self.load(fh.read(), level=level)

    def dump_file(self, a: Ct, path: str | os.PathLike[str]) -> None:
        """:meth:`dump` into a file (created or replaced)."""
        data = self.dump(a)
        with open(path, "wb") as fh:
            fh.write(data)

    # participant side; CKKS needs the secret context for these
    @abc.abstractmethod
    def encrypt(self, values: np.ndarray, level: int | None = None) -> bytes:
        """Encrypt one chunk of ``slots`` float values at ``level`` (the top)."""

    @abc.abstractmethod
    def decrypt(self, chunk: bytes, *, level: int) -> np.ndarray:
        """Decrypt one chunk to ``slots`` float64 values after the checks of
        :meth:`load` (it must sit at ``level``; raise CiphertextError)."""

    @abc.abstractmethod
    def decrypt_ct(self, a: Ct) -> np.ndarray:
        """Decrypt a handle that :meth:`load` checked; the factor is removed."""

    # ---- level- and factor-tracking operations -----------------------------
    def mul(self, a: Ct, b: Ct) -> Ct:
        """ct×ct (relinearised and rescaled): one level."""
        lvl = min(a.level, b.level)
        if lvl < 1:
            raise DepthExceeded(f"product at level {lvl}: no level left (depth)")
        bias = self.rescale_bias(lvl)
        return Ct(self._mul(a, b), lvl - 1, a.factor * b.factor * bias)

    def scal(self, a: Ct, c: float, *, out_factor: float = 1.0) -> Ct:
        """ct×scalar: one level; the result carries ``out_factor`` exactly."""
        if a.level < 1:
            raise DepthExceeded(f"scalar product at level {a.level}: no level left")
        coeff = c * out_factor / (a.factor * self.rescale_bias(a.level))
        return Ct(self._mul_scalar(a, coeff), a.level - 1, out_factor)

    def add(self, a: Ct, b: Ct) -> Ct:
        """ct+ct (free); the factor of ``a`` is kept (mismatch ≈ 1e-5 at most)."""
        return Ct(self._add(a, b), min(a.level, b.level), a.factor)

    def sub(self, a: Ct, b: Ct) -> Ct:
        """ct−ct (free)."""
        return Ct(self._sub(a, b), min(a.level, b.level), a.factor)

    def neg(self, a: Ct) -> Ct:
        """−ct (free)."""
        return Ct(self._neg(a), a.level, a.factor)

    def add_scalar(self, a: Ct, c: float) -> Ct:
        """ct + public scalar (free)."""
        return Ct(self._add_const(a, c * a.factor), a.level, a.factor)

    def add_plain(self, a: Ct, values: np.ndarray) -> Ct:
        """ct + public vector (free)."""
        return Ct(self._add_plain(a, values * a.factor), a.level, a.factor)

    def to_level(self, a: Ct, level: int) -> Ct:
        """Modulus-switch down to ``level`` (no noise, no factor change)."""
        if level > a.level:
            raise DepthExceeded(f"cannot switch up from level {a.level} to {level}")
        if level == a.level:
            return a
        return Ct(self._to_level(a, level), level, a.factor)

    def to_bottom(self, a: Ct) -> Ct:
        """Modulus-switch to the last level."""
        return self.to_level(a, 0)


class PlainBackend(Backend):
    """The plaintext twin: float64 arrays, identical level accounting."""

    name = "plain"

    def rescale_bias(self, level: int) -> float:
        return 1.0

    def _mul(self, a: Ct, b: Ct) -> np.ndarray:
        return a.data * b.data

    def _mul_scalar(self, a: Ct, c: float) -> np.ndarray:
        return a.data * c

    def _add(self, a: Ct, b: Ct) -> np.ndarray:
        return a.data + b.data

    def _sub(self, a: Ct, b: Ct) -> np.ndarray:
        return a.data - b.data

    def _add_plain(self, a: Ct, values: np.ndarray) -> np.ndarray:
        return a.data + values

    def _neg(self, a: Ct) -> np.ndarray:
        return -a.data

    def _add_const(self, a: Ct, c: float) -> np.ndarray:
        return a.data + c

    def _to_level(self, a: Ct, level: int) -> np.ndarray:
        return a.data

    def chunk_bytes(self, level: int) -> int:
        """Exact size of a plain chunk: a level byte and ``slots`` float64."""
        return 1 + 8 * self.slots

    def load(self, chunk: bytes, *, level: int) -> Ct:
        if len(chunk) != self.chunk_bytes(level):
            raise CiphertextError(
                f"plain chunk: expected {self.chunk_bytes(level)} bytes, "
                f"received {len(chunk)}"
            )
        if chunk[0] != level:
            raise CiphertextError(
                f"plain chunk: expected level {level}, received level {chunk[0]}"
            )
        data = np.frombuffer(chunk, dtype="<f8", offset=1).copy()
        return Ct(data, level)

    def dump(self, a: Ct) -> bytes:
        return bytes([a.level]) + np.asarray(a.data, dtype="<f8").tobytes()

    def encrypt(self, values: np.ndarray, level: int | None = None) -> bytes:
        lvl = self.top_level if level is None else level
        return self.dump(Ct(np.asarray(values, dtype=np.float64), lvl))

    def decrypt_ct(self, a: Ct) -> np.ndarray:
        return np.asarray(a.data, dtype=np.float64) / a.factor

    def decrypt(self, chunk: bytes, *, level: int) -> np.ndarray:
        return self.load(chunk, level=level).data
