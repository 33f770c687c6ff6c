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


def diagnostics_path(state_dir: Path, index: int) -> Path:
    """``<state-dir>/diagnostics-p<index>.jsonl`` (state-dir: the participant's
    own configuration: its node config deployed, keys-dir in simulation)."""
    return state_dir / f"diagnostics-p{index}.jsonl"


def write_diagnostics(
    state_dir: Path, index: int, t: int, stats: Mapping[str, Any]
) -> None:
    """Append one round's PPO statistics (of the last minibatch) and rollout
    counts to the participant's diagnostics file. Never sent to anyone; a
    failure to write is logged, never fatal."""
    episodes = int(stats.get("episodes", 0))
    row: dict[str, Any] = {
        "round": t,
        "env_steps": int(stats.get("env_steps", 0)),
        "episodes": episodes,
        "return_mean": float(stats.get("return_sum", 0.0)) / episodes
        if episodes
        else None,
        **{k: float(stats[f"train/{k}"]) for k in DIAGNOSTICS if f"train/{k}" in stats},
    }
    try:
        with open(diagnostics_path(state_dir, index), "a") as fh:
            fh.write(json.dumps(row) + "\n")
    except OSError as exc:
        log.warning("hedrl: participant %d: diagnostics not written (%s)", index, exc)
