"""Open-loop fidelity (issue 3 --quick): encrypted θ tracks the twin for 20 rounds."""

from __future__ import annotations

import json

import pytest

from benchmarks import fidelity_quick
from protocol.params import get_param_set
from protocol.tolerance import ckks_theta_rel_tol


@pytest.mark.slow  # a sweep: CI runs it, the fast loop does not
def test_open_loop_encrypted_theta_within_ckks_tolerance(tmp_path):
    """Replayed twin gradients: every round's decrypted θ within 2^(25−b) relative."""
    rc = fidelity_quick.main(tmp_path)
    res = json.loads((tmp_path / "fidelity_quick.json").read_text())
    assert len(res["theta_rel_err"]) == fidelity_quick.ROUNDS
    assert res["theta_tolerance"] == ckks_theta_rel_tol(get_param_set("8k-35x3"))
    assert max(res["theta_rel_err"]) <= res["theta_tolerance"], res["theta_rel_err"]
    assert max(res["aggregate_rel_err"]) < 1e-4, res["aggregate_rel_err"]
    # the errors are CKKS noise, not zero: the replay really went through CKKS
    assert min(res["theta_rel_err"]) > 0
    assert rc == 0
