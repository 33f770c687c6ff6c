"""A coordinator that deviates learns at most one constant bit per refusal, and
only a bounded number of them (issue 25, classes 1, 3–6, 9).

Each test plays the coordinator (tests.participants.malicious.Attacker): it
crafts θ or the refresh state from ciphertexts it legitimately holds, forges
task fields and the run config, replays and rewinds, against deployed
participants whose settings come from their node config.
"""

from __future__ import annotations

import numpy as np
import pytest

from participants import node as node_mod
from protocol import messages as msg
from protocol.adam import StateUnits
from protocol.codec import decrypt_received
from protocol.tolerance import ckks_abs_tol
from tests.participants.malicious import (
    BOUND,
    GAP,
    PS,
    Attacker,
    deployed_federation,
    vector_of,
)

REFUSAL = f"Refused: {msg.REFUSED_CODE}"
TERMINAL = f"Terminal: {msg.TERMINAL_CODE}"


@pytest.fixture
def attacker(tmp_path):
    """3 deployed participants after 3 honest CKKS rounds; refusal budget 6."""
    return Attacker(deployed_federation(tmp_path, budget=6), tmp_path)


def _decryptions(monkeypatch) -> list[int]:
    """Count the participant's decryptions (every one goes through here)."""
    calls: list[int] = []
    real = decrypt_received

    def counted(be, received):
        calls.append(1)
        return real(be, received)

    monkeypatch.setattr(node_mod, "decrypt_received", counted)
    return calls


def test_malicious_crafted_theta_gets_one_constant_refusal(attacker):
    """θ crafted from ciphertexts the coordinator holds — another participant's
    gradient (as θ, or added to θ at several scales), θ plus a public offset —
    each gets the same constant reply and costs one refusal; the honest θ is
    still accepted afterwards. Nothing in a reply depends on the value. (θ plus
    a gradient, |g| < 0.011 here, is within the bound of 0.03 and is accepted:
    what a bound admits is the coordinator's to choose, docs/threat-model.md.)"""
    a, be = attacker, attacker.be
    victim = a.nodes[0]
    theta, grad = a.theta(victim), [be.to_bottom(g) for g in a.gradient()]

    def plus(scale: float) -> list:  # θ + scale·(another participant's gradient)
        return [
            be.add(t, be.to_bottom(be.scal(g, scale)))
            for t, g in zip(theta, a.gradient(), strict=True)
        ]

    crafted = [
        grad,
        plus(10.0),
        plus(1e3),
        [be.add_scalar(t, 0.5) for t in theta],
        [be.add_scalar(t, BOUND * (GAP + 1)) for t in theta],  # past any gap
    ]
    reasons = []
    for i, th in enumerate(crafted):
        reply = a.send(victim, msg.TRAIN, a.train(victim, th))
        assert reply.has_error()
        reasons.append(reply.error.reason)
        assert a.guard(0).refusals == i + 1
        a.round += 1
    assert set(reasons) == {REFUSAL}, reasons
    # a θ within the bound of the last accepted one is accepted (and costs nothing)
    reply = a.send(victim, msg.TRAIN, a.train(victim))
    assert not reply.has_error(), reply.error
    assert set(reply.content) >= {msg.GRADIENT, msg.METRICS}
    assert a.guard(0).refusals == len(crafted)


def test_refusal_budget_ends_in_a_constant_terminal_reply_across_runs(tmp_path):
    """After B refusals every message gets the terminal code — an honest θ, a new
    run with the same key, a restarted participant — and a coordinator that
    meets it ends its run with one line."""
    from protocol.errors import RunEnded

    a = Attacker(deployed_federation(tmp_path, budget=2), tmp_path)
    victim = a.nodes[1]
    offset = [a.be.add_scalar(t, 1.0) for t in a.theta(victim)]
    replies = []
    for _ in range(3):
        replies.append(a.send(victim, msg.TRAIN, a.train(victim, offset)).error.reason)
        a.round += 1
    assert replies == [REFUSAL, TERMINAL, TERMINAL]
    honest = a.send(victim, msg.TRAIN, a.train(victim))
    assert honest.error.reason == TERMINAL
    assert a.guard(1).refusals == 2
    # a new run under the same key: participant 1 answers setup with the code
    with pytest.raises(RunEnded, match="spent its refusal budget"):
        deployed_federation(tmp_path, budget=2, run_id=4343)


def test_malicious_forged_task_and_run_config_do_not_widen_the_bound(attacker):
    """K = 10^6, theta-step-bound = 10^9 and refusal-budget = 10^6 in the
    run config, key-run-id and num-participants in the task, a jump of 10^4
    rounds: a deployed participant's bound stays theta-step-bound × min(gap, G)
    from its node config, and a θ inside it that is not its twin is refused
    too; the honest θ is still accepted after both. A run config whose honest
    steps the node's bound could not take (lr 10) is refused before anything
    is decrypted, typed and uncharged."""
    a = attacker
    victim = a.nodes[2]
    a.grid.contexts[victim].run_config["lr"] = 10.0
    reply = a.send(victim, msg.TRAIN, a.train(victim, round_=a.round + 1))
    assert reply.error.reason.startswith("ConfigError: run config steps θ by up to ")
    assert "theta-step-bound is 0.03" in reply.error.reason
    assert a.guard(2).refusals == 0
    a.grid.contexts[victim].run_config.update(
        {
            "lr": 0.002,
            "num-participants": 10**6,
            "theta-step-bound": 1e9,
            "max-round-gap": 10**6,
            "refusal-budget": 10**6,
        }
    )
    task = {"num-participants": 10**6, "key-run-id": 1, "k": 1e6}
    jump = a.round + 10_000
    over = [a.be.add_scalar(t, BOUND * GAP * 1.5) for t in a.theta(victim)]
    reply = a.send(victim, msg.TRAIN, a.train(victim, over, round_=jump, task=task))
    assert reply.error.reason == REFUSAL
    within = [a.be.add_scalar(t, BOUND * 0.5) for t in a.theta(victim)]
    reply = a.send(victim, msg.TRAIN, a.train(victim, within, round_=jump + 1))
    assert reply.error.reason == REFUSAL
    reply = a.send(victim, msg.TRAIN, a.train(victim, round_=jump + 2))
    assert not reply.has_error(), reply.error
    assert a.guard(2).refusals == 2
    assert not (a.tmp / "keys").exists()  # no key directory picked by the task


def test_malicious_run_config_cannot_grow_the_policy_or_rollout_past_node_caps(
    attacker, monkeypatch
):
    """hidden-sizes 512,512,512 (≈1M parameters), then 10^6 envs, in a deployed
    participant's run config: each refused typed, uncharged and before any
    decryption, naming the node config's cap; the honest config is served after."""
    a = attacker
    victim = a.nodes[1]
    calls = _decryptions(monkeypatch)
    a.grid.contexts[victim].run_config["hidden-sizes"] = "512,512,512"
    reply = a.send(victim, msg.TRAIN, a.train(victim, round_=a.round + 1))
    assert reply.error.reason.startswith("ConfigError: the run config's policy has ")
    assert "max-param-count 200000" in reply.error.reason
    assert calls == [] and a.guard(1).refusals == 0
    a.grid.contexts[victim].run_config["hidden-sizes"] = "64,64"
    a.grid.contexts[victim].run_config["num-envs"] = 10**6  # 1.28e8 steps a rollout
    reply = a.send(victim, msg.TRAIN, a.train(victim, round_=a.round + 1))
    assert reply.error.reason.startswith("ConfigError: run config asks for rollouts")
    assert "max-rollout-steps 65536" in reply.error.reason
    assert calls == [] and a.guard(1).refusals == 0
    a.grid.contexts[victim].run_config["num-envs"] = 4
    reply = a.send(victim, msg.TRAIN, a.train(victim, round_=a.round + 1))
    assert not reply.has_error(), reply.error


def _masked_state_message(a: Attacker):
    """A train message of the honest run that carried the masked state."""
    return a.sent(msg.TRAIN, key=msg.state_key("state", "m"))


def _with_state(a: Attacker, content, state: dict[str, list], **fields) -> None:
    """Put masked-state vectors (per name) into ``content`` at this round."""
    hdr, _ = a.cts(_masked_state_message(a).content, msg.state_key("state", "m"), 0)
    for name in msg.STATE_NAMES:
        a.put(
            content,
            msg.state_key("state", name),
            hdr,
            state[name],
            round=a.round,
            name=name,
            **fields,
        )


def _honest_state(a: Attacker) -> dict[str, list]:
    content = _masked_state_message(a).content
    return {n: a.cts(content, msg.state_key("state", n), 0)[1] for n in msg.STATE_NAMES}


def test_malicious_replay_and_rewind_refused_before_any_decryption(
    attacker, monkeypatch
):
    """The same round twice, a round going back, a round past max-rounds, a
    spare refresh in a round the participant already refreshed in: each is
    refused with a typed error before anything is decrypted, and costs nothing."""
    a = attacker
    victim = a.nodes[0]
    content = a.train(victim, refresher=True)
    _with_state(a, content, _honest_state(a))
    ok = a.send(victim, msg.TRAIN, content)
    assert not ok.has_error(), ok.error
    decrypted = _decryptions(monkeypatch)
    for round_ in (a.round, a.round - 1, 1, 10**6):
        reply = a.send(victim, msg.TRAIN, a.train(victim, round_=round_))
        assert reply.error.reason.startswith("OutOfOrder: train: round"), reply
    spare = a.train(victim)
    _with_state(a, spare, _honest_state(a))
    reply = a.send(victim, msg.REFRESH, spare)
    assert reply.error.reason.startswith("OutOfOrder: refresh: round"), reply
    assert decrypted == [] and a.guard(0).refusals == 0


def test_malicious_refresh_state_checked_before_decryption(attacker, monkeypatch):
    """Masked state whose header claims another level, with a chunk too many, or
    whose chunks sit at another level than the header says, is refused before
    decryption; state that decrypts to values no mask produces is one refusal;
    an honest refresh returns values rounded to the encryption grid."""
    a, be = attacker, attacker.be
    victim = a.nodes[1]
    state = _honest_state(a)
    decrypted = _decryptions(monkeypatch)

    def refresh(state: dict[str, list], **fields) -> str:
        content = a.train(victim, refresher=True)
        _with_state(a, content, state, **fields)
        reply = a.send(victim, msg.TRAIN, content)
        a.round += 1
        return reply.error.reason if reply.has_error() else ""

    assert refresh(state, level=3).startswith("HeaderMismatch")
    more = {n: c + c[:1] for n, c in state.items()}
    assert refresh(more).startswith("HeaderMismatch")
    top = {n: a.gradient() for n in state}  # top-level chunks, header says 0
    assert refresh(top).startswith("CiphertextError")
    assert decrypted == [] and a.guard(1).refusals == 0
    # a gradient × 2^40 decrypts far outside any masked state: one refusal
    big = [be.to_bottom(be.scal(g, 2.0**40)) for g in a.gradient()]
    assert refresh({n: big for n in state}) == REFUSAL
    assert a.guard(1).refusals == 1
    # the honest refresh: every value re-encrypted lies on the grid
    assert refresh(state) == ""
    rd = a.grid.received[-1].content
    part, _ = _participant(a)
    grid = PS.encrypt_grid
    levels = StateUnits.levels(be.top_level)
    for name, level in zip(msg.STATE_NAMES, levels, strict=True):
        values = np.concatenate(
            [
                part.decrypt(c, level=level)
                for c in vector_of(rd, msg.state_key("refresh", name))
            ]
        )
        off = np.abs(values / grid - np.round(values / grid)) * grid
        assert off.max() <= ckks_abs_tol(PS, float(np.abs(values).max())), name


def test_malicious_v0_checked(attacker):
    """k outside [1, K] is refused before decryption; squares outside [0, 1]
    after it, as one refusal."""
    a, be = attacker, attacker.be
    victim = a.nodes[0]
    grad = a.gradient()

    def v0(cts, k: float) -> str:
        content = a.train(victim, task={"k": k})
        hdr, _ = a.cts(a.sent(msg.V0).content, msg.SQUARES, be.top_level)
        a.put(content, msg.SQUARES, hdr, cts, round=a.round)
        reply = a.send(victim, msg.V0, content)
        a.round += 1
        return reply.error.reason if reply.has_error() else ""

    assert v0(grad, 1e6).startswith("WireFormatError: task 'k'")
    assert a.guard(0).refusals == 0
    scaled = [be.add_scalar(g, 5.0) for g in grad]
    assert v0(scaled, 1.0) == REFUSAL and a.guard(0).refusals == 1


def test_replies_of_deployed_participants_carry_no_episode_metrics(attacker):
    """report-metrics is off by default in deployment: a train reply's metrics
    hold the environment step count only; setup replies hold no decrypted value."""
    for reply in attacker.grid.received:
        if msg.METRICS in reply.content:
            assert set(reply.content[msg.METRICS]) == {"env-steps"}
        if msg.SETUP_REPLY in reply.content:
            assert set(reply.content[msg.SETUP_REPLY]) <= {
                "fingerprint",
                "layout-digest",
                "param-count",
                "participant-index",
                "last-round",
                "max-rounds",
                "context",
                "twin-step",
                "twin-hash",
            }


def test_malicious_key_run_id_task_field_is_ignored(tmp_path):
    """In simulation the key directory comes from the run config (keys-dir and
    key-run-id), never from a task field: a setup asking for run 1's key gets
    this run's."""
    from tests.helpers import local_federation, local_raw

    raw = local_raw(tmp_path, **{"backend": "plain", "num-participants": 2})
    fed = local_federation(raw, 77)
    a = Attacker.__new__(Attacker)
    a.grid = fed.grid
    from flwr.app import ConfigRecord, RecordDict

    content = RecordDict(
        {
            msg.TASK: ConfigRecord(
                {"round": 0, "backend": "plain", "send-context": 0, "key-run-id": 1}
            )
        }
    )
    reply = a.send(1000, msg.SETUP, content)
    assert not reply.has_error(), reply.error
    assert (tmp_path / "keys" / "run-77").is_dir()
    assert not (tmp_path / "keys" / "run-1").exists()


def _participant(a: Attacker):
    from protocol import keys

    return keys.participant_backend(a.tmp / "bundle" / "participant.ctx", PS, "ckks")


def test_malicious_nothing_is_decrypted_after_the_final(tmp_path, monkeypatch):
    """Once a participant accepted a final θ under a key, it decrypts nothing
    more under it: a second final (say, θ plus a structured offset, to be
    released next to the first) and any later θ are refused before decryption.
    Each participant tags one final, so two finals cannot both win a majority."""
    a = Attacker(deployed_federation(tmp_path, finish=True), tmp_path)
    a.round += 1  # the final took a round
    victim = a.nodes[0]
    decrypted = _decryptions(monkeypatch)
    offset = [a.be.add_scalar(t, 1e-3) for t in a.theta(victim)]
    for kind in (msg.FINAL, msg.TRAIN):
        reply = a.send(victim, kind, a.train(victim, offset))
        assert reply.error.reason.startswith(f"OutOfOrder: {kind.split('.')[-1]}:")
        assert "accepted the final θ" in reply.error.reason
        a.round += 1
    assert decrypted == [] and a.guard(0).refusals == 0


def test_malicious_refused_message_leaves_the_learner_where_it_was(attacker):
    """A train refused after the learner ran (here: its refresh) leaves the
    participant's rollout state as it was, so the environment steps it reports
    later follow from the accepted messages only, whatever the refusal's cause."""
    from participants.node import STATE_KEY

    a, be = attacker, attacker.be
    victim = a.nodes[2]
    context = a.grid.contexts[victim]
    before = bytes(context.state[STATE_KEY]["blob"])
    content = a.train(victim, refresher=True)
    big = [be.to_bottom(be.scal(g, 2.0**40)) for g in a.gradient()]
    _with_state(a, content, {n: big for n in msg.STATE_NAMES})
    assert a.send(victim, msg.TRAIN, content).error.reason == REFUSAL
    assert bytes(context.state[STATE_KEY]["blob"]) == before


def test_malicious_run_config_cannot_import_a_module_or_unpin_the_node(tmp_path):
    """env-id 'module:Env' would make gymnasium import the module in the process
    that holds the key: refused before anything is loaded. A node config with
    deployment settings but no secret-context, or without federation-size (the
    final θ's quorum), fails closed instead of falling back to the run config."""
    import sys

    from participants.trust import Trust
    from protocol.config import RunConfig
    from protocol.errors import ConfigError

    with pytest.raises(ConfigError, match="without ':'"):
        RunConfig.from_mapping({"env-id": "antigravity:Fly-v0"})
    assert "antigravity" not in sys.modules
    cfg = RunConfig()
    for node_config, missing in (
        ({"participant-index": 0, "federation-size": 3}, "secret-context"),
        ({"secret-context": "/k/p.ctx", "participant-index": 0}, "federation"),
    ):
        with pytest.raises(ConfigError, match=missing):
            Trust.from_context(node_config, cfg, 7)
    simulated = Trust.from_context({"partition-id": 1, "num-partitions": 4}, cfg, 7)
    assert not simulated.deployed and simulated.index == 1
