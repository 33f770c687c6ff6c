"""Typed errors shared by participants and coordinator.

Every error names what was expected and what arrived, so that a log line is
enough to tell a broken peer from a bug.
"""

from __future__ import annotations


class HedrlError(Exception):
    """Base class of every error raised by hedrl."""


class ConfigError(HedrlError, ValueError):
    """A run configuration or parameter-set value is unknown or impossible."""


class KeyMaterialError(HedrlError):
    """Key material is missing, of the wrong kind, or does not match."""


class SecretKeyRefused(KeyMaterialError):
    """A context holding a secret key was offered where only a public one may be."""


class FingerprintMismatch(KeyMaterialError):
    """A peer's context fingerprint differs from ours."""

    def __init__(self, *, expected: str, received: str, where: str = "") -> None:
        self.expected = expected
        self.received = received
        at = f" ({where})" if where else ""
        super().__init__(
            f"context fingerprint mismatch{at}: expected {expected[:16]}..., "
            f"received {received[:16]}..."
        )


class WireFormatError(HedrlError, ValueError):
    """A message does not follow the wire format (checked before any ciphertext)."""


class HeaderMismatch(WireFormatError):
    """A header field differs from what the receiver expects."""

    def __init__(self, *, field: str, expected: object, received: object) -> None:
        self.field = field
        self.expected = expected
        self.received = received
        super().__init__(
            f"header field {field!r}: expected {expected!r}, received {received!r}"
        )


class CiphertextError(WireFormatError):
    """A chunk could not be parsed as a ciphertext of the expected level/scale."""


class BackendMismatch(HeaderMismatch):
    """A peer runs the other backend (plain in a ckks run or the reverse)."""


class UpdateRejected(HedrlError, ValueError):
    """A plaintext update is unfit to encrypt (NaN/Inf, wrong shape, absurd size)."""


class ThetaRejected(HedrlError, ValueError):
    """A participant's sanity check refused the decrypted global policy."""


class RunEnded(HedrlError):
    """The run cannot go on (e.g. a participant's refusal budget is spent)."""


class ReplyRejected(HedrlError):
    """A participant's reply failed a check, or using it raised: the reply is
    dropped, the round goes on without it."""

    def __init__(self, *, participant: int | str, reason: str) -> None:
        self.participant = participant
        self.reason = reason
        super().__init__(f"reply of participant {participant}: {reason}")
