"""What a train reply reports besides ciphertexts: environment counts.

Environment steps always; episodes, returns and stage seconds only if the
participant's operator allows it (`report-metrics`). They come from rollouts
of the twin, not from a decryption (docs/threat-model.md, "What leaks"), and
are rounded so that they carry no more digits than a user reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import MetricRecord

from protocol import messages as msg

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
