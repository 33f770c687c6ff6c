"""What a train reply reports besides ciphertexts (environment counts), and
what a participant keeps for itself (its PPO diagnostics).

Environment steps always; episodes, returns and stage seconds only if the
participant's operator allows it (`report-metrics`). They come from rollouts
of the twin, not from a decryption (docs/threat-model.md, "What leaks"), and
are rounded so that they carry no more digits than a user reads.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import MetricRecord

from protocol import messages as msg

log = logging.getLogger("flwr.hedrl.participant")

#: reported returns are rounded to this (docs/threat-model.md counts their bits)
RETURN_QUANTUM = 0.01
#: reported stage seconds are rounded to this
SECONDS_QUANTUM = 1e-3


def reply_metrics(
    stats: Mapping[str, Any], timings: Mapping[str, float], report: bool
) -> MetricRecord:
    """A train reply's metrics from the learner's ``stats`` and the handler's
    stage ``timings``; episodes, returns and seconds only with ``report``."""
    record: dict[str, int | float] = {"env-steps": int(stats["env_steps"])}
    if report:
        ret = round(float(stats["return_sum"]) / RETURN_QUANTUM) * RETURN_QUANTUM
        record.update(
            {
                "episodes": int(stats["episodes"]),
                "return-sum": ret,
                **{
                    msg.stage_time_key(k): round(timings.get(k, 0.0) / SECONDS_QUANTUM)
                    * SECONDS_QUANTUM
                    for k in msg.PARTICIPANT_STAGES
                },
            }
        )
    return MetricRecord(record)


#: the learner's PPO statistics kept in the participant's diagnostics file
DIAGNOSTICS = ("pg_loss", "v_loss", "entropy", "approx_kl", "clipfrac")


def diagnostics_path(state_dir: Path, fingerprint: str, index: int) -> Path:
    """``<state-dir>/diagnostics-<key fingerprint[:16]>-p<index>.jsonl`` (one
    file per key; state-dir: the participant's own configuration, its node
    config deployed, keys-dir in simulation)."""
    return state_dir / f"diagnostics-{fingerprint[:16]}-p{index}.jsonl"


def _finite(value: Any) -> float | None:
    x = float(value)
    return x if math.isfinite(x) else None


def write_diagnostics(path: Path, index: int, t: int, stats: Mapping[str, Any]) -> None:
    """Append one round's PPO statistics (of the last minibatch) and rollout
    counts to the participant's diagnostics file (mode 0600; non-finite values
    as null). Never sent to anyone; a failure to write is logged, never fatal."""
    try:
        episodes = int(stats.get("episodes", 0))
        ret_sum = _finite(stats.get("return_sum", 0.0))
        row: dict[str, Any] = {
            "round": t,
            "env_steps": int(stats.get("env_steps", 0)),
            "episodes": episodes,
            "return_mean": ret_sum / episodes
            if episodes and ret_sum is not None
            else None,
            **{
                k: _finite(stats[f"train/{k}"])
                for k in DIAGNOSTICS
                if f"train/{k}" in stats
            },
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as fh:
            fh.write(json.dumps(row) + "\n")
    except Exception as exc:  # noqa: BLE001 (diagnostics never fail a message)
        log.warning("hedrl: participant %d: diagnostics not written (%s)", index, exc)
