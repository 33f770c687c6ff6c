"""The guard's bookkeeping: charges survive crashes, messages under a key are
handled one at a time, a stored state that does not fit fails closed."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from participants.guard import Guard, Refused, Terminal
from participants.trust import Trust
from protocol.errors import KeyMaterialError

FP = "ab" * 32


def _trust(tmp_path, budget: int = 3) -> Trust:
    return Trust(
        key_path=tmp_path / "participant.ctx",
        state_dir=tmp_path / "state",
        index=0,
        theta_step_bound=0.1,
        max_round_gap=4,
        max_rounds=100,
        refusal_budget=budget,
        report_metrics=False,
        federation_size=3,
        deployed=True,
    )


def test_refusal_charge_is_on_disk_before_the_decryption(tmp_path):
    """Inside the decrypting block the refusal is already charged on disk, so a
    process that dies there has paid; an exception becomes Refused; success
    gives the charge back."""
    guard = Guard(_trust(tmp_path), FP)
    with guard.decrypting(("train",), 1):
        guard.close()
        assert Guard(_trust(tmp_path), FP).state.refusals == 1  # as a crash sees it
    assert guard.state.refusals == 0
    guard = Guard(_trust(tmp_path), FP)
    with pytest.raises(Refused) as info, guard.decrypting(("train",), 2):
        raise ValueError("θ changed by up to 0.73")  # never reaches the reply
    assert str(info.value) == "hedrl-refused" and info.value.__cause__ is None
    guard.close()
    assert Guard(_trust(tmp_path), FP).state.refusals == 1


def test_refusal_budget_then_terminal(tmp_path):
    """The B-th refusal answers Terminal and so does every later message."""
    guard = Guard(_trust(tmp_path, budget=2), FP)
    for round_, expected in ((1, Refused), (2, Terminal)):
        guard.admit("train", round_)
        with pytest.raises(expected), guard.decrypting(("train",), round_):
            raise RuntimeError
    with pytest.raises(Terminal):
        guard.admit("train", 3)
    guard.close()


def test_refusal_messages_under_a_key_are_handled_one_at_a_time(tmp_path):
    """A second message under the same key waits for the first to finish and
    then sees its charge: two crafted θ sent at once cost two refusals."""
    first = Guard(_trust(tmp_path), FP)
    seen: dict[str, float] = {}

    def second() -> None:
        other = Guard(_trust(tmp_path), FP)
        seen["acquired"] = time.monotonic()
        seen["refusals"] = other.state.refusals
        other.close()

    thread = threading.Thread(target=second)
    with pytest.raises(Refused), first.decrypting(("train",), 1):
        thread.start()
        time.sleep(0.3)  # the second message arrives while the first decrypts
        raise ValueError
    released = time.monotonic()
    first.close()
    thread.join(5)
    assert seen["acquired"] >= released and seen["refusals"] == 1


def test_theta_bound_grows_with_the_gap_up_to_g(tmp_path):
    """|θ − θ_last| ≤ bound·min(t − t_last, G); before any θ, from θ0."""
    guard = Guard(_trust(tmp_path), FP)
    theta0 = np.zeros(5)
    own = lambda: theta0  # noqa: E731 - this participant's θ0
    guard.check_theta(theta0 + 0.1, 1, own)
    with pytest.raises(ValueError):
        guard.check_theta(theta0 + 0.11, 1, own)
    with pytest.raises(ValueError):
        guard.check_theta(np.zeros(6), 1, own)  # another size
    guard.accept_theta(theta0 + 0.1, 1, "d")
    guard.check_theta(theta0 + 0.1 + 0.4, 9, own)  # gap 8, capped at G = 4
    with pytest.raises(ValueError):
        guard.check_theta(theta0 + 0.1 + 0.41, 9, own)
    guard.close()


def test_guard_state_of_another_key_fails_closed(tmp_path):
    guard = Guard(_trust(tmp_path), FP)
    guard.save()
    guard.close()
    other = "cd" * 32
    (tmp_path / "state" / f"guard-{FP[:16]}-p0.json").rename(
        tmp_path / "state" / f"guard-{other[:16]}-p0.json"
    )
    with pytest.raises(KeyMaterialError, match="another key"):
        Guard(_trust(tmp_path), other)
