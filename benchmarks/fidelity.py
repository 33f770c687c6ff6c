"""Fidelity benchmark: encrypted federation vs plaintext twin vs exact Adam.

    python -m benchmarks.fidelity --envs cartpole --seeds 5      # closed loop
    python -m benchmarks.fidelity --quick                        # open loop, CI
    python -m benchmarks.fidelity --report                       # JSON, PNG, table

Each (env, seed, variant) runs the real coordinator (``Federation``) and the
real ClientApp through an in-process grid (:mod:`benchmarks.local_grid`; the
Flower transport is the only thing left out) and writes its own result file
under ``benchmarks/results/fidelity/`` as soon as it finishes; finished ones are
skipped, so a long sweep survives being stopped. A run in progress checkpoints
every ``CHECKPOINT_EVERY`` rounds into ``fidelity/.work/``; a stopped run
resumes from there (the coordinator's ``resume-from``; the participants start
fresh episodes) and its result lists the rounds it resumed at.

Variants: ``ckks`` (CKKS + HE-Adam), ``plain`` (the twin: same circuit in
float64) and ``exact`` (twin with exact Adam — the paper's "unencrypted
counterpart").

Gap (per env): |mean final return encrypted − mean final return reference| over
the seeds, divided by |solve threshold − random-policy return|; final return =
mean over the last 100 episodes. ``gap`` uses exact Adam as the reference,
``gap_twin`` the plaintext twin.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.fidelity_common import (
    CHECKPOINT_EVERY,
    RESULTS,
    TRACE_ROUNDS,
    ThetaTrace,
    _read_json,
    final_return,
    load_preset,
    parse_set,
    result_path,
    rounds_to_solve,
    stale,
    sweep_settings,
    trace_path,
    work_path,
)
from benchmarks.fidelity_quick import main as quick_main
from benchmarks.fidelity_report import main as report_main
from benchmarks.local_grid import LocalGrid
from coordinator.federation import Federation
from protocol import keys
from protocol.checkpoint import read_checkpoint
from protocol.config import RunConfig
from protocol.files import write_atomic

log = logging.getLogger("hedrl.fidelity")


def _segments(work: Path, ident: dict[str, Any]) -> list[tuple[Path, int]]:
    """Earlier parts of this run in ``work``: (results dir, checkpoint step) each.

    Everything in ``work`` is discarded if it was started with other settings
    (a re-tuned preset, another round budget) or cannot be resumed; a part
    stopped before its first checkpoint is dropped.
    """
    meta = work / "run.json"
    found: list[tuple[Path, int]] = []
    if meta.exists():
        why = None
        if _read_json(meta) != ident:
            why = "started with other settings"
        elif not (work / "trace.npz").exists():
            why = f"stopped before round {TRACE_ROUNDS} (no trace)"
        else:
            for part in sorted((work / "results").glob("part-*"), key=_part_no):
                ckpt = part / "checkpoint.npz"
                step = int(read_checkpoint(ckpt)[0]["step"]) if ckpt.exists() else 0
                if step <= (found[-1][1] if found else 0):
                    shutil.rmtree(part)
                    continue
                found.append((part, step))
            if found and found[-1][1] >= ident["rounds"]:
                why, found = "finished but never written", []
        if why:
            log.warning("discarding %s: %s", work, why)
            found = []
    if not found and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    write_atomic(meta, json.dumps(ident).encode(), 0o644)
    return found


def _part_no(part: Path) -> int:
    """k of a run's k-th part, ``results/part-<k>``."""
    return int(part.name.removeprefix("part-"))


def _resumed_rows(parts: list[tuple[Path, int]]) -> tuple[list[dict[str, Any]], float]:
    """Metrics rows of earlier parts up to their checkpoints; their wall time."""
    rows: list[dict[str, Any]] = []
    wall, prev = 0.0, 0
    for part, step in parts:
        with open(part / "metrics.jsonl") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except ValueError:
                    break  # the line a kill cut short: past the checkpoint
                if prev < rec["round"] <= step:
                    rows.append(rec)
        elapsed = json.loads((part / "elapsed.json").read_text())
        wall += elapsed[str(step)]
        prev = step
    return rows, wall


class _Progress:
    """Per-round hook: the θ trace (saved once complete) and the part's elapsed
    time per round (saved at each checkpoint round, for a later resume)."""

    def __init__(self, trace: ThetaTrace, work: Path, part: Path) -> None:
        self.trace, self.work, self.part = trace, work, part
        self.start = time.perf_counter()
        self.elapsed: dict[str, float] = {}

    def __call__(self, t: int, fed: Federation) -> None:
        self.trace(t, fed)
        if t == TRACE_ROUNDS:
            buf = io.BytesIO()
            np.savez(buf, **self.trace.arrays())
            write_atomic(self.work / "trace.npz", buf.getvalue())
        self.elapsed[str(t)] = time.perf_counter() - self.start
        if t % CHECKPOINT_EVERY == 0:  # before the checkpoint of round t
            write_atomic(
                self.part / "elapsed.json", json.dumps(self.elapsed).encode(), 0o644
            )


def run_one(
    env: str,
    seed: int,
    variant: str,
    work: Path,
    *,
    max_rounds: int | None = None,
    participants: int = 4,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One closed-loop federation; returns its result record.

    ``work`` keeps the run's keys and checkpoints: if it holds a stopped run
    with the same settings, this one resumes it from its last checkpoint.
    """
    overrides, bench = load_preset(env, extra)
    rounds = max_rounds or int(bench["max-rounds"])
    ident = {"preset": overrides, "rounds": rounds, "participants": participants}
    parts = _segments(work, ident)
    raw = {
        **overrides,
        **sweep_settings(env, seed, variant, work, rounds, participants),
    }
    # after the last part kept (a name never reused: its rows are read below)
    part = work / "results" / f"part-{_part_no(parts[-1][0]) + 1 if parts else 0}"
    raw["run-name"] = part.name
    run_id = 1000 + seed
    trace = ThetaTrace(
        work / "keys" / f"run-{run_id}" / keys.PARTICIPANT_FILE,
        str(raw["backend"]),
        TRACE_ROUNDS,
    )
    rows, wall = [], 0.0
    if parts:
        raw["resume-from"] = str((parts[-1][0] / "checkpoint.npz").resolve())
        rows, wall = _resumed_rows(parts)
        trace.load(work / "trace.npz")
        log.info(
            "resuming %s seed %d %s at round %d (%s)",
            env,
            seed,
            variant,
            parts[-1][1] + 1,
            work,
        )
    cfg = RunConfig.from_mapping(raw)
    grid = LocalGrid(run_id, raw, participants, keep_history=False)
    part.mkdir(parents=True, exist_ok=True)
    progress = _Progress(trace, work, part)
    fed = Federation(grid, cfg, run_id, on_round=progress)
    fed.keep_aggregate = True
    fed.run()
    wall += time.perf_counter() - progress.start
    rows += fed.history
    solved = rounds_to_solve(rows, float(bench["solve-threshold"]))
    return {
        "env": env,
        "env_id": cfg.env_id,
        "seed": seed,
        "variant": variant,
        "final_return": final_return(rows),
        "rounds": len(rows),
        "rounds_to_solve": solved[0] if solved else None,
        "env_steps_to_solve": solved[1] if solved else None,
        "wall_s": wall,
        "median_round_s": float(np.median([r["round_s"] for r in rows])),
        # rounds a stopped run continued at (from a checkpoint; the
        # participants' environments started fresh episodes there)
        "resumed_at": [step + 1 for _, step in parts],
        "curve": [
            [r["round"], r["return_mean"], r["episodes"]] for r in rows if r["episodes"]
        ],
        "_traces": trace.arrays(),
        "solve_threshold": bench["solve-threshold"],
        "random_return": bench["random-return"],
        # the preset this run used: a later re-tune makes it stale (re-run, and
        # left out of the report)
        "preset": overrides,
    }


def write_result(out: Path, res: dict[str, Any]) -> Path:
    """Write a run's traces (npz) and its result (JSON, atomically, last)."""
    env, variant, seed = res["env"], res["variant"], res["seed"]
    traces = res.pop("_traces")
    tpath = trace_path(out, env, variant, seed)
    tpath.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(tpath, **traces)
    path = result_path(out, env, variant, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(res).encode(), 0o644)
    return path


def sweep(
    envs: list[str],
    seeds: list[int],
    variants: list[str],
    out: Path,
    max_rounds: int | None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Run every missing (env, seed, variant) in this process, one after the
    other; each result is written on finish. To share a sweep among processes,
    give each its own --seed-list (or --envs): they write separate files.

    ``extra`` (``--set``) overrides preset values; results record them, so the
    report leaves such runs out of the committed table (they are stale).
    """
    for env in envs:
        for seed in seeds:
            for variant in variants:
                path = result_path(out, env, variant, seed)
                if path.exists():
                    why = stale(path, env, extra)
                    if why is None:
                        log.info("skip %s (done)", path)
                        continue
                    log.warning("re-running %s: %s", path, why)
                work = work_path(out, env, variant, seed)
                log.info("run %s seed %d %s", env, seed, variant)
                try:
                    res = run_one(
                        env, seed, variant, work, max_rounds=max_rounds, extra=extra
                    )
                except BaseException:
                    if work.exists():
                        log.warning("stopped; %s resumes from %s", path.name, work)
                    raise
                write_result(out, res)
                shutil.rmtree(work, ignore_errors=True)
                log.info(
                    "%s seed %d %s: final return %s, solved at %s, %.0f s",
                    env,
                    seed,
                    variant,
                    res["final_return"],
                    res["rounds_to_solve"],
                    res["wall_s"],
                )


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.fidelity",
        description="Encrypted vs plaintext-twin vs exact-Adam federations "
        "(closed loop, resumable), an open-loop CKKS check (--quick) and the report.",
    )
    ap.add_argument(
        "--envs",
        default="cartpole",
        help="comma-separated presets from benchmarks/presets "
        "(cartpole, acrobot, pendulum, mountaincar, lunarlander)",
    )
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    ap.add_argument(
        "--seed-list",
        default=None,
        help="comma-separated seeds instead of 0..N-1, e.g. '1,3' to split a "
        "sweep over two processes (each writes its own result files)",
    )
    ap.add_argument(
        "--variants",
        default="ckks,plain,exact",
        help="comma-separated subset of ckks,plain,exact",
    )
    ap.add_argument(
        "--max-rounds",
        type=int,
        default=None,
        help="override the preset's round budget (smoke runs)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a preset's run-config value (repeatable; TOML values, "
        "e.g. --set lr=5e-4 --set layer-bounds=critic=0.01) for screening; "
        "needs --out outside the committed results",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="open-loop check: replay the twin's gradients into the "
        "encrypted pipeline for 20 rounds and assert the CKKS tolerance",
    )
    ap.add_argument(
        "--report",
        action="store_true",
        help="aggregate result files into fidelity.json, fidelity.png "
        "and the table in docs/fidelity.md",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    # flwr's logger is at DEBUG; keep the participants' per-message lines
    # (DEBUG after a process's first) out of the root handler
    logging.getLogger("flwr.hedrl.participant").setLevel(logging.INFO)
    if args.quick:
        return quick_main(args.out)
    if args.report:
        report_main(args.out)
        return 0
    if args.seed_list:
        try:
            seeds = [int(x) for x in args.seed_list.split(",")]
        except ValueError:
            ap.error(f"--seed-list: expected integers like 1,3, got {args.seed_list!r}")
        if min(seeds) < 0:
            ap.error("--seed-list: seeds must be >= 0")
    else:
        seeds = list(range(args.seeds))
    try:
        extra = parse_set(args.set)
    except ValueError as exc:
        ap.error(str(exc))
    # `kill` unwinds like Ctrl-C: the run's checkpoints stay for a resume
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if extra and args.out.resolve() == RESULTS.resolve():
        ap.error(
            "--set runs are screening runs: give --out DIR (not the committed results)"
        )
    sweep(
        args.envs.split(","),
        seeds,
        args.variants.split(","),
        args.out,
        args.max_rounds,
        extra,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
