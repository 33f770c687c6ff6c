"""The run: rounds until num-rounds or stop-return, metrics, checkpoints, summary.

Each round's record goes to ``metrics.jsonl`` as it completes (and to
``Federation.history``); a periodic checkpoint every ``checkpoint-every``
rounds, a final one at the end, then ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from protocol.config import RunConfig
from protocol.errors import RunEnded
from protocol.params import ParamSet

log = logging.getLogger("flwr.hedrl.coordinator")


class RunLoopMixin:
    """``Federation``'s loop over rounds and its summary.

    A mixin: it uses the attributes and methods annotated below, which the
    Federation provides, and appends each round's record to ``history``.
    """

    cfg: RunConfig
    params: ParamSet
    out_dir: Path
    run_id: int
    fingerprint: str
    param_count: int
    n_chunks: int
    start_round: int
    history: list[dict[str, Any]]
    on_round: Callable[[int, Any], None] | None
    setup: Callable[[], None]
    run_round: Callable[[int], dict[str, Any]]
    finish: Callable[[int], dict[str, Any]]
    checkpoint: Callable[..., Path | None]

    def _run(self, start: float) -> dict[str, Any]:
        """Setup, then rounds; write metrics.jsonl, checkpoints and summary.json."""
        self.setup()
        metrics_path = self.out_dir / "metrics.jsonl"
        returns: list[float] = []
        reached: dict[str, int | None] = {"195": None, "475": None}
        t = 0
        with open(metrics_path, "w") as fh:
            for t in range(self.start_round + 1, self.cfg.num_rounds + 1):
                try:
                    rec = self.run_round(t)
                except RunEnded as exc:
                    log.error("hedrl: round %d: %s", t, exc)
                    self.checkpoint(t)  # the last θ a majority accepted
                    raise
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                self.history.append(rec)
                if self.on_round is not None:
                    self.on_round(t, self)
                if rec["return_mean"] is not None:
                    returns.append(rec["return_mean"])
                last20 = statistics.fmean(returns[-20:]) if len(returns) >= 20 else None
                for key in reached:
                    if (
                        reached[key] is None
                        and last20 is not None
                        and last20 >= float(key)
                    ):
                        reached[key] = t
                rm = rec["return_mean"]
                log.info(
                    "hedrl: round %d/%d %s return %s (%d episodes) last-20 %s | "
                    "%.2f s/round, coordinator %.2f s | up %.1f kB, down %.1f kB",
                    t,
                    self.cfg.num_rounds,
                    self.cfg.backend,
                    "-" if rm is None else f"{rm:.1f}",
                    rec["episodes"],
                    "-" if last20 is None else f"{last20:.1f}",
                    rec["round_s"],
                    rec["coordinator_s"],
                    rec["upload_bytes"] / 1e3,
                    rec["broadcast_bytes"] / 1e3,
                )
                if t % self.cfg.checkpoint_every == 0:
                    self.checkpoint(t)
                if (
                    self.cfg.stop_return > 0
                    and last20 is not None
                    and last20 >= self.cfg.stop_return
                ):
                    log.info(
                        "hedrl: mean return %.1f ≥ stop-return %.1f at round %d",
                        last20,
                        self.cfg.stop_return,
                        t,
                    )
                    break
        ckpt = self.checkpoint(t, final=True)
        assert ckpt is not None
        final = self.finish(t)
        summary = self._summary(t, returns, reached, time.perf_counter() - start, ckpt)
        summary["final"] = final
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info(
            "hedrl: done after %d rounds; metrics %s; checkpoint %s",
            t,
            metrics_path,
            ckpt,
        )
        return summary

    def _summary(
        self,
        t: int,
        returns: list[float],
        reached: dict[str, int | None],
        wall: float,
        ckpt: Path,
    ) -> dict[str, Any]:
        """The contents of summary.json: configuration, outcome, median costs."""
        h = self.history
        ups = [r["crypto/gradient_bytes"] for r in h if r["crypto/gradient_bytes"]]
        slots = self.n_chunks * self.params.slots
        return {
            "run_id": self.run_id,
            "backend": self.cfg.backend,
            "env_id": self.cfg.env_id,
            "param_set": self.params.id,
            "rounds": t,
            "wall_s": wall,
            "config": dataclasses.asdict(self.cfg),
            "param_count": self.param_count,
            "chunks": self.n_chunks,
            "final_return_mean_last20": statistics.fmean(returns[-20:])
            if returns
            else None,
            "rounds_to_195": reached["195"],
            "rounds_to_475": reached["475"],
            "median_round_s": statistics.median(r["round_s"] for r in h) if h else None,
            "median_coordinator_s": statistics.median(r["coordinator_s"] for r in h)
            if h
            else None,
            # one participant's gradient upload, per parameter and per filled slot
            "upload_bytes_per_param": (statistics.median(ups) / self.param_count)
            if ups
            else None,
            "upload_bytes_per_slot": (statistics.median(ups) / slots) if ups else None,
            "env_steps": sum(r["env_steps"] for r in h),
            "skipped_steps": sum(1 for r in h if not r["stepped"]),
            "checkpoint": str(ckpt),
            "fingerprint": self.fingerprint,
        }
