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
import time
from typing import Any

import numpy as np

from participants.learner import Learner, clip_and_scale
from protocol.adam import SUM_OPTIMIZERS, initial_state, twin_step
from protocol.config import RunConfig

WINDOW = 20
THRESHOLDS = {"CartPole-v1": 475.0, "Acrobot-v1": -100.0}


def update_unit(learner: Learner, server: str) -> np.ndarray:
    """Per element, what a participant multiplies clip(u, ±G)/G by (with its
    weight): Adam's pre-scale c, or G itself for the optimisers that step on
    the plain mean of the updates (:data:`protocol.adam.SUM_OPTIMIZERS`)."""
    if server not in SUM_OPTIMIZERS:
        return np.full(learner.layout.size, learner.cfg.hyper.c)
    out = np.empty(learner.layout.size)
    for (_, sl), g in zip(learner.layout.slices(), learner.bounds, strict=True):
        out[sl] = g
    return out


def run(
    cfg: RunConfig,
    threshold: float,
    max_rounds: int,
    server: str = "",
    verbose: bool = False,
) -> dict[str, Any]:
    """One run of ``cfg`` (its seed) with server optimiser ``server`` (default:
    the run config's); the rounds and env steps to the threshold."""
    server = server or cfg.optimizer
    k = cfg.num_participants
    learners = [Learner(cfg, i) for i in range(k)]
    hp, w = cfg.hyper, 1.0 / k
    unit = update_unit(learners[0], server)
    theta = learners[0].initial_theta()
    saved: list[bytes | None] = [None] * k
    state = None
    means: list[float] = []  # per-round mean episode return (rounds with episodes)
    curve: list[float] = []  # last-20 mean after each round
    env_steps, solved_at, solved_steps, stop = 0, 0, 0, max_rounds
    low = math.inf
    for t in range(1, max_rounds + 1):
        x = np.zeros_like(theta)
        squares = np.zeros_like(theta)
        episodes, total = 0, 0.0
        for i, lr_ in enumerate(learners):
            update, stats, saved[i] = lr_.step(theta, saved[i])
            g_n = clip_and_scale(update, lr_.layout, lr_.bounds)
            x += unit * w * g_n
            squares += w * g_n * g_n
            episodes += stats["episodes"]
            total += stats["return_sum"]
            env_steps += stats["env_steps"]
        if state is None:
            state = initial_state(np.clip(squares, 0.0, 1.0), hp)
        theta, state = twin_step(theta, state, x, t, hp, 1.0, server)
        if episodes:
            means.append(total / episodes)
        window = float(np.mean(means[-WINDOW:])) if len(means) >= WINDOW else -math.inf
        curve.append(window)
        if not solved_at and window >= threshold:
            solved_at, solved_steps = t, env_steps
            stop = max(math.ceil(1.5 * t), t + 20)
        elif solved_at and t <= math.ceil(1.5 * solved_at):
            low = min(low, window)
        if verbose and t % 10 == 0:
            print(f"round {t} last-20 {window:.1f}", file=sys.stderr)
        if t >= stop or not np.all(np.isfinite(theta)):
            break
    margin = 0.9 * threshold if threshold > 0 else threshold / 0.9
    return {
        "seed": cfg.seed,
        "rounds": solved_at or None,
        "env_steps": solved_steps or None,
        "stable": bool(solved_at) and low >= margin,
        "lowest_after": None if math.isinf(low) else low,
        "final_last20": curve[-1],
        "ran": t,
    }


def report(lines: list[str]) -> str:
    """A markdown table of study summaries (the JSON lines ``--out`` writes)."""
    out = [
        "| env | update | server | settings | R per seed | median R | env steps "
        "to R (median) | stable |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for line in lines:
        d = json.loads(line)
        kv = dict(item.split("=", 1) for item in d["set"])
        mode = kv.pop("participant-update", "gradient")
        rounds = [r["rounds"] for r in d["runs"]]
        steps = [r["env_steps"] for r in d["runs"] if r["env_steps"]]
        med = d["median_rounds"]
        out.append(
            f"| {d['env']} | {mode} | {d['server']} | "
            f"{' '.join(f'{k}={v}' for k, v in kv.items()) or 'defaults'} | "
            f"{', '.join('—' if r is None else str(r) for r in rounds)} | "
            f"{'—' if med is None else f'{med:g}'} | "
            f"{f'{np.median(steps):,.0f}' if len(steps) == len(rounds) else '—'} | "
            f"{d['stable']}/{len(rounds)} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--env", default="CartPole-v1")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--max-rounds", type=int, default=300)
    ap.add_argument(
        "--server",
        default="",
        choices=["", "he-adam", "exact-adam", *SUM_OPTIMIZERS],
        help="server optimiser (default: the run config's; fedavg and fedavgm "
        "step on the plain mean of the updates, lr = η)",
    )
    ap.add_argument("--set", nargs="*", default=[], help="run-config key=value")
    ap.add_argument("--out", default="")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument(
        "--report", default="", help="print a markdown table of this --out file"
    )
    args = ap.parse_args(argv)
    if args.report:
        with open(args.report) as fh:
            print(report([line for line in fh if line.strip()]))
        return
    raw: dict[str, Any] = dict(kv.split("=", 1) for kv in args.set)
    raw["env-id"] = args.env
    rows = []
    for seed in args.seeds:
        cfg = RunConfig.from_mapping({**raw, "seed": seed, "backend": "plain"})
        start = time.perf_counter()
        row = run(cfg, THRESHOLDS[args.env], args.max_rounds, args.server, args.verbose)
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(json.dumps({"server": args.server, **row}))
    solved = [r["rounds"] for r in rows if r["rounds"]]
    summary = {
        "env": args.env,
        "server": args.server or RunConfig.from_mapping(raw).optimizer,
        "set": args.set,
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
