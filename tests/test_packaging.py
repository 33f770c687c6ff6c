"""The wheel, installed in a fresh venv: every console script answers --help and
--version, and hedrl-bench finds its own package.

The venv gets the wheel alone (--no-deps); its dependencies are those of the
interpreter running the tests, reached through a .pth file (which adds their
directory to sys.path without running the .pth files there, so an editable
install of this checkout stays invisible and the wheel's own modules are the
ones imported)."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


@pytest.mark.slow
def test_every_console_script_works_from_the_wheel(tmp_path):
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
    assert "benchmarks/targets.toml" in names and "coordinator/launch.py" in names
    assert not [n for n in names if n.startswith("benchmarks/results/")]
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True
    )
    purelib = Path(
        sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)})
    )
    (purelib / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "-q",
            "--no-deps",
            str(wheel),
        ],
        check=True,
    )
    where = subprocess.run(
        [
            venv / "bin" / "python",
            "-c",
            "import coordinator; print(coordinator.__file__)",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    ).stdout
    assert where.startswith(str(venv)), where  # the wheel's, not this checkout's
    for script in sorted(PROJECT["scripts"]):
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
        assert shown.stdout.strip() == f"{script} {PROJECT['version']}", (script, shown)
