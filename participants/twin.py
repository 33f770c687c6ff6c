"""The participant's twin: the optimiser replayed in float64 over relayed updates.

A decryption of a ciphertext the coordinator chose must not steer what a
participant does: a θ it trains on, or releases, would carry the key out
(docs/threat-model.md, "Release" and "Training on the twin"). So each
participant recomputes θ itself: from θ0 and the updates the coordinator says
it summed — sealed by their senders (protocol/relay.py), so only genuine ones
— through the same HE-Adam circuit in float64 (or exact Adam). It trains on
that twin, keeps it as the final θ, and decrypts the coordinator's θ only to
check that it matches: one accept or refuse per message.

Snapshots (θ, m, V, r) per step and chain hash live in ``<guard stem>-twin/``;
the last :data:`KEEP_STEPS` steps are kept (a rollback or a resumed run goes
back to one of them).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocol.adam import AdamHyper, initial_state, twin_step
from protocol.files import write_atomic
from protocol.ledger import Entry
from protocol.params import ParamSet
from protocol.relay import ROOT_HASH, Relay, RelayError, Update, entry_hash, open_sealed
from protocol.tolerance import ckks_abs_tol, ckks_theta_rel_tol

#: the coordinator's θ may differ from the twin by this many times the
#: parameter set's HE-Adam tolerance (protocol/tolerance.py), relative to how
#: far the twin moved from θ0, plus one fresh decryption's error
TOLERANCE_FACTOR = 4.0
KEEP_STEPS = 128
State = tuple[np.ndarray, np.ndarray, np.ndarray]
_NAME = re.compile(r"s(\d{1,9})-([0-9a-f]{64})\.npz")


@dataclass(frozen=True)
class Limits:
    """What a replay needs and keeps to: the run's optimiser, and this
    participant's own limits (k at most the federation size, no element moved
    by more than its theta-step-bound in one step)."""

    hp: AdamHyper
    optimizer: str
    gradient_factor: float
    max_k: float
    step_bound: float
    size: int


class TwinStore:
    """A participant's twin snapshots under one key."""

    def __init__(self, stem: Path) -> None:
        self.dir = stem.with_name(f"{stem.name}-twin")

    def _path(self, step: int, hash_: str) -> Path:
        return self.dir / f"s{step:07d}-{hash_}.npz"

    def newest(self) -> tuple[int, str]:
        """(step, chain hash) of the newest snapshot; (0, root) if none."""
        best = (0, ROOT_HASH)
        if self.dir.is_dir():
            for path in self.dir.iterdir():
                m = _NAME.fullmatch(path.name)
                if m and int(m.group(1)) > best[0]:
                    best = (int(m.group(1)), m.group(2))
        return best

    def load(self, step: int, hash_: str) -> tuple[np.ndarray, State]:
        path = self._path(step, hash_)
        if not path.exists():
            raise RelayError(
                f"relay starts from step {step}, which this participant has not "
                "replayed (or no longer keeps)"
            )
        with np.load(path, allow_pickle=False) as d:
            return d["theta"], (d["m"], d["V"], d["r"])

    def save(self, step: int, hash_: str, theta: np.ndarray, state: State) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        buf = io.BytesIO()
        np.savez(buf, theta=theta, m=state[0], V=state[1], r=state[2])
        write_atomic(self._path(step, hash_), buf.getvalue())
        for path in self.dir.iterdir():
            m = _NAME.fullmatch(path.name)
            if m and int(m.group(1)) <= step - KEEP_STEPS:
                path.unlink(missing_ok=True)


def _opened(
    relay: Relay, key: bytes, e: Entry, index: int, size: int, cache: dict
) -> Update:
    if (index, e.wire) not in cache:
        blob = relay.sealed.get((index, e.wire))
        if blob is None:
            raise RelayError(
                f"relay: step {e.step} uses participant {index}'s update of round "
                f"{e.wire}, which it does not carry"
            )
        cache[(index, e.wire)] = open_sealed(key, blob, e.wire, index, size)
    return cache[(index, e.wire)]


def _sum(relay: Relay, key: bytes, e: Entry, size: int, squares: bool) -> np.ndarray:
    cache: dict = {}
    total = np.zeros(size)
    for index, digest in e.init if squares else e.updates:  # type: ignore[union-attr]
        u = _opened(relay, key, e, index, size, cache)
        named = u.squares_digest if squares else u.gradient_digest
        values = u.squares if squares else u.gradient
        if named != digest or values is None:
            raise RelayError(
                f"relay: step {e.step} names an update participant {index} did "
                f"not send in round {e.wire}"
            )
        total += values
    return total


def advance(
    store: TwinStore, relay: Relay, key: bytes, theta0: np.ndarray, lim: Limits
) -> np.ndarray:
    """The twin of the relay's head: from the snapshot at its base (θ0 at
    step 0), each relayed step replayed over the sealed updates it names."""
    if relay.base == 0:
        if relay.base_hash != ROOT_HASH:
            raise RelayError("relay: step 0 is θ0, its hash the root's")
        theta, state = np.asarray(theta0, dtype=np.float64), None
    else:
        theta, state = store.load(relay.base, relay.base_hash)
    h = relay.base_hash
    for e in relay.entries:
        if max(e.k, e.init_k or 1.0) > lim.max_k:
            raise RelayError(f"relay: step {e.step}: k above the federation size")
        x = _sum(relay, key, e, lim.size, squares=False) / lim.gradient_factor
        if e.parent == 0:
            sq = _sum(relay, key, e, lim.size, squares=True)
            state = initial_state((e.init_k or 1.0) * np.clip(sq, 0.0, 1.0), lim.hp)
        if state is None:
            raise RelayError(f"relay: step {e.step} has no optimiser state")
        before = theta
        theta, state = twin_step(theta, state, x, e.step, lim.hp, e.k, lim.optimizer)
        if not float(np.max(np.abs(theta - before))) <= lim.step_bound:  # NaN too
            raise RelayError(
                f"relay: step {e.step} moves θ by more than this participant's "
                "theta-step-bound"
            )
        h = entry_hash(h, e)
        store.save(e.step, h, theta, state)
    if h != relay.head_hash:
        raise RelayError("relay: the steps' hash chain does not end at the head's")
    return theta


def matches(
    twin: np.ndarray, decrypted: np.ndarray, theta0: np.ndarray, ps: ParamSet
) -> bool:
    """The coordinator's θ is the twin up to the HE-Adam tolerance (relative
    to how far θ moved) plus one decryption's error."""
    moved = float(np.max(np.abs(twin - theta0)))
    tol = TOLERANCE_FACTOR * ckks_theta_rel_tol(ps) * moved + ckks_abs_tol(
        ps, float(np.max(np.abs(twin)))
    )
    diff = float(np.max(np.abs(decrypted - twin)))
    return bool(np.isfinite(diff)) and diff <= tol
