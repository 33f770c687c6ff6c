"""Replies crafted as an attacker would: the coordinator rejects them, names the
participant, and the run completes its rounds (``coordinator-workers`` 0 and 2).

Real participants and the real coordinator, in-process (benchmarks.local_grid);
a ``tamper`` hook forges fields of a reply on its way back: metrics values, or
SEAL ciphertext fields (tests.seal_bytes) of its chunks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message, MetricRecord, RecordDict

from coordinator.chunks import BadChunks, step_chunks
from coordinator.federation import Federation
from protocol import messages as msg
from protocol.adam import AdamHyper, StateUnits
from protocol.backend import Ct
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
from tests.seal_bytes import SealCiphertext

RUN_ID = 616
PS = get_param_set("8k-35x3")
WORKERS = pytest.mark.parametrize("workers", [0, 2])

#: (message type, round, node) → how that reply's content is edited
Plan = dict[tuple[str, int, int], Callable[[Federation, RecordDict], None]]


def _raw(tmp: Path, backend: str, workers: int, **extra: Any) -> dict:
    """3 participants (nodes 1000–1002), seed 5; round t's refresher is node
    1000 + t % 3."""
    return local_raw(
        tmp,
        **{
            "backend": backend,
            "num-participants": 3,
            "seed": 5,
            "run-name": backend,
            "checkpoint-every": 100,
            "round-timeout": 5.0,
            "coordinator-workers": workers,
            **extra,
        },
    )


def _run(raw: dict, plan: Plan, on_round=None) -> tuple[Federation, list[dict]]:
    """Run with the replies in ``plan`` edited (None as edit: the reply is lost)."""
    fed = local_federation(raw, RUN_ID, on_round=on_round)

    def tamper(request: Message, reply: Message) -> Message | None:
        key = (
            request.metadata.message_type,
            int(request.content["task"]["round"]),
            request.metadata.dst_node_id,
        )
        if key not in plan:
            return reply
        edit = plan[key]
        if edit is None:
            return None
        assert not reply.has_error(), reply.error
        edit(fed, reply.content)
        return Message(reply.content, reply_to=request)

    fed.grid.tamper = tamper
    fed.run()
    return fed, metrics_rows(fed)


def _chunks(content: RecordDict, key: str) -> list[bytes]:
    data = bytes(content[key]["data"].data)
    ends = np.cumsum(np.frombuffer(content[key]["lengths"].data, "<u4"))
    return [data[s:e] for s, e in zip([0, *ends[:-1]], ends, strict=True)]


def forge_chunks(key: str, level: int, **fields: Any):
    """Edit: every chunk of vector ``key`` (at ``level``) re-serialised with the
    SEAL ciphertext ``fields`` replaced (e.g. ``scale=nan``, ``ntt=0``), as an
    attacker holding the bytes can."""

    def edit(fed: Federation, content: RecordDict) -> None:
        forged = []
        for c in _chunks(content, key):
            real = SealCiphertext.of(fed.be.load(c, level=level).data)
            forged.append(real.replace(**fields).chunk())
        put_vector_arrays(content, key, b"".join(forged), [len(c) for c in forged])

    return edit


def forge_metrics(**fields: Any):
    """Edit: metrics with ``fields`` set (``None``: the field removed)."""

    def edit(fed: Federation, content: RecordDict) -> None:
        metrics = dict(content[msg.METRICS])
        for k, v in fields.items():
            metrics.pop(k.replace("_", "-"), None)
            if v is not None:
                metrics[k.replace("_", "-")] = v
        content[msg.METRICS] = MetricRecord(metrics)

    return edit


TOP = PS.depth
GRADIENT_ATTACKS: Plan = {
    # round t's refresher is node 1000 + t % 3; the forged replies are others'
    ("train", 2, 1001): forge_chunks(msg.GRADIENT, TOP, scale=float("nan")),
    ("train", 3, 1002): forge_chunks(msg.GRADIENT, TOP, ntt=0),
    ("train", 4, 1000): forge_chunks(msg.GRADIENT, TOP, scale=PS.scale * (1 + 2**-40)),
}
GRADIENT_ERRORS = {
    2: ("1001", "ciphertext scale nan, expected 2^35"),
    3: ("1002", "not in NTT form"),
    4: ("1000", "scale 2^35.0000000 (x1.0000000000009095 of Δ)"),
}


@pytest.fixture(scope="module")
def plain_without_them(tmp_path_factory) -> np.ndarray:
    """θ of the plaintext twin whose forged replies never arrived (K − 1 steps)."""
    tmp = tmp_path_factory.mktemp("reference")
    lost = {key: None for key in GRADIENT_ATTACKS}
    raw = _raw(tmp, "plain", 0, **{"num-rounds": 4, "round-timeout": 0.3})
    fed, rows = _run(raw, lost)  # type: ignore[arg-type]
    assert [r["participants"] for r in rows] == [3, 2, 2, 2]
    return decrypt_theta(fed, local_key_file(tmp, RUN_ID), "plain")


@WORKERS
def test_malicious_gradient_ciphertexts_rejected(tmp_path, workers, plain_without_them):
    """A gradient whose SEAL scale is NaN, one not in NTT form and one whose scale
    is Δ(1 + 2^-40) are each rejected naming the participant and the field; every
    round steps with the other two, and θ is what the plaintext twin reaches
    when those replies never arrive."""
    raw = _raw(tmp_path, "ckks", workers, **{"num-rounds": 4})
    fed, rows = _run(raw, GRADIENT_ATTACKS)
    assert len(rows) == 4 and all(r["stepped"] for r in rows)
    for t, (node, error) in GRADIENT_ERRORS.items():
        row = rows[t - 1]
        assert row["participants"] == 2 and row["missing"] == [int(node)], row
        assert list(row["rejected"]) == [node]
        assert "CiphertextError" in row["rejected"][node]
        assert error in row["rejected"][node], row["rejected"]
    theta = decrypt_theta(fed, local_key_file(tmp_path, RUN_ID), "ckks")
    from participants.learner import Learner
    from protocol.config import RunConfig

    theta0 = Learner(RunConfig.from_mapping(raw), 0).initial_theta()
    moved = np.max(np.abs(plain_without_them - theta0))
    rel = np.max(np.abs(theta - plain_without_them)) / moved
    assert rel < ckks_theta_rel_tol(PS), rel


METRICS_ATTACKS: Plan = {
    ("train", 2, 1001): forge_metrics(episodes=float("inf")),
    ("train", 3, 1002): forge_metrics(return_sum=1e308),
    ("train", 4, 1000): forge_metrics(env_steps=None),
    ("train", 5, 1001): forge_metrics(return_sum=None),
    ("train", 6, 1002): forge_metrics(env_steps=-1),
    ("train", 7, 1000): forge_metrics(episodes=2.5),
    ("train", 8, 1001): forge_metrics(time_learn=float("nan")),
    ("train", 9, 1002): forge_metrics(bonus=1),
    # not an attack: a participant with episode reporting off is accepted
    # (round 13 ends a rollout: episodes are reported every 4 rounds here)
    ("train", 13, 1000): forge_metrics(episodes=None, return_sum=None),
}
METRICS_ERRORS = {
    2: (
        "1001",
        "'episodes': expected an integer in [0, 1000000000], at most env-steps "
        "(0), received inf",
    ),
    3: ("1002", "'return-sum': expected a number with |value| ≤"),
    4: ("1000", "'env-steps': expected an integer in [0, 1000000000], received no"),
    5: ("1001", "'return-sum': expected it beside 'episodes' (both or neither)"),
    6: ("1002", "'env-steps': expected an integer"),
    7: ("1000", "'episodes': expected an integer"),
    8: ("1001", "'time-learn': expected seconds in [0, 1e+06), received nan"),
    9: ("1002", "'bonus': expected no such field"),
}


@pytest.fixture(scope="module")
def metrics_without_them(tmp_path_factory) -> tuple[np.ndarray, list[dict]]:
    """θ and rows of a plain run whose forged replies never arrived."""
    tmp = tmp_path_factory.mktemp("reference")
    lost = {key: None for key in METRICS_ATTACKS if key[1] in METRICS_ERRORS}
    raw = _raw(tmp, "plain", 0, **{"num-rounds": 21, "round-timeout": 0.3})
    fed, rows = _run(raw, lost)  # type: ignore[arg-type]
    return decrypt_theta(fed, local_key_file(tmp, RUN_ID), "plain"), rows


@WORKERS
def test_malicious_metrics_rejected(tmp_path, workers, metrics_without_them):
    """Metrics that are not finite, out of range, missing, half of the episode
    pair or unknown reject the reply (ReplyRejected naming participant and
    field); the run takes all its rounds (a return-sum of 1e308 does not fire
    stop-return), and θ and the reported returns are exactly those of a run
    without the rejected replies. Episode reporting switched off is accepted."""
    reference, ref_rows = metrics_without_them
    raw = _raw(tmp_path, "plain", workers, **{"num-rounds": 21, "stop-return": 100.0})
    fed, rows = _run(raw, METRICS_ATTACKS)
    assert len(rows) == 21 and all(r["stepped"] for r in rows)
    for t, (node, error) in METRICS_ERRORS.items():
        row = rows[t - 1]
        assert row["participants"] == 2 and list(row["rejected"]) == [node], row
        assert row["rejected"][node].startswith(
            f"ReplyRejected: reply of participant {node}: metrics field "
        )
        assert error in row["rejected"][node], row["rejected"]
    assert rows[12]["participants"] == 3 and rows[12]["rejected"] == {}
    theta = decrypt_theta(fed, local_key_file(tmp_path, RUN_ID), "plain")
    # not bit for bit: the refresher rounds the masked state to the encryption
    # grid (2^-22), and the masks are OS randomness, so each run's state rounds
    # differently (measured 2.3e-5 on θ after 21 rounds); one rejected reply
    # used in one step would move θ by ~lr = 2e-3
    np.testing.assert_allclose(theta, reference, rtol=0, atol=1e-4)
    for row, ref in zip(rows, ref_rows, strict=True):
        if row["round"] == 13:  # one participant reported no episodes
            assert 0 < row["episodes"] < ref["episodes"], (row, ref)
            continue
        assert (row["episodes"], row["return_mean"]) == (
            ref["episodes"],
            ref["return_mean"],
        )
    summary = (fed.out_dir / "summary.json").read_text()
    assert "1e+308" not in summary and "Infinity" not in summary


@WORKERS
def test_malicious_state_replies(tmp_path, workers):
    """Round 1: the key holder's m0, V0, r0 with a NaN scale → the step is
    skipped, the state stays unset, round 2 starts it again. Round 3: the
    refresher's m not in NTT form → the spare refreshes, the step runs.
    Round 4: refresher and spare both send a refresh with scale Δ(1+2^-40) →
    no step, θ exactly as it was. Round 5 steps again."""
    thetas: list[list[bytes]] = []

    def on_round(t: int, fed: Federation) -> None:
        thetas.append([fed.be.to_bytes(c) for c in fed.theta])

    nan, eps = float("nan"), PS.scale * (1 + 2**-40)
    level = dict(zip(msg.STATE_NAMES, StateUnits.levels(TOP), strict=True))

    def forge(kind: str, name: str, **fields: Any):
        return forge_chunks(msg.state_key(kind, name), level[name], **fields)

    plan: Plan = {
        (msg.V0, 1, 1000): forge("v0", "m", scale=nan),
        ("train", 3, 1000): forge("refresh", "m", ntt=0),
        ("train", 4, 1001): forge("refresh", "r", scale=eps),
        (msg.REFRESH, 4, 1002): forge("refresh", "V", scale=eps),
    }
    raw = _raw(tmp_path, "ckks", workers, **{"num-rounds": 5})
    fed, rows = _run(raw, plan, on_round)
    assert [r["stepped"] for r in rows] == [False, True, True, False, True]
    assert [r["spare_refresher"] for r in rows] == [None, None, 1001, 1002, None]
    assert all(r["participants"] == 3 and r["rejected"] == {} for r in rows)
    assert thetas[3] == thetas[2]  # the skipped step left θ as it was
    assert thetas[4] != thetas[3]


def test_malicious_reply_raising_anything_is_a_rejection(tmp_path, monkeypatch):
    """Whatever reading a reply raises (here a ZeroDivisionError, as a bug a
    crafted reply might reach would) rejects that reply with a ReplyRejected
    naming the participant; the round steps with the others."""
    import coordinator.rounds as rounds

    real = rounds.parse_reply

    def parse(content: RecordDict, **kw: Any):
        if kw["t"] == 2 and kw["node"] == 1001:
            raise ZeroDivisionError("division by zero")
        return real(content, **kw)

    monkeypatch.setattr(rounds, "parse_reply", parse)
    _, rows = _run(_raw(tmp_path, "plain", 0, **{"num-rounds": 3}), {})
    assert [r["participants"] for r in rows] == [3, 2, 3]
    assert rows[1]["rejected"] == {
        "1001": "ReplyRejected: reply of participant 1001: ZeroDivisionError: "
        "division by zero"
    }
    assert all(r["stepped"] for r in rows)


@pytest.mark.parametrize("bad", [0, 1, 2])
def test_malicious_chunk_failing_the_sum_is_charged_to_its_reply(
    ckks_pair, ps, monkeypatch, tmp_path, bad
):
    """Behind the load checks: if a chunk that no addition accepts got through
    them (simulated: the NTT check switched off), the sum fails with BadChunks
    naming that reply — not the one it was added to — in the coordinator's
    process and in a pool worker's entry point (its chunks in spool files)."""
    import coordinator.workers as workers

    part, coord, _, _ = ckks_pair
    rng = np.random.default_rng(1)
    top = ps.depth

    def enc(level: int) -> bytes:
        return part.encrypt(rng.uniform(-0.1, 0.1, ps.slots), level=level)

    real = SealCiphertext.of(coord.load(enc(top), level=top).data)
    grads = [[enc(top) for _ in range(3)]]
    grads[0][bad] = real.replace(ntt=0).chunk()
    theta = [coord.dump(coord.to_bottom(coord.load(enc(top), level=top)))]
    state = [(enc(top - 1), enc(top - 1), enc(top))]
    args = (theta, state, StateUnits.levels(top), None, grads, 5, AdamHyper())
    check = type(coord).check

    def lenient(self, ct: Any, level: int) -> Ct:
        if not ct.is_ntt_form():
            return Ct(ct, level)
        return check(self, ct, level)

    monkeypatch.setattr(type(coord), "check", lenient)
    with pytest.raises(BadChunks) as info:
        step_chunks(coord, *args)
    assert [(f.source, f.index) for f in info.value.failures] == [("gradient", bad)]
    assert "ValueError" in info.value.failures[0].error
    monkeypatch.setattr(workers, "_worker_be", coord)
    files = workers.write_shard(coord, tmp_path, slice(0, 1), (*args, None))
    with pytest.raises(BadChunks) as info:
        workers._step_shard(files, {"optimizer": "he-adam", "k": 1.0})
    assert [(f.source, f.index) for f in info.value.failures] == [("gradient", bad)]
