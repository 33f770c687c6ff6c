"""A release is the twin replayed over genuine updates, never a decryption of a
ciphertext the coordinator chose: a crafted final θ, a forged ledger or a
missing update gets no release, and the released values do not depend on what
the final θ decrypted to."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from participants import release as rel
from participants import updates
from participants.guard import Guard
from participants.twin import replay
from protocol import keys
from protocol.adam import AdamHyper
from protocol.errors import KeyMaterialError
from protocol.ledger import read_chain
from protocol.params import get_param_set
from tests.helpers import local_federation, local_raw

PS = get_param_set("8k-35x3")
RUN_ID = 5151
#: a release whose flooding and rounding are far below every other error
EXACT = {"noise_std": 1e-30, "round_to": 2.0**-40}


def _run(tmp: Path, on_round=None, rounds: int = 3, **extra) -> tuple[Path, Path]:
    raw = local_raw(
        tmp,
        **{
            "backend": "ckks",
            "num-rounds": rounds,
            "num-participants": 2,
            "seed": 4,
            "run-name": "r",
            **extra,
        },
    )
    local_federation(raw, RUN_ID, on_round=on_round).run()
    return tmp / "keys" / f"run-{RUN_ID}", tmp / "results" / "r" / "ledger.jsonl"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("twin"))


@pytest.fixture
def run(trained, tmp_path):
    """Copies of the trained run's key directory and ledger (a release marks
    the key used)."""
    key_dir, ledger = trained
    return (
        shutil.copytree(key_dir, tmp_path / "keys"),
        Path(shutil.copy(ledger, tmp_path / "ledger.jsonl")),
    )


def _final(key_dir: Path) -> tuple[np.ndarray, dict, np.ndarray]:
    fp = json.loads(next(key_dir.glob("guard-*-p0.json")).read_text())["fingerprint"]
    from participants.trust import Trust

    guard = Guard(Trust.local(key_dir / keys.PARTICIPANT_FILE, key_dir, 0), fp)
    try:
        theta, final = guard.final_theta()
        return theta, final, guard.final_theta0()
    finally:
        guard.close()


def test_released_policy_is_the_replay_not_the_decryption(run, monkeypatch):
    """Released θ = the twin replayed from the kept updates (to 2^-40), not the
    decrypted final θ (they differ by CKKS noise); and a different decrypted
    final θ within the match tolerance releases exactly the same values."""
    key_dir, ledger = run
    decrypted, final, theta0 = _final(key_dir)
    wire, chain = read_chain(ledger)
    assert wire == final["round"] and [e.step for e in chain] == [1, 2, 3]
    found = updates.Kept(key_dir, _fp(key_dir), decrypted.size)
    assert found.keys() == [(i, w) for i in (0, 1) for w in (1, 2, 3)]
    args = (AdamHyper(**final["hyper"]), "he-adam", final["gradient_factor"])
    twin = replay(chain, found, theta0, *args, max_k=2, step_bound=0.06)
    assert 1e-9 < np.max(np.abs(twin - decrypted)) < 1e-3
    out = key_dir.parent / "p.npz"
    rel.release(key_dir, out, ledger_path=ledger, **EXACT)
    released, info = rel.load_policy(out)
    assert info["steps"] == 3
    assert np.max(np.abs(released - twin)) <= 2.0**-40

    # the same key, another decrypted final θ (shifted by half the tolerance)
    again = key_dir.parent / "again"
    key2 = shutil.copytree(key_dir.parent / "keys", again / "keys")
    for g in key2.glob("guard-*.json"):
        state = json.loads(g.read_text())
        state["released"] = False
        g.write_text(json.dumps(state))
    real = Guard.final_theta

    def shifted(self):
        theta, fin = real(self)
        return theta + 0.5 * 4.0 * 9.8e-4 * np.max(np.abs(twin - theta0)), fin

    monkeypatch.setattr(Guard, "final_theta", shifted)
    rel.release(key2, again / "p.npz", ledger_path=ledger, **EXACT)
    assert np.array_equal(rel.load_policy(again / "p.npz")[0], released)


def test_replay_keeps_to_the_participants_step_bound(run):
    """A step the twin would take beyond this participant's theta-step-bound
    (a ledger's lr or k magnifying an update) stops the replay."""
    key_dir, ledger = run
    decrypted, final, theta0 = _final(key_dir)
    _, chain = read_chain(ledger)
    found = updates.Kept(key_dir, _fp(key_dir), decrypted.size)
    args = (AdamHyper(**final["hyper"]), "he-adam", final["gradient_factor"])
    moved = replay(chain[:1], found, theta0, *args, max_k=2, step_bound=1.0)
    step1 = float(np.max(np.abs(moved - theta0)))
    with pytest.raises(KeyMaterialError, match="moves θ by more than"):
        replay(chain, found, theta0, *args, max_k=2, step_bound=0.9 * step1)


def test_unnamed_kept_files_are_never_read(run):
    """Only the updates the chain names are loaded: a damaged or foreign file
    under a round the chain does not name (an earlier run's leftovers) does
    not block the release."""
    key_dir, ledger = run
    d = next(key_dir.glob("guard-*-p0-updates"))
    (d / "w0000099.npz").write_bytes(b"not an npz")
    np.savez(d / "w0000098.npz", gradient=np.zeros(7), gradient_digest=np.zeros(32))
    assert rel.release(key_dir, key_dir.parent / "p.npz", ledger_path=ledger)


def _fp(key_dir: Path) -> str:
    return json.loads(next(key_dir.glob("guard-*-p0.json")).read_text())["fingerprint"]


def test_malicious_crafted_final_theta_is_not_released(tmp_path):
    """The audit's attack: the coordinator makes the final θ a ciphertext it
    chose (here θ + 0.004 in every slot, inside the participants' step bound,
    added with the evaluation context alone). Every participant accepts and
    confirms it — it passes every check a single θ can pass — but it is not
    what the ledger's steps compute, so nothing is released."""

    def craft(t, fed):
        if t == fed.cfg.num_rounds:
            be = fed.be
            fed.theta = [
                be.add_scalar(
                    c if not isinstance(c, bytes) else be.load(c, level=0), 0.004
                )
                for c in fed.theta
            ]

    key_dir, ledger = _run(tmp_path, on_round=craft)
    decrypted, final, _ = _final(key_dir)
    assert final["agreed"]
    out = tmp_path / "p.npz"
    with pytest.raises(KeyMaterialError, match="did not run the steps it recorded"):
        rel.release(key_dir, out, ledger_path=ledger)
    assert not out.exists()
    assert not any(
        json.loads(g.read_text())["released"] for g in key_dir.glob("guard-*.json")
    )


def _forge(ledger: Path, change) -> None:
    lines = [json.loads(line) for line in ledger.read_text().splitlines()]
    lines = change(lines)
    ledger.write_text("".join(json.dumps(line) + "\n" for line in lines))


def _set(lines, step, key, value):
    for line in lines:
        if line.get("step") == step:
            line[key] = value
    return lines


FORGERIES = {
    "unknown digest": (
        lambda ls: _set(ls, 2, "updates", [[0, "ab" * 32], ls[1]["updates"][1]]),
        "no participant's update directory",
    ),
    "another round's update": (
        lambda ls: _set(ls, 3, "updates", ls[1]["updates"]),
        "no participant's update directory",
    ),
    "k changed": (lambda ls: _set(ls, 3, "k", 2.0), "did not run the steps"),
    "an update dropped": (
        lambda ls: _set(ls, 3, "updates", ls[2]["updates"][:1]),
        "did not run the steps",
    ),
    "a step left out": (lambda ls: _set(ls, 3, "parent", 1), "did not run the steps"),
    "a parent after its step": (
        lambda ls: _set(ls, 2, "parent", 3),
        "starts from a later step",
    ),
    "no final": (lambda ls: [x for x in ls if "final" not in x], "names no final"),
    "rounds going back": (lambda ls: _set(ls, 3, "wire", 1), "do not increase"),
    "a participant twice": (
        lambda ls: _set(ls, 2, "updates", [ls[1]["updates"][0]] * 2),
        "names a participant twice",
    ),
    "k out of range": (lambda ls: _set(ls, 1, "k", float("nan")), "must be a number"),
    # k = K/K' ≤ K: a larger k would magnify one update in the release
    "k above K": (lambda ls: _set(ls, 3, "k", 1800.0), "above the federation size"),
}


@pytest.mark.parametrize("name", list(FORGERIES))
def test_malicious_forged_ledger_releases_nothing(run, name):
    """Each forgery of the ledger (the coordinator writes it) ends the release
    with one line naming the problem, writes nothing and leaves the key
    releasable with the true ledger."""
    key_dir, ledger = run
    true = ledger.read_text()
    change, match = FORGERIES[name]
    _forge(ledger, change)
    out = key_dir.parent / "p.npz"
    with pytest.raises(KeyMaterialError, match=match):
        rel.release(key_dir, out, ledger_path=ledger)
    assert not out.exists()
    ledger.write_text(true)
    assert rel.release(key_dir, out, ledger_path=ledger)["steps"] == 3


def test_release_needs_every_participants_updates(run, capsys):
    """Without participant 1's kept updates (a deployment that did not copy
    them over) the release stops with the fix in one line."""
    key_dir, ledger = run
    for d in key_dir.glob("guard-*-p1-updates"):
        shutil.rmtree(d)
    args = ["--keys", str(key_dir), "--ledger", str(ledger)]
    assert rel.release_main([*args, "--out", str(key_dir.parent / "p.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "participant 1's update of round 1" in err and "copy every" in err


class Killed(RuntimeError):
    """Stands in for the ServerApp process dying."""


def test_resumed_run_releases_over_both_ledgers(tmp_path):
    """Killed after round 3, resumed from the round-2 checkpoint (θ after step
    1): the resumed run carries the first run's ledger, runs steps 2 and 3
    again (their new lines replace the old ones) and the release replays the
    chain 1–5, the first run's step 1 included."""

    def die(t, fed):
        if t == 3:
            raise Killed

    with pytest.raises(Killed):
        _run(tmp_path, on_round=die, rounds=5, **{"checkpoint-every": 2})
    first = tmp_path / "results" / "r"
    raw = local_raw(
        tmp_path,
        **{
            "backend": "ckks",
            "num-rounds": 5,
            "num-participants": 2,
            "seed": 4,
            "run-name": "resumed",
            "resume-from": str(first / "checkpoint.npz"),
        },
    )
    local_federation(raw, RUN_ID + 1).run()
    ledger = tmp_path / "results" / "resumed" / "ledger.jsonl"
    _, chain = read_chain(ledger)
    assert [e.step for e in chain] == [1, 2, 3, 4, 5]
    old = {e["step"]: e for e in map(json.loads, (first / "ledger.jsonl").open())}
    assert chain[0].updates == [tuple(u) for u in old[1]["updates"]]
    assert chain[1].wire > old[2]["wire"]  # step 2 ran again, in a later round
    key_dir = tmp_path / "keys" / f"run-{RUN_ID}"
    info = rel.release(key_dir, tmp_path / "p.npz", ledger_path=ledger)
    assert info["steps"] == 5


def _simulated_update(raw: dict, index: int, theta0: np.ndarray, be) -> np.ndarray:
    """The coordinator's replay of participant ``index``'s first update: the
    learner run from the run config it wrote, as the participant would."""
    from participants.learner import Learner, clip_and_scale
    from protocol.codec import on_grid
    from protocol.config import RunConfig

    cfg = RunConfig.from_mapping(raw)
    learner = Learner(cfg, index)
    grad, _, _ = learner.step(theta0, None)
    g_n = clip_and_scale(grad, learner.layout, learner.bounds)
    weight = 1.0 / cfg.num_participants  # participants/node.py's _learn_into
    return on_grid(be, cfg.hyper.c * weight * be.gradient_factor * g_n)


@pytest.mark.parametrize("deployed", [False, True])
def test_malicious_coordinator_replays_rollouts_only_in_simulation(tmp_path, deployed):
    """The coordinator writes the run's seed. In a simulation (one user in
    every role) it can replay a participant's first rollout exactly; a
    deployed participant mixes a secret derived from its key into every
    rollout seed, so the same replay misses its update."""
    from tests.participants.malicious import deployed_federation

    if deployed:
        fed = deployed_federation(tmp_path, participants=2, rounds=1)
        state = tmp_path / "state-0"
    else:
        raw = local_raw(
            tmp_path,
            **{"backend": "ckks", "num-rounds": 1, "num-participants": 2, "seed": 3},
        )
        fed = local_federation(raw, RUN_ID)
        fed.run()
        state = tmp_path / "keys" / f"run-{RUN_ID}"
    raw = dict(fed.grid.contexts[fed.nodes[0]].run_config)
    from participants.learner import Learner
    from protocol.config import RunConfig

    theta0 = Learner(RunConfig.from_mapping(raw), 0).initial_theta()
    kept = updates.Kept(state, fed.fingerprint, theta0.size).get((0, fed.wire(1)))
    assert kept is not None
    guess = _simulated_update(raw, 0, theta0, fed.be)
    # the replay matches to the grid but for float noise (3 of 9,155 values
    # one grid step off in a simulation), or not at all
    off = np.abs(guess - kept.gradient)
    scale = np.max(np.abs(kept.gradient))
    if deployed:
        assert np.max(off) > 0.1 * scale
    else:
        assert np.mean(off == 0) > 0.99 and np.max(off) <= PS.encrypt_grid
