"""hedrl-bench: synthetic aggregation rounds, CKKS and its plaintext twin (issue 5).

The round (participant → coordinator → participant) runs through the real code
of both sides; see :mod:`benchmarks.bench_round` for its stages.

Participants run in parallel in a federation, so a round's critical path is
``round_s = coordinator_s + participant_s + refresh_s`` (one participant's own
work, plus the refresher's extra work); transport latency is not included.
``--workers N`` shards the coordinator's per-chunk work (ciphertext parsing, sum,
unmask, HE-Adam) over N processes, the coordinator's own included
(coordinator.workers.ChunkPool); ``step_s`` is
that work's wall time and parse/sum/unmask/adam its breakdown (CPU seconds summed
over the workers when sharded).
Backends of one configuration run interleaved in one process; every number is the
median over ``--reps`` rounds.

This module is the CLI and the sweep; :mod:`benchmarks.bench_party` sets up one
backend at one size, :mod:`benchmarks.bench_round` times one round and
:mod:`benchmarks.bench_report` writes the records, table and plot.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_party import (
    RUN_ID,
    Clock,
    Keys,
    Party,
    Wire,
    from_wire,
    make_party,
    relay,
    to_wire,
)
from benchmarks.bench_report import (
    add_speedups,
    markdown_table,
    merge,
    plot,
    summarise,
)
from benchmarks.bench_round import (
    BENCH_PARTICIPANT_STAGES,
    COORDINATOR_STAGES,
    STAGES,
    Round,
)
from coordinator.workers import ChunkPool
from protocol import hedrl_version
from protocol.adam import AdamHyper
from protocol.memory import retain_freed_memory

__all__ = [  # the CLI plus its parts re-exported for callers and tests
    "COORDINATOR_STAGES",
    "BENCH_PARTICIPANT_STAGES",
    "RUN_ID",
    "STAGES",
    "Clock",
    "Keys",
    "Party",
    "Round",
    "Wire",
    "build_parser",
    "from_wire",
    "main",
    "make_party",
    "markdown_table",
    "parse_count",
    "parse_list",
    "plot",
    "run_sweep",
    "relay",
    "to_wire",
]

DEFAULT_PARTICIPANTS = "2,4,8,16,32,64"
DEFAULT_PARAMS = "10k,100k,1M"


# ---- small helpers -------------------------------------------------------------------
def parse_count(text: str) -> int:
    """``"100k"`` → 100000, ``"1M"`` → 1000000, ``"12288"`` → 12288."""
    s = text.strip().lower()
    mult = {"k": 10**3, "m": 10**6, "g": 10**9}.get(s[-1:], 1)
    if mult != 1:
        s = s[:-1]
    value = float(s) * mult
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"not a positive count: {text!r}")
    return int(value)


def parse_list(text: str, item: Callable[[str], Any] = parse_count) -> list[Any]:
    """A comma-separated list (one value is a list of one)."""
    return [item(x) for x in text.split(",") if x.strip()]


# ---- the sweep -----------------------------------------------------------------------
def _progress(done: int, total: int, label: str, start: float, quiet: bool) -> None:
    if quiet:
        return
    el = time.perf_counter() - start
    eta = el / done * (total - done) if done else 0.0
    bar = "#" * int(30 * done / total)
    sys.stderr.write(
        f"\r[{bar:<30}] {done}/{total} {el:6.0f} s (eta {eta:5.0f} s) {label:<40}"
    )
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def run_sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (P, K) configuration; backends and worker counts interleaved per rep."""
    rng = np.random.default_rng(args.seed)
    hp = AdamHyper(lr=args.lr)
    # as the federation does by default (run-config retain-freed-memory)
    retained = not args.no_retain_memory and retain_freed_memory()
    pools: dict[tuple[str, int], ChunkPool] = {}
    variants = [(b, w) for w in args.workers for b in args.backends]
    total = len(args.params) * len(args.participants) * args.reps * len(variants)
    done, start = 0, time.perf_counter()
    records = []
    with tempfile.TemporaryDirectory(prefix="hedrl-bench-") as tmp:
        keys_ = Keys(args.param_set, Path(tmp), hp)

        def pool_for(b: str, w: int) -> ChunkPool | None:
            if w > 0 and (b, w) not in pools:
                pools[b, w] = ChunkPool(
                    context=keys_.get(b)[2],
                    param_set=args.param_set,
                    backend=b,
                    workers=w,
                    retain_memory=not args.no_retain_memory,
                )
            return pools.get((b, w))

        try:
            for P in args.params:
                parties = {v: make_party(keys_, v[0], P, rng) for v in variants}
                for K in args.participants:
                    rounds = {}
                    for v in variants:
                        pool = pool_for(*v)
                        rounds[v] = Round(parties[v], K, hp, args.mask_bits, rng, pool)
                        for _ in range(args.warmup):  # not timed
                            rounds[v].run(keys_)
                    samples: dict[tuple[str, int], list[dict[str, float]]] = {
                        v: [] for v in variants
                    }
                    for rep in range(args.reps):
                        for v in variants:
                            samples[v].append(rounds[v].run(keys_))
                            done += 1
                            label = f"{v[0]} K={K} P={P} w={v[1]} rep {rep + 1}"
                            _progress(done, total, label, start, args.quiet)
                    config = [
                        rec
                        for w in args.workers
                        for rec in summarise(
                            {b: rounds[b, w] for b in args.backends},
                            {b: samples[b, w] for b in args.backends},
                            w,
                        )
                    ]
                    add_speedups(config)  # workers N vs 0, same interleaved reps
                    for rec in config:
                        rec["retain_freed_memory"] = retained
                    records.extend(config)
        finally:
            for pool in pools.values():
                pool.close()
    return records


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="hedrl-bench",
        description=(
            "Synthetic aggregation rounds (random normalised gradients, no "
            "environment) through hedrl's real participant and coordinator code: "
            "clip/scale, encrypt, Flower records, parse, homomorphic sum, masked "
            "refresh, HE-Adam, θ broadcast at the bottom level, decrypt. Each "
            "configuration runs every backend interleaved in this process; numbers "
            "are medians over --reps rounds after one warm-up round. round_s is the "
            "critical path: coordinator + one participant + the refresher's extra "
            "work (participants work in parallel; transport latency excluded)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument(
        "--version", action="version", version=f"%(prog)s {hedrl_version()}"
    )
    ap.add_argument(
        "--participants",
        type=parse_list,
        default=DEFAULT_PARTICIPANTS,
        help="participants K per round: one value or a comma-separated list",
    )
    ap.add_argument(
        "--params",
        type=parse_list,
        default=DEFAULT_PARAMS,
        help="parameter counts P: one value or a comma-separated list; k/M "
        "suffixes allowed (10000,100k,1M). Bytes are exact per filled slot when P "
        "is a multiple of the slot count (4096 at 8k-35x3); otherwise the JSON "
        "reports the padding waste",
    )
    ap.add_argument(
        "--backends",
        type=lambda s: parse_list(s, str.strip),
        default="ckks,plain",
        help="backends to run, interleaved (ckks: CKKS; plain: the plaintext twin)",
    )
    ap.add_argument(
        "--reps", type=int, default=3, help="timed rounds per configuration and backend"
    )
    ap.add_argument(
        "--workers",
        type=lambda s: parse_list(s, int),
        default="0",
        help="processes sharding the coordinator's per-chunk work (parse, sum, "
        "unmask, HE-Adam): the coordinator's own process takes one shard and N−1 "
        "spawned workers the others; 0 runs step_chunks in-process on one core, 1 "
        "the same through the pool (the federation runs in-process with "
        "coordinator-workers 0 or 1 or for a single chunk; its default, -1, takes "
        "one process per core). A list (0,2) measures each, rounds interleaved; "
        "records with N ≥ 2 then carry their speed-up over 0 (speedup, "
        "step_speedup) and, from the shards' summed stage times, cpu_inflation "
        "(how much the processes slowed each other), step_speedup_bound = "
        "N/cpu_inflation and sharding_efficiency; serial_fraction (the stages "
        "outside the step, in the coordinator's process only), speedup_bound "
        "(Amdahl: those stages as in one process, the step at its bound) and "
        "speedup_efficiency",
    )
    ap.add_argument(
        "--param-set", default="8k-35x3", help="CKKS parameter set (protocol/params.py)"
    )
    ap.add_argument("--lr", type=float, default=2e-3, help="HE-Adam learning rate")
    ap.add_argument(
        "--mask-bits", type=int, default=20, help="refresh masks are uniform ±2^bits"
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of gradients and masks")
    ap.add_argument(
        "--out", type=Path, default=Path("bench.json"), help="JSON records written here"
    )
    ap.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="PNG of round time vs K and vs P (default: --out with .png)",
    )
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG")
    ap.add_argument(
        "--table",
        type=Path,
        default=None,
        help="also write the Markdown table (always printed) to this file",
    )
    ap.add_argument(
        "--warmup", type=int, default=1, help="untimed rounds before the timed ones"
    )
    ap.add_argument(
        "--append",
        action="store_true",
        help="merge into the records already in --out (a configuration measured "
        "again replaces its old records); plot and table show the merged set",
    )
    ap.add_argument(
        "--no-retain-memory",
        action="store_true",
        help="leave glibc's malloc at its defaults (the federation's "
        "retain-freed-memory = false); by default this process and the workers "
        "keep freed large allocations for reuse, as the federation does "
        "(records: retain_freed_memory)",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bad = [b for b in args.backends if b not in ("ckks", "plain")]
    if (
        bad
        or args.reps < 1
        or args.warmup < 0
        or min(args.workers) < 0
        or min(args.participants) < 1
    ):
        build_parser().error(
            f"backends must be ckks/plain (got {bad}), reps ≥ 1, warmup ≥ 0, "
            "workers ≥ 0, K ≥ 1"
        )
    records = run_sweep(args)
    if args.append and args.out.exists():
        records = merge(json.loads(args.out.read_text()), records)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=1) + "\n")
    table = markdown_table(records)
    print(table, end="")
    if args.table is not None:
        args.table.write_text(table)
    if not args.no_plot:
        plot(records, args.plot or args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
