"""What a participant remembers under each key, and what it lets out.

Every decryption is an oracle query: whatever a participant does differently
because of a decrypted value can tell the coordinator something about the key
(IND-CPA^D, Li & Micciancio, EUROCRYPT 2021). So:

- Before anything is decrypted a message is *admitted*: its round is at most
  ``max-rounds``, strictly above the last round of the same kind and not below
  the last round of any kind (each (round, kind) is handled once; a spare
  refresh in the round of a train is another kind). These checks depend on no
  decryption; their errors say what was wrong.
- From the first decryption on, every failure, expected or not, becomes the
  one constant :class:`Refused` (text ``hedrl-refused``) and costs one unit of
  the refusal budget. The charge and the (round, kind) are written to disk
  before the decryption, so a process that dies half-way has still paid.
- With the budget spent every message gets the constant :class:`Terminal`,
  under this key, across runs and restarts.
- θ may differ from the last θ this participant accepted by at most
  ``theta-step-bound`` per element times min(round gap, ``max-round-gap``);
  before any θ was accepted under a key, from the participant's own θ0.

The state lives in ``state-dir`` (default: the key's directory), one JSON file
per key fingerprint and participant plus the last accepted θ and the final θ
as ``.npy`` files, all written atomically.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import io
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from participants.trust import Trust
from protocol import messages as msg
from protocol.errors import HedrlError, KeyMaterialError, ThetaRejected
from protocol.files import write_atomic

log = logging.getLogger("flwr.hedrl.participant")

REFUSED = msg.REFUSED_CODE
"""The text of every refusal: what the coordinator sees of a failure after a
decryption (Flower forwards an exception's type and text)."""
TERMINAL = msg.TERMINAL_CODE
"""The text of every reply once the refusal budget is spent."""
THETA_ABS_LIMIT = 1e4
"""No element of an accepted θ is larger (a foreign key decrypts to ~q/Δ)."""
KINDS = ("train", "refresh", "v0", "final", "confirm")


class Refused(Exception):  # noqa: N818 - the name reaches the coordinator
    """A constant refusal: nothing in it depends on what was decrypted."""

    def __init__(self) -> None:
        super().__init__(REFUSED)


class Terminal(Exception):  # noqa: N818 - the name reaches the coordinator
    """The refusal budget under this key is spent; the participant is done."""

    def __init__(self) -> None:
        super().__init__(TERMINAL)


class OutOfOrder(HedrlError):
    """A message's round is out of range, repeated or behind (before decryption)."""


@dataclass
class GuardState:
    """What a participant remembers under one key (JSON on disk)."""

    fingerprint: str
    participant: int
    refusals: int = 0
    last: dict[str, int] = field(default_factory=dict)
    """The last round handled, per message kind."""
    accepted_round: int = 0
    """The round of the last accepted θ (0: none; θ0 is the reference)."""
    theta_digest: str = ""
    """SHA-256 of the last accepted θ's ciphertext chunks."""
    final: dict[str, Any] | None = None
    """The final θ: round, digest, agreed, and what the release needs."""
    released: bool = False


class Guard:
    """One participant's admission checks, refusal budget and θ memory."""

    def __init__(self, trust: Trust, fingerprint: str) -> None:
        self.trust = trust
        self.fingerprint = fingerprint
        stem = f"guard-{fingerprint[:16]}-p{trust.index}"
        self.stem = trust.state_dir / stem
        self.path = trust.state_dir / f"{stem}.json"
        self.final_path = trust.state_dir / f"{stem}-final.npy"
        # one message at a time under a key: two handled at once would both be
        # admitted and charged against the same count
        trust.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock: IO[str] | None = open(trust.state_dir / f".{stem}.lock", "a+")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            self.state = self._load()
        except BaseException:
            self.close()
            raise
        self._stale: list[Path] = []  # θ files replaced by the last save

    def close(self) -> None:
        """Let the next message under this key in (the end of a handler)."""
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    # ---- persistence ---------------------------------------------------------
    def _load(self) -> GuardState:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return GuardState(self.fingerprint, self.trust.index)
        except (OSError, ValueError) as exc:
            # fail closed: a participant that cannot tell what it has spent stops
            raise KeyMaterialError(
                "guard state unreadable; the participant stops under this key"
            ) from exc
        state = GuardState(**raw)
        if state.fingerprint != self.fingerprint:
            raise KeyMaterialError("guard state belongs to another key")
        return state

    def _save(self) -> None:
        write_atomic(self.path, json.dumps(asdict(self.state)).encode())
        for path in self._stale:
            path.unlink(missing_ok=True)
        self._stale = []

    def _theta_path(self, round_: int) -> Path:
        return self.stem.with_name(f"{self.stem.name}-theta-{round_}.npy")

    @staticmethod
    def _save_array(path: Path, values: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, np.asarray(values, dtype="<f8"), allow_pickle=False)
        write_atomic(path, buf.getvalue())

    @staticmethod
    def _load_array(path: Path) -> np.ndarray:
        return np.load(path, allow_pickle=False)

    # ---- admission (before any decryption) -------------------------------------
    @property
    def spent(self) -> bool:
        """The refusal budget is spent: the participant answers nothing more."""
        return self.state.refusals >= self.trust.refusal_budget

    @property
    def last_round(self) -> int:
        """The highest round handled under this key (0: none)."""
        return max(self.state.last.values(), default=0)

    def admit(self, kind: str, round_: int) -> None:
        """Check a message before anything of it is decrypted."""
        if self.spent:
            raise Terminal()
        if kind not in KINDS:
            raise OutOfOrder(f"unknown message kind {kind!r}")
        if self.state.final is not None and kind != "confirm":
            raise OutOfOrder(
                f"{kind}: this participant accepted the final θ of round "
                f"{self.state.final['round']} under this key; it handles nothing "
                "more under it (a new run needs a new key)"
            )
        if not 1 <= round_ <= self.trust.max_rounds:
            raise OutOfOrder(
                f"{kind}: round {round_} outside [1, max-rounds="
                f"{self.trust.max_rounds}]"
            )
        if round_ <= self.state.last.get(kind, 0):
            raise OutOfOrder(
                f"{kind}: round {round_} already handled or behind (last "
                f"{kind} was round {self.state.last[kind]})"
            )
        if round_ < self.last_round:
            raise OutOfOrder(
                f"{kind}: round {round_} is behind round {self.last_round}, "
                "already handled"
            )

    @contextmanager
    def decrypting(self, kinds: tuple[str, ...], round_: int) -> Iterator[None]:
        """The part of a handler that decrypts and uses what it decrypted.

        One refusal is charged (on disk) before the block runs and given back
        when it completes; any exception inside becomes :class:`Refused`, or
        :class:`Terminal` when it spends the budget, with nothing of it in the
        reply. The participant's own log names the exception's type only.
        """
        for kind in kinds:
            self.state.last[kind] = round_
        self.state.refusals += 1
        self._save()
        try:
            yield
        except Exception as exc:
            log.warning(
                "hedrl: participant %d refused %s of round %d (%s); %d of %d "
                "refusals spent under this key",
                self.trust.index,
                "/".join(kinds),
                round_,
                type(exc).__name__,
                self.state.refusals,
                self.trust.refusal_budget,
            )
            if self.spent:
                raise Terminal() from None
            raise Refused() from None
        self.state.refusals -= 1
        self._save()

    def handled(self, kind: str, round_: int) -> None:
        """Record a message that decrypts nothing (after :meth:`admit`)."""
        self.state.last[kind] = round_
        self._save()

    # ---- θ -----------------------------------------------------------------------
    def check_theta(
        self, theta: np.ndarray, round_: int, theta0: Callable[[], np.ndarray]
    ) -> None:
        """Refuse θ unless it is finite, bounded and near the last accepted θ
        (``theta0()``, this participant's own θ0, before any was accepted)."""
        if not np.all(np.isfinite(theta)):
            raise ThetaRejected("θ has non-finite values")
        if float(np.max(np.abs(theta))) > THETA_ABS_LIMIT:
            raise ThetaRejected("θ out of range")
        if self.state.accepted_round:
            prev_round = self.state.accepted_round
            prev = self._load_array(self._theta_path(prev_round))
        else:
            prev, prev_round = theta0(), 0
        gap = min(round_ - prev_round, self.trust.max_round_gap)
        if prev.shape != theta.shape:
            raise ThetaRejected("θ has another size than the last accepted θ")
        if float(np.max(np.abs(theta - prev))) > self.trust.theta_step_bound * gap:
            raise ThetaRejected("θ moved further than the step bound allows")

    def accept_theta(self, theta: np.ndarray, round_: int, digest: str) -> None:
        """Remember θ as the last accepted one: its file is written now, the
        state that points to it when :meth:`decrypting` completes (the last
        step of a handler, so nothing after it can fail)."""
        self._save_array(self._theta_path(round_), theta)
        if self.state.accepted_round:
            self._stale.append(self._theta_path(self.state.accepted_round))
        self.state.accepted_round = round_
        self.state.theta_digest = digest

    # ---- the final θ and its release ----------------------------------------------
    def store_final(self, theta: np.ndarray, round_: int, info: dict[str, Any]) -> None:
        """Keep the final θ's twin (for hedrl-release) until the others confirm it."""
        values = np.asarray(theta, dtype="<f8")
        self._save_array(self.final_path, values)
        self.state.final = {
            "round": round_,
            "agreed": False,
            "values_sha256": hashlib.sha256(values.tobytes()).hexdigest(),
            **info,
        }

    def confirm_final(self, round_: int, tags: Mapping[int, bytes], key: bytes) -> int:
        """Check the other participants' tags on the final θ; the count of valid
        ones if a majority of the federation confirms it, else raise."""
        final = self.state.final
        if final is None or final["round"] != round_:
            raise OutOfOrder(f"confirm of round {round_}: no final θ of that round")
        # a tag that does not match (another θ, a forged tag) counts for
        # nothing; each participant tags one final, so at most one final can
        # gather a majority of matching tags
        valid = sum(
            hmac.compare_digest(final_tag(key, final["digest"], round_, index), tag)
            for index, tag in tags.items()
        )
        quorum = self.trust.federation_size // 2 + 1
        if valid < quorum:
            raise OutOfOrder(
                f"final θ confirmed by {valid} of {len(tags)} tags, {quorum} needed "
                "(the others were sent another θ, or their tags were forged)"
            )
        final["agreed"] = True
        self._save()
        return valid

    def final_theta(self) -> tuple[np.ndarray, dict[str, Any]]:
        """The agreed final θ and its record, for a release."""
        final = self.state.final
        if final is None or not final.get("agreed"):
            raise KeyMaterialError(
                "no final θ agreed by a majority of the participants under this key "
                "(the run has not ended, or the participants disagreed)"
            )
        theta = self._load_array(self.final_path)
        digest = hashlib.sha256(np.asarray(theta, "<f8").tobytes()).hexdigest()
        if digest != final.get("values_sha256"):
            raise KeyMaterialError("the stored final θ is not the one confirmed")
        return theta, final

    def mark_released(self) -> None:
        self.state.released = True
        self._save()

    def save(self) -> None:
        """Write the state now."""
        self._save()


def final_tag(key: bytes, theta_digest: str, round_: int, index: int) -> bytes:
    """Participant ``index``'s tag on the final θ: HMAC-SHA256 under a key only
    the key holders can derive (:meth:`protocol.backend.Backend.mac_key`)."""
    msg = f"hedrl-final-theta\0{round_}\0{index}\0{theta_digest}".encode()
    return hmac.new(key, msg, hashlib.sha256).digest()
