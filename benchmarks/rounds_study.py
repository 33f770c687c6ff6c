"""Rounds to solve, in float64, with hedrl's own learner and the participants' twin.

Each round every participant's :class:`participants.learner.Learner` makes its
update at θ (a gradient, or Δ in 'delta' mode), clips and scales it as a
participant does before encrypting (``c·(1/K)·clip(u, ±G)/G``), and the sum
goes through :func:`protocol.adam.twin_step`, the same float64 step the
participants replay and check the encrypted θ against. So a run here is the
encrypted run's plaintext twin without keys, Flower or processes: a screening
tool for update modes, server optimisers and their constants.

R is a run's first round whose last-20 mean of the per-round mean episode
return reaches the threshold; the run continues to max(1.5R, R + 20) rounds and
is stable if its lowest last-20 mean over (R, 1.5R] is at least 90 % of it.

Usage::

    python -m benchmarks.rounds_study --env CartPole-v1 --seeds 0 1 2 \\
        --set participant-update=delta lr=0.01 --out study.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import tomllib
from typing import Any

import numpy as np

from benchmarks.fidelity_common import PRESETS, TARGETS, load_preset
from participants.learner import Learner, clip_and_scale
from protocol.adam import OPTIMIZERS, initial_state, twin_step
from protocol.config import RunConfig

WINDOW = 20


def _thresholds() -> dict[str, float]:
    """Each env id's solve threshold, from benchmarks/targets.toml."""
    targets = tomllib.loads(TARGETS.read_text())
    out: dict[str, float] = {}
    for name, target in targets.items():
        env = tomllib.loads((PRESETS / f"{name}.toml").read_text())["env-id"]
        out[env] = float(target["solve-threshold"])
    return out


THRESHOLDS = _thresholds()


class Tracker:
    """R, the env steps to R and stability from a run's rounds, as they come."""

    def __init__(self, threshold: float, max_rounds: int, full: bool = False) -> None:
        """``full``: run all ``max_rounds`` and judge stability over every
        round after R (a long run's late collapse), not (R, 1.5R] only."""
        self.threshold, self.stop, self.full = threshold, max_rounds, full
        self.means: list[float] = []  # per-round mean return (rounds with episodes)
        self.window = -math.inf
        self.env_steps = self.solved_at = self.solved_steps = self.t = 0
        self.low = math.inf

    def add(self, return_mean: float | None, env_steps: int) -> bool:
        """Record a round; whether the run should go on."""
        self.t += 1
        self.env_steps += env_steps
        if return_mean is not None:
            self.means.append(return_mean)
        if len(self.means) >= WINDOW:
            self.window = float(np.mean(self.means[-WINDOW:]))
        t = self.t
        if not self.solved_at and self.window >= self.threshold:
            self.solved_at, self.solved_steps = t, self.env_steps
            if not self.full:
                self.stop = min(self.stop, max(math.ceil(1.5 * t), t + 20))
        elif self.solved_at and (self.full or t <= math.ceil(1.5 * self.solved_at)):
            self.low = min(self.low, self.window)
        return t < self.stop

    def result(self, seed: int) -> dict[str, Any]:
        # stable: never more than 10 % worse than the threshold after R
        th = self.threshold
        margin = 0.9 * th if th > 0 else th / 0.9
        return {
            "seed": seed,
            "rounds": self.solved_at or None,
            "env_steps": self.solved_steps or None,
            "stable": bool(self.solved_at) and self.low >= margin,
            "lowest_after": None if math.isinf(self.low) else self.low,
            "final_last20": None if math.isinf(self.window) else self.window,
            "ran": self.t,
        }


def run(
    cfg: RunConfig,
    threshold: float,
    max_rounds: int,
    verbose: bool = False,
    full: bool = False,
) -> dict[str, Any]:
    """One run of ``cfg`` (its seed) on the float64 twin; rounds and env steps
    to the threshold."""
    k = cfg.num_participants
    learners = [Learner(cfg, i) for i in range(k)]
    hp, w = cfg.hyper, 1.0 / k
    unit = learners[0].update_unit()
    theta = learners[0].initial_theta()
    saved: list[bytes | None] = [None] * k
    state = None
    track = Tracker(threshold, max_rounds, full)
    going = True
    while going and np.all(np.isfinite(theta)):
        x = np.zeros_like(theta)
        squares = np.zeros_like(theta)
        episodes, total, steps = 0, 0.0, 0
        for i, lr_ in enumerate(learners):
            update, stats, saved[i] = lr_.step(theta, saved[i])
            g_n = clip_and_scale(update, lr_.layout, lr_.bounds)
            x += unit * w * g_n
            squares += w * g_n * g_n
            episodes += stats["episodes"]
            total += stats["return_sum"]
            steps += stats["env_steps"]
        if state is None:
            state = initial_state(np.clip(squares, 0.0, 1.0), hp)
        theta, state = twin_step(theta, state, x, track.t + 1, hp, 1.0, cfg.optimizer)
        going = track.add(total / episodes if episodes else None, steps)
        if verbose and track.t % 10 == 0:
            print(f"round {track.t} last-20 {track.window:.1f}", file=sys.stderr)
    return track.result(cfg.seed)


class _Done(Exception):
    pass


def run_encrypted(
    raw: dict[str, Any], threshold: float, max_rounds: int, verbose: bool = False
) -> dict[str, Any]:
    """One encrypted run of the real coordinator and participants in one
    process (:class:`benchmarks.local_grid.LocalGrid`, fresh keys), stopped
    as :class:`Tracker` says; the metrics rows give R."""
    from benchmarks.local_grid import LocalGrid
    from coordinator.federation import Federation

    with tempfile.TemporaryDirectory() as tmp:
        raw = {
            **raw,
            "backend": "ckks",
            "num-rounds": max_rounds,
            "results-dir": f"{tmp}/results",
            "keys-dir": f"{tmp}/keys",
            "run-name": "study",
            "checkpoint-every": 10**6,
        }
        cfg = RunConfig.from_mapping(raw)
        track = Tracker(threshold, max_rounds)

        def on_round(t: int, fed: Federation) -> None:
            row = fed.history[-1]
            going = track.add(row["return_mean"], row["env_steps"])
            if verbose and t % 10 == 0:
                print(f"round {t} last-20 {track.window:.1f}", file=sys.stderr)
            if not going:
                raise _Done

        grid = LocalGrid(1, raw, cfg.num_participants, keep_history=False)
        fed = Federation(grid, cfg, 1, on_round=on_round)
        try:
            fed.run()
        except _Done:
            pass
        refused = sum(len(r["refused"]) for r in fed.history)
        return {**track.result(cfg.seed), "refused": refused}


def report(lines: list[str]) -> str:
    """A markdown table of study summaries (the JSON lines ``--out`` writes)."""
    out = [
        "| env | run | update | server | settings | R per seed | median R | env "
        "steps to R (median) | stable |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for line in lines:
        d = json.loads(line)
        kv = dict(item.split("=", 1) for item in d["set"])
        mode = kv.pop("participant-update", d.get("update", "gradient"))
        if d.get("preset"):
            kv = {"preset": d["preset"], **kv}
        rounds = [r["rounds"] for r in d["runs"]]
        steps = [r["env_steps"] for r in d["runs"] if r["env_steps"]]
        med = d["median_rounds"]
        out.append(
            f"| {d['env']} | {'CKKS' if d.get('encrypted') else 'twin'} | {mode} | "
            f"{d.get('server', '—')} | "
            f"{' '.join(f'{k}={v}' for k, v in kv.items()) or 'defaults'} | "
            f"{', '.join('—' if r is None else str(r) for r in rounds)} | "
            f"{'—' if med is None else f'{med:g}'} | "
            f"{f'{np.median(steps):,.0f}' if len(steps) == len(rounds) else '—'} | "
            f"{d['stable']}/{len(rounds)} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--env", default="CartPole-v1", choices=sorted(THRESHOLDS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--max-rounds", type=int, default=300)
    ap.add_argument(
        "--server",
        default="",
        choices=["", *OPTIMIZERS],
        help="server optimiser: the run config's optimizer key (default: the "
        "run config's; fedavg and fedavgm step on the plain mean, lr = η)",
    )
    ap.add_argument(
        "--encrypted",
        action="store_true",
        help="run the real coordinator and participants under CKKS (in one "
        "process) instead of the float64 twin; the run config's optimiser",
    )
    ap.add_argument(
        "--preset",
        default="",
        help="start from this benchmarks/presets file's run config (--env must "
        "match it; --set overrides it)",
    )
    ap.add_argument("--set", nargs="*", default=[], help="run-config key=value")
    ap.add_argument("--out", default="")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument(
        "--full",
        action="store_true",
        help="run every --max-rounds round; stable = never 10 %% below the "
        "threshold after R (twin runs only)",
    )
    ap.add_argument(
        "--report", default="", help="print a markdown table of this --out file"
    )
    args = ap.parse_args(argv)
    if args.report:
        with open(args.report) as fh:
            print(report([line for line in fh if line.strip()]))
        return
    raw: dict[str, Any] = load_preset(args.preset)[0] if args.preset else {}
    if raw.get("env-id", args.env) != args.env:
        ap.error(f"--preset {args.preset} is for {raw['env-id']}, not --env {args.env}")
    raw.update(kv.split("=", 1) for kv in args.set)
    raw["env-id"] = args.env
    if args.server:
        raw["optimizer"] = args.server
    rows = []
    for seed in args.seeds:
        cfg = RunConfig.from_mapping({**raw, "seed": seed, "backend": "plain"})
        start = time.perf_counter()
        if args.encrypted:
            row = run_encrypted(
                {**raw, "seed": seed},
                THRESHOLDS[args.env],
                args.max_rounds,
                args.verbose,
            )
        else:
            row = run(
                cfg, THRESHOLDS[args.env], args.max_rounds, args.verbose, args.full
            )
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(json.dumps({"server": args.server, **row}))
    solved = [r["rounds"] for r in rows if r["rounds"]]
    base = RunConfig.from_mapping(raw)
    summary = {
        "env": args.env,
        "server": base.optimizer,
        "encrypted": args.encrypted,
        "set": args.set,
        "preset": args.preset,
        "update": base.participant_update,
        "median_rounds": float(np.median(solved)) if len(solved) == len(rows) else None,
        "solved": len(solved),
        "stable": sum(r["stable"] for r in rows),
        "runs": rows,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
