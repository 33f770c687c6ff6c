"""Aggregate fidelity result files: fidelity.json, fidelity.png, the table in
docs/fidelity.md."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.fidelity_common import RESULTS, stale, trace_path

README = Path(__file__).resolve().parents[1] / "docs" / "fidelity.md"
# the committed result folders whose tables docs/fidelity.md shows, by marker
TABLES = {RESULTS: "fidelity-table", RESULTS / "delta": "fidelity-delta-table"}
BOOTSTRAP = 10_000
# (entry key, reference variant, per-seed field): CKKS against the reference;
# gap_late is the headline gap on the second-half returns
GAPS = (
    ("gap", "exact", "final_return"),
    ("gap_twin", "plain", "final_return"),
    ("gap_late", "exact", "late_return"),
)
log = logging.getLogger(__name__)


def _load(out: Path) -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """Result records by env, variant and seed; runs of an older preset are left out."""
    data: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for path in sorted((out / "fidelity").glob("*/*-seed*.json")):
        why = stale(path, path.parent.name)
        if why is not None:
            log.warning("report leaves out %s: %s", path, why)
            continue
        res = json.loads(path.read_text())
        res["late_return"] = late_return(res)
        data.setdefault(res["env"], {}).setdefault(res["variant"], {})[res["seed"]] = (
            res
        )
    return data


def late_return(res: dict[str, Any]) -> float | None:
    """Mean episode return over the second half of a run's rounds (episode-weighted).

    The final return (the last 100 episodes) is whole rounds from the end: with
    PPO's minibatch rounds that is one rollout, whose mean swings by tens of
    points from one rollout to the next. This averages every rollout after
    the midpoint; reported beside the final return, not instead of it.
    """
    half = res["rounds"] / 2
    pts = [(m, n) for r, m, n in res.get("curve", []) if r > half and n]
    if not pts:
        return None
    means, counts = np.array(pts, dtype=np.float64).T
    return float(np.sum(means * counts) / np.sum(counts))


def _gap(
    enc: dict[int, Any],
    ref: dict[int, Any],
    scale: float,
    rng: np.random.Generator,
    field: str,
) -> dict[str, Any] | None:
    seeds = sorted(set(enc) & set(ref))
    pairs = [(enc[s][field], ref[s][field]) for s in seeds]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    if not pairs:
        return None
    diff = np.array([a - b for a, b in pairs])
    boot = rng.choice(diff, size=(BOOTSTRAP, len(diff)), replace=True).mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {
        "gap": float(abs(diff.mean()) / scale),
        "seeds": [s for s in seeds],
        "mean_diff": float(diff.mean()),
        "ci95_diff": [float(lo), float(hi)],
        "ci95_gap": [float(lo / scale), float(hi / scale)],
    }


def _rel_rows(a: np.ndarray, b: np.ndarray) -> list[float]:
    return [
        float(np.max(np.abs(x - y)) / max(1e-12, float(np.max(np.abs(y)))))
        for x, y in zip(a, b, strict=False)
    ]


def _drift(out: Path, env: str, variants: dict[str, Any]) -> dict[str, Any]:
    """Per-round max relative difference, encrypted vs twin (decrypted), per seed."""
    theta, agg = {}, {}
    for s in sorted(set(variants["ckks"]) & set(variants["plain"])):
        pc, pp = trace_path(out, env, "ckks", s), trace_path(out, env, "plain", s)
        if pc.exists() and pp.exists():
            with np.load(pc) as c, np.load(pp) as p:
                theta[str(s)] = _rel_rows(c["theta"], p["theta"])
                agg[str(s)] = _rel_rows(c["aggregate"], p["aggregate"])
    return {"theta_max_rel_diff": theta, "aggregate_max_rel_diff": agg}


def _mean(values: Any) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def summarise(out: Path) -> dict[str, Any]:
    """Per env: per-seed numbers, success counts, gap, gap_twin with bootstrap CIs."""
    rng = np.random.default_rng(0)
    summary: dict[str, Any] = {}
    for env, variants in _load(out).items():
        any_res = next(iter(next(iter(variants.values())).values()))
        scale = abs(any_res["solve_threshold"] - any_res["random_return"])
        entry: dict[str, Any] = {
            "solve_threshold": any_res["solve_threshold"],
            "random_return": any_res["random_return"],
            "env_id": any_res["env_id"],
            "variants": {},
        }
        # the table compares seeds on which every variant has finished
        complete = sorted(
            set.intersection(
                *(set(variants.get(v, {})) for v in ("ckks", "plain", "exact"))
            )
        )
        entry["complete_seeds"] = complete
        for variant, seeds in variants.items():
            entry["variants"][variant] = {
                "per_seed": {
                    str(s): {
                        k: r[k]
                        for k in (
                            "final_return",
                            "late_return",
                            "rounds",
                            "rounds_to_solve",
                            "env_steps_to_solve",
                            "wall_s",
                            "median_round_s",
                        )
                    }
                    # rounds a stopped run resumed at (older results: none)
                    | {"resumed_at": r.get("resumed_at", [])}
                    for s, r in sorted(seeds.items())
                },
                "mean_final_return": _mean(r["final_return"] for r in seeds.values()),
                "mean_final_return_complete": _mean(
                    seeds[s]["final_return"] for s in complete
                ),
                "mean_late_return_complete": _mean(
                    seeds[s]["late_return"] for s in complete
                ),
                "solved": sum(r["rounds_to_solve"] is not None for r in seeds.values()),
                "solved_complete": sum(
                    seeds[s]["rounds_to_solve"] is not None for s in complete
                ),
                "seeds": len(seeds),
            }
        if "ckks" in variants:
            for key, ref, field in GAPS:
                if ref in variants:
                    g = _gap(variants["ckks"], variants[ref], scale, rng, field)
                    entry[key] = None if g is None else g["gap"]
                    entry[key + "_detail"] = g
            # closed-loop drift of θ and of the aggregate, first rounds, per seed
            if "plain" in variants:
                entry["closed_loop_drift"] = _drift(out, env, variants)
        summary[env] = entry
    return summary


#: from this many seeds of a variant on, its runs are drawn faint and their
#: mean on top (40 LunarLander seeds × 3 variants are otherwise one blur)
MEAN_CURVE_SEEDS = 10


def mean_curve(curves: list[np.ndarray]) -> np.ndarray:
    """Mean over runs of (round, return) curves, each interpolated onto the
    rounds of the first, up to the round every run reached: shape (n, 2)."""
    curves = [c for c in curves if c.size]
    if not curves:
        return np.empty((0, 2))
    end = min(c[-1, 0] for c in curves)
    grid = curves[0][:, 0][curves[0][:, 0] <= end]
    ys = [np.interp(grid, c[:, 0], c[:, 1]) for c in curves]
    return np.column_stack([grid, np.mean(ys, axis=0)])


def plot(out: Path, data: dict[str, dict[str, dict[int, dict[str, Any]]]]) -> Path:
    """Learning curves, one panel per env, encrypted vs twin vs exact Adam
    (with many seeds: each variant's mean bold over its faint runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = sorted(data)
    fig, axes = plt.subplots(1, len(envs), figsize=(5 * len(envs), 3.6), squeeze=False)
    colours = {"ckks": "tab:red", "plain": "tab:blue", "exact": "tab:green"}
    for ax, env in zip(axes[0], envs, strict=True):
        for variant, seeds in sorted(data[env].items()):
            colour = colours.get(variant, "k")
            curves = [
                np.array([[r, m] for r, m, _ in res["curve"]]) for res in seeds.values()
            ]
            many = len(curves) >= MEAN_CURVE_SEEDS
            for i, curve in enumerate(curves):
                if curve.size:
                    ax.plot(
                        curve[:, 0],
                        curve[:, 1],
                        color=colour,
                        alpha=0.12 if many else 0.5,
                        lw=0.5 if many else 0.8,
                        label=None if many or i else variant,
                    )
            if many:
                mean = mean_curve(curves)
                label = f"{variant} (mean of {len(curves)})"
                ax.plot(mean[:, 0], mean[:, 1], color=colour, lw=1.8, label=label)
        any_res = next(iter(next(iter(data[env].values())).values()))
        ax.axhline(any_res["solve_threshold"], color="k", ls="--", lw=0.8)
        ax.set_title(any_res["env_id"])
        ax.set_xlabel("round (HE-Adam step)")
        ax.set_ylabel("mean episode return")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "fidelity.png"
    fig.savefig(path, dpi=110)
    return path


def _fmt(variants: dict[str, Any], key: str, field: str) -> str:
    x = variants.get(key, {}).get(field)
    if x is None:
        return "–"
    return f"{x:.1f}" if isinstance(x, float) else str(x)


def table(summary: dict[str, Any]) -> str:
    """Markdown table for docs/fidelity.md."""
    lines = [
        "| env | seeds | final return: CKKS / twin / exact Adam "
        "| solved: CKKS/twin/exact | gap | gap_twin "
        "| second-half return: CKKS / twin / exact | gap (second half) "
        "| runs beyond these seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for _, e in sorted(summary.items()):
        v = e["variants"]
        complete = e.get("complete_seeds", [])
        extra = sum(x["seeds"] for x in v.values()) - len(v) * len(complete)
        gap, gap_twin, gap_late = (
            "–" if e.get(k) is None else f"{e[k]:.3f}" for k, _, _ in GAPS
        )
        finals = " / ".join(
            _fmt(v, k, "mean_final_return_complete") for k in ("ckks", "plain", "exact")
        )
        late = " / ".join(
            _fmt(v, k, "mean_late_return_complete") for k in ("ckks", "plain", "exact")
        )
        solved = "/".join(
            _fmt(v, k, "solved_complete") for k in ("ckks", "plain", "exact")
        )
        lines.append(
            f"| {e['env_id']} | {len(complete)} | {finals} | {solved} | {gap} "
            f"| {gap_twin} | {late} | {gap_late} | {extra} |"
        )
    return "\n".join(lines)


def main(out: Path) -> None:
    """Write fidelity.json and fidelity.png under ``out``; for a committed
    result folder (``TABLES``) update its table in docs/fidelity.md."""
    summary = summarise(out)
    (out / "fidelity.json").write_text(json.dumps(summary, indent=2))
    if summary:
        plot(out, _load(out))
    marker = {k.resolve(): v for k, v in TABLES.items()}.get(out.resolve())
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    text = README.read_text()
    if marker and begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        README.write_text(f"{head}{begin}\n{table(summary)}\n{end}{tail}")
    print(table(summary))
