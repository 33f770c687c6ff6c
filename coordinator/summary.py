"""The run's progress line per round and its ``summary.json``."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coordinator.curve import Curve
from coordinator.tboard import Board

if TYPE_CHECKING:
    from coordinator.federation import Federation

log = logging.getLogger("flwr.hedrl.coordinator")

LAST_N = 20


def solve_threshold(env_id: str, stop_return: float, own: float = 0.0) -> float | None:
    """The return an env counts as solved at: the run config's solve-threshold
    if set, else gymnasium's ``reward_threshold`` for the env id, else
    ``stop-return`` when set, else None."""
    if own != 0.0:
        return own
    try:
        import gymnasium

        threshold = gymnasium.spec(env_id).reward_threshold
    except Exception:  # noqa: BLE001 (an unknown id or a broken registry: no threshold)
        threshold = None
    if threshold is not None:
        return float(threshold)
    return stop_return if stop_return > 0 else None


#: returns and seconds beyond this are clamped (participants' rows are checked
#: far below it; the sums of 20 such values stay finite)
CLAMP = 1e12


def _bounded(value: Any) -> float | None:
    """A finite float clamped to ±CLAMP, or None (missing or not finite)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return max(-CLAMP, min(CLAMP, x)) if math.isfinite(x) else None


@dataclass
class Progress:
    """Mean returns so far, and when the last-20 mean first reached the threshold."""

    threshold: float | None = None
    curve: Curve | None = None
    board: Board | None = None
    returns: list[float] = field(default_factory=list)
    round_s: list[float] = field(default_factory=list)
    reached: int | None = None

    def add(self, t: int, row: dict[str, Any]) -> float | None:
        """Take round ``t``'s row; the mean of the last 20 non-null returns."""
        ret = _bounded(row["return_mean"])
        if ret is not None:
            self.returns.append(ret)
        self.round_s.append(_bounded(row["round_s"]) or 0.0)
        if self.curve is not None:
            self.curve.add(t, row)
        if self.board is not None:
            self.board.add(t, row, self.last20)
        last = self.last20
        if self.reached is None and None not in (last, self.threshold):
            if last >= self.threshold:  # type: ignore[operator]
                self.reached = t
        return last

    @property
    def last20(self) -> float | None:
        if len(self.returns) < LAST_N:
            return None
        return statistics.fmean(self.returns[-LAST_N:])

    @property
    def window(self) -> tuple[int, float] | None:
        """(n, mean) of the last n ≤ 20 returns so far (None before any)."""
        if not self.returns:
            return None
        last = self.returns[-LAST_N:]
        return len(last), statistics.fmean(last)

    def eta(self, t: int, num_rounds: int) -> str:
        """Time left at the median round time so far, as h:mm:ss or m:ss."""
        left = round((num_rounds - t) * statistics.median(self.round_s))
        h, rest = divmod(left, 3600)
        return (
            f"{h}:{rest // 60:02d}:{rest % 60:02d}"
            if h
            else f"{rest // 60}:{rest % 60:02d}"
        )


def progress_for(fed: Federation) -> Progress:
    """The run's progress, with its learning_curve.png."""
    cfg = fed.cfg
    threshold = solve_threshold(cfg.env_id, cfg.stop_return, cfg.solve_threshold)
    title = f"{cfg.env_id} · {cfg.backend} · {fed.out_dir.name}"
    curve = Curve(fed.out_dir / "learning_curve.png", title, threshold)
    progress = Progress(threshold, curve)
    # a resumed run's returns and curve start where the resumed one's stood
    for row in earlier_rows(fed.out_dir / "metrics.jsonl", fed.start_round):
        progress.add(int(row["round"]), row)
    progress.board = Board(fed.out_dir) if cfg.tensorboard else None
    return progress


def earlier_rows(path: Path, upto: int) -> list[dict[str, Any]]:
    """The readable rows of rounds ≤ ``upto`` in a metrics.jsonl (none if 0)."""
    if upto <= 0 or not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            raw = row["return_mean"]
            ret = None if raw is None else _bounded(raw)
            if 0 < int(row["round"]) <= upto and (raw is None or ret is not None):
                rows.append(
                    {
                        "return_mean": ret,
                        "env_steps": max(0, int(row["env_steps"])),
                        "round_s": _bounded(row.get("round_s")) or 0.0,
                        "round": int(row["round"]),
                    }
                )
        except Exception:  # noqa: BLE001 (a damaged row is skipped)
            continue
    return rows


def log_round(fed: Federation, t: int, row: dict[str, Any], progress: Progress) -> None:
    """One line per round: the windowed mean return, seconds, bytes, time left."""
    window = progress.window
    log.info(
        "hedrl: round %d/%d %s %s (%d new episodes) | %.2f s/round, "
        "coordinator %.2f s | up %.1f kB, down %.1f kB | ETA %s",
        t,
        fed.cfg.num_rounds,
        fed.cfg.backend,
        "return -" if window is None else f"last-{window[0]} return {window[1]:.1f}",
        row["episodes"],
        row["round_s"],
        row["coordinator_s"],
        row["upload_bytes"] / 1e3,
        row["broadcast_bytes"] / 1e3,
        progress.eta(t, fed.cfg.num_rounds),
    )


def versions() -> dict[str, str]:
    """hedrl's, flwr's and TenSEAL's installed versions."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("hedrl", "flwr", "tenseal"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def summary(
    fed: Federation, t: int, progress: Progress, wall: float, ckpt: Path
) -> dict[str, Any]:
    """The contents of summary.json: configuration, outcome, median costs
    (and the learning curve's last drawing)."""
    if progress.curve is not None:
        progress.curve.draw()
    if progress.board is not None:
        progress.board.close()
    h = fed.history
    ups = [r["crypto/gradient_bytes"] for r in h if r["crypto/gradient_bytes"]]
    slots = fed.n_chunks * fed.params.slots
    returns = progress.returns

    def median(key: str) -> float | None:
        return statistics.median(r[key] for r in h) if h else None

    return {
        "run_id": fed.run_id,
        "backend": fed.cfg.backend,
        "env_id": fed.cfg.env_id,
        "param_set": fed.params.id,
        "rounds": t,
        "wall_s": wall,
        "config": dataclasses.asdict(fed.cfg),
        "param_count": fed.param_count,
        "chunks": fed.n_chunks,
        "final_return_mean_last20": statistics.fmean(returns[-LAST_N:])
        if returns
        else None,
        # the env's solve threshold (None: it has none) and the first round
        # whose last-20 mean reached it
        "solve_threshold": progress.threshold,
        "rounds_to_threshold": progress.reached,
        "median_round_s": median("round_s"),
        "median_coordinator_s": median("coordinator_s"),
        # one participant's gradient upload, per parameter and per filled slot
        "upload_bytes_per_param": (statistics.median(ups) / fed.param_count)
        if ups
        else None,
        "upload_bytes_per_slot": (statistics.median(ups) / slots) if ups else None,
        "env_steps": sum(r["env_steps"] for r in h),
        "skipped_steps": sum(1 for r in h if not r["stepped"]),
        "checkpoint": str(ckpt),
        "fingerprint": fed.fingerprint,
        "versions": versions(),
    }
