"""How far HE-Adam's r' strays from V'^(−½) in a real run: u = x²r² per step.

HE-Adam's update differs from Adam's only where r' = r·(A − P)/((A − 1)·√β2)
misses V'^(−½), and from an exact r that miss is a function of u = x²r² alone
(:func:`protocol.adam.rsqrt_step_error`). This runs the plaintext twin of an
environment preset (in-process, 4 participants, coordinator-workers 0) and,
per window of rounds, reports the share of parameter-steps with u above 0.1,
0.3 and 0.5, the largest u, and the mean of ``rsqrt_step_error`` for A = 3
(Newton) and A = 4.16 (the minimax constant): the mean relative change of
Adam's step that the r update causes. One JSON object per window on stdout.

    python -m benchmarks.rsqrt_u --env lunarlander --rounds 5000 --window 500
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.fidelity import load_preset, sweep_settings
from benchmarks.local_grid import LocalGrid
from coordinator.federation import Federation
from protocol.adam import StateUnits, minimax_rsqrt_a, rsqrt_step_error
from protocol.config import RunConfig

THRESHOLDS = (0.1, 0.3, 0.5)


class UStats:
    """Per-window statistics of u, fed one step at a time."""

    def __init__(self, window: int, constants: tuple[float, ...]) -> None:
        self.window, self.constants = window, constants
        self.windows: dict[int, dict[str, float]] = {}

    def add(self, t: int, u: np.ndarray) -> None:
        """Step ``t``'s u of every parameter."""
        w = self.windows.setdefault((t - 1) // self.window, {"n": 0, "max_u": 0.0})
        w["n"] += u.size
        w["max_u"] = max(w["max_u"], float(u.max()))
        for th in THRESHOLDS:
            w[f"share_u>{th}"] = w.get(f"share_u>{th}", 0) + int((u > th).sum())
        for a in self.constants:
            key = f"mean_err_A{a:g}"
            w[key] = w.get(key, 0.0) + float(rsqrt_step_error(a, u).sum())

    def rows(self) -> list[dict[str, Any]]:
        """One row per window: shares and means over its parameter-steps."""
        out = []
        for i, w in sorted(self.windows.items()):
            n = w["n"]
            row: dict[str, Any] = {
                "rounds": [i * self.window + 1, (i + 1) * self.window],
                "max_u": w["max_u"],
            }
            row.update({k: v / n for k, v in w.items() if k not in ("n", "max_u")})
            out.append(row)
        return out


def measure(
    env: str, rounds: int, seed: int, window: int, work: Path
) -> list[dict[str, Any]]:
    """Run the twin of ``env`` for ``rounds`` rounds; u statistics per window."""
    overrides, _ = load_preset(env)
    # the twin exactly as the fidelity sweep runs it (same run id as its seed)
    raw = {**overrides, **sweep_settings(env, seed, "plain", work, rounds, 4)}
    cfg = RunConfig.from_mapping(raw)
    constants = sorted({cfg.rsqrt_a, 3.0, round(minimax_rsqrt_a(), 2)})
    stats = UStats(window, tuple(constants))
    prev: dict[str, np.ndarray] = {}

    def on_round(t: int, fed: Federation) -> None:
        n = fed.param_count
        if fed.last_aggregate is None or fed.state is None:
            return
        x = np.concatenate([a.data / a.factor for a in fed.last_aggregate])[:n]
        if "r" in prev:  # r going into this step, x this step's sum
            stats.add(t, (x * prev["r"]) ** 2)
        f_r = StateUnits.of(fed.be, fed.hp).out[2]
        prev["r"] = np.concatenate([s[2].data for s in fed.state])[:n] / f_r

    grid = LocalGrid(1000 + seed, raw, 4, keep_history=False)
    fed = Federation(grid, cfg, 1000 + seed, on_round=on_round)
    fed.keep_aggregate = True
    fed.run()
    return stats.rows()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.rsqrt_u",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--env", default="lunarlander", help="preset name")
    ap.add_argument("--rounds", type=int, default=500, help="rounds to run")
    ap.add_argument("--window", type=int, default=500, help="rounds per row")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.rounds < 2 or args.window < 1:
        ap.error("--rounds must be ≥ 2 and --window ≥ 1")
    with tempfile.TemporaryDirectory(prefix="hedrl-u-") as tmp:
        for row in measure(args.env, args.rounds, args.seed, args.window, Path(tmp)):
            print(json.dumps({"env": args.env, "seed": args.seed, **row}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
