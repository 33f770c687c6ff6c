"""Lose nothing: resume from the encrypted checkpoint; roll back a refused θ."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.local_grid import LocalGrid
from coordinator.federation import Federation
from protocol import keys
from protocol.checkpoint import read_checkpoint
from protocol.codec import receive_plain
from protocol.config import RunConfig
from protocol.errors import ConfigError
from protocol.params import get_param_set
from protocol.tolerance import ckks_abs_tol
from protocol.wire import Expect

RUN_ID = 8080
PS = get_param_set("8k-35x3")


def _raw(tmp, **extra) -> dict:
    return {
        "backend": "ckks",
        "num-rounds": 5,
        "num-participants": 3,
        "seed": 9,
        "results-dir": str(tmp / "results"),
        "keys-dir": str(tmp / "keys"),
        "checkpoint-every": 2,
        "node-wait": 5.0,
        "round-timeout": 5.0,
        **extra,
    }


class Killed(RuntimeError):
    """Stands in for the ServerApp process dying."""


def test_restart_resumes_from_checkpoint_with_same_theta(tmp_path):
    """Killed after round 3; resumed from the round-2 checkpoint to 5 steps in all."""
    raw = _raw(tmp_path, **{"run-name": "first"})

    def die(t: int, fed: Federation) -> None:
        if t == 3:
            raise Killed("ServerApp killed after round 3")

    with pytest.raises(Killed):
        Federation(
            LocalGrid(RUN_ID, raw, 3), RunConfig.from_mapping(raw), RUN_ID, on_round=die
        ).run()
    ckpt = tmp_path / "results" / "first" / "checkpoint.npz"
    meta, vectors = read_checkpoint(ckpt)
    assert meta["step"] == 2 and set(vectors) == {"theta", "m", "V", "r"}

    raw2 = _raw(tmp_path, **{"run-name": "resumed", "resume-from": str(ckpt)})
    grid = LocalGrid(RUN_ID + 1, raw2, 3)  # a new run: fresh participant state
    fed = Federation(grid, RunConfig.from_mapping(raw2), RUN_ID + 1)
    fed.run()
    assert [h["round"] for h in fed.history] == [3, 4, 5]
    assert all(h["stepped"] and not h["rejected"] for h in fed.history)
    # no new key was made for the resumed run: it uses the checkpoint's
    assert not (tmp_path / "keys" / f"run-{RUN_ID + 1}").exists()

    part, fp = keys.participant_backend(
        tmp_path / "keys" / f"run-{RUN_ID}" / "participant.ctx", PS, "ckks"
    )
    assert fp == meta["fingerprint"]
    first_train = next(m for m in grid.sent if m.metadata.message_type == "train")
    expect = Expect(
        param_set=PS.id,
        fingerprint=fp,
        backend="ckks",
        run_id=RUN_ID + 1,
        layout_digest=meta["layout_digest"],
        slot_count=PS.slots,
        chunk_count=len(vectors["theta"]),
        kind="theta",
        level=0,
        round=3,
    )
    sent = receive_plain(part, first_train.content, "theta", expect)
    stored = np.concatenate([part.decrypt(c) for c in vectors["theta"]])[: sent.size]
    assert np.max(np.abs(sent - stored)) <= ckks_abs_tol(PS, 10.0)


def test_resume_refuses_mismatched_checkpoint(tmp_path):
    """A checkpoint of another env (or one already finished) fails at start."""
    raw = _raw(tmp_path, **{"run-name": "a", "num-rounds": 2})
    Federation(LocalGrid(RUN_ID, raw, 3), RunConfig.from_mapping(raw), RUN_ID).run()
    ckpt = str(tmp_path / "results" / "a" / "checkpoint.npz")
    bad_env = _raw(tmp_path, **{"resume-from": ckpt, "env-id": "Acrobot-v1"})
    with pytest.raises(ConfigError, match="env_id"):
        Federation(
            LocalGrid(RUN_ID + 2, bad_env, 3),
            RunConfig.from_mapping(bad_env),
            RUN_ID + 2,
        )
    done = _raw(tmp_path, **{"resume-from": ckpt, "num-rounds": 2})
    with pytest.raises(ConfigError, match="nothing left to run"):
        Federation(
            LocalGrid(RUN_ID + 3, done, 3), RunConfig.from_mapping(done), RUN_ID + 3
        )


def test_forged_theta_refused_by_participants_then_rolled_back(tmp_path):
    """θ under a foreign key with a valid header passes the coordinator; participants
    refuse it, the coordinator rolls back to the last accepted θ; training goes on.
    """
    other = tmp_path / "other"
    keys.write_keys(other, PS, "ckks", force=False)
    foreign, _ = keys.participant_backend(other / "participant.ctx", PS, "ckks")
    kept: dict[str, list[bytes]] = {}

    def forge(t: int, fed: Federation) -> None:
        if t == 2:
            kept["good"] = [fed.be.dump(c) for c in fed._good[0]]  # θ_2, accepted
            junk = np.random.default_rng(1).normal(0, 0.3, PS.slots)
            fed.theta = [
                fed.be.to_bottom(fed.be.load(foreign.encrypt(junk), level=3))
                for _ in fed.theta
            ]
        if t == 3:
            kept["after"] = [fed.be.dump(c) for c in fed.theta]

    raw = _raw(tmp_path, **{"run-name": "forged", "num-rounds": 4})
    fed = Federation(
        LocalGrid(RUN_ID, raw, 3), RunConfig.from_mapping(raw), RUN_ID, on_round=forge
    )
    fed.run()
    r3 = fed.history[2]
    assert r3["rolled_back"] is True and r3["stepped"] is False
    assert r3["participants"] == 0 and len(r3["missing"]) == 3
    assert kept["after"] == kept["good"]  # θ is exactly the last accepted one
    assert fed.history[3]["stepped"] and not fed.history[3]["rejected"]


def test_forged_gradient_under_foreign_key_caught_by_participants(tmp_path):
    """A gradient under a foreign key with a matching header is summed (the keyless
    coordinator cannot tell); participants refuse the resulting θ; rolled back."""
    from flwr.app import Array, Message

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
            arr = reply.content["gradient"]
            for key in list(arr.keys()):
                junk = foreign.encrypt(np.full(PS.slots, 0.01))
                arr[key] = Array(
                    dtype="uint8", shape=(len(junk),), stype="raw", data=junk
                )
        return reply

    raw = _raw(tmp_path, **{"run-name": "forged-grad", "num-rounds": 4})
    fed = Federation(
        LocalGrid(RUN_ID, raw, 3, tamper=tamper), RunConfig.from_mapping(raw), RUN_ID
    )
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
            return Message(
                Error(code=0, reason="ThetaRejected: crafted"), reply_to=request
            )
        return reply

    raw = _raw(tmp_path, **{"run-name": "minority", "num-rounds": 4})
    thetas: list[list[bytes]] = []
    fed = Federation(
        LocalGrid(RUN_ID, raw, 3, tamper=refuse),
        RunConfig.from_mapping(raw),
        RUN_ID,
        on_round=lambda t, f: thetas.append([f.be.dump(c) for c in f.theta]),
    )
    fed.run()
    for rec in fed.history[1:]:
        assert rec["refused"] == [1001] and rec["missing"] == [1001]
        assert rec["stepped"] and rec["participants"] == 2
        assert not rec.get("rolled_back")
    assert len({b"".join(th) for th in thetas}) == 4  # θ moved every round
