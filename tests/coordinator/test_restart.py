"""Lose nothing: resume from the encrypted checkpoint; roll back a refused θ."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from coordinator.federation import Federation
from protocol import PROTOCOL_VERSION, keys
from protocol import messages as msg
from protocol.checkpoint import read_checkpoint, write_checkpoint
from protocol.codec import receive_plain
from protocol.errors import ConfigError
from protocol.params import get_param_set
from protocol.tolerance import ckks_abs_tol
from tests.helpers import (
    decrypt_chunks,
    local_federation,
    local_key_file,
    local_raw,
    wire_expect,
)

RUN_ID = 8080
PS = get_param_set("8k-35x3")


def _raw(tmp, **extra) -> dict:
    """3 CKKS participants, 5 rounds, seed 9, a checkpoint every 2 rounds."""
    return local_raw(
        tmp,
        **{
            "backend": "ckks",
            "num-rounds": 5,
            "num-participants": 3,
            "seed": 9,
            "checkpoint-every": 2,
            "round-timeout": 5.0,
            **extra,
        },
    )


class Killed(RuntimeError):
    """Stands in for the ServerApp process dying."""


def _theta_sent(part, fed: Federation, step: int, meta: dict, chunks: int):
    """θ as the participants decrypt it from the coordinator's message of the
    round that takes step ``step`` (messages carry that round plus the run's
    offset: participants require rounds to increase under a key)."""
    round_ = fed.wire(step)
    train = next(
        m
        for m in fed.grid.sent
        if m.metadata.message_type == "train"
        and int(m.content["task"]["round"]) == round_
    )
    expect = wire_expect(
        PS,
        meta["fingerprint"],
        "ckks",
        "theta",
        0,
        run_id=fed.run_id,
        layout_digest=meta["layout_digest"],
        chunk_count=chunks,
        round=round_,
    )
    return receive_plain(part, train.content, "theta", expect)


def _record_masks(fed: Federation) -> dict[int, list[np.ndarray]]:
    """The refresh masks the coordinator draws, per round."""
    drawn: dict[int, list[np.ndarray]] = {}
    real = fed.masked_state

    def masked_state(wire, into=None):
        rd, masks, sent = real(wire, into)
        step = wire - fed.wire_offset
        drawn.setdefault(step, []).extend(m.copy() for m in masks)
        return rd, masks, sent

    fed.masked_state = masked_state
    return drawn


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({}, id="gradient"),
        pytest.param(
            {"participant-update": "delta", "optimizer": "fedavgm"},
            id="delta-fedavgm",
            marks=pytest.mark.slow,  # CI runs it, the fast loop does not
        ),
    ],
)
def test_restart_resumes_from_checkpoint_with_same_theta(tmp_path, extra):
    """Killed after round 3; resumed from the round-2 checkpoint to 5 steps in all.

    The round-2 checkpoint holds θ_2, the θ every participant accepted in round 2
    (with m, V, r after step 1), so the resumed run starts at round 2; in
    gradient mode with HE-Adam and in delta mode with server momentum.
    """
    raw = _raw(tmp_path, **{"run-name": "first", **extra})

    def die(t: int, fed: Federation) -> None:
        if t == 3:
            raise Killed("ServerApp killed after round 3")

    first = local_federation(raw, RUN_ID, on_round=die)
    first_masks = _record_masks(first)
    with pytest.raises(Killed):
        first.run()
    ckpt = tmp_path / "results" / "first" / "checkpoint.npz"
    meta, vectors = read_checkpoint(ckpt)
    assert meta["step"] == 1 and set(vectors) == {"theta", "m", "V", "r"}

    raw2 = _raw(tmp_path, **{"run-name": "resumed", "resume-from": str(ckpt), **extra})
    fed = local_federation(raw2, RUN_ID + 1)  # a new run: fresh participant state
    masks = _record_masks(fed)
    fed.run()
    assert [h["round"] for h in fed.history] == [2, 3, 4, 5]
    # rounds 2 and 3 ran twice: the refresher never sees two states under one mask
    for t in (2, 3):
        assert first_masks[t] and masks[t]
        assert not any(
            np.array_equal(a, b) for a in first_masks[t] for b in masks[t]
        ), f"round {t}: a refresh mask of the crashed run was reused"
    assert all(
        h["stepped"] and not h["rejected"] and not h["refused"] for h in fed.history
    )
    # no new key was made for the resumed run: it uses the checkpoint's
    assert not (tmp_path / "keys" / f"run-{RUN_ID + 1}").exists()

    part, fp = keys.participant_backend(local_key_file(tmp_path, RUN_ID), PS, "ckks")
    assert fp == meta["fingerprint"]
    chunks = len(vectors["theta"])
    sent = _theta_sent(part, fed, 2, meta, chunks)
    stored = decrypt_chunks(part, vectors["theta"], sent.size)
    tol = ckks_abs_tol(PS, 10.0)
    assert np.max(np.abs(sent - stored)) <= tol
    # ... and it is the θ the first run's participants accepted in round 2
    accepted = _theta_sent(part, first, 2, meta, chunks)
    assert np.max(np.abs(accepted - stored)) <= tol
    assert first.history[1]["participants"] == 3 and not first.history[1]["refused"]


def test_resume_refuses_mismatched_checkpoint(tmp_path):
    """A checkpoint of another env (or one already finished) fails at start."""
    raw = _raw(tmp_path, **{"run-name": "a", "num-rounds": 2})
    local_federation(raw, RUN_ID).run()
    ckpt = str(tmp_path / "results" / "a" / "checkpoint.npz")
    bad_env = _raw(tmp_path, **{"resume-from": ckpt, "env-id": "Acrobot-v1"})
    with pytest.raises(ConfigError, match="env_id"):
        local_federation(bad_env, RUN_ID + 2)
    done = _raw(tmp_path, **{"resume-from": ckpt, "num-rounds": 2})
    with pytest.raises(ConfigError, match="nothing left to run"):
        local_federation(done, RUN_ID + 3)
    # m, V, r are in units set by beta1, beta2 and rsqrt-a: other values refused
    for key, value in (("rsqrt-a", 4.16), ("beta2", 0.99)):
        other = _raw(tmp_path, **{"resume-from": ckpt, "num-rounds": 4, key: value})
        with pytest.raises(ConfigError, match=f"written with {key} "):
            local_federation(other, RUN_ID + 5)
    meta, vectors = read_checkpoint(Path(ckpt))
    assert meta.pop("state_hyper")["rsqrt_a"] == 3.0
    unmarked = tmp_path / "unmarked.npz"  # written before state_hyper: A was 3
    write_checkpoint(unmarked, meta, vectors)
    newer_a = {"resume-from": str(unmarked), "num-rounds": 4, "rsqrt-a": 4.16}
    with pytest.raises(ConfigError, match="rsqrt-a 3.0"):
        local_federation(_raw(tmp_path, **newer_a), RUN_ID + 6)
    # written before m, V, r moved to StateUnits (protocol 1): not resumable
    meta, vectors = read_checkpoint(Path(ckpt))
    assert meta.pop("protocol_version") == PROTOCOL_VERSION
    old = tmp_path / "old.npz"
    write_checkpoint(old, meta, vectors)
    older = _raw(tmp_path, **{"resume-from": str(old), "num-rounds": 4})
    with pytest.raises(ConfigError, match="protocol version 1"):
        local_federation(older, RUN_ID + 4)
    # protocol 2 had the same units (3 changed only the vectors' record layout)
    v2 = tmp_path / "v2.npz"
    write_checkpoint(v2, {**meta, "protocol_version": 2}, vectors)
    fed = local_federation(
        _raw(tmp_path, **{"resume-from": str(v2), "num-rounds": 4}), RUN_ID + 7
    )
    resumed_meta, resumed = fed.resume  # accepted at start, state included
    assert resumed_meta["protocol_version"] == 2 and "r" in resumed


def test_forged_theta_refused_by_participants_then_rolled_back(tmp_path):
    """θ under a foreign key with a valid header passes the coordinator; participants
    refuse it, the coordinator rolls back to the last accepted θ; training goes on.
    The checkpoint written after the forged step holds the accepted θ, not the
    forged one: a crash there would not resume from it.
    """
    other = tmp_path / "other"
    keys.write_keys(other, PS, "ckks", force=False)
    foreign, _ = keys.participant_backend(other / "participant.ctx", PS, "ckks")
    kept: dict[str, list[bytes]] = {}

    def forge(t: int, fed: Federation) -> None:
        if t == 2:
            kept["good"] = [fed.be.to_bytes(c) for c in fed.good.theta]  # θ_2 accepted
            junk = np.random.default_rng(1).normal(0, 0.3, PS.slots)
            fed.theta = [
                fed.be.to_bottom(fed.be.load(foreign.encrypt(junk), level=3))
                for _ in fed.theta
            ]
        if t == 3:
            kept["after"] = [fed.be.to_bytes(c) for c in fed.theta]
            # written after round 2, when θ_3 was already the forged one
            kept["checkpoint"] = read_checkpoint(fed.out_dir / "checkpoint.npz")

    raw = _raw(tmp_path, **{"run-name": "forged", "num-rounds": 4})
    fed = local_federation(raw, RUN_ID, on_round=forge)
    fed.run()
    r3 = fed.history[2]
    assert r3["rolled_back"] is True and r3["stepped"] is False
    assert r3["participants"] == 0 and len(r3["missing"]) == 3
    assert kept["after"] == kept["good"]  # θ is exactly the last accepted one
    meta, vectors = kept["checkpoint"]
    assert meta["step"] == 1 and vectors["theta"] == kept["good"]
    assert fed.history[3]["stepped"] and not fed.history[3]["rejected"]


def test_forged_gradient_under_foreign_key_caught_by_participants(tmp_path):
    """A gradient under a foreign key with a matching header is summed (the keyless
    coordinator cannot tell); participants refuse the resulting θ; rolled back."""
    from flwr.app import Message

    from protocol.records import write_vector
    from protocol.wire import parse_header

    other = tmp_path / "other"
    keys.write_keys(other, PS, "ckks", force=False)
    foreign, _ = keys.participant_backend(other / "participant.ctx", PS, "ckks")

    def tamper(request: Message, reply: Message) -> Message:
        task = request.content["task"]
        if (
            request.metadata.message_type == "train"
            and int(task["round"]) == 2
            and request.metadata.dst_node_id == 1001
        ):
            hdr = parse_header(reply.content["gradient.hdr"]["header"])
            junk = [
                foreign.encrypt(np.full(PS.slots, 0.01)) for _ in range(hdr.chunk_count)
            ]
            write_vector(reply.content, "gradient", hdr, junk)
        return reply

    raw = _raw(tmp_path, **{"run-name": "forged-grad", "num-rounds": 4})
    fed = local_federation(raw, RUN_ID, tamper=tamper)
    fed.run()
    h = fed.history
    assert h[1]["stepped"] and not h[1]["rejected"]  # it looked valid
    assert h[2]["rolled_back"] is True and h[2]["participants"] == 0
    assert h[3]["stepped"] and h[3]["participants"] == 3


def test_minority_refusal_does_not_stall_training(tmp_path):
    """One participant refusing every θ (faulty or hostile) is counted as missing;
    θ decrypted fine for the majority, so there is no rollback and training steps."""
    from flwr.app import Error, Message

    def refuse(request: Message, reply: Message) -> Message:
        task = request.content["task"]
        if (
            request.metadata.message_type == "train"
            and int(task["round"]) >= 2
            and request.metadata.dst_node_id == 1001
        ):
            return Message(Error(code=0, reason=msg.REFUSED_CODE), reply_to=request)
        return reply

    raw = _raw(tmp_path, **{"run-name": "minority", "num-rounds": 4})
    thetas: list[list[bytes]] = []
    fed = local_federation(
        raw,
        RUN_ID,
        on_round=lambda t, f: thetas.append([f.be.to_bytes(c) for c in f.theta]),
        tamper=refuse,
    )
    fed.run()
    for rec in fed.history[1:]:
        assert rec["refused"] == [1001] and rec["missing"] == [1001]
        assert rec["stepped"] and rec["participants"] == 2
        assert not rec.get("rolled_back")
    assert len({b"".join(th) for th in thetas}) == 4  # θ moved every round


def test_resuming_into_the_same_folder_keeps_one_history(tmp_path):
    """A crashed run resumed under its own run-name: metrics.jsonl reads rounds
    1..5 once (the crashed attempt's rounds after the checkpoint set aside in
    metrics.superseded.jsonl), and the resumed run's progress counts the
    returns of the rounds before it."""
    raw = _raw(tmp_path, **{"run-name": "same", "backend": "plain"})

    def die(t: int, fed: Federation) -> None:
        if t == 3:
            raise Killed("ServerApp killed after round 3")

    with pytest.raises(Killed):
        local_federation(raw, RUN_ID, on_round=die).run()
    folder = tmp_path / "results" / "same"
    first = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in first] == [1, 2, 3]
    with pytest.raises(ConfigError, match="already holds a run"):
        local_federation(raw, RUN_ID + 1)  # the same name without resume-from
    ckpt = folder / "checkpoint.npz"
    fed = local_federation({**raw, "resume-from": str(ckpt)}, RUN_ID + 1)
    summary = fed.run()
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0] == first[0]  # kept as written
    aside = (folder / "metrics.superseded.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in aside] == [2, 3]
    returns = [r["return_mean"] for r in rows if r["return_mean"] is not None]
    assert summary["final_return_mean_last20"] == pytest.approx(
        sum(returns) / len(returns)
    )
