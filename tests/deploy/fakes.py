"""A stand-in flwr on PATH that records its arguments instead of submitting."""

from __future__ import annotations

import os
from pathlib import Path


def fake_flwr(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """(environment with the fake first on PATH, the file its argv goes to)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    argv_file = tmp_path / "argv"
    fake = bin_dir / "flwr"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {argv_file}\n')
    fake.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, argv_file
