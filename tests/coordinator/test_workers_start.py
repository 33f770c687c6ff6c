"""Coordinator worker start-up: a script without a main guard fails fast and
says why, instead of deadlocking in the spawn (real CKKS context, real spawn)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    f"""
    import sys
    sys.path.insert(0, {str(REPO)!r})
    from coordinator.workers import ChunkPool
    from protocol.keys import generate
    from protocol.params import get_param_set

    ps = get_param_set("8k-35x3")
    _, evaluation_context, _ = generate(ps, "ckks")  # MBs: more than a pipe holds
    pool = ChunkPool(context=evaluation_context, param_set=ps.id, backend="ckks",
                     workers=2)  # this process and one spawned worker
    print("STARTED")
    pool.close()
    """
)


def test_pool_without_main_guard_fails_fast_with_the_reason(tmp_path: Path) -> None:
    script = tmp_path / "no_guard.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=180,  # the old behaviour: blocked for good writing to the pipe
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert "STARTED" not in proc.stdout
    assert "ConfigError: coordinator workers did not start" in proc.stderr
    assert 'if __name__ == "__main__":' in proc.stderr


def test_pool_with_main_guard_starts(tmp_path: Path) -> None:
    script = tmp_path / "guarded.py"
    body = "\n".join("    " + line for line in SCRIPT.strip().splitlines())
    script.write_text(f"if __name__ == '__main__':\n{body}\n")
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "STARTED" in proc.stdout
