"""Names of the records and message types the two apps exchange."""

from __future__ import annotations

SETUP = "query.setup"  # coordinator asks for fingerprint, layout (and context, θ0)
TRAIN = "train"  # one round: θ down, gradient (and refreshed state) up
REFRESH = "query.refresh"  # only when the round's refresher failed: masked m, V, r
V0 = "query.v0"  # round 1 only: squared-gradient sum down, m0, V0, r0 up
FINAL = "query.final"  # after the last round: final θ down, a tag on it up
CONFIRM = "query.confirm"  # every participant's tag down, "confirmed" up

TASK = "task"  # ConfigRecord in every request
SETUP_REPLY = "setup"  # ConfigRecord in the setup reply
METRICS = "metrics"  # MetricRecord in a train reply (environment counts only)
FINAL_REPLY = "final"  # ConfigRecord in a final or confirm reply
FINAL_TAGS = "tags"  # ConfigRecord in a confirm request: indices and tags
RELAY = "relay"  # ConfigRecord with every θ: the steps to it, sealed updates
RELAY_UP = "relay-up"  # ConfigRecord in a train reply: its sealed update

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


# A participant's refusal and terminal replies carry exactly these texts (its
# exception's text, which Flower forwards): nothing that depends on a decryption.
REFUSED_CODE = "hedrl-refused"
TERMINAL_CODE = "hedrl-terminal"
