"""The wheel, installed in a clean venv: every console script answers --help and
--version, and hedrl-bench finds its own package."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(
    tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
)


@pytest.mark.slow
def test_every_console_script_works_from_a_wheel_in_a_clean_venv(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "-w",
            str(wheels),
            str(REPO),
        ],
        check=True,
    )
    (wheel,) = wheels.glob("hedrl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "benchmarks/targets.toml" in names
    assert not [n for n in names if n.startswith("benchmarks/results/")]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([venv / "bin" / "pip", "install", "-q", str(wheel)], check=True)
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for script in SCRIPTS:
        exe = venv / "bin" / script
        helped = subprocess.run(
            [exe, "--help"], capture_output=True, text=True, cwd=tmp_path
        )
        assert helped.returncode == 0 and "usage:" in helped.stdout, (
            script,
            helped.stderr,
        )
        shown = subprocess.run(
            [exe, "--version"], capture_output=True, text=True, cwd=tmp_path
        )
        assert shown.stdout.strip() == f"{script} {version}", (script, shown)
