"""Shared fixtures: one CKKS key pair per session (key generation costs ~0.5 s)."""

from __future__ import annotations

import pytest

from protocol.backend import PlainBackend
from protocol.keys import coordinator_backend, generate, participant_backend
from protocol.params import get_param_set


@pytest.fixture(scope="session")
def ps():
    return get_param_set("8k-35x3")


@pytest.fixture(scope="session")
def ckks_pair(ps, tmp_path_factory):
    """(participant backend, coordinator backend, fingerprint, key dir) at 8k-35x3."""
    d = tmp_path_factory.mktemp("keys")
    sec, pub, fp = generate(ps, "ckks")
    (d / "participant.ctx").write_bytes(sec)
    (d / "coordinator.ctx").write_bytes(pub)
    part, fp_p = participant_backend(d / "participant.ctx", ps, "ckks")
    coord, fp_c = coordinator_backend(pub, ps, "ckks")
    assert fp_p == fp_c == fp
    return part, coord, fp, d


@pytest.fixture(scope="session")
def plain(ps):
    return PlainBackend(ps)
