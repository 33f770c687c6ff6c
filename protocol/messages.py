"""Names of the records and message types the two apps exchange."""

from __future__ import annotations

SETUP = "query.setup"  # coordinator asks for fingerprint, layout (and context, θ0)
TRAIN = "train"  # one round: θ down, gradient (and refreshed state) up
REFRESH = "query.refresh"  # only when the round's refresher failed: masked m, V, r
V0 = "query.v0"  # round 1 only: squared-gradient sum down, m0, V0, r0 up

TASK = "task"  # ConfigRecord in every request
SETUP_REPLY = "setup"  # ConfigRecord in the setup reply
METRICS = "metrics"  # MetricRecord in a train reply (environment counts only)

THETA = "theta"
GRADIENT = "gradient"
SQUARES = "squares"
STATE_NAMES = ("m", "V", "r")
# a train reply's metrics carry each stage's seconds under stage_time_key(stage)
PARTICIPANT_STAGES = ("decrypt", "learn", "encrypt", "refresh")


def stage_time_key(stage: str) -> str:
    """Metrics key of a participant stage's seconds, e.g. ``time-encrypt``."""
    return f"time-{stage}"


def state_key(prefix: str, name: str) -> str:
    """Record key of one optimiser-state vector, e.g. ``state.m``."""
    return f"{prefix}.{name}"
