"""Open-loop fidelity: the same gradients through the encrypted pipeline and the twin.

Closed-loop runs drift apart as soon as one sampled action differs, so this
replays the plaintext twin's per-participant gradients (recorded round by
round) into the encrypted federation — summed in the same fixed participant
order — and compares θ decrypted on the participant side after every round.
Deterministic up to CKKS noise; asserted against the parameter set's tolerance.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.fidelity_common import ThetaTrace, load_preset, sweep_settings
from benchmarks.local_grid import LocalGrid
from coordinator.federation import Federation
from participants.client_app import make_app
from participants.learner import GradientSource, Learner
from protocol import keys
from protocol.config import RunConfig
from protocol.params import get_param_set
from protocol.tolerance import ckks_theta_rel_tol

ROUNDS = 20


def _gradients(record: dict | None, replay: dict | None) -> GradientSource:
    """A gradient source that records (twin) or replays (encrypted) each
    participant's gradients, round by round."""
    calls: dict[int, int] = {}

    def source(learner: Learner, theta: np.ndarray, saved: Any, scope: Any) -> Any:
        n = calls.get(learner.index, 0)
        calls[learner.index] = n + 1
        if replay is not None:
            return replay[(learner.index, n)]
        out = learner.ppo_step(theta, saved, scope)
        assert record is not None
        record[(learner.index, n)] = (out[0].copy(), out[1], b"")
        return out

    return source


def _run(
    backend: str,
    work: Path,
    rounds: int,
    env: str,
    seed: int,
    record: dict | None,
    replay: dict | None,
) -> ThetaTrace:
    overrides, _ = load_preset(env)
    # the closed-loop sweep's settings; variant "ckks"/"plain" is this backend
    # with HE-Adam (keep_aggregate keeps the step in-process either way)
    raw = {**overrides, **sweep_settings(env, seed, backend, work, rounds, 4)}
    run_id = 77
    cfg = RunConfig.from_mapping(raw)
    trace = ThetaTrace(
        work / "keys" / f"run-{run_id}" / keys.PARTICIPANT_FILE, backend, rounds
    )
    grid = LocalGrid(run_id, raw, 4, app=make_app(_gradients(record, replay)))
    fed = Federation(grid, cfg, run_id, on_round=trace)
    fed.keep_aggregate = True  # in-process, so the trace sees each Σ x
    fed.run()
    return trace


def open_loop(
    rounds: int = ROUNDS,
    env: str = "cartpole",
    seed: int = 0,
    param_set: str = "8k-35x3",
) -> dict[str, Any]:
    """Run twin then encrypted replay; per-round relative θ and aggregate errors."""
    recorded: dict = {}
    with tempfile.TemporaryDirectory(prefix="hedrl-quick-") as tmp:
        twin = _run("plain", Path(tmp) / "plain", rounds, env, seed, recorded, None)
        enc = _run("ckks", Path(tmp) / "ckks", rounds, env, seed, None, recorded)
    overrides, _ = load_preset(env)
    ps = get_param_set(param_set)
    cfg = RunConfig.from_mapping({**overrides, "seed": seed})
    theta0 = Learner(cfg, 0).initial_theta()
    theta_err, agg_err = [], []
    for tp, tc, ap, ac in zip(
        twin.theta, enc.theta, twin.aggregate, enc.aggregate, strict=True
    ):
        theta_err.append(float(np.max(np.abs(tc - tp)) / np.max(np.abs(tp - theta0))))
        agg_err.append(float(np.max(np.abs(ac - ap)) / np.max(np.abs(ap))))
    tol = ckks_theta_rel_tol(ps)
    return {
        "env": env,
        "seed": seed,
        "param_set": ps.id,
        "rounds": rounds,
        "theta_rel_err": theta_err,
        "aggregate_rel_err": agg_err,
        "theta_tolerance": tol,
        "max_theta_rel_err": max(theta_err),
        "max_aggregate_rel_err": max(agg_err),
        "within_tolerance": max(theta_err) <= tol,
    }


def main(out: Path) -> int:
    """Write results/fidelity_quick.json; exit 1 when outside the tolerance."""
    res = open_loop()
    out.mkdir(parents=True, exist_ok=True)
    (out / "fidelity_quick.json").write_text(json.dumps(res, indent=2))
    print(
        f"open loop, {res['rounds']} rounds: max relative θ error "
        f"{res['max_theta_rel_err']:.2e} (tolerance {res['theta_tolerance']:.2e}); "
        f"max relative aggregate error {res['max_aggregate_rel_err']:.2e}"
    )
    return 0 if res["within_tolerance"] else 1
