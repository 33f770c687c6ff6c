"""Participants act on the twin: θ replayed in float64 over the sealed updates
the coordinator relays. A θ that is not its twin is refused in the round it is
sent, a forged relay fails before anything is decrypted, and what participants
train on and release does not depend on any decryption."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message

from participants.learner import Learner, clip_and_scale
from protocol import keys
from protocol import messages as msg
from protocol.codec import on_grid
from protocol.config import RunConfig
from protocol.params import get_param_set
from protocol.relay import Relay, open_sealed, parse_relay, relay_key
from tests.helpers import local_federation, local_raw

PS = get_param_set("8k-35x3")
RUN_ID = 5151


def _raw(tmp, rounds: int = 3, **extra) -> dict:
    return local_raw(
        tmp,
        **{
            "backend": "ckks",
            "num-rounds": rounds,
            "num-participants": 2,
            "seed": 4,
            "run-name": "r",
            "coordinator-workers": 0,
            **extra,
        },
    )


def _refusals(tmp) -> list[int]:
    key_dir = tmp / "keys" / f"run-{RUN_ID}"
    return [json.loads(p.read_text())["refusals"] for p in key_dir.glob("guard-*.json")]


def test_twin_matches_and_is_what_participants_train_on(tmp_path):
    """An honest run: no refusal, every participant's final θ is its twin
    (within CKKS error of the decryption, not equal to it), and both keep the
    same twin."""
    fed = local_federation(_raw(tmp_path), RUN_ID)
    summary = fed.run()
    assert all(not h["refused"] and h["stepped"] for h in fed.history)
    assert _refusals(tmp_path) == [0, 0] and len(summary["final"]["confirmed"]) == 2
    key_dir = tmp_path / "keys" / f"run-{RUN_ID}"
    finals = [np.load(p) for p in sorted(key_dir.glob("guard-*-final.npy"))]
    assert np.array_equal(finals[0], finals[1])
    be, _ = keys.participant_backend(key_dir / keys.PARTICIPANT_FILE, PS, "ckks")
    dec = np.concatenate([be.decrypt_ct(c) for c in fed.theta])[: finals[0].size]
    assert 0 < np.max(np.abs(dec - finals[0])) < 1e-4
    snapshots = sorted(p.name[:10] for p in key_dir.glob("guard-*-p0-twin/*.npz"))
    assert snapshots == ["s000000001", "s000000002", "s000000003"]


def _crafted_at(step_to_craft: int):
    def craft(t, fed):
        if t == step_to_craft:
            be = fed.be
            fed.theta = [
                be.add_scalar(be.load(c, level=0) if isinstance(c, bytes) else c, 0.004)
                for c in fed.theta
            ]

    return craft


def test_malicious_crafted_theta_is_refused_when_sent(tmp_path):
    """The audit's attack on θ: after step 2 the coordinator shifts θ by 0.004
    in every slot with the evaluation context alone — inside the step bound,
    so the bound accepts it — but it is not the twin: both participants refuse
    it in round 3 (one charged refusal each) and the coordinator rolls back."""
    fed = local_federation(_raw(tmp_path, rounds=4), RUN_ID, on_round=_crafted_at(2))
    fed.run()
    rows = {h["round"]: h for h in fed.history}
    assert sorted(rows[3]["refused"]) == [1000, 1001] and rows[3]["rolled_back"]
    assert not rows[4]["refused"] and rows[4]["stepped"]
    assert _refusals(tmp_path) == [1, 1]


def test_malicious_crafted_final_theta_is_not_released(tmp_path):
    """The same shift on the final θ: no participant tags it, so nothing can
    be released under the key."""
    from participants import release as rel

    fed = local_federation(_raw(tmp_path), RUN_ID, on_round=_crafted_at(3))
    summary = fed.run()
    assert summary["final"]["tagged"] == 0 and summary["final"]["confirmed"] == []
    key_dir = tmp_path / "keys" / f"run-{RUN_ID}"
    with pytest.raises(rel.HedrlError):
        rel.release(key_dir, tmp_path / "p.npz")
    assert not (tmp_path / "p.npz").exists()


def _forge(change):
    """A tamper_request that rewrites the relay of round 3's train messages."""

    def tamper(request: Message) -> Message:
        task = request.content.get(msg.TASK)
        if request.metadata.message_type == msg.TRAIN and task["round"] == 3:
            relay = parse_relay(request.content[msg.RELAY])
            request.content[msg.RELAY] = change(relay).record()
        return request

    return tamper


def _swap_sealed(r: Relay) -> Relay:
    (a, b) = list(r.sealed)
    return Relay(
        r.base, r.base_hash, r.head, r.head_hash, r.entries,
        {a: r.sealed[b], b: r.sealed[a]},
    )  # fmt: skip


def _entry(r: Relay, **change) -> Relay:
    """The relay's one step changed, its hash chain recomputed (the coordinator
    can: the hashes are public)."""
    from dataclasses import replace

    from protocol.relay import entry_hash

    (entry,) = [replace(r.entries[-1], **change)]
    head = entry.step
    return Relay(
        r.base, r.base_hash, head, entry_hash(r.base_hash, entry), [entry], r.sealed
    )


FORGERIES = {
    "sealed updates swapped": (_swap_sealed, "does not open"),
    "an update left out": (
        lambda r: _entry(r, updates=r.entries[-1].updates[:1]),
        "sums 1 updates",
    ),
    "k changed": (lambda r: _entry(r, k=1.5), "sums 2 updates with k = 1.5"),
    "k above K": (lambda r: _entry(r, k=3.0), "sums 2 updates with k = 3.0"),
    "head hash not the chain's": (
        lambda r: Relay(r.base, r.base_hash, r.head, "ab" * 32, r.entries, r.sealed),
        "hash chain",
    ),
    "a base never replayed": (
        lambda r: Relay(
            7, "ab" * 32, 8, r.head_hash, _entry(r, step=8, parent=7).entries, r.sealed
        ),
        "has not replayed",
    ),
    "a hash that is not one": (
        lambda r: Relay(r.base, "../x", r.head, r.head_hash, r.entries, r.sealed),
        "64 hex digits",
    ),
}


@pytest.mark.parametrize("name", list(FORGERIES))
def test_malicious_forged_relay_fails_before_decryption(tmp_path, name):
    """Each forgery of round 3's relay makes both participants fail with a
    typed error naming it, before anything is decrypted: no refusal charged;
    the coordinator counts it as a refused θ and rolls back; the run goes on."""
    change, match = FORGERIES[name]
    fed = local_federation(
        _raw(tmp_path, rounds=4), RUN_ID, tamper_request=_forge(change)
    )
    fed.run()
    row = next(h for h in fed.history if h["round"] == 3)
    assert sorted(row["missing"]) == sorted(row["refused"]) == [1000, 1001]
    assert row["rolled_back"]
    errors = [
        m.error.reason
        for m in fed.grid.received
        if m.has_error() and m.metadata.group_id == str(fed.wire(3))
    ]
    assert len(errors) == 2 and all(match in e for e in errors), errors
    assert _refusals(tmp_path) == [0, 0]
    assert next(h for h in fed.history if h["round"] == 4)["stepped"]


def test_malicious_relay_naming_an_older_step_gets_a_refusal(tmp_path):
    """A relay that holds together but names an older step as θ's (its new
    step dropped) gives a twin that is not θ: a charged refusal, like a
    crafted θ."""

    def older(r: Relay) -> Relay:
        return Relay(r.base, r.base_hash, r.base, r.base_hash, [], {})

    fed = local_federation(
        _raw(tmp_path, rounds=4), RUN_ID, tamper_request=_forge(older)
    )
    fed.run()
    row = next(h for h in fed.history if h["round"] == 3)
    assert sorted(row["refused"]) == [1000, 1001]
    assert _refusals(tmp_path) == [1, 1]


def test_malicious_relay_moving_past_the_bound_is_a_charged_refusal(
    tmp_path, monkeypatch
):
    """Whether a relayed step moves θ past the bound depends on the updates'
    values, so it is answered like a decryption: with the one constant,
    charged refusal, once per round (the audit's free gradient oracle). The
    run-config check before decryption (Trust.admit_run) refuses an lr whose
    honest steps could pass the bound, so it is switched off here to reach
    this second line."""
    from participants import trust
    from tests.participants.malicious import deployed_federation

    monkeypatch.setattr(trust, "largest_step", lambda cfg: 0.0)

    refusal = f"Refused: {msg.REFUSED_CODE}"

    fed = deployed_federation(tmp_path, participants=2, rounds=2)
    victim = fed.nodes[1]
    fed.grid.contexts[victim].run_config["lr"] = 10.0  # the twin's steps blow up
    honest = [m for m in fed.grid.sent if m.metadata.message_type == msg.TRAIN]
    last = [m for m in honest if m.metadata.dst_node_id == victim][-1]
    from tests.participants.malicious import Attacker

    a = Attacker(fed, tmp_path)
    content = a.train(victim)
    content[msg.RELAY] = last.content[msg.RELAY]  # with its step: replayed again
    twin_dir = next((tmp_path / "state-1").glob("guard-*-twin"))
    before = sorted(p.name for p in twin_dir.iterdir())
    reply = a.send(victim, msg.TRAIN, content)
    assert reply.error.reason == refusal
    assert a.guard(1).refusals == 1
    again = a.send(victim, msg.TRAIN, content)  # the same round: not answered again
    assert "already handled" in again.error.reason and a.guard(1).refusals == 1
    # a refused message keeps no snapshot
    assert sorted(p.name for p in twin_dir.iterdir()) == before


def test_twin_store_keeps_the_newest_snapshots(tmp_path, monkeypatch):
    """Snapshots are pruned by count, newest kept, whatever their numbers."""
    from participants import twin

    monkeypatch.setattr(twin, "KEEP_STEPS", 3)
    store = twin.TwinStore(tmp_path / "guard-x-p0")
    z = np.zeros(2)
    store.save([(s, f"{s:02d}" * 32, z, (z, z, z)) for s in (5, 1, 9, 3, 7)])
    assert [p.name[:10] for p in sorted(store.dir.iterdir())] == [
        "s000000005",
        "s000000007",
        "s000000009",
    ]
    assert store.newest() == (9, "09" * 32) and not store.has(3, "03" * 32)


def _simulated_update(raw: dict, index: int, theta0: np.ndarray, be) -> np.ndarray:
    """The coordinator's replay of participant ``index``'s first update: the
    learner run from the run config it wrote, as the participant would."""
    cfg = RunConfig.from_mapping(raw)
    learner = Learner(cfg, index)
    grad, _, _ = learner.step(theta0, None)
    g_n = clip_and_scale(grad, learner.layout, learner.bounds)
    weight = 1.0 / cfg.num_participants  # participants/node.py's _learn_into
    return on_grid(be, cfg.hyper.c * weight * be.gradient_factor * g_n)


@pytest.mark.parametrize("deployed", [False, True])
def test_malicious_coordinator_replays_rollouts_only_in_simulation(tmp_path, deployed):
    """The coordinator writes the run's seed. In a simulation (one user in
    every role) it could replay a participant's first rollout; a deployed
    participant mixes a secret derived from its key into every rollout seed,
    so the same replay misses its update."""
    from tests.participants.malicious import deployed_federation

    if deployed:
        fed = deployed_federation(tmp_path, participants=2, rounds=1)
        key_file = tmp_path / "bundle" / keys.PARTICIPANT_FILE
    else:
        fed = local_federation(_raw(tmp_path, rounds=1), RUN_ID)
        fed.run()
        key_file = tmp_path / "keys" / f"run-{RUN_ID}" / keys.PARTICIPANT_FILE
    raw = dict(fed.grid.contexts[fed.nodes[0]].run_config)
    theta0 = Learner(RunConfig.from_mapping(raw), 0).initial_theta()
    part, _ = keys.participant_backend(key_file, PS, "ckks")
    reply = next(
        m
        for m in fed.grid.received
        if m.metadata.src_node_id == fed.nodes[0]
        and m.metadata.message_type == msg.TRAIN
    )
    sealed = reply.content[msg.RELAY_UP]["sealed"]
    assert isinstance(reply.content[msg.RELAY_UP], ConfigRecord)
    kept = open_sealed(relay_key(part.mac_key), sealed, fed.wire(1), 0, theta0.size)
    guess = _simulated_update(raw, 0, theta0, fed.be)
    # the replay matches to the grid but for float noise, or not at all
    off = np.abs(guess - kept.gradient)
    scale = np.max(np.abs(kept.gradient))
    if deployed:
        assert np.max(off) > 0.1 * scale
    else:
        assert np.mean(off == 0) > 0.99 and np.max(off) <= PS.encrypt_grid
