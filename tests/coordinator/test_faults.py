"""Fail closed: bad replies are rejected, dropouts are corrected, state is kept.

Real participants and the real coordinator, in-process (benchmarks.local_grid);
a ``tamper`` hook edits or drops replies on their way back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from coordinator.federation import Federation
from protocol.config import RunConfig
from protocol.params import get_param_set
from protocol.tolerance import ckks_theta_rel_tol
from tests.helpers import (
    decrypt_theta,
    local_federation,
    local_key_file,
    local_raw,
    metrics_rows,
    put_vector_arrays,
)

RUN_ID = 515


def _raw(tmp: Path, backend: str, **extra) -> dict:
    """3 participants, 3 rounds, seed 5, 1 s round timeout, named after the backend."""
    return local_raw(
        tmp,
        **{
            "backend": backend,
            "num-rounds": 3,
            "num-participants": 3,
            "seed": 5,
            "run-name": backend,
            "checkpoint-every": 100,
            "round-timeout": 1.0,
            **extra,
        },
    )


def _run(
    tmp: Path, backend: str, tamper=None, **extra
) -> tuple[Federation, list[dict]]:
    fed = local_federation(_raw(tmp, backend, **extra), RUN_ID, tamper=tamper)
    fed.run()
    return fed, metrics_rows(fed)


def _theta(tmp: Path, fed: Federation, backend: str) -> np.ndarray:
    return decrypt_theta(fed, local_key_file(tmp, RUN_ID), backend)


def _round_of(message: Message) -> int:
    return int(message.content["task"]["round"])


def _drop(node_index: int, rnd: int):
    def tamper(request: Message, reply: Message) -> Message | None:
        dst = request.metadata.dst_node_id
        if (
            request.metadata.message_type == "train"
            and dst == 1000 + node_index
            and _round_of(request) == rnd
        ):
            return None  # never arrives: the coordinator times out on it
        return reply

    return tamper


MODES = {
    "gradient": {},
    "delta": {"participant-update": "delta"},
    "delta-fedavgm": {"participant-update": "delta", "optimizer": "fedavgm"},
}


@pytest.mark.parametrize(
    "mode",  # the delta modes in CI only: the fast loop keeps gradient's
    [
        pytest.param(m, marks=[pytest.mark.slow] if m != "gradient" else [])
        for m in MODES
    ],
)
def test_dropout_round_matches_plaintext_twin(tmp_path, mode):
    """Participant 2 drops in round 2: both backends step with k = 3/2, every
    participant accepts the θ its twin replays, θ agrees; in every update mode
    and server optimiser."""
    extra = MODES[mode]
    fed_c, rows_c = _run(tmp_path / "c", "ckks", _drop(2, 2), **extra)
    fed_p, rows_p = _run(tmp_path / "p", "plain", _drop(2, 2), **extra)
    for rows in (rows_c, rows_p):
        assert rows[1]["participants"] == 2 and rows[1]["missing"] == [1002]
        assert all(r["stepped"] and r["refused"] == [] for r in rows)
    theta_c = _theta(tmp_path / "c", fed_c, "ckks")
    theta_p = _theta(tmp_path / "p", fed_p, "plain")
    theta0 = _theta0(tmp_path, **extra)
    rel = np.max(np.abs(theta_c - theta_p)) / np.max(np.abs(theta_p - theta0))
    assert rel < ckks_theta_rel_tol(get_param_set("8k-35x3")), rel


def _theta0(tmp: Path, **extra) -> np.ndarray:
    from participants.learner import Learner

    cfg = RunConfig.from_mapping(_raw(tmp, "plain", **extra))
    return Learner(cfg, 0).initial_theta()


def _corrupt_gradient(node_index: int, rnd: int, how: str):
    def tamper(request: Message, reply: Message) -> Message | None:
        if (
            request.metadata.message_type != "train"
            or _round_of(request) != rnd
            or request.metadata.dst_node_id != 1000 + node_index
        ):
            return reply
        content = reply.content
        if how in ("random-bytes", "truncated", "missing-chunk"):
            data = bytes(content["gradient"]["data"].data)
            ends = np.cumsum(np.frombuffer(content["gradient"]["lengths"].data, "<u4"))
            chunks = [data[s:e] for s, e in zip([0, *ends[:-1]], ends, strict=True)]
            if how == "random-bytes":  # chunk 0 replaced by junk
                rng = np.random.default_rng(0)
                chunks[0] = rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()
            elif how == "truncated":  # chunk 1 cut to 100 bytes, its length saying so
                chunks[1] = chunks[1][:100]
            else:  # the last chunk gone, the header still counting it
                chunks = chunks[:-1]
            lengths = [len(c) for c in chunks]
            put_vector_arrays(content, "gradient", b"".join(chunks), lengths)
        elif how in ("stale-round", "backend", "version", "fingerprint"):
            from protocol.wire import parse_header

            hdr = parse_header(content["gradient.hdr"]["header"])
            if how == "stale-round":
                hdr.round = rnd - 1
            elif how == "backend":
                hdr.backend = "plain"
            elif how == "version":
                hdr.protocol_version = 9
            else:
                hdr.fingerprint = "0" * 64
            content["gradient.hdr"] = ConfigRecord({"header": hdr.SerializeToString()})
        return Message(content, reply_to=request)

    return tamper


@pytest.mark.parametrize(
    ("how", "error"),
    [
        ("random-bytes", "CiphertextError"),
        ("truncated", "CiphertextError"),
        ("stale-round", "HeaderMismatch: header field 'round'"),
        ("backend", "BackendMismatch"),
        ("version", "protocol_version"),
        ("fingerprint", "fingerprint"),
        ("missing-chunk", "chunk_count"),
    ],
)
def test_bad_reply_rejected_round_continues(tmp_path, how, error):
    """A malformed reply is rejected with a typed error; the rest still step."""
    fed, rows = _run(tmp_path, "ckks", _corrupt_gradient(1, 2, how))
    r2 = rows[1]
    assert r2["missing"] == [1001] and r2["participants"] == 2 and r2["stepped"]
    assert error in r2["rejected"]["1001"], r2["rejected"]
    assert all(r["stepped"] for r in rows)
    assert np.all(np.isfinite(_theta(tmp_path, fed, "ckks")))


def test_replay_of_earlier_round_reply_rejected(tmp_path):
    """Round 2's reply replayed in round 3 fails the round check; state stays sane."""
    saved: dict[int, RecordDict] = {}

    def tamper(request: Message, reply: Message) -> Message | None:
        if (
            request.metadata.message_type != "train"
            or request.metadata.dst_node_id != 1000
        ):
            return reply
        rnd = _round_of(request)
        saved[rnd] = reply.content
        if rnd == 3:
            return Message(saved[2], reply_to=request)
        return reply

    _, rows = _run(tmp_path, "ckks", tamper)
    assert "round" in rows[2]["rejected"]["1000"]
    assert rows[2]["stepped"]


def test_refresher_drop_uses_spare(tmp_path):
    """The refresher of round 2 drops; a spare is asked then (only then) to refresh,
    its refresh is used and the step runs."""
    # round t's refresher is nodes[t % 3]: round 2 → participant index 2
    fed, rows = _run(tmp_path, "ckks", _drop(2, 2))
    assert rows[1]["stepped"] and rows[1]["missing"] == [1002]
    asked = [
        (_round_of(m), m.metadata.dst_node_id)
        for m in fed.grid.sent
        if m.metadata.message_type == "query.refresh"
    ]
    assert asked == [(2, 1000)]  # the next in rotation that replied, once
    assert [r["spare_refresher"] for r in rows] == [None, 1000, None]
    assert all(r["stepped"] for r in rows)


def test_refresher_and_spare_drop_skip_step_and_keep_state(tmp_path):
    """Refresher and spare both fail in round 2: no step, θ exactly as it was."""
    thetas: list[list[bytes]] = []

    def on_round(t: int, fed: Federation) -> None:
        thetas.append([fed.be.to_bytes(c) for c in fed.theta])

    def tamper(request: Message, reply: Message) -> Message | None:
        kind = request.metadata.message_type
        if _round_of(request) == 2 and (
            kind == "query.refresh"
            or (kind == "train" and request.metadata.dst_node_id == 1002)
        ):
            return None
        return reply

    fed = local_federation(
        _raw(tmp_path, "plain"), RUN_ID, on_round=on_round, tamper=tamper
    )
    fed.run()
    assert [h["stepped"] for h in fed.history] == [True, False, True]
    assert fed.history[1]["spare_refresher"] == 1000
    assert thetas[1] == thetas[0]


def test_no_refresh_skips_step_and_keeps_state(tmp_path):
    """Without a spare, a dropped refresher means no step; θ is kept unchanged."""
    thetas: list[list[bytes]] = []

    def on_round(t: int, fed: Federation) -> None:
        thetas.append([fed.be.to_bytes(c) for c in fed.theta])

    raw = _raw(tmp_path, "plain", **{"spare-refresher": False})
    fed = local_federation(raw, RUN_ID, on_round=on_round, tamper=_drop(2, 2))
    fed.run()
    assert [h["stepped"] for h in fed.history] == [True, False, True]
    assert thetas[1] == thetas[0]  # the skipped round left θ exactly as it was
    assert thetas[2] != thetas[1]


def test_too_few_participants_skip_step(tmp_path):
    """Below min-participants no step is taken; metrics say who is missing."""

    def tamper(request: Message, reply: Message) -> Message | None:
        if (
            request.metadata.message_type == "train"
            and _round_of(request) == 2
            and request.metadata.dst_node_id != 1000
        ):
            return None
        return reply

    _, rows = _run(tmp_path, "plain", tamper, **{"min-participants": 2})
    assert rows[1]["stepped"] is False and rows[1]["missing"] == [1001, 1002]
    assert rows[2]["stepped"]


def test_fingerprint_mismatch_in_theta_refused_by_participants(tmp_path):
    """θ whose header carries another fingerprint is refused by every participant."""
    from protocol.wire import parse_header

    def tamper_request(request: Message) -> Message:
        if request.metadata.message_type == "train" and _round_of(request) == 2:
            hdr = parse_header(request.content["theta.hdr"]["header"])
            hdr.fingerprint = "e" * 64
            request.content["theta.hdr"] = ConfigRecord(
                {"header": hdr.SerializeToString()}
            )
        return request

    fed = local_federation(
        _raw(tmp_path, "plain"), RUN_ID, tamper_request=tamper_request
    )
    fed.run()
    r2 = fed.history[1]
    assert r2["participants"] == 0 and r2["stepped"] is False
    errors = [m.error.reason for m in fed.grid.received if m.has_error()]
    assert len(errors) == 3 and all("fingerprint" in e for e in errors)
    assert fed.history[2]["stepped"]


@pytest.mark.needs_git
def test_gitignore_covers_key_material():
    """Key directories and .ctx files are ignored by git."""
    import subprocess

    repo = Path(__file__).resolve().parents[2]
    for path in ("keys/run-1/participant.ctx", "some/dir/participant.ctx", ".hedrl/x"):
        res = subprocess.run(["git", "check-ignore", "-q", path], cwd=repo)
        assert res.returncode == 0, path
