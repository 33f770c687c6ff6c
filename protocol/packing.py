"""Flat, slot-aligned packing of the whole parameter vector.

All layers are concatenated and cut into chunks of ``slots`` values, the last
one zero-padded (one ciphertext per layer would waste one per bias vector).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

import numpy as np

from protocol.errors import UpdateRejected


def n_chunks(size: int, slots: int) -> int:
    """Number of slot-chunks needed for ``size`` values."""
    return max(1, -(-size // slots))


def pack(flat: np.ndarray, slots: int) -> list[np.ndarray]:
    """Cut ``flat`` into zero-padded chunks of ``slots`` float64 values."""
    flat = np.asarray(flat, dtype=np.float64).ravel()
    out = np.zeros(n_chunks(flat.size, slots) * slots)
    out[: flat.size] = flat
    return list(out.reshape(-1, slots))


def unpack(chunks: Iterable[np.ndarray], size: int) -> np.ndarray:
    """Inverse of :func:`pack`: concatenate and drop the padding."""
    flat = np.concatenate([np.asarray(c, dtype=np.float64) for c in chunks])
    if flat.size < size:
        raise UpdateRejected(f"unpack: {flat.size} values for a vector of {size}")
    return flat[:size]


def layout_digest(entries: Iterable[tuple[str, tuple[int, ...]]]) -> str:
    """SHA-256 hex over the ordered (name, shape) list of a parameter layout."""
    canon = json.dumps([[n, list(s)] for n, s in entries], separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()
