"""Deployment across network namespaces: real SuperLink/SuperNodes, TLS, node auth.

One coordinator host and three participant hosts, each a network namespace
joined by veth pairs to a bridge that lives in a fifth ("switch") namespace, so
nothing is added to the machine's own network stack. Every step uses the
scripts in ``deploy/`` exactly as the README's "Deploy on separate machines"
does. The hosts share this machine's file system; each gets its own directory
(HOME, FLWR_HOME, bundle) and the test checks that the coordinator's holds no
secret key. Before the honest run the SuperLink serves a modified app bundle,
which every participant must refuse before any of its code runs (the app pin,
deploy/app_pin.py). Needs root (CAP_NET_ADMIN); without it the test FAILS,
never skips.

Every process carries an environment marker and is stopped by it (and every
process left inside our namespaces is killed) before the namespaces are
deleted, whether the test passed or not.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from benchmarks.deploy_lab import (
    PARTICIPANTS,
    REPO,
    Lab,
    free_port,
    hand_out,
    provision,
    script,
)
from protocol.keys import coordinator_backend
from protocol.params import get_param_set
from tests.deploy.pin import app_pin

SUBNET = "10.77.0"
COORD_IP = f"{SUBNET}.1"
PORT = 8000
ROUNDS = 3

pytestmark = [pytest.mark.slow, pytest.mark.needs_root]


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        lab.close()
    left = [ns for ns in lab.namespaces if ns in _netns_list()]
    assert not left, f"namespaces left behind: {left}"


def _netns_list() -> str:
    return subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True
    ).stdout


def _start(
    lab: Lab,
    dirs: dict[str, Path],
    ns: dict[str, str | None],
    address: str,
    listen: str,
    after_superlink: Callable[[], None] = lambda: None,
) -> None:
    """SuperLink, connection, registration and one SuperNode per participant."""
    coord, cns = dirs["coordinator"], ns["coordinator"]
    bundle = coord / "bundle"
    port = address.rsplit(":", 1)[1]
    argv = script("superlink.sh", bundle=bundle, host=listen, port=port)
    lab.start("superlink", cns, argv, coord)
    lab.wait_for_log("superlink", "Uvicorn running on https://")
    after_superlink()
    argv = script("connect.sh", name="hedrl", address=address, ca=bundle / "ca.crt")
    lab.run(cns, argv, coord)
    keys = sorted(str(p) for p in (bundle / "supernodes").glob("*.pub"))
    lab.run(cns, script("register.sh", *keys, connection="hedrl"), coord)
    for i in range(PARTICIPANTS):
        host, hns = dirs[f"participant-{i}"], ns[f"participant-{i}"]
        local_port = 9094 if hns else free_port()  # one loopback: distinct ports
        argv = script(
            "supernode.sh", bundle=host / "bundle", superlink=address, port=local_port
        )
        lab.start(f"supernode-{i}", hns, argv, host)


RUN_CONFIG = (
    f"num-participants={PARTICIPANTS} num-rounds={ROUNDS} round-timeout=120.0 "
    "node-wait=60.0"
)


def _submit(
    lab: Lab, dirs: dict[str, Path], ns: dict[str, str | None], run_config: str
) -> tuple[list[dict], dict]:
    """submit.sh as the operator, checked against the pin: (metrics, summary)."""
    coord = dirs["coordinator"]
    results = coord / "results"
    argv = script(
        "submit.sh",
        connection="hedrl",
        results_dir=results,
        run_name="deployed",
        app_sha256=coord / "bundle" / "app.sha256",
        run_config=f"{RUN_CONFIG} {run_config}",
    )
    proc = lab.run(ns["coordinator"], argv, coord, timeout=240)
    run_dir = results / "deployed"
    assert (run_dir / "summary.json").exists(), proc.stdout[-4000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows, json.loads((run_dir / "summary.json").read_text())


def _modified_app(lab: Lab, marker_dir: Path) -> Path:
    """The app tree with one changed line: importing client_app leaves a marker."""
    app = lab.tmp / "modified-app"
    app.mkdir()
    shutil.copy(REPO / "pyproject.toml", app)
    shutil.copy(REPO / "README.md", app)
    for pkg in ("protocol", "coordinator", "participants"):
        shutil.copytree(REPO / pkg, app / pkg, ignore=shutil.ignore_patterns("__*__"))
    client_app = app / "participants" / "client_app.py"
    line = "app = ClientApp()\n"
    source = client_app.read_text()
    assert source.count(line) == 1, "client_app.py changed: update _modified_app"
    pid = "__import__('os').getpid()"
    marker = f'open(f"{marker_dir}/ran-{{{pid}}}", "w").close()'
    client_app.write_text(source.replace(line, f"app = ClientApp(); {marker}\n"))
    return app


def _attack_with_modified_bundle(
    lab: Lab, dirs: dict[str, Path], ns: dict[str, str | None]
) -> None:
    """The SuperLink serves a modified bundle: every participant refuses it unrun."""
    coord, cns = dirs["coordinator"], ns["coordinator"]
    markers = lab.tmp / "markers"
    markers.mkdir(mode=0o777)
    app = _modified_app(lab, markers)
    results = coord / "results"
    config = f"{RUN_CONFIG} results-dir='{results}' run-name='modified'"
    # flwr run --stream returns when the run has ended, with exit code 0 even
    # when it failed: the run's status says how it ended.
    argv = ["flwr", "run", str(app), "hedrl", "--stream", "--run-config", config]
    out = lab.run(cns, argv, coord, timeout=180).stdout
    run_id = re.search(r"Successfully started run (\d+)", out)[1]

    assert sorted(markers.iterdir()) == [], "the modified ClientApp ran"
    pin = (coord / "bundle" / "app.sha256").read_text().strip()
    modified_fab = build_fab_from_disk(app)
    refusal = (
        f"hedrl: refused app bundle of run {run_id}: app-sha256 expected {pin}, "
        f"received {app_pin.bundle_digest(modified_fab)}"
    )
    short = hashlib.sha256(modified_fab).hexdigest()[:8]  # flwr's install dir
    for i in range(PARTICIPANTS):
        assert refusal in lab.log(f"supernode-{i}"), lab.log(f"supernode-{i}")[-3000:]
        apps = dirs[f"participant-{i}"] / "flwr-home" / "apps"
        assert not list(apps.glob(f"*.{short}")), f"participant {i} installed it"
    argv = ["flwr", "ls", "hedrl", "--run-id", run_id, "--format", "json"]
    [run] = json.loads(lab.run(cns, argv, coord).stdout)["runs"]
    assert run["status"] == "finished:failed", run
    assert not (results / "modified" / "summary.json").exists()


def _secret_signatures(participant_ctx: bytes, public_ctx: bytes) -> list[bytes]:
    """64-byte pieces of the secret context that the public context lacks.

    The serialized key material is compressed (high entropy), so such a piece
    occurs in another file only if the secret key was copied there.
    """
    sigs = [
        participant_ctx[i : i + 64]
        for i in range(0, len(participant_ctx) - 64, 1024)
        if participant_ctx[i : i + 64] not in public_ctx
    ]
    assert len(sigs) >= 8, "could not isolate the secret key's bytes"
    return sigs


def _assert_no_secret_key(root: Path, participant_ctx: bytes, public_ctx: bytes):
    sigs = _secret_signatures(participant_ctx, public_ctx)
    params = get_param_set("8k-35x3")
    scanned = 0
    for path in root.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        scanned += 1
        assert path.name != "participant.ctx", path
        data = path.read_bytes()
        assert not any(s in data for s in sigs), f"{path} holds secret-key bytes"
        if path.suffix == ".ctx":
            coordinator_backend(data, params, "ckks")  # raises on a secret key
    assert scanned > 5, f"only {scanned} files under {root}"


def _assert_rounds(rows: list[dict], summary: dict, backend: str) -> None:
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1)), rows
    assert all(r["participants"] == PARTICIPANTS and r["missing"] == [] for r in rows)
    assert all(r["backend"] == backend and r["stepped"] for r in rows), rows
    assert summary["rounds"] == ROUNDS and summary["skipped_steps"] == 0, summary


def _assert_pinned_bundle_ran(lab: Lab, dirs: dict[str, Path]) -> None:
    """Every participant checked the bundle and installed exactly the pinned one."""
    short = hashlib.sha256(build_fab_from_disk(REPO)).hexdigest()[:8]
    for i in range(PARTICIPANTS):
        assert "matches app-sha256" in lab.log(f"supernode-{i}")
        apps = dirs[f"participant-{i}"] / "flwr-home" / "apps"
        assert [p.suffix for p in apps.iterdir()] == [f".{short}"]


def test_encrypted_cartpole_across_namespaces(lab: Lab) -> None:
    """3 CKKS rounds over TLS + node auth; keyless coordinator; bad nodes refused;
    a modified app bundle is refused by every participant before it runs."""
    names = ["coordinator"] + [f"participant-{i}" for i in range(PARTICIPANTS)]
    ips = [COORD_IP] + [f"{SUBNET}.{11 + i}" for i in range(PARTICIPANTS)]
    ns: dict[str, str | None] = dict(lab.make_hosts(names, ips))
    provision(lab, "ckks", COORD_IP, lab.tmp / "operator", PARTICIPANTS)
    dirs = hand_out(lab, lab.tmp / "operator")
    address = f"{COORD_IP}:{PORT}"

    # Two impostors on participant hosts, started once the SuperLink is up: an
    # unregistered SuperNode key (right CA), and a registered key trusting another CA.
    other = lab.tmp / "other-deployment"
    provision(lab, "plain", COORD_IP, other, 1)
    bad = {name: lab.tmp / "hosts" / name for name in ("unregistered", "wrong-ca")}
    shutil.copytree(other / "participant-0", bad["unregistered"] / "bundle")
    shutil.copy(
        dirs["participant-0"] / "bundle" / "ca.crt", bad["unregistered"] / "bundle"
    )
    shutil.copytree(dirs["participant-1"] / "bundle", bad["wrong-ca"] / "bundle")
    shutil.copy(other / "ca" / "ca.crt", bad["wrong-ca"] / "bundle")
    impostors: dict[str, subprocess.Popen] = {}

    def start_impostors() -> None:
        for k, (name, host) in enumerate(bad.items()):
            (host / "home").mkdir()
            argv = script(
                "supernode.sh",
                bundle=host / "bundle",
                superlink=address,
                port=9095,
                max_retries=2,
                max_wait_time=30,
            )
            impostors[name] = lab.start(name, ns[f"participant-{k + 1}"], argv, host)

    _start(lab, dirs, ns, address, "0.0.0.0", after_superlink=start_impostors)
    _attack_with_modified_bundle(lab, dirs, ns)
    rows, summary = _submit(lab, dirs, ns, "")
    _assert_rounds(rows, summary, "ckks")
    _assert_pinned_bundle_ran(lab, dirs)
    fingerprint = (dirs["coordinator"] / "bundle" / "fingerprint.txt").read_text()
    assert summary["fingerprint"] == fingerprint.strip()

    for name, proc in impostors.items():
        rc = proc.wait(timeout=60)
        assert rc != 0, f"{name} SuperNode was not refused:\n{lab.log(name)[-2000:]}"
    assert "Failed to activate SuperNode" in lab.log("unregistered")
    assert "CERTIFICATE_VERIFY_FAILED" in lab.log("wrong-ca")
    assert "No SuperNode found with the given public key" in lab.log("superlink")

    part_ctx = (dirs["participant-0"] / "bundle" / "participant.ctx").read_bytes()
    pub_ctx = (dirs["coordinator"] / "bundle" / "coordinator.ctx").read_bytes()
    _assert_no_secret_key(dirs["coordinator"], part_ctx, pub_ctx)
    assert (dirs["coordinator"] / "results" / "deployed" / "checkpoint.npz").exists()


def test_plaintext_twin_on_loopback(lab: Lab) -> None:
    """The same deployment recipe on 127.0.0.1 with backend='plain' finishes."""
    provision(lab, "plain", "127.0.0.1", lab.tmp / "operator", PARTICIPANTS)
    dirs = hand_out(lab, lab.tmp / "operator")
    ns: dict[str, str | None] = {name: None for name in dirs}
    _start(lab, dirs, ns, f"127.0.0.1:{free_port()}", "127.0.0.1")
    rows, summary = _submit(lab, dirs, ns, "backend='plain'")
    _assert_rounds(rows, summary, "plain")
    _assert_pinned_bundle_ran(lab, dirs)
