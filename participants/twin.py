"""The release's policy: the optimiser's float64 twin replayed over the ledger.

A released θ must not be a decryption of a ciphertext the coordinator chose:
with the policy in hand it could read the key off a crafted ciphertext
(docs/threat-model.md, "Release"). So the release recomputes θ in float64 from
θ0 and the plaintext updates the participants kept (participants/updates.py),
following the chain of steps the coordinator's ledger names
(protocol/ledger.py). An update enters only if its digest matches what its
sender recorded: the result is a function of genuine updates and public
numbers, whatever the ledger says. It is then compared with the final θ the
participant decrypted; a coordinator that did not compute what its ledger
claims gets no release.
"""

from __future__ import annotations

import numpy as np

from participants.updates import Kept
from protocol.adam import AdamHyper, initial_state, twin_step
from protocol.errors import KeyMaterialError
from protocol.ledger import Entry, Used

#: the twin may differ from the decrypted final θ by this many times the
#: parameter set's HE-Adam tolerance (protocol/tolerance.py), relative to how
#: far θ moved from θ0
TOLERANCE_FACTOR = 4.0


def _sum(found: Kept, used: Used, wire: int, squares: bool) -> np.ndarray:
    total: np.ndarray | None = None
    for index, digest in used:
        update = found.get((index, wire))
        kept = None
        if update is not None:
            kept = update.squares_digest if squares else update.gradient_digest
        if kept != digest:
            what = "squares" if squares else "update"
            raise KeyMaterialError(
                f"the ledger uses participant {index}'s {what} of round {wire}, "
                "which no participant's update directory in the state directory "
                "holds with that digest (copy every participant's "
                "guard-…-updates directory there; docs/deploy.md)"
            )
        assert update is not None
        values = update.squares if squares else update.gradient
        assert values is not None
        total = values.copy() if total is None else total + values
    assert total is not None
    return total


def replay(
    chain: list[Entry],
    found: Kept,
    theta0: np.ndarray,
    hp: AdamHyper,
    optimizer: str,
    gradient_factor: float,
    *,
    max_k: float,
    step_bound: float,
) -> np.ndarray:
    """θ after the steps of ``chain`` (first step first), from ``theta0``.

    Within this participant's own limits: k = K/K' at most ``max_k`` (the
    federation size) and no step moving an element by more than
    ``step_bound`` (its theta-step-bound, what it accepts of θ in one round),
    so the ledger's numbers cannot magnify one update in the release.
    """
    if optimizer not in ("he-adam", "exact-adam"):
        raise KeyMaterialError(f"no twin for optimizer {optimizer!r}")
    theta = np.asarray(theta0, dtype=np.float64).copy()
    state = None
    for e in chain:
        if max(e.k, e.init_k or 1.0) > max_k:
            raise KeyMaterialError(
                f"ledger step {e.step}: k above the federation size {max_k:g}"
            )
        x = _sum(found, e.updates, e.wire, squares=False) / gradient_factor
        if e.parent == 0:
            assert e.init is not None and e.init_k is not None  # read_chain
            squares = _sum(found, e.init, e.wire, squares=True)
            state = initial_state(e.init_k * np.clip(squares, 0.0, 1.0), hp)
        assert state is not None  # a chain starts from θ0 (read_chain)
        before = theta
        theta, state = twin_step(theta, state, x, e.step, hp, e.k, optimizer)
        if not float(np.max(np.abs(theta - before))) <= step_bound:  # NaN too
            raise KeyMaterialError(
                f"ledger step {e.step} moves θ by more than this participant's "
                f"theta-step-bound {step_bound:g}"
            )
    return theta


def matches(
    twin: np.ndarray, decrypted: np.ndarray, theta0: np.ndarray, tolerance: float
) -> bool:
    """The decrypted final θ is the twin up to ``TOLERANCE_FACTOR·tolerance``
    relative to the twin's distance from θ0."""
    moved = float(np.max(np.abs(twin - theta0)))
    diff = float(np.max(np.abs(decrypted - twin)))
    return bool(np.isfinite(diff)) and diff <= TOLERANCE_FACTOR * tolerance * max(
        moved, 1e-12
    )
