"""``learning_curve.png`` in the run's folder, redrawn as the run trains.

Mean episode return against round and against environment steps (the
per-round means and their last-20 mean), with the env's solve threshold when
it has one. Drawing never ends a run: a failure is logged once and the curve
is not drawn again.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("flwr.hedrl.coordinator")

#: seconds between redraws while training (the last round is always drawn)
REDRAW_S = 15.0
WINDOW = 20


class Curve:
    """Collects (round, env steps, mean return) and draws them."""

    def __init__(self, path: Path, title: str, threshold: float | None) -> None:
        self.path, self.title, self.threshold = path, title, threshold
        self.rounds: list[int] = []
        self.steps: list[int] = []
        self.returns: list[float] = []
        self.env_steps = 0
        self.drawn_at = -REDRAW_S
        self.broken = False

    def add(self, t: int, row: dict[str, Any], last: bool = False) -> None:
        """Take round ``t``'s metrics row; redraw if due (always when ``last``)."""
        self.env_steps += max(0, int(row["env_steps"]))
        ret = row["return_mean"]
        if ret is not None and math.isfinite(ret):
            self.rounds.append(t)
            self.steps.append(self.env_steps)
            self.returns.append(float(ret))
        if last or time.monotonic() - self.drawn_at >= REDRAW_S:
            self.draw()

    def draw(self) -> None:
        if self.broken or not self.returns:
            return
        self.drawn_at = time.monotonic()
        try:
            self._draw()
        except Exception as exc:  # noqa: BLE001 (a plot must never end a run)
            self.broken = True
            log.warning("hedrl: learning curve not drawn (%s); training goes on", exc)

    def _draw(self) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        smooth = [
            statistics.fmean(self.returns[max(0, i - WINDOW + 1) : i + 1])
            for i in range(len(self.returns))
        ]
        fig = Figure(figsize=(10, 3.8), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, 2, sharey=True)
        for ax, xs, label in (
            (axes[0], self.rounds, "round"),
            (axes[1], self.steps, "environment steps (all participants)"),
        ):
            ax.plot(xs, self.returns, ".", ms=3, alpha=0.35, label="mean return")
            ax.plot(xs, smooth, "-", lw=1.6, label=f"last-{WINDOW} mean")
            if self.threshold is not None:
                ax.axhline(self.threshold, color="k", ls="--", lw=0.8, label="solved")
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("episode return")
        axes[0].legend(loc="lower right", fontsize=8)
        # a '$' would start matplotlib's math text
        fig.suptitle(self.title.replace("$", r"\$"), fontsize=10)
        tmp = self.path.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=90)
        os.replace(tmp, self.path)  # readers never see half a file
