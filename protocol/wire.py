"""The versioned wire format (docs/design.md#wire-format), carried in Flower records.

A vector travels as two records of a ``RecordDict``: ``<name>`` an
``ArrayRecord`` holding the slot-chunks concatenated in one raw byte ``Array``
plus their lengths (:mod:`protocol.records`; Flower cuts large arrays into
≤ 5 MB objects on the wire) and ``<name>.hdr`` a ``ConfigRecord`` holding the
serialised :class:`VectorHeader`. :func:`read_vector` checks every header field
against what the receiver expects *before* any chunk is parsed. The context is
never sent with a vector.

The protobuf schema is ``protocol/wire.proto``; its descriptor is built here at
import time so that no generated code (tied to a protoc version) is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from protocol import PROTOCOL_VERSION
from protocol.errors import BackendMismatch, HeaderMismatch, WireFormatError

KINDS = ("gradient", "theta", "state", "refresh", "squares", "v0")

# protobuf field types and label (descriptor.proto)
_STRING, _UINT32, _UINT64 = 9, 13, 4
_OPTIONAL = 1

HEADER_FIELDS: tuple[tuple[str, int, int], ...] = (
    ("protocol_version", 1, _UINT32),
    ("param_set", 2, _STRING),
    ("fingerprint", 3, _STRING),
    ("run_id", 4, _UINT64),
    ("round", 5, _UINT32),
    ("kind", 6, _STRING),
    ("backend", 7, _STRING),
    ("layout_digest", 8, _STRING),
    ("slot_count", 9, _UINT32),
    ("chunk_count", 10, _UINT32),
    ("level", 11, _UINT32),
    ("name", 12, _STRING),
    ("value_count", 13, _UINT64),
)


def _build() -> Any:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="hedrl_wire.proto", package="hedrl.wire", syntax="proto3"
    )
    hdr = fdp.message_type.add(name="VectorHeader")
    for name, number, ftype in HEADER_FIELDS:
        hdr.field.add(name=name, number=number, type=ftype, label=_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("hedrl.wire.VectorHeader")
    )


VectorHeader = _build()

# Upper bound on one serialised chunk: a fresh public-key ciphertext at
# N=16384 with 8 primes is ~1.6 MB; anything much larger is not a chunk.
MAX_CHUNK_BYTES = 4 * 1024 * 1024
MAX_HEADER_BYTES = 4096


@dataclass(frozen=True)
class Expect:
    """What a receiver expects of a vector's header (``None``: not checked)."""

    param_set: str
    fingerprint: str
    backend: str
    run_id: int
    layout_digest: str
    slot_count: int
    chunk_count: int
    kind: str
    level: int
    round: int | None = None
    name: str | None = None


def make_header(expect: Expect, *, value_count: int, round_: int) -> Any:
    """A header describing a vector about to be sent."""
    return VectorHeader(
        protocol_version=PROTOCOL_VERSION,
        param_set=expect.param_set,
        fingerprint=expect.fingerprint,
        run_id=expect.run_id,
        round=round_,
        kind=expect.kind,
        backend=expect.backend,
        layout_digest=expect.layout_digest,
        slot_count=expect.slot_count,
        chunk_count=expect.chunk_count,
        level=expect.level,
        name=expect.name or "",
        value_count=value_count,
    )


def parse_header(data: bytes) -> Any:
    """Parse a header; raise :class:`WireFormatError` on anything malformed."""
    if not isinstance(data, bytes | bytearray):
        raise WireFormatError(f"header: expected bytes, received {type(data).__name__}")
    if len(data) > MAX_HEADER_BYTES:
        raise WireFormatError(
            f"header: {len(data)} bytes, at most {MAX_HEADER_BYTES} allowed"
        )
    hdr = VectorHeader()
    try:
        hdr.ParseFromString(bytes(data))
    except Exception as exc:  # protobuf DecodeError and friends
        raise WireFormatError(f"header: not a VectorHeader ({exc})") from exc
    if hdr.protocol_version != PROTOCOL_VERSION:
        raise HeaderMismatch(
            field="protocol_version",
            expected=PROTOCOL_VERSION,
            received=hdr.protocol_version,
        )
    if hdr.kind not in KINDS:
        raise HeaderMismatch(field="kind", expected=KINDS, received=hdr.kind)
    return hdr


def check_header(hdr: Any, expect: Expect) -> None:
    """Compare every header field with ``expect``; raise on the first mismatch."""
    if hdr.backend != expect.backend:
        raise BackendMismatch(
            field="backend", expected=expect.backend, received=hdr.backend
        )
    checks: list[tuple[str, object]] = [
        ("param_set", expect.param_set),
        ("fingerprint", expect.fingerprint),
        ("run_id", expect.run_id),
        ("kind", expect.kind),
        ("layout_digest", expect.layout_digest),
        ("slot_count", expect.slot_count),
        ("chunk_count", expect.chunk_count),
        ("level", expect.level),
    ]
    if expect.round is not None:
        checks.append(("round", expect.round))
    if expect.name is not None:
        checks.append(("name", expect.name))
    for field, want in checks:
        got = getattr(hdr, field)
        if got != want:
            raise HeaderMismatch(field=field, expected=want, received=got)
