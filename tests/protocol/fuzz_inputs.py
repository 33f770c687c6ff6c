"""Structured fuzz inputs: what a peer can send in place of one vector.

Each category mutates one layer of a valid vector (a top-level gradient or a
bottom-level θ of one chunk) as tests/protocol/test_fuzz_receive.py drives it
through both receiving paths:

- ``header``: the VectorHeader protobuf bytes (field values, bit flips,
  truncations, extensions, duplicated fields, oversize);
- ``header-record``: the ConfigRecord holding the header (missing, other key,
  other value types);
- ``lengths``, ``data``: the chunk-length table and the data array (counts and
  lengths off by one, other dtypes and stypes, missing or extra arrays);
- ``seal-header``: SEAL's 16-byte header of the chunk (magic, header size,
  version, compr_mode, reserved, size);
- ``fields``: the ciphertext's members, re-encoded uncompressed or as stored
  zstd blocks (parms_id, is_ntt_form, size, degree, modulus count, scale —
  NaN, ±inf, 0, subnormal, Δ(1±ε) —, correction factor, array header and count,
  coefficients at or above their modulus);
- ``seeded``: the seeded form (first polynomial plus a PRNG seed record), its
  seed record mutated;
- ``cut``: truncations and extensions at every member boundary, re-framed so
  that the SEAL header's size is right (and the raw chunk cut as sent);
- ``zstd``: the compressed stream of a real chunk (bit flips, truncated or
  extended frames, RLE blocks expanding far beyond a chunk, huge windows,
  reserved block types, extra and skippable frames).

An input is either a chunk (also sent wrapped in a valid record) or a whole
record; inputs are a pure function of (seed, index).
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from protocol.records import HDR_SUFFIX, write_vector
from protocol.wire import MAX_CHUNK_BYTES, MAX_HEADER_BYTES, make_header
from tests.seal_bytes import (
    COMPR_NONE,
    COMPR_ZSTD,
    MEMBERS,
    SEAL_VERSION,
    ZSTD_MAGIC,
    SealCiphertext,
    seal_array,
    seal_header,
    seal_serialise,
    zstd_block,
    zstd_frame,
)

KEY = "vec"
SEAL_HEADER_FIELDS = ("magic", "header_size", "version", "compr", "reserved", "size")
#: offsets of the members in an uncompressed serialisation (after SEAL's header)
BOUNDARIES = (0, 32, 33, 41, 49, 57, 65, 73, 89, 97)


@dataclasses.dataclass
class Base:
    """A valid vector to mutate: its chunk, its fields, what a receiver expects."""

    name: str
    chunk: bytes
    fields: SealCiphertext
    expect: Any
    other_parms: tuple[int, int, int, int]  # another level's parms_id
    primes: list[int]  # the moduli of its level


@dataclasses.dataclass
class Input:
    """One fuzz input: a chunk, or a whole record holding vector :data:`KEY`."""

    category: str
    base: Base
    chunk: bytes | None = None
    record: RecordDict | None = None

    def as_record(self) -> RecordDict:
        if self.record is not None:
            return self.record
        assert self.chunk is not None
        return _record(self.base, [self.chunk])


def _record(base: Base, chunks: list[bytes], header: Any = None) -> RecordDict:
    rd = RecordDict()
    hdr = (
        header
        if header is not None
        else make_header(base.expect, value_count=base.fields.degree // 2, round_=1)
    )
    write_vector(rd, KEY, hdr, chunks)
    return rd


def _pick(rng: np.random.Generator, options: list[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _bytes(rng: np.random.Generator, n: int) -> bytes:
    return rng.integers(0, 256, n, dtype=np.uint8).tobytes()


def _flip(rng: np.random.Generator, data: bytes, lo: int = 0, hi: int = 0) -> bytes:
    out = bytearray(data)
    pos = int(rng.integers(lo, hi or len(out)))
    out[pos] ^= 1 << int(rng.integers(8))
    return bytes(out)


# ---- record layers -------------------------------------------------------------
def header(rng: np.random.Generator, base: Base) -> Input:
    hdr = make_header(base.expect, value_count=base.fields.degree // 2, round_=1)
    raw = hdr.SerializeToString()
    how = int(rng.integers(7))
    if how == 0:  # one field off
        field = _pick(rng, [f.name for f in hdr.DESCRIPTOR.fields])
        value = getattr(hdr, field)
        if isinstance(value, str):
            setattr(hdr, field, _pick(rng, ["", value + "x", value[:-1], "\x00"]))
        else:
            setattr(hdr, field, max(0, value + _pick(rng, [-1, 1, 2**31])))
        raw = hdr.SerializeToString()
    elif how == 1:
        raw = _flip(rng, raw)
    elif how == 2:
        raw = raw[: int(rng.integers(len(raw)))]
    elif how == 3:
        raw = raw + _bytes(rng, int(rng.integers(1, 40)))
    elif how == 4:  # a field repeated (protobuf: the last one counts)
        raw = raw + raw[: int(rng.integers(1, len(raw)))]
    elif how == 5:
        raw = _bytes(rng, int(rng.integers(0, 200)))
    else:
        raw = raw + b"\x0a" + b"\xff" * (MAX_HEADER_BYTES // 2)
    rd = _record(base, [base.chunk])
    rd[KEY + HDR_SUFFIX] = ConfigRecord({"header": raw})
    return Input("header", base, record=rd)


def header_record(rng: np.random.Generator, base: Base) -> Input:
    rd = _record(base, [base.chunk])
    raw = rd[KEY + HDR_SUFFIX]["header"]
    value = _pick(
        rng,
        [1, "text", 1.5, True, [raw], [1, 2], raw.decode("latin-1"), b"", None],
    )
    if value is None:
        del rd[KEY + HDR_SUFFIX]
    elif rng.integers(2):
        rd[KEY + HDR_SUFFIX] = ConfigRecord({"header": value})
    elif rng.integers(2):
        rd[KEY + HDR_SUFFIX] = ConfigRecord({"other": raw})
    else:
        rd[KEY + HDR_SUFFIX] = MetricRecord({"header": 1})
    return Input("header-record", base, record=rd)


def _arrays(lengths: Any, data: Any, extra: dict[str, Array] | None = None) -> Any:
    arrays = {"lengths": lengths, "data": data, **(extra or {})}
    return ArrayRecord({k: v for k, v in arrays.items() if v is not None})


def _raw_array(data: bytes, dtype: str = "uint8", stype: str = "raw") -> Array:
    return Array(dtype=dtype, shape=(len(data),), stype=stype, data=data)


def lengths(rng: np.random.Generator, base: Base) -> Input:
    two = rng.integers(2) == 1  # a two-chunk vector (header says so)
    chunks = [base.chunk, base.chunk] if two else [base.chunk]
    hdr = make_header(
        dataclasses.replace(base.expect, chunk_count=len(chunks)),
        value_count=base.fields.degree // 2,
        round_=1,
    )
    rd = _record(base, chunks, hdr)
    table = [len(c) for c in chunks]
    how = int(rng.integers(7))
    if how == 0:  # one length off (by one, or moved between chunks)
        i = int(rng.integers(len(table)))
        delta = int(_pick(rng, [-1, 1, -17, 16]))
        table[i] += delta
        if two and rng.integers(2):
            table[1 - i] -= delta
    elif how == 1:  # one entry too many or too few
        table = table + [0] if rng.integers(2) else table[:-1]
    elif how == 2:
        table[0] = int(_pick(rng, [0, MAX_CHUNK_BYTES + 1, 2**32 - 1]))
    raw = np.array([max(0, min(t, 2**32 - 1)) for t in table], "<u4").tobytes()
    data = b"".join(chunks)
    if how == 3:  # not a whole number of uint32
        raw = raw + b"\x00"
    lengths_arr = _raw_array(raw, "uint32")
    if how == 4:
        lengths_arr = _raw_array(raw, _pick(rng, ["uint8", "int64", "float32"]))
    elif how == 5:
        lengths_arr = None
    elif how == 6:
        lengths_arr = _raw_array(raw, "uint32", "numpy.ndarray")
    rd[KEY] = _arrays(lengths_arr, _raw_array(data))
    return Input("lengths", base, record=rd)


def data(rng: np.random.Generator, base: Base) -> Input:
    rd = _record(base, [base.chunk])
    raw_lengths = np.array([len(base.chunk)], "<u4").tobytes()
    how = int(rng.integers(5))
    payload = base.chunk
    extra = None
    if how == 0:
        payload = payload[: int(rng.integers(len(payload)))]
    elif how == 1:
        payload = payload + _bytes(rng, int(rng.integers(1, 64)))
    data_arr: Array | None = _raw_array(payload)
    if how == 2:
        data_arr = _raw_array(payload, _pick(rng, ["uint32", "float64", "int8"]))
    elif how == 3:
        data_arr = None
    elif how == 4:
        extra = {"more": _raw_array(b"\x00" * 8)}
    rd[KEY] = _arrays(_raw_array(raw_lengths, "uint32"), data_arr, extra)
    return Input("data", base, record=rd)


# ---- the chunk -------------------------------------------------------------------
def seal_header_field(rng: np.random.Generator, base: Base) -> Input:
    good = dict(
        zip(
            SEAL_HEADER_FIELDS,
            (0xA15E, 16, SEAL_VERSION, COMPR_ZSTD, 0, len(base.chunk)),
            strict=True,
        )
    )
    field = _pick(rng, list(SEAL_HEADER_FIELDS))
    value = {
        "magic": _pick(rng, [0, 0x5EA1, 0xA15F, int(rng.integers(2**16))]),
        "header_size": _pick(rng, [0, 15, 17, 255]),
        "version": _pick(rng, [(3, 6), (4, 0), (SEAL_VERSION[0], 99), (255, 255)]),
        "compr": _pick(rng, [COMPR_NONE, 1, 3, 255]),
        "reserved": _pick(rng, [1, 0xFFFF]),
        "size": _pick(rng, [0, 15, 16, len(base.chunk) - 1, len(base.chunk) + 1]),
    }[field]
    good[field] = value
    args = {k: v for k, v in good.items() if k not in ("size", "compr")}
    chunk = seal_header(good["size"], good["compr"], **args) + base.chunk[16:]
    return Input("seal-header", base, chunk=chunk)


SCALES = [
    float("nan"),
    float("inf"),
    -float("inf"),
    0.0,
    -0.0,
    5e-324,
    2.0**-1030,
    np.nextafter(2.0**35, 0.0),
    np.nextafter(2.0**35, np.inf),
    2.0**35 * (1 + 1e-9),
    2.0**70,
    1.7976931348623157e308,
    -(2.0**35),
]


def fields(rng: np.random.Generator, base: Base) -> Input:
    f = base.fields
    field = _pick(
        rng,
        [
            "parms_id",
            "ntt",
            "size",
            "degree",
            "moduli",
            "scale",
            "correction",
            "coeffs",
            "count",
            "array",
        ],
    )
    compr = _pick(rng, [COMPR_NONE, COMPR_ZSTD])
    big = [0, 1, 2**31, 2**63, 2**64 - 1]
    if field == "parms_id":
        pid = _pick(
            rng,
            [
                base.other_parms,
                (0, 0, 0, 0),
                tuple(int(x) for x in rng.integers(0, 2**63, 4)),
            ],
        )
        return Input("fields", base, chunk=f.replace(parms_id=pid).chunk(compr))
    if field in ("ntt", "correction"):
        value = _pick(rng, [0, 2, 255] if field == "ntt" else [0, 2, *big])
        return Input("fields", base, chunk=f.replace(**{field: value}).chunk(compr))
    if field in ("size", "degree", "moduli"):
        v = getattr(f, field)
        value = _pick(rng, [v - 1, v + 1, 2 * v, *big])
        return Input("fields", base, chunk=f.replace(**{field: value}).chunk(compr))
    if field == "scale":
        return Input(
            "fields", base, chunk=f.replace(scale=_pick(rng, SCALES)).chunk(compr)
        )
    coeffs = f.coeffs.copy()
    if field == "coeffs":  # at or above the modulus of their prime, or random
        i = int(rng.integers(coeffs.size))
        prime = base.primes[(i // f.degree) % len(base.primes)]
        coeffs[i] = _pick(rng, [prime, prime + 1, 2**64 - 1, int(rng.integers(prime))])
        return Input("fields", base, chunk=f.replace(coeffs=coeffs).chunk(compr))
    if field == "count":  # the array's count off, or half (the seeded path)
        count = _pick(
            rng, [coeffs.size - 1, coeffs.size + 1, coeffs.size // 2, 0, 2**40]
        )
        members = f.fields() + seal_array(coeffs, count)
        return Input("fields", base, chunk=seal_serialise(members, compr))
    # the array's own SEAL header
    body = seal_array(coeffs)
    args = _pick(rng, [{"magic": 0}, {"reserved": 7}, {"version": (1, 0)}])
    hsize = _pick(rng, [len(body), len(body) - 8, len(body) + 8])
    members = f.fields() + seal_header(hsize, **args) + body[16:]
    return Input("fields", base, chunk=seal_serialise(members, compr))


def seeded(rng: np.random.Generator, base: Base) -> Input:
    f = base.fields
    half = f.coeffs[: f.coeffs.size // 2]
    info = bytes([1]) + _bytes(rng, 64)  # PRNG type, 64-byte seed
    how = int(rng.integers(6))
    rec = seal_header(16 + len(info)) + info
    if how == 1:
        rec = (
            seal_header(16 + len(info)) + bytes([_pick(rng, [0, 2, 3, 255])]) + info[1:]
        )
    elif how == 2:
        rec = rec[: int(rng.integers(len(rec)))]
    elif how == 3:
        rec = seal_header(16 + len(info) + 8) + info + b"\x00" * 8
    elif how == 4:
        rec = seal_header(_pick(rng, [0, 2**40])) + info
    elif how == 5:
        rec = b""
    members = f.fields() + seal_array(half, f.coeffs.size // 2) + rec
    return Input("seeded", base, chunk=seal_serialise(members, _pick(rng, [0, 2])))


def cut(rng: np.random.Generator, base: Base) -> Input:
    members = base.fields.members()
    ends = [*BOUNDARIES, MEMBERS.size + 16, MEMBERS.size + 24, len(members)]
    at = int(_pick(rng, ends)) + int(_pick(rng, [-1, 0, 1]))
    at = max(0, min(at, len(members)))
    how = int(rng.integers(4))
    if how == 0:  # re-framed: the SEAL header's size fits
        chunk = seal_serialise(members[:at], _pick(rng, [0, 2]))
    elif how == 1:  # something inserted at a boundary
        more = _bytes(rng, int(_pick(rng, [1, 8, 64])))
        chunk = seal_serialise(members[:at] + more + members[at:], _pick(rng, [0, 2]))
    elif how == 2:  # the real chunk cut or extended as it travels
        n = int(_pick(rng, [0, 1, 15, 16, 17, 20, 28, len(base.chunk) - 1]))
        chunk = (
            base.chunk[:n] if rng.integers(2) else base.chunk + _bytes(rng, n % 32 + 1)
        )
    else:  # trailing bytes after the members, re-framed
        chunk = seal_serialise(members + _bytes(rng, int(rng.integers(1, 64))), 2)
    return Input("cut", base, chunk=chunk)


def zstd(rng: np.random.Generator, base: Base) -> Input:
    stream = base.chunk[16:]
    how = int(rng.integers(8))
    if how == 0:  # bit flips anywhere in the compressed stream
        for _ in range(int(rng.integers(1, 4))):
            stream = _flip(rng, stream)
    elif how == 1:  # in the frame header and the first block header
        stream = _flip(rng, stream, 0, min(16, len(stream)))
    elif how == 2:  # RLE blocks expanding to ~16 GB after a valid prefix
        members = base.fields.members()
        rle = zstd_block(1, b"\x00", last=False, size=128 * 1024) * 2000
        blocks = zstd_block(0, members[:4096], last=False) + rle
        stream = zstd_frame(
            members, blocks=blocks + zstd_block(1, b"\x00", last=True, size=1)
        )
    elif how == 3:  # a window of 2^41 bytes and no content size
        stream = ZSTD_MAGIC + bytes([0x00, (31 << 3)]) + stream[9:]
    elif how == 4:  # reserved block type, oversize block
        kind = _pick(rng, [3, 0])
        stream = stream[:9] + zstd_block(kind, b"", last=True, size=2**21 - 1)
    elif how == 5:  # a second frame, or a skippable one first
        if rng.integers(2):
            stream = stream + stream
        else:
            stream = b"\x50\x2a\x4d\x18" + struct.pack("<I", 8) + b"\x00" * 8 + stream
    elif how == 6:  # frame checksum flag set without a checksum
        stream = stream[:4] + bytes([stream[4] | 0x04]) + stream[5:]
    else:  # the frame cut inside
        stream = stream[: int(rng.integers(len(stream)))]
    return Input("zstd", base, chunk=seal_header(16 + len(stream), COMPR_ZSTD) + stream)


CATEGORIES: dict[str, Callable[[np.random.Generator, Base], Input]] = {
    "header": header,
    "header-record": header_record,
    "lengths": lengths,
    "data": data,
    "seal-header": seal_header_field,
    "fields": fields,
    "seeded": seeded,
    "cut": cut,
    "zstd": zstd,
}


def make_input(seed: int, index: int, bases: list[Base]) -> Input:
    """Input ``index`` of the run with ``seed``: categories in turn, bases at
    random, everything else drawn from a generator seeded by (seed, index)."""
    rng = np.random.default_rng([seed, index])
    names = list(CATEGORIES)
    return CATEGORIES[names[index % len(names)]](rng, _pick(rng, bases))
