"""provision.sh writes each participant's node.toml; supernode.sh hands it over."""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from tests.deploy.fakes import fake_flwr
from tests.deploy.pin import app_pin

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def _sh(*argv: str | Path, env: dict[str, str] | None = None):
    return subprocess.run(
        ["bash", *map(str, argv)], capture_output=True, text=True, env=env
    )


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("provision") / "bundles"
    proc = _sh(
        DEPLOY / "provision.sh",
        *("--out", out, "--coordinator-host", "10.0.0.1", "--participants", "2"),
        *("--backend", "plain", "--theta-step-bound", "0.05"),
    )
    assert proc.returncode == 0, proc.stderr
    return out


def _node(bundles: Path, i: int) -> dict:
    return tomllib.loads((bundles / f"participant-{i}" / "node.toml").read_text())


def test_node_toml_holds_the_settings_the_index_and_the_pin(bundles):
    """Every key the ClientApp reads, the flags' values, and this tree's app-sha256."""
    pin = app_pin.tree_digest(REPO)
    assert (bundles / "coordinator" / "app.sha256").read_text() == pin + "\n"
    for i in range(2):
        assert _node(bundles, i) == {
            "participant-index": i,
            "federation-size": 2,
            "app-sha256": pin,
            "secret-context": "participant.ctx",
            "state-dir": "state",
            "theta-step-bound": 0.05,
            "max-round-gap": 64,
            "max-rounds": 100000,
            "refusal-budget": 3,
            "report-metrics": False,
            "max-param-count": 200000,
            "max-rollout-steps": 65536,
        }
        state = bundles / f"participant-{i}" / "state"
        assert state.is_dir() and state.stat().st_mode & 0o777 == 0o700


def test_keys_only_keeps_settings_unless_given_again(bundles, tmp_path):
    """A fresh key; theta-step-bound kept, max-rounds replaced, the rest as before."""
    copy = tmp_path / "bundles"
    shutil.copytree(bundles, copy)
    proc = _sh(
        DEPLOY / "provision.sh", *("--out", copy, "--keys-only", "--max-rounds", "500")
    )
    assert proc.returncode == 0, proc.stderr
    fingerprint = "participant-0/fingerprint.txt"
    assert (copy / fingerprint).read_text() != (bundles / fingerprint).read_text()
    assert _node(copy, 1) == _node(bundles, 1) | {"max-rounds": 500}


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--theta-step-bound", "0"),
        ("--max-round-gap", "1.5"),
        ("--refusal-budget", "0"),
        ("--report-metrics", "yes"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, flag, value):
    """A bad guard setting stops provision.sh before it creates any file."""
    out = tmp_path / "bundles"
    proc = _sh(
        DEPLOY / "provision.sh",
        *("--out", out, "--coordinator-host", "10.0.0.1", flag, value),
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"provision.sh: {flag} must be ")
    assert not out.exists()


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--coordinator-host", "c`touch pwned`", "expected a host name or IP"),
        ("--coordinator-host", "a b", "expected a host name or IP"),
        ("--hedrl-home", "/h$(touch pwned)", "must be absolute paths of"),
        ("--hedrl-home", '/home/o n"e/hedrl', "must be absolute paths of"),
        ("--kit-dir", "/srv/kits %h", "must be absolute paths of"),
        ("--kit-dir", "relative", "must be absolute paths of"),
    ],
)
def test_values_written_into_start_scripts_are_plain(tmp_path, flag, value, says):
    """Host names and paths end up in shell scripts and systemd units: anything
    but plain names is refused before a file is written (nothing runs)."""
    out = tmp_path / "bundles"
    host = [] if flag == "--coordinator-host" else ["--coordinator-host", "10.0.0.1"]
    proc = subprocess.run(
        ["bash", str(DEPLOY / "provision.sh"), "--out", str(out), *host, flag, value],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr
    assert not out.exists() and not (tmp_path / "pwned").exists()


def test_supernode_passes_absolute_paths_and_puts_the_pin_on_path(bundles, tmp_path):
    """flower-supernode gets STATE/node-config.toml; flwr-clientapp is deploy/bin's."""
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "flower-supernode").write_text(
        '#!/bin/sh\necho "ARGS $*"\necho "CLIENTAPP $(command -v flwr-clientapp)"\n'
    )
    (fake / "flower-supernode").chmod(0o755)
    bundle = bundles / "participant-1"
    state = tmp_path / "state"
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}")
    proc = _sh(
        DEPLOY / "supernode.sh",
        *("--bundle", bundle, "--superlink", "10.0.0.1:8000", "--state-dir", state),
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"--node-config {state}/node-config.toml" in proc.stdout
    assert f"CLIENTAPP {DEPLOY}/bin/flwr-clientapp" in proc.stdout
    resolved = tomllib.loads((state / "node-config.toml").read_text())
    assert resolved == _node(bundles, 1) | {
        "secret-context": str(bundle / "participant.ctx"),
        "state-dir": str(state),
    }


def test_supernode_refuses_a_bundle_without_a_pin(tmp_path):
    """A node.toml from before the pin: supernode.sh stops before flower-supernode."""
    bundle = tmp_path / "old-bundle"
    bundle.mkdir()
    (bundle / "participant.ctx").write_bytes(b"")
    (bundle / "node.toml").write_text(
        'secret-context = "participant.ctx"\nparticipant-index = 0\n'
    )
    proc = _sh(DEPLOY / "supernode.sh", "--bundle", bundle, "--superlink", "x:1")
    assert proc.returncode == 2
    assert "node.toml has no app-sha256: re-run provision.sh" in proc.stderr


def test_preset_sets_the_step_bound_unless_it_is_given(tmp_path):
    """--preset: theta-step-bound is 1.25 × the largest step of the preset's
    server optimiser (delta mode: HE-Adam at lr 0.2, β1 0.2, floor 1); an
    explicit --theta-step-bound wins; an unreadable preset stops provisioning."""
    from participants.trust import AUTO_BOUND_MARGIN
    from protocol.adam import step_sup
    from protocol.config import RunConfig

    preset = DEPLOY / "presets" / "cartpole-delta.toml"
    cfg = RunConfig.from_mapping(tomllib.loads(preset.read_text()))
    want = AUTO_BOUND_MARGIN * step_sup(cfg.hyper) * cfg.lr
    base = ("--coordinator-host", "10.0.0.1", "--participants", "1", "--backend")
    for extra, bound in (((), want), (("--theta-step-bound", "0.5"), 0.5)):
        out = tmp_path / f"b{len(extra)}"
        proc = _sh(
            DEPLOY / "provision.sh",
            *("--out", out, *base, "plain", "--preset", preset, *extra),
        )
        assert proc.returncode == 0, proc.stderr
        got = _node(out, 0)["theta-step-bound"]
        assert got == pytest.approx(bound, rel=1e-5) and got > 0.2
    proc = _sh(
        DEPLOY / "provision.sh",
        *("--out", tmp_path / "c", *base, "plain", "--preset", tmp_path / "none"),
    )
    assert proc.returncode == 2 and "cannot read --preset" in proc.stderr
    assert not (tmp_path / "c").exists()


def _fake_home(tmp_path: Path) -> tuple[Path, Path]:
    """A HEDRL_HOME whose deploy scripts record their arguments."""
    home, record = tmp_path / "home", tmp_path / "argv"
    (home / "deploy").mkdir(parents=True)
    for script in ("superlink.sh", "supernode.sh"):
        fake = home / "deploy" / script
        fake.write_text(f'#!/bin/sh\necho {script} "$@" > {record}\n')
        fake.chmod(0o755)
    return home, record


def test_each_kit_starts_its_own_host_from_its_own_directory(bundles, tmp_path):
    """start-*.sh run the checkout's script on the kit they sit in, wherever the
    kit was copied; the systemd unit starts that script from --kit-dir."""
    home, record = _fake_home(tmp_path)
    env = {**os.environ, "HEDRL_HOME": str(home)}
    for name, script, want in (
        ("participant-1", "start-supernode.sh", "--superlink 10.0.0.1:8000"),
        ("coordinator", "start-superlink.sh", "--database"),
    ):
        moved = shutil.copytree(bundles / name, tmp_path / "elsewhere" / name)
        proc = subprocess.run(
            [moved / script, "--port", "9999"], env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        argv = record.read_text().split()
        assert argv[:3] == [script[6:], "--bundle", str(moved)], argv
        assert want in " ".join(argv) and argv[-2:] == ["--port", "9999"]
        unit = next(moved.glob("hedrl-*.service")).read_text()
        assert f"ExecStart=/opt/hedrl/{name}/{script}\n" in unit
        assert f"Environment=HEDRL_HOME={REPO}\n" in unit


def test_submit_with_the_kit_expects_its_fingerprint(bundles, tmp_path):
    env, argv_file = fake_flwr(tmp_path)
    kit = bundles / "coordinator"
    proc = _sh(
        DEPLOY / "submit.sh",
        *("--connection", "hedrl", "--results-dir", tmp_path / "r", "--bundle", kit),
        env=env,
    )
    fp = (kit / "fingerprint.txt").read_text().strip()
    assert proc.returncode == 1, proc.stderr  # submitted (fake), no metrics.jsonl
    assert f"expect-fingerprint='{fp}'" in argv_file.read_text()
    # flwr applies --run-config in order: run configs passed through after --
    # come before submit.sh's own, so they cannot drop the kit's fingerprint
    proc = _sh(
        DEPLOY / "submit.sh",
        *("--connection", "hedrl", "--results-dir", tmp_path / "r", "--bundle", kit),
        *("--", "--run-config", "expect-fingerprint=''"),
        env=env,
    )
    argv = argv_file.read_text().splitlines()
    configs = [argv[i + 1] for i, a in enumerate(argv) if a == "--run-config"]
    assert parse_config_args(configs)["expect-fingerprint"] == fp
    for flag, value in (("--run-name", "x' y=\""), ("--results-dir", "/r 2")):
        proc = _sh(
            DEPLOY / "submit.sh",
            *("--connection", "hedrl", "--results-dir", tmp_path / "r"),
            *("--bundle", kit, flag, value),
            env=env,
        )
        assert proc.returncode == 2 and "letters, digits" in proc.stderr
    # a checkout other than the provisioned one is refused before flwr runs
    other = shutil.copytree(kit, tmp_path / "kit2")
    (other / "app.sha256").write_text("0" * 64 + "\n")
    argv_file.unlink()
    proc = _sh(
        DEPLOY / "submit.sh",
        *("--connection", "hedrl", "--results-dir", tmp_path / "r", "--bundle", other),
        env=env,
    )
    assert proc.returncode == 2 and "is not the provisioned" in proc.stderr
    assert not argv_file.exists()


def test_rehearse_explains_itself_and_refuses_unknown_arguments():
    helped = _sh(DEPLOY / "rehearse.sh", "--help")
    assert helped.returncode == 0 and "--namespaces" in helped.stdout
    bad = _sh(DEPLOY / "rehearse.sh", "--round", "3")
    assert bad.returncode == 2 and "unknown argument --round" in bad.stderr
