"""hedrl run: one-line refusals before anything starts, merged presets, and real
runs that exit 0 only when they completed and leave no SuperLink behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from coordinator import launch

REPO = Path(__file__).resolve().parents[2]


def _superlinks() -> set[int]:
    out = subprocess.run(
        ["pgrep", "-f", "flower-superlink"], capture_output=True, text=True
    ).stdout
    return {int(x) for x in out.split()}


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["env-id=CartPol-v1"], "did you mean 'CartPole-v1'"),
        (["lr=-1"], "lr: must be > 0"),
        (
            ["num-round=3"],
            "unknown run-config key 'num-round'; did you mean num-rounds",
        ),
        (["lr='fast'"], "lr='fast': expected a float"),
        (["--preset", "nope"], "no such file or preset; presets: acrobot"),
        (["num-participants=4", "--supernodes", "2"], "pass --supernodes 4"),
        (["num-rounds"], "expected key=value"),
    ],
)
def test_mistakes_end_in_one_line_before_anything_starts(
    monkeypatch, capsys, argv, says
):
    def no_superlink(*a, **k):
        raise AssertionError("a SuperLink was started for a run config that fails")

    monkeypatch.setattr(launch, "local_superlink", no_superlink)
    assert launch.main(["run", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("hedrl run: ")
    assert says in err, err


def test_preset_then_pairs_make_one_run_config_flwr_reads_back(tmp_path):
    defaults = launch.app_defaults(REPO)
    preset = tomllib.loads(launch.preset_path("acrobot-delta").read_text())
    pairs = launch.parse_pairs(["lr=0.1", "seed=3", "env-id=Acrobot-v1", "beta2=1"])
    merged = launch.merged_config(defaults, preset, pairs)
    assert merged["lr"] == 0.1 != preset["lr"] and merged["seed"] == 3
    assert merged["participant-update"] == "delta"  # from the preset
    assert merged["beta2"] == 1.0 and type(merged["beta2"]) is float  # int → float
    cfg = launch.check_config(defaults, {**merged, "beta2": 0.999})
    assert cfg.env_id == "Acrobot-v1" and cfg.anneal_lr
    path = launch.write_config(tmp_path / "rc.toml", merged)
    assert parse_config_args([str(path)]) == merged


def test_presets_by_name_or_file_and_strings_survive_toml(tmp_path):
    assert launch.preset_path("cartpole-fast").parent.name == "presets"
    assert launch.preset_path("cartpole-fast").parent.parent.name == "deploy"
    assert launch.preset_path("pendulum-delta").parent.parent.name == "benchmarks"
    own = tmp_path / "mine.toml"
    own.write_text("lr = 0.001\n")
    assert launch.preset_path(str(own)) == own
    tricky = {"run-name": 'a "quoted" \\ name ü🚀\n', "anneal-lr": False, "lr": 1e-05}
    path = launch.write_config(tmp_path / "t.toml", tricky)
    assert tomllib.loads(path.read_text()) == tricky


def test_version_and_help_from_the_console_script():
    exe = Path(sys.executable).with_name("hedrl")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("hedrl 0.")
    helped = subprocess.run([exe, "run", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--preset" in helped.stdout


def _hedrl_run(tmp_path: Path, *argv: str) -> subprocess.Popen:
    env = {**os.environ, "HOME": str(tmp_path), "FLWR_HOME": str(tmp_path / "flwr")}
    return subprocess.Popen(
        [sys.executable, "-m", "coordinator.launch", "run", *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell's background job (CI under nohup, `cmd &`) ignores SIGINT and
        # its children inherit that: give hedrl run Ctrl-C's usual meaning
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


@pytest.mark.slow
def test_a_completed_run_exits_0_and_names_its_folder(tmp_path):
    before = _superlinks()
    proc = _hedrl_run(tmp_path, "num-rounds=3", "backend='plain'")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "hedrl: round 3/3 plain" in out
    folder = Path(out.strip().splitlines()[-1].split("results in ")[1])
    assert folder.parent == tmp_path / ".hedrl" / "results"
    assert {"summary.json", "learning_curve.png"} <= {p.name for p in folder.iterdir()}
    assert _superlinks() <= before  # its own SuperLink is gone


@pytest.mark.slow
def test_a_failed_run_exits_1_with_its_reason_in_one_line(tmp_path):
    proc = _hedrl_run(
        tmp_path, "num-rounds=3", "backend='plain'", "expect-fingerprint='00ff'"
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, (out[-2000:], err[-2000:])
    last = err.strip().splitlines()[-1]
    assert last.startswith("hedrl run: run ") and "fingerprint mismatch" in last


@pytest.mark.slow
def test_ctrl_c_stops_the_run_and_its_superlink(tmp_path):
    before = _superlinks()
    proc = _hedrl_run(tmp_path, "num-rounds=400", "backend='plain'")
    assert proc.stdout is not None
    deadline = time.monotonic() + 240
    for line in proc.stdout:  # wait until it trains
        if "hedrl: round 2/400" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "stopping run" in err
    assert _superlinks() <= before


def test_the_serverapp_checks_the_env_id_before_asking_anyone(monkeypatch):
    """flwr run . with a typo'd env id: one ConfigError naming the closest id,
    before the coordinator waits for or asks any participant."""
    from types import SimpleNamespace

    from coordinator import server_app
    from protocol.errors import ConfigError

    def no_federation(*a, **k):
        raise AssertionError("the federation started")

    monkeypatch.setattr(server_app, "Federation", no_federation)
    context = SimpleNamespace(run_config={"env-id": "Acrobat-v1"}, run_id=1)
    with pytest.raises(ConfigError, match="did you mean 'Acrobot-v1'"):
        server_app.main(None, context)


def test_follow_prints_hedrl_lines_and_finds_the_first_error(tmp_path, capsys):
    """flwr log's stream (a fake flwr here): colour codes, Ray's prefixes and
    repeat notes stripped; a hedrl error's traceback line and the results
    folder found; a path containing 'failed' is not an error."""
    from coordinator.local_flwr import follow

    log = [
        "\x1b[92mINFO \x1b[0m:      Starting Flower Simulation",
        "Successfully installed hedrl to /tmp/test_failed_run/apps/hedrl",
        "\x1b[92mINFO \x1b[0m:      hedrl: evaluation context accepted; "
        "results in /r/CartPole-v1-1",
        "(ClientAppActor pid=12) \x1b[92mINFO \x1b[0m:      hedrl: participant 1: ok "
        "[repeated 2x across cluster] (Ray deduplicates logs by default.",
        "(ClientAppActor pid=12) protocol.errors.KeyMaterialError: "
        "no participant context",
        "ERROR :     hedrl: round 3: later error",
    ]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "log.txt").write_text("\n".join(log) + "\n")
    fake = bin_dir / "flwr"
    fake.write_text(f"#!/bin/sh\ncat {tmp_path / 'log.txt'}\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    error, results = follow("7", env, verbose=False)
    assert error == "KeyMaterialError: no participant context"
    assert results == "/r/CartPole-v1-1"
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "hedrl: evaluation context accepted; results in /r/CartPole-v1-1",
        "hedrl: participant 1: ok",
        "hedrl: round 3: later error",
    ]
