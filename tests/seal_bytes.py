"""SEAL ciphertext serialisations taken apart and put together (tests only).

What an attacker edits: a chunk is SEAL's 16-byte header (magic 0xA15E, header
size, version major and minor, compression mode, reserved, total size) and then,
compressed (zstd) or not, the ciphertext's members — parms_id (4 × u64),
is_ntt_form (u8), size, polynomial degree, coefficient-modulus count (u64
each), scale (f64), correction factor (u64) — then the coefficients as a SEAL
array (its own 16-byte header, a u64 count, count × u64). A seeded ciphertext
(what participants send) stores only the first polynomial, then the seed as a
SEAL-serialised PRNG description.

:class:`SealCiphertext` holds those fields of a loaded ciphertext in the
unseeded form, :meth:`SealCiphertext.members` writes them back, and
:func:`seal_serialise` wraps members into a chunk, uncompressed or as a zstd
frame of raw (stored) blocks, which SEAL's decompressor reads like any other.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import numpy as np

from protocol.ckks import SEAL_VERSION
from protocol.seal_format import SEAL_HEADER, SEAL_MAGIC

COMPR_NONE, COMPR_ZLIB, COMPR_ZSTD = 0, 1, 2
#: layout of the members before the coefficient array
MEMBERS = struct.Struct("<4QB3QdQ")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_BLOCK = 128 * 1024


def seal_header(
    size: int,
    compr: int = COMPR_NONE,
    *,
    magic: int = SEAL_MAGIC,
    header_size: int = SEAL_HEADER.size,
    version: tuple[int, int] = SEAL_VERSION,
    reserved: int = 0,
) -> bytes:
    """A SEAL header announcing ``size`` bytes in total (header included)."""
    return SEAL_HEADER.pack(magic, header_size, *version, compr, reserved, size)


def zstd_frame(data: bytes, *, blocks: bytes | None = None) -> bytes:
    """A zstd frame declaring ``len(data)`` bytes of content and holding
    ``data`` in raw (stored) blocks, or the given ``blocks`` instead
    (:func:`zstd_block`)."""
    frame = ZSTD_MAGIC + bytes([0xA0]) + struct.pack("<I", len(data))
    if blocks is not None:
        return frame + blocks
    parts = [data[i : i + ZSTD_BLOCK] for i in range(0, len(data), ZSTD_BLOCK)]
    parts = parts or [b""]
    for k, part in enumerate(parts):
        frame += zstd_block(0, part, last=k == len(parts) - 1)
    return frame


def zstd_block(
    kind: int, content: bytes, *, last: bool, size: int | None = None
) -> bytes:
    """One zstd block of ``kind`` 0 (raw: ``content`` itself) or 1 (RLE: the
    one byte ``content`` repeated ``size`` times); ``size`` defaults to
    ``len(content)``."""
    n = len(content) if size is None else size
    head = struct.pack("<I", (n << 3) | (kind << 1) | int(last))[:3]
    return head + content


def seal_serialise(members: bytes, compr: int = COMPR_ZSTD) -> bytes:
    """A chunk: SEAL's header, then ``members`` as they are or in a zstd frame."""
    body = zstd_frame(members) if compr == COMPR_ZSTD else members
    return seal_header(SEAL_HEADER.size + len(body), compr) + body


def seal_array(values: np.ndarray, count: int | None = None) -> bytes:
    """A SEAL-serialised u64 array (uncompressed): header, count, values."""
    data = np.asarray(values, dtype="<u8").tobytes()
    n = len(values) if count is None else count
    return seal_header(SEAL_HEADER.size + 8 + len(data)) + struct.pack("<Q", n) + data


@dataclasses.dataclass
class SealCiphertext:
    """The serialised fields of one ciphertext (unseeded form)."""

    parms_id: tuple[int, int, int, int]
    ntt: int
    size: int
    degree: int
    moduli: int
    scale: float
    correction: int
    coeffs: np.ndarray  # uint64, size · degree · moduli values

    @classmethod
    def of(cls, ct: Any) -> SealCiphertext:
        """The fields of a loaded ``tenseal.sealapi.Ciphertext``."""
        arr = ct.dyn_array()
        coeffs = np.array([arr.at(i) for i in range(arr.size())], dtype=np.uint64)
        return cls(
            tuple(int(w) for w in ct.parms_id()),  # type: ignore[arg-type]
            int(ct.is_ntt_form()),
            int(ct.size()),
            int(ct.poly_modulus_degree()),
            int(ct.coeff_modulus_size()),
            float(ct.scale),
            1,
            coeffs,
        )

    def fields(self) -> bytes:
        """The members before the coefficient array."""
        return MEMBERS.pack(
            *self.parms_id,
            self.ntt,
            self.size,
            self.degree,
            self.moduli,
            self.scale,
            self.correction,
        )

    def members(self) -> bytes:
        """Every member, as SEAL's save writes them before compression."""
        return self.fields() + seal_array(self.coeffs)

    def chunk(self, compr: int = COMPR_ZSTD) -> bytes:
        """The whole chunk."""
        return seal_serialise(self.members(), compr)

    def replace(self, **changes: Any) -> SealCiphertext:
        return dataclasses.replace(self, **changes)
