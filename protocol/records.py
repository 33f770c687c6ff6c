"""Vectors in Flower records: header in a ConfigRecord, chunks in one raw Array.

A vector's chunks travel concatenated in one raw ``uint8`` Array (``data``) with
their byte lengths in a second (``lengths``, little-endian uint32), not one
Array per chunk: Flower (1.42) pushes and pulls every Array — and every ≤ 5 MB
piece of a large one — as an object of its own, one request each, and at 1M
parameters the per-object cost of ~2k objects per round dwarfed the per-byte
cost (docs/benchmarks.md). Protocol version 3 on.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from protocol.errors import HeaderMismatch, WireFormatError
from protocol.wire import MAX_CHUNK_BYTES, Expect, check_header, parse_header

HDR_SUFFIX = ".hdr"
DATA, LENGTHS = "data", "lengths"
_LEN = np.dtype("<u4")


def write_vector(rd: RecordDict, key: str, header: Any, chunks: list[bytes]) -> int:
    """Put one vector under ``key``; return the bytes it adds (header, chunk
    lengths and chunks)."""
    if header.chunk_count != len(chunks):
        raise WireFormatError(
            f"{key}: header says {header.chunk_count} chunks, {len(chunks)} given"
        )
    lengths = np.array([len(c) for c in chunks], dtype=_LEN).tobytes()
    data = b"".join(chunks)
    rd[key] = ArrayRecord(
        {
            DATA: Array(dtype="uint8", shape=(len(data),), stype="raw", data=data),
            LENGTHS: Array(
                dtype="uint32", shape=(len(chunks),), stype="raw", data=lengths
            ),
        }
    )
    hdr_bytes = header.SerializeToString()
    rd[key + HDR_SUFFIX] = ConfigRecord({"header": hdr_bytes})
    return len(hdr_bytes) + len(lengths) + len(data)


def read_header(rd: RecordDict, key: str) -> Any:
    """Parse the header stored for ``key`` (no chunk is touched)."""
    cfg = rd.get(key + HDR_SUFFIX)
    if not isinstance(cfg, ConfigRecord) or "header" not in cfg:
        raise WireFormatError(f"{key}: message carries no header record")
    return parse_header(cfg["header"])


def _raw(arr: ArrayRecord, key: str, name: str, dtype: str) -> bytes:
    a = arr.get(name)
    if a is None or a.stype != "raw" or a.dtype != dtype:
        raise WireFormatError(
            f"{key}: '{name}' missing or not a raw {dtype} array "
            f"(a vector is one raw uint8 array of chunks plus their uint32 lengths)"
        )
    return bytes(a.data)


def read_vector(rd: RecordDict, key: str, expect: Expect) -> tuple[Any, list[bytes]]:
    """Check the header of ``key`` against ``expect``, then return its chunks."""
    hdr = read_header(rd, key)
    check_header(hdr, expect)
    arr = rd.get(key)
    if not isinstance(arr, ArrayRecord):
        raise WireFormatError(f"{key}: expected an ArrayRecord of chunks")
    if set(arr.keys()) != {DATA, LENGTHS}:
        raise WireFormatError(
            f"{key}: expected arrays {DATA!r} and {LENGTHS!r}, got {sorted(arr.keys())}"
        )
    raw_lengths = _raw(arr, key, LENGTHS, "uint32")
    if len(raw_lengths) % _LEN.itemsize:
        raise WireFormatError(f"{key}: chunk lengths are {len(raw_lengths)} bytes")
    count = len(raw_lengths) // _LEN.itemsize
    if count != hdr.chunk_count:  # before converting: never more than the header says
        raise HeaderMismatch(
            field="chunk_count", expected=hdr.chunk_count, received=count
        )
    lengths = np.frombuffer(raw_lengths, dtype=_LEN).astype(np.int64)
    big = np.flatnonzero(lengths > MAX_CHUNK_BYTES)
    if big.size:
        i = int(big[0])
        raise WireFormatError(
            f"{key}: chunk {i} is {int(lengths[i])} bytes, at most "
            f"{MAX_CHUNK_BYTES} allowed"
        )
    data = _raw(arr, key, DATA, "uint8")
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if count else 0
    if total != len(data):
        raise WireFormatError(
            f"{key}: chunk lengths add up to {total} bytes, the data "
            f"has {len(data)} (truncated or padded)"
        )
    view = memoryview(data)
    return hdr, [bytes(view[e - n : e]) for n, e in zip(lengths, ends, strict=True)]


def digest(chunks: list[bytes]) -> str:
    """SHA-256 over a vector's ciphertext chunks (each length-prefixed)."""
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(len(chunk).to_bytes(8, "little"))
        h.update(chunk)
    return h.hexdigest()


def written_chunks(rd: RecordDict, key: str) -> list[bytes]:
    """The chunks :func:`write_vector` put under ``key`` (no checks: the
    writer's own record)."""
    arr = rd[key]
    assert isinstance(arr, ArrayRecord)
    lengths = np.frombuffer(arr[LENGTHS].data, dtype=_LEN).astype(np.int64)
    data, ends = arr[DATA].data, np.cumsum(lengths)
    return [bytes(data[e - n : e]) for n, e in zip(lengths, ends, strict=True)]
