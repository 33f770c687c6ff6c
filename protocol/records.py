"""Vectors in Flower records: header in a ConfigRecord, chunks as raw Arrays."""

from __future__ import annotations

from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from protocol.errors import HeaderMismatch, WireFormatError
from protocol.wire import MAX_CHUNK_BYTES, Expect, check_header, parse_header

HDR_SUFFIX = ".hdr"


def write_vector(rd: RecordDict, key: str, header: Any, chunks: list[bytes]) -> int:
    """Put one vector under ``key``; return the bytes it adds (header + chunks)."""
    if header.chunk_count != len(chunks):
        raise WireFormatError(
            f"{key}: header says {header.chunk_count} chunks, {len(chunks)} given"
        )
    arrays = {
        str(i): Array(dtype="uint8", shape=(len(c),), stype="raw", data=bytes(c))
        for i, c in enumerate(chunks)
    }
    rd[key] = ArrayRecord(arrays)
    hdr_bytes = header.SerializeToString()
    rd[key + HDR_SUFFIX] = ConfigRecord({"header": hdr_bytes})
    return len(hdr_bytes) + sum(len(c) for c in chunks)


def read_header(rd: RecordDict, key: str) -> Any:
    """Parse the header stored for ``key`` (no chunk is touched)."""
    cfg = rd.get(key + HDR_SUFFIX)
    if not isinstance(cfg, ConfigRecord) or "header" not in cfg:
        raise WireFormatError(f"{key}: message carries no header record")
    return parse_header(cfg["header"])


def read_vector(rd: RecordDict, key: str, expect: Expect) -> tuple[Any, list[bytes]]:
    """Check the header of ``key`` against ``expect``, then return its chunks."""
    hdr = read_header(rd, key)
    check_header(hdr, expect)
    arr = rd.get(key)
    if not isinstance(arr, ArrayRecord):
        raise WireFormatError(f"{key}: expected an ArrayRecord of chunks")
    if len(arr) != hdr.chunk_count:
        raise HeaderMismatch(
            field="chunk_count", expected=hdr.chunk_count, received=len(arr)
        )
    chunks: list[bytes] = []
    for i in range(hdr.chunk_count):
        a = arr.get(str(i))
        if a is None or a.stype != "raw" or a.dtype != "uint8":
            raise WireFormatError(f"{key}: chunk {i} missing or not a raw byte array")
        if len(a.data) > MAX_CHUNK_BYTES:
            raise WireFormatError(
                f"{key}: chunk {i} is {len(a.data)} bytes, at most "
                f"{MAX_CHUNK_BYTES} allowed"
            )
        chunks.append(bytes(a.data))
    return hdr, chunks
