"""The run's progress line per round and its ``summary.json``."""

from __future__ import annotations

import dataclasses
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from coordinator.federation import Federation

log = logging.getLogger("flwr.hedrl.coordinator")

#: summary.json reports the first round whose last-20 mean return reached these
MILESTONES = ("195", "475")
LAST_N = 20


@dataclass
class Progress:
    """Mean returns so far and when the last-20 mean first reached each milestone."""

    returns: list[float] = field(default_factory=list)
    reached: dict[str, int | None] = field(
        default_factory=lambda: dict.fromkeys(MILESTONES)
    )

    def add(self, t: int, row: dict[str, Any]) -> float | None:
        """Take round ``t``'s row; the mean of the last 20 non-null returns."""
        if row["return_mean"] is not None:
            self.returns.append(row["return_mean"])
        last = self.last20
        for key in self.reached:
            if self.reached[key] is None and last is not None and last >= float(key):
                self.reached[key] = t
        return last

    @property
    def last20(self) -> float | None:
        if len(self.returns) < LAST_N:
            return None
        return statistics.fmean(self.returns[-LAST_N:])


def log_round(
    fed: Federation, t: int, row: dict[str, Any], last20: float | None
) -> None:
    """One line per round: returns, seconds, bytes."""
    rm = row["return_mean"]
    log.info(
        "hedrl: round %d/%d %s return %s (%d episodes) last-20 %s | "
        "%.2f s/round, coordinator %.2f s | up %.1f kB, down %.1f kB",
        t,
        fed.cfg.num_rounds,
        fed.cfg.backend,
        "-" if rm is None else f"{rm:.1f}",
        row["episodes"],
        "-" if last20 is None else f"{last20:.1f}",
        row["round_s"],
        row["coordinator_s"],
        row["upload_bytes"] / 1e3,
        row["broadcast_bytes"] / 1e3,
    )


def summary(
    fed: Federation, t: int, progress: Progress, wall: float, ckpt: Path
) -> dict[str, Any]:
    """The contents of summary.json: configuration, outcome, median costs."""
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
        **{f"rounds_to_{key}": progress.reached[key] for key in MILESTONES},
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
    }
