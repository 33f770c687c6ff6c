"""'delta' mode on the real code path: participants send their encrypted Δ,
the coordinator runs HE-Adam on the encrypted mean, every participant checks θ
against its float64 twin (a mismatch would be a refusal), and the encrypted
run follows the plaintext twin."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from participants.learner import Learner
from protocol.config import RunConfig
from protocol.params import get_param_set
from protocol.tolerance import ckks_theta_rel_tol
from tests.helpers import decrypt_theta, local_federation, local_key_file, local_raw

RUN_ID = 4343
ROUNDS = 3


def _raw(tmp: Path, backend: str) -> dict:
    return local_raw(
        tmp,
        **{
            "backend": backend,
            "participant-update": "delta",
            "num-rounds": ROUNDS,
            "num-participants": 3,
            "seed": 4,
            "run-name": backend,
            "coordinator-workers": 0,
        },
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for backend in ("ckks", "plain"):
        tmp = tmp_path_factory.mktemp(backend)
        fed = local_federation(_raw(tmp, backend), RUN_ID)
        summary = fed.run()
        theta = decrypt_theta(fed, local_key_file(tmp, RUN_ID), backend)
        out[backend] = (fed, summary, theta)
    return out


@pytest.mark.parametrize("backend", ["ckks", "plain"])
def test_delta_rounds_are_accepted_by_every_participant(runs, backend):
    """Every round used every participant's Δ, none refused θ (each replayed
    the step on its twin and compared), and all four tagged the final θ."""
    fed, summary, _ = runs[backend]
    assert [r["participants"] for r in fed.history] == [3] * ROUNDS
    assert all(r["refused"] == [] and r["rejected"] == {} for r in fed.history)
    assert summary["final"]["tagged"] == 3


def test_encrypted_delta_run_follows_the_plaintext_twin(runs):
    """Same seeds: the decrypted θ after 3 HE-Adam steps on Δ is the plaintext
    twin's within the parameter set's θ tolerance, relative to the movement;
    and the movement is delta mode's (lr 0.2: θ moved by more than 0.05)."""
    cfg = RunConfig.from_mapping(_raw(Path("/"), "plain"))
    theta0 = Learner(cfg, 0).initial_theta()
    theta_c, theta_p = runs["ckks"][2], runs["plain"][2]
    moved = float(np.max(np.abs(theta_p - theta0)))
    assert moved > 0.05
    rel = float(np.max(np.abs(theta_c - theta_p))) / moved
    assert rel < 4 * ckks_theta_rel_tol(get_param_set("8k-35x3")), rel


@pytest.mark.slow  # CI runs it, the fast loop does not
@pytest.mark.parametrize("optimizer", ["fedavg", "fedavgm"])
def test_encrypted_baselines_are_accepted_and_move_theta(tmp_path, optimizer):
    """The baselines under CKKS in delta mode: every participant checked each θ
    against its twin (none refused), all tagged the final θ, and θ moved by the
    mean Δ's scale (lr 1, G 1: FedAvg)."""
    raw = {**_raw(tmp_path, "ckks"), "optimizer": optimizer, "lr": 1.0}
    raw["clip-bound"] = 1.0
    fed = local_federation(raw, RUN_ID)
    summary = fed.run()
    assert all(r["refused"] == [] and r["rejected"] == {} for r in fed.history)
    assert [r["participants"] for r in fed.history] == [3] * ROUNDS
    assert summary["final"]["tagged"] == 3
    theta = decrypt_theta(fed, local_key_file(tmp_path, RUN_ID), "ckks")
    theta0 = Learner(RunConfig.from_mapping(raw), 0).initial_theta()
    assert 0.01 < float(np.max(np.abs(theta - theta0))) < 3 * ROUNDS
