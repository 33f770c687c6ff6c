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
from protocol.errors import ThetaRejected
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
Snapshots = list[tuple[int, str, np.ndarray, State]]
"""(step, chain hash, θ, state) per replayed step."""
_NAME = re.compile(r"s(\d{9})-([0-9a-f]{64})\.npz")


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
    min_updates: int
    max_rounds: int


class TwinStore:
    """A participant's twin snapshots under one key."""

    def __init__(self, stem: Path) -> None:
        self.dir = stem.with_name(f"{stem.name}-twin")

    def _path(self, step: int, hash_: str) -> Path:
        return self.dir / f"s{step:09d}-{hash_}.npz"

    def _kept(self) -> list[tuple[int, str, Path]]:
        if not self.dir.is_dir():
            return []
        found = [(_NAME.fullmatch(p.name), p) for p in self.dir.iterdir()]
        return sorted((int(m.group(1)), m.group(2), p) for m, p in found if m)

    def newest(self) -> tuple[int, str]:
        """(step, chain hash) of the newest snapshot; (0, root) if none."""
        kept = self._kept()
        return (kept[-1][0], kept[-1][1]) if kept else (0, ROOT_HASH)

    def has(self, step: int, hash_: str) -> bool:
        return step == 0 and hash_ == ROOT_HASH or self._path(step, hash_).exists()

    def load(self, step: int, hash_: str) -> tuple[np.ndarray, State]:
        with np.load(self._path(step, hash_), allow_pickle=False) as d:
            return d["theta"], (d["m"], d["V"], d["r"])

    def save(self, replayed: Snapshots) -> None:
        """Keep the steps of an accepted message's twin; the newest
        :data:`KEEP_STEPS` snapshots stay."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for step, hash_, theta, state in replayed:
            buf = io.BytesIO()
            np.savez(buf, theta=theta, m=state[0], V=state[1], r=state[2])
            write_atomic(self._path(step, hash_), buf.getvalue())
        for _, _, path in self._kept()[:-KEEP_STEPS]:
            path.unlink(missing_ok=True)


@dataclass
class Checked:
    """A relay whose structure holds: its base is kept, its hash chain ends at
    its head, every step keeps to the limits and every named update opened
    and carries the digest the step names. Nothing here depends on a value."""

    relay: Relay
    updates: dict[tuple[int, int], Update]
    hashes: list[str]


def check(store: TwinStore, relay: Relay, key: bytes, lim: Limits) -> Checked:
    """Everything about a relay that depends on no value (typed errors:
    :class:`RelayError`, nothing charged)."""
    if not store.has(relay.base, relay.base_hash):
        raise RelayError(
            f"relay starts from step {relay.base}, which this participant has not "
            "replayed (or no longer keeps)"
        )
    hashes, h = [], relay.base_hash
    for e in relay.entries:
        h = entry_hash(h, e)
        hashes.append(h)
    if h != relay.head_hash:
        raise RelayError("relay: the steps' hash chain does not end at the head's")
    updates: dict[tuple[int, int], Update] = {}
    for e in relay.entries:
        if e.step > lim.max_rounds:
            raise RelayError(f"relay: step {e.step} past max-rounds")
        n = len(e.updates)
        if n < lim.min_updates or abs(e.k * n - lim.max_k) > 1e-9 * lim.max_k:
            raise RelayError(
                f"relay: step {e.step} sums {n} updates with k = {e.k!r}; this "
                f"participant takes at least {lim.min_updates}, with k = K/{n}"
            )
        if e.parent == 0:
            senders = {i for i, _ in e.init or []}
            if (
                not {i for i, _ in e.updates} <= senders
                or abs((e.init_k or 0.0) * len(senders) - lim.max_k) > 1e-9 * lim.max_k
            ):
                raise RelayError(f"relay: step {e.step}'s V0 is not its updates'")
        for squares, named in ((False, e.updates), (True, e.init or [])):
            for index, digest in named:
                u = _opened(relay, key, e, index, lim.size, updates)
                got = u.squares_digest if squares else u.gradient_digest
                if got != digest or (squares and u.squares is None):
                    raise RelayError(
                        f"relay: step {e.step} names an update participant "
                        f"{index} did not send in round {e.wire}"
                    )
    return Checked(relay, updates, hashes)


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


def replay(
    store: TwinStore, checked: Checked, theta0: np.ndarray, lim: Limits
) -> tuple[np.ndarray, Snapshots]:
    """The twin of the relay's head and the snapshots of its steps (to keep
    once the message is accepted). Its failures depend on the updates'
    values: call it where a failure is the one charged refusal."""
    relay = checked.relay
    if relay.base == 0:
        theta, state = np.asarray(theta0, dtype=np.float64), None
    else:
        theta, state = store.load(relay.base, relay.base_hash)
    out: Snapshots = []
    for e, h in zip(relay.entries, checked.hashes, strict=True):
        x = sum(checked.updates[(i, e.wire)].gradient for i, _ in e.updates)
        if e.parent == 0:
            sq = sum(checked.updates[(i, e.wire)].squares for i, _ in e.init or [])
            state = initial_state((e.init_k or 1.0) * np.clip(sq, 0.0, 1.0), lim.hp)
        if state is None:
            raise ThetaRejected("no optimiser state")
        before = theta
        theta, state = twin_step(
            theta, state, x / lim.gradient_factor, e.step, lim.hp, e.k, lim.optimizer
        )
        if not float(np.max(np.abs(theta - before))) <= lim.step_bound:  # NaN too
            raise ThetaRejected("a relayed step moves θ past the bound")
        out.append((e.step, h, theta, state))
    return theta, out


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
