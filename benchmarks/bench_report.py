"""hedrl-bench outputs: per-configuration records (the JSON schema), the
Markdown table and the PNG of round time vs K and vs P."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_round import (
    BENCH_PARTICIPANT_STAGES,
    COORDINATOR_STAGES,
    STAGES,
    Round,
)
from coordinator.chunks import STEP_STAGES

IDENT = ("backend", "participants", "params", "workers", "param_set")


# ---- records -------------------------------------------------------------------------
def summarise(
    rounds: dict[str, Round], samples: dict[str, list[dict[str, float]]], workers: int
) -> list[dict[str, Any]]:
    """One record per backend: stage medians, bytes and the ckks/plain ratios."""
    out = {}
    for b, rnd in rounds.items():
        p = rnd.p
        med = {s: statistics.median(x[s] for x in samples[b]) for s in STAGES}
        coord = sum(med[s] for s in COORDINATOR_STAGES)
        part = sum(med[s] for s in BENCH_PARTICIPANT_STAGES)
        slots = p.chunks * p.ps.slots
        out[b] = {
            "backend": b,
            "participants": rnd.k,
            "params": p.params,
            "workers": workers,
            "param_set": p.ps.id,
            "chunks": p.chunks,
            "reps": len(samples[b]),
            "stages_s": med,
            "participant_s": part,
            "coordinator_s": coord,
            # the critical path (module docstring of benchmarks.bench); the
            # STEP_STAGES are inside step_s, not added to it
            "round_s": part + med["refresh_s"] + coord,
            "upload_bytes_per_param": rnd.up_bytes / p.params,
            "upload_bytes_per_slot": rnd.up_bytes / slots,
            "broadcast_bytes_per_param": rnd.down_bytes / p.params,
            "broadcast_bytes_per_slot": rnd.down_bytes / slots,
            "padding_waste": 1.0 - p.params / slots,
            "coordinator_params_per_s": p.params / coord if coord > 0 else None,
            "float32_upload_ratio": rnd.up_bytes / (4 * p.params),
        }
    if "ckks" in out and "plain" in out:
        out["ckks"]["round_ratio"] = out["ckks"]["round_s"] / out["plain"]["round_s"]
        out["ckks"]["coordinator_ratio"] = (
            out["ckks"]["coordinator_s"] / out["plain"]["coordinator_s"]
        )
    return list(out.values())


def add_speedups(records: list[dict[str, Any]]) -> None:
    """Add, to each record measured with N ≥ 2 processes, its speed-up over the
    one-process record of the same configuration and backend *from the same
    sweep* (rounds interleaved), and what the CPU the processes got allowed.

    ``speedup`` and ``step_speedup`` are coordinator_s and step_s of one
    process over N. ``cpu_inflation`` is the shards' step stages summed (each
    process's own clock: CPU it was given, and any time it waited for a core)
    over the same stages in one process: above 1 when the processes slow each
    other down (shared caches, hyperthreads, a busy host). N / cpu_inflation is
    ``step_speedup_bound``, the step's speed-up if its chunks split perfectly at
    the speed the processes actually ran, and ``sharding_efficiency`` =
    step_speedup / step_speedup_bound what the sharding itself (copies to and
    from the workers, waiting for the slower shard) keeps of it.

    Outside the step the coordinator's stages (Flower records: headers of the
    uploads, θ broadcast, masked state) run in its own process only:
    ``serial_fraction`` is their share of the one-process coordinator_s, and
    ``speedup_bound`` the coordinator's speed-up had they taken as long as in
    one process and the step reached step_speedup_bound (Amdahl's law with the
    CPU the processes got); ``speedup_efficiency`` = speedup / speedup_bound.
    """

    def config(r: dict[str, Any]) -> tuple[Any, ...]:  # IDENT without workers
        return tuple(r[i] for i in IDENT if i != "workers")

    one = {config(r): r for r in records if r["workers"] == 0}
    for r in records:
        base = one.get(config(r))
        if r["workers"] < 2 or base is None:
            continue
        cpu = sum(r["stages_s"][s] for s in STEP_STAGES)
        cpu0 = sum(base["stages_s"][s] for s in STEP_STAGES)
        coord0, step0 = base["coordinator_s"], base["stages_s"]["step_s"]
        step_speedup = step0 / r["stages_s"]["step_s"]
        inflation = cpu / cpu0
        bound = r["workers"] / inflation
        speedup = coord0 / r["coordinator_s"]
        speedup_bound = coord0 / (coord0 - step0 + step0 / bound)
        r.update(
            speedup=speedup,
            step_speedup=step_speedup,
            cpu_inflation=inflation,
            step_speedup_bound=bound,
            sharding_efficiency=step_speedup / bound,
            serial_fraction=(coord0 - step0) / coord0,
            speedup_bound=speedup_bound,
            speedup_efficiency=speedup / speedup_bound,
        )


def merge(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old`` with every configuration measured again replaced by ``new``, sorted."""
    new_ids = {tuple(r[i] for i in IDENT) for r in new}
    kept = [r for r in old if tuple(r[i] for i in IDENT) not in new_ids]
    return sorted(
        kept + new,
        key=lambda r: (r["workers"], r["params"], r["participants"], r["backend"]),
    )


# ---- outputs -------------------------------------------------------------------------
def _fmt_p(n: int) -> str:
    if n % 10**6 == 0:
        return f"{n // 10**6}M"
    if n % 10**3 == 0:
        return f"{n // 10**3}k"
    return str(n)


def markdown_table(records: list[dict[str, Any]]) -> str:
    """One row per configuration and backend."""
    head = (
        "| backend | K | P | workers | round s | coordinator s | step s | "
        "coord. params/s | up B/param | down B/param | padding | ckks/plain | "
        "vs 1 process: coordinator / bound (step / bound) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    for r in records:
        ratio = r.get("round_ratio")
        speedup = ""
        if "speedup" in r:
            speedup = (
                f"{r['speedup']:.2f}× / {r['speedup_bound']:.2f}× "
                f"({r['step_speedup']:.2f}× / "
                f"{r['step_speedup_bound']:.2f}×)"
            )
        rows.append(
            f"| {r['backend']} | {r['participants']} | {_fmt_p(r['params'])} | "
            f"{r['workers']} | {r['round_s']:.3f} | {r['coordinator_s']:.3f} | "
            f"{r['stages_s']['step_s']:.3f} | "
            f"{r['coordinator_params_per_s']:,.0f} | "
            f"{r['upload_bytes_per_param']:.2f} | "
            f"{r['broadcast_bytes_per_param']:.2f} | "
            f"{100 * r['padding_waste']:.1f}% | "
            f"{'' if ratio is None else f'{ratio:.1f}×'} | {speedup} |"
        )
    return head + "\n".join(rows) + "\n"


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """Round time vs K (one line per backend and P) and vs P (per backend and K)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w0 = min(r["workers"] for r in records)
    recs = [r for r in records if r["workers"] == w0]
    fig, (ax_k, ax_p) = plt.subplots(1, 2, figsize=(11, 4.2))
    style = {"ckks": "-o", "plain": "--s"}
    # one line per (backend, fixed value of the other axis)
    for ax, x_key, fixed_key, label in (
        (ax_k, "participants", "params", lambda v: f"P={_fmt_p(v)}"),
        (ax_p, "params", "participants", lambda v: f"K={v}"),
    ):
        values = sorted({r[fixed_key] for r in recs})
        # one colour per value of the other axis, the same for both backends
        colours = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, len(values)))
        for b in sorted({r["backend"] for r in recs}):
            for fixed, colour in zip(values, colours, strict=True):
                pts = sorted(
                    (r[x_key], r["round_s"])
                    for r in recs
                    if r["backend"] == b and r[fixed_key] == fixed
                )
                if pts:
                    ax.plot(
                        *zip(*pts, strict=True),
                        style[b],
                        color=colour,
                        label=f"{b} {label(fixed)}",
                    )
    for ax, xl in ((ax_k, "participants K"), (ax_p, "parameters P")):
        ax.set_xscale("log", base=2 if ax is ax_k else 10)
        ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel("seconds per round (median)")
        ax.grid(True, which="both", alpha=0.3)
        low, high = ax.get_ylim()
        ax.set_ylim(low, high * 10)  # room for the legend above the lines
        ax.legend(fontsize=7, ncol=2, loc="upper left")
    fig.suptitle(
        f"hedrl aggregation round (coordinator + participant critical path), "
        f"{recs[0]['param_set']}, workers={w0}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
