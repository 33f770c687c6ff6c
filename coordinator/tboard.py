"""TensorBoard event files in the run's folder (run config ``tensorboard``).

Per round: the mean return (when episodes ended), its last-20 mean, the env
steps so far, the round's seconds and the coordinator's, and the bytes up and
down; ``tensorboard --logdir <results-dir>`` shows every run. Needs the
``tensorboard`` extra; without it the run says so once and goes on, and a
write failure is logged once, never fatal.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("flwr.hedrl.coordinator")


class Board:
    """An event-file writer, or nothing when TensorBoard is not installed."""

    def __init__(self, out_dir: Path) -> None:
        self.writer: Any = None
        self.env_steps = 0
        try:
            from tensorboard.compat.proto.event_pb2 import Event
            from tensorboard.compat.proto.summary_pb2 import Summary
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError:
            log.warning(
                "hedrl: tensorboard = true but TensorBoard is not installed "
                "(pip install 'hedrl[tensorboard]'); no event files"
            )
            return
        self.Event, self.Summary = Event, Summary
        self.writer = EventFileWriter(str(out_dir))

    def add(self, t: int, row: dict[str, Any], last20: float | None) -> None:
        if self.writer is None:
            return
        self.env_steps += max(0, int(row["env_steps"]))
        scalars = {
            "return/mean": row["return_mean"],
            "return/last20": last20,
            "env/steps": self.env_steps,
            "time/round_s": row["round_s"],
            "time/coordinator_s": row["coordinator_s"],
            "bytes/up": row["upload_bytes"],
            "bytes/down": row["broadcast_bytes"],
        }
        values = [
            self.Summary.Value(tag=tag, simple_value=float(v))
            for tag, v in scalars.items()
            if v is not None and math.isfinite(float(v))
        ]
        try:
            self.writer.add_event(
                self.Event(
                    wall_time=time.time(), step=t, summary=self.Summary(value=values)
                )
            )
            self.writer.flush()
        except Exception as exc:  # noqa: BLE001 (event files never end a run)
            log.warning(
                "hedrl: TensorBoard events not written (%s); training goes on", exc
            )
            self.writer = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
