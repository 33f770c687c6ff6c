"""Presets: valid run-config files, deploy/'s for submit.sh and benchmarks/'s for
the benchmarks; flwr run takes either with ``--run-config FILE``."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from protocol.config import RunConfig
from tests.deploy.fakes import fake_flwr

REPO = Path(__file__).resolve().parents[2]
PRESETS = sorted((REPO / "deploy" / "presets").glob("*.toml")) + sorted(
    (REPO / "benchmarks" / "presets").glob("*.toml")
)


def _app_config() -> dict:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return pyproject["tool"]["flwr"]["app"]["config"]


def test_there_is_a_cartpole_preset():
    assert REPO / "deploy" / "presets" / "cartpole-fast.toml" in PRESETS


@pytest.mark.parametrize(
    "preset", PRESETS, ids=lambda p: p.parent.parent.name + "/" + p.stem
)
def test_flwr_reads_the_preset_as_a_run_config_file(preset: Path):
    assert parse_config_args([str(preset)]) == tomllib.loads(preset.read_text())


def test_every_benchmark_preset_has_targets_and_every_target_a_preset():
    targets = tomllib.loads((REPO / "benchmarks" / "targets.toml").read_text())
    names = {p.stem for p in PRESETS if p.parent.parent.name == "benchmarks"}
    assert names == set(targets)
    for name, target in targets.items():
        assert set(target) == {"solve-threshold", "random-return", "max-rounds"}, name
        assert target["solve-threshold"] > target["random-return"], name


@pytest.mark.parametrize(
    "preset", PRESETS, ids=lambda p: p.parent.parent.name + "/" + p.stem
)
def test_preset_holds_only_run_config_keys(preset: Path):
    """flwr refuses keys the app does not declare; RunConfig range-checks values."""
    data = tomllib.loads(preset.read_text())
    declared = _app_config()
    unknown = sorted(set(data) - set(declared))
    assert not unknown, f"{preset.name}: not in [tool.flwr.app.config]: {unknown}"
    for key, value in data.items():
        assert type(value) is type(declared[key]), (key, value, declared[key])
    # num-participants must match the SuperNodes a deployment actually starts
    assert "num-participants" not in data
    RunConfig.from_mapping({**declared, **data})


def test_submit_puts_the_preset_before_the_overrides(tmp_path: Path):
    """--preset becomes its own --run-config ahead of the user's, so theirs win."""
    env, argv_file = fake_flwr(tmp_path)
    preset = REPO / "deploy" / "presets" / "cartpole-fast.toml"
    proc = subprocess.run(
        [
            "bash",
            str(REPO / "deploy" / "submit.sh"),
            "--connection",
            "hedrl",
            "--results-dir",
            str(tmp_path / "results"),
            "--run-name",
            "r1",
            "--preset",
            str(preset.relative_to(REPO)),
            "--run-config",
            "num-participants=3 lr=0.001",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc.stderr  # no metrics.jsonl: nothing ran
    argv = argv_file.read_text().splitlines()
    assert argv[:4] == ["run", ".", "hedrl", "--stream"], argv
    configs = [argv[i + 1] for i, a in enumerate(argv) if a == "--run-config"]
    assert len(configs) == 3, argv  # preset, the user's, submit.sh's own
    fused = parse_config_args(configs)  # Flower's own parser, in flwr run's order
    data = tomllib.loads(preset.read_text())
    assert fused["lr"] == 0.001 != data["lr"]
    assert fused["num-participants"] == 3
    assert fused["results-dir"] == str(tmp_path / "results")
    for key, value in data.items():
        if key != "lr":
            assert fused[key] == value, key
