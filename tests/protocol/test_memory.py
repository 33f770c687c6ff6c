"""retain-freed-memory: freed large allocations are reused, not faulted in again."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from coordinator.workers import ChunkPool
from protocol import memory
from protocol.config import RunConfig
from protocol.keys import generate

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="mallopt settings are glibc's",
)

# A child process allocates, fills and frees a 64 MiB buffer four times and
# reports the minor page faults of each time (64 MiB is above glibc's largest
# automatic mmap threshold, 32 MiB: by default every time gets fresh pages).
CHILD = """
import json, resource, sys
from protocol.memory import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "1" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
counts = []
for _ in range(4):
    f0 = faults()
    buf = b"x" * (64 << 20)
    counts.append(faults() - f0)
    del buf
print(json.dumps({"applied": applied, "faults": counts}))
"""
PAGES = (64 << 20) // 4096  # 16384 pages of 4 KiB per buffer


def _child(retain: bool) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, "1" if retain else "0"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


@glibc
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    """Without the setting every 64 MiB buffer faults in about its 16384 pages
    again; with it only the first does, the next three reuse its memory (fewer
    than 1 % of the pages)."""
    default = _child(retain=False)
    assert not default["applied"]
    assert all(c > PAGES // 2 for c in default["faults"]), default
    kept = _child(retain=True)
    assert kept["applied"] is True
    assert kept["faults"][0] > PAGES // 2, kept
    assert all(c < PAGES // 100 for c in kept["faults"][1:]), kept


def test_run_config_key():
    """On by default; the run-config key turns it off."""
    assert RunConfig().retain_freed_memory is True
    cfg = RunConfig.from_mapping({"retain-freed-memory": False})
    assert cfg.retain_freed_memory is False


def _applied_here(_: int) -> bool | None:
    return memory._applied


@glibc
@pytest.mark.parametrize("retain", [True, False])
def test_pool_workers_follow_the_setting(ps, retain):
    """The coordinator's spawned workers apply it in their own processes (or not)."""
    _, pub, _ = generate(ps, "plain")
    with ChunkPool(
        context=pub, param_set=ps.id, backend="plain", workers=2, retain_memory=retain
    ) as pool:
        assert pool._executor is not None
        got = pool._executor.submit(_applied_here, 0).result(timeout=120)
    assert got is (True if retain else None)
