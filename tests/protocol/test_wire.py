"""Wire format: round trips for every kind and both backends; bad headers fail first."""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import PROTOCOL_VERSION
from protocol.codec import receive_cts, receive_plain, send_cts, send_plain
from protocol.errors import (
    BackendMismatch,
    CiphertextError,
    HeaderMismatch,
    UpdateRejected,
    WireFormatError,
)
from protocol.records import read_vector, write_vector
from protocol.wire import (
    HEADER_FIELDS,
    KINDS,
    Expect,
    VectorHeader,
    make_header,
    parse_header,
)
from tests.helpers import assert_close, ckks_abs_tol, put_vector_arrays, wire_expect

N_VALUES = 9155  # CartPole actor-critic: three chunks at 4096 slots


# _expect(ps, fp, backend, kind, level): N_VALUES in three chunks, run 7, round 5
_expect = functools.partial(wire_expect, run_id=7, chunk_count=3, round=5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["ckks", "plain"])
def test_every_kind_round_trips(kind, backend, ckks_pair, plain, ps):
    """serialize → parse → decrypt for each message kind (participant → participant)."""
    part, coord, fp = (
        (ckks_pair[0], ckks_pair[1], ckks_pair[2])
        if backend == "ckks"
        else (plain, plain, "f" * 64)
    )
    values = np.random.default_rng(1).normal(size=N_VALUES)
    exp = _expect(ps, fp, backend, kind, ps.depth)
    rd = RecordDict()
    nbytes = send_plain(part, rd, kind, values, exp, 5)
    assert nbytes > 0
    back = receive_plain(part, rd, kind, exp)
    values = np.round(values / ps.encrypt_grid) * ps.encrypt_grid  # as encrypted
    assert_close(
        back, values, ckks_abs_tol(ps, 4.0) if backend == "ckks" else 0.0, kind
    )
    # the coordinator parses the same bytes as ciphertexts and re-serialises them
    cts = receive_cts(coord, rd, kind, exp)
    rd2 = RecordDict()
    send_cts(coord, rd2, kind, cts, exp, 5, N_VALUES)
    assert_close(
        receive_plain(part, rd2, kind, exp),
        values,
        ckks_abs_tol(ps, 4.0) if backend == "ckks" else 0.0,
        kind + " re-sent",
    )


def test_bottom_level_theta_round_trips(ckks_pair, ps):
    """θ switched to the bottom level serialises small and decrypts correctly."""
    part, coord, fp, _ = ckks_pair
    values = np.random.default_rng(2).normal(size=N_VALUES)
    rd = RecordDict()
    top = send_plain(
        part, rd, "theta", values, _expect(ps, fp, "ckks", "theta", ps.depth), 5
    )
    cts = [
        coord.to_bottom(c)
        for c in receive_cts(
            coord, rd, "theta", _expect(ps, fp, "ckks", "theta", ps.depth)
        )
    ]
    rd2 = RecordDict()
    bottom = send_cts(
        coord, rd2, "theta", cts, _expect(ps, fp, "ckks", "theta", 0), 5, N_VALUES
    )
    assert bottom < 0.75 * top
    back = receive_plain(part, rd2, "theta", _expect(ps, fp, "ckks", "theta", 0))
    assert_close(back, values, ckks_abs_tol(ps, 4.0), "theta at bottom")


def _garbage_vector(ps, fp, backend="ckks", **hdr_changes) -> RecordDict:
    """A vector whose chunks are random bytes: parsing them would fail loudly."""
    exp = _expect(ps, fp, backend, "gradient", ps.depth)
    hdr = make_header(exp, value_count=N_VALUES, round_=5)
    for k, v in hdr_changes.items():
        setattr(hdr, k, v)
    rd = RecordDict()
    chunks = [
        bytes(np.random.default_rng(i).integers(0, 256, 1000, dtype=np.uint8))
        for i in range(hdr.chunk_count)
    ]
    write_vector(rd, "gradient", hdr, chunks)
    return rd


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"fingerprint": "0" * 64}, "fingerprint"),
        ({"chunk_count": 2}, "chunk_count"),
        ({"param_set": "16k-50x6"}, "param_set"),
        ({"round": 4}, "round"),
        ({"layout_digest": "cd" * 32}, "layout_digest"),
        ({"level": 0}, "level"),
        ({"run_id": 8}, "run_id"),
    ],
)
def test_bad_header_rejected_before_any_chunk_is_parsed(change, field, ckks_pair, ps):
    """A header mismatch raises HeaderMismatch naming the field (no chunk parsed)."""
    part, coord, fp, _ = ckks_pair
    rd = _garbage_vector(ps, fp, **change)
    with pytest.raises(HeaderMismatch, match=field) as info:
        receive_cts(
            coord, rd, "gradient", _expect(ps, fp, "ckks", "gradient", ps.depth)
        )
    assert info.value.field == field


def test_unknown_protocol_version_rejected(ckks_pair, ps):
    """A header from protocol version 99 is refused before chunks are read."""
    _, coord, fp, _ = ckks_pair
    rd = _garbage_vector(ps, fp, protocol_version=99)
    with pytest.raises(HeaderMismatch, match="protocol_version.*99"):
        receive_cts(
            coord, rd, "gradient", _expect(ps, fp, "ckks", "gradient", ps.depth)
        )


def test_other_backend_refused(ckks_pair, ps):
    """A plain-backend vector in a ckks run raises BackendMismatch."""
    _, coord, fp, _ = ckks_pair
    rd = _garbage_vector(ps, fp, backend="plain")
    with pytest.raises(BackendMismatch, match="backend"):
        receive_cts(
            coord, rd, "gradient", _expect(ps, fp, "ckks", "gradient", ps.depth)
        )


def test_chunk_count_mismatch_with_header_rejected(ckks_pair, ps):
    """A vector with fewer chunks than its header claims is refused."""
    _, coord, fp, _ = ckks_pair
    rd = _garbage_vector(ps, fp)
    data = bytes(rd["gradient"]["data"].data)
    put_vector_arrays(rd, "gradient", data[:2000], [1000, 1000])  # header says 3
    with pytest.raises(HeaderMismatch, match="chunk_count"):
        read_vector(rd, "gradient", _expect(ps, fp, "ckks", "gradient", ps.depth))


def test_chunks_come_back_as_written(ps):
    """Chunks of different sizes (incl. empty) survive the one-array layout."""
    exp = _expect(ps, "f" * 64, "plain", "gradient", ps.depth)
    chunks = [b"abc", b"", bytes(range(256)) * 3]
    hdr = make_header(exp, value_count=N_VALUES, round_=5)
    assert hdr.chunk_count == len(chunks)
    rd = RecordDict()
    sent = write_vector(rd, "gradient", hdr, chunks)
    assert sent == len(hdr.SerializeToString()) + 4 * len(chunks) + 771
    got_hdr, got = read_vector(rd, "gradient", exp)
    assert got == chunks and got_hdr.chunk_count == 3


@pytest.mark.parametrize(
    ("data_len", "lengths", "match"),
    [
        (2999, [1000, 1000, 1000], "add up to 3000 bytes, the data has 2999"),
        (3001, [1000, 1000, 1000], "add up to 3000 bytes, the data has 3001"),
        (3000, [1000, 2000, 0], None),  # sizes move between chunks: parsed later
    ],
)
def test_truncated_or_padded_chunk_data_refused(
    ckks_pair, ps, data_len, lengths, match
):
    """Data that does not match the chunk lengths is refused before any parsing."""
    _, coord, fp, _ = ckks_pair
    rd = _garbage_vector(ps, fp)
    data = (bytes(rd["gradient"]["data"].data) + b"x")[:data_len]
    put_vector_arrays(rd, "gradient", data, lengths)
    exp = _expect(ps, fp, "ckks", "gradient", ps.depth)
    if match is None:
        _, chunks = read_vector(rd, "gradient", exp)
        assert [len(c) for c in chunks] == lengths
    else:
        with pytest.raises(WireFormatError, match=match):
            read_vector(rd, "gradient", exp)


def test_old_per_chunk_layout_refused_by_name(ps):
    """A protocol-2 style record (one Array per chunk) names what is expected."""
    exp = _expect(ps, "f" * 64, "plain", "gradient", ps.depth)
    rd = RecordDict()
    write_vector(
        rd, "gradient", make_header(exp, value_count=N_VALUES, round_=5), [b"x"] * 3
    )
    rd["gradient"] = ArrayRecord(
        {
            str(i): Array(dtype="uint8", shape=(1,), stype="raw", data=b"x")
            for i in range(3)
        }
    )
    with pytest.raises(WireFormatError, match="expected arrays 'data' and 'lengths'"):
        read_vector(rd, "gradient", exp)


def test_random_bytes_as_ciphertext_raise_ciphertext_error(ckks_pair, ps):
    """With a valid header, random chunk bytes give CiphertextError."""
    _, coord, fp, _ = ckks_pair
    rd = _garbage_vector(ps, fp)
    with pytest.raises(CiphertextError, match="not a ciphertext"):
        receive_cts(
            coord, rd, "gradient", _expect(ps, fp, "ckks", "gradient", ps.depth)
        )


def test_nan_inf_update_refused_before_encryption(plain, ps):
    """NaN/Inf gradients are refused by the participant codec."""
    values = np.zeros(N_VALUES)
    values[10] = np.nan
    with pytest.raises(UpdateRejected, match="non-finite"):
        send_plain(
            plain,
            RecordDict(),
            "gradient",
            values,
            _expect(ps, "f" * 64, "plain", "gradient", ps.depth),
            5,
        )


def test_missing_header_record(ps):
    """A vector without its header record is a WireFormatError."""
    with pytest.raises(WireFormatError, match="no header"):
        read_vector(
            RecordDict({"x": ConfigRecord({})}),
            "gradient",
            _expect(ps, "f" * 64, "plain", "gradient", ps.depth),
        )


def test_proto_file_matches_descriptor():
    """protocol/wire.proto documents exactly the fields wire.py builds."""
    text = (Path(__file__).resolve().parents[2] / "protocol" / "wire.proto").read_text()
    body = text.split("message VectorHeader {")[1].split("}")[0]
    declared = [
        (m[2], int(m[3])) for m in re.finditer(r"(\w+)\s+(\w+)\s*=\s*(\d+);", body)
    ]
    assert declared == [(n, num) for n, num, _ in HEADER_FIELDS]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_header_parser_fuzz(data):
    """Arbitrary bytes parse to a valid-version header or raise WireFormatError."""
    try:
        hdr = parse_header(data)
    except WireFormatError:
        return
    assert hdr.protocol_version == PROTOCOL_VERSION and hdr.kind in KINDS


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(KINDS), st.text(max_size=20))
def test_header_round_trip_property(round_, kind, name):
    """Any well-formed header survives serialize → parse unchanged."""
    exp = Expect(
        param_set="8k-35x3",
        fingerprint="a" * 64,
        backend="ckks",
        run_id=3,
        layout_digest="b" * 64,
        slot_count=4096,
        chunk_count=3,
        kind=kind,
        level=2,
        name=name,
    )
    hdr = make_header(exp, value_count=11, round_=round_)
    back = parse_header(hdr.SerializeToString())
    assert back == hdr
    assert isinstance(back, type(VectorHeader()))
    _ = dataclasses.asdict(exp)


def test_lengths_not_whole_uint32s_refused(ps):
    """A lengths array whose byte count is not a multiple of 4 is refused."""
    exp = _expect(ps, "f" * 64, "plain", "gradient", ps.depth)
    rd = RecordDict()
    write_vector(
        rd, "gradient", make_header(exp, value_count=N_VALUES, round_=5), [b"x"] * 3
    )
    rd["gradient"]["lengths"] = Array(
        dtype="uint32", shape=(5,), stype="raw", data=b"\x01\x00\x00\x00\x01"
    )
    with pytest.raises(WireFormatError, match="chunk lengths are 5 bytes"):
        read_vector(rd, "gradient", exp)
