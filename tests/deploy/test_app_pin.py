"""The app pin (deploy/app_pin.py): what app-sha256 covers, and what is refused."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from flwr.app import Message, RecordDict
from flwr.cli.build import build_fab_from_disk
from flwr.common.constant import ErrorCode
from flwr.supercore.fab import Fab
from flwr.supercore.task_identity import TaskIdentity

from tests.deploy.pin import app_pin

REPO = Path(__file__).resolve().parents[2]

FILES = {
    "pyproject.toml": b'[project]\nname = "hedrl"\nversion = "0.1.0"\n'
    b'[tool.flwr.app]\npublisher = "hedrl"\n',
    "participants/__init__.py": b"",
    "participants/client_app.py": b"app = None\n",
}


def _zip(
    files: dict[str, bytes],
    method: int = zipfile.ZIP_DEFLATED,
    date: tuple[int, ...] = (2024, 10, 1, 0, 0, 0),
) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as archive:
        for name, data in files.items():
            archive.writestr(zipfile.ZipInfo(name, date), data)
    return buf.getvalue()


def _served(fab_bytes: bytes, **run_fields: str) -> tuple[SimpleNamespace, Fab]:
    """The run and FAB a SuperNode hands its ClientApp (honest fields by default)."""
    sha = hashlib.sha256(fab_bytes).hexdigest()
    fields = dict(run_id=7, fab_hash=sha, fab_id="hedrl/hedrl", fab_version="0.1.0")
    fields.update(run_fields)
    return SimpleNamespace(**fields), Fab(sha, fab_bytes, {})


def test_digest_ignores_compression_order_and_dates_not_content():
    """Same entries → same app-sha256 whatever the zip; any entry change → another."""
    pin = app_pin.bundle_digest(_zip(FILES))
    reordered = dict(reversed(list(FILES.items())))
    assert app_pin.bundle_digest(_zip(reordered, zipfile.ZIP_STORED)) == pin
    assert app_pin.bundle_digest(_zip(FILES, date=(2030, 1, 1, 0, 0, 0))) == pin
    assert pin != hashlib.sha256(_zip(FILES)).hexdigest()
    edited = FILES | {"participants/client_app.py": b"app = 1\n"}
    shadow = FILES | {"participants/client_app/__init__.py": b"app = None\n"}
    renamed = {k.replace("client_app", "clientapp"): v for k, v in FILES.items()}
    others = {app_pin.bundle_digest(_zip(f)) for f in (edited, shadow, renamed)}
    assert pin not in others and len(others) == 3


def test_tree_digest_is_the_submitted_bundles_and_independent_of_the_path(tmp_path):
    """A copy of the app elsewhere pins the same; one changed line does not."""
    pin = app_pin.tree_digest(REPO)
    assert pin == app_pin.bundle_digest(build_fab_from_disk(REPO))
    copy = tmp_path / "elsewhere"
    copy.mkdir()
    shutil.copy(REPO / "pyproject.toml", copy)
    shutil.copy(REPO / "README.md", copy)
    for pkg in ("protocol", "coordinator", "participants"):
        shutil.copytree(REPO / pkg, copy / pkg, ignore=shutil.ignore_patterns("__*__"))
    assert app_pin.tree_digest(copy) == pin
    client_app = copy / "participants" / "client_app.py"
    client_app.write_text(client_app.read_text() + "marker = 1\n")
    assert app_pin.tree_digest(copy) != pin


def test_check_bundle_accepts_only_the_pinned_bundle_with_consistent_fields():
    """Each refusal names what differs; the pinned bundle with honest fields passes."""
    fab_bytes = _zip(FILES)
    pin = app_pin.bundle_digest(fab_bytes)
    assert app_pin.check_bundle(pin, *_served(fab_bytes)) is None

    other = _zip(FILES | {"participants/client_app.py": b"import os\n"})
    why = app_pin.check_bundle(pin, *_served(other))
    assert why == f"app-sha256 expected {pin}, received {app_pin.bundle_digest(other)}"
    assert "provision" in app_pin.check_bundle(None, *_served(fab_bytes))
    assert "64 hex" in app_pin.check_bundle(pin[:-1], *_served(fab_bytes))
    assert "not a readable zip" in app_pin.check_bundle(pin, *_served(b"PK junk"))
    old = "a" * 64
    assert "hash fields" in app_pin.check_bundle(pin, *_served(fab_bytes, fab_hash=old))
    run, fab = _served(fab_bytes)
    fab.hash_str = old
    assert "hash fields" in app_pin.check_bundle(pin, run, fab)
    why = app_pin.check_bundle(pin, *_served(fab_bytes, fab_version="0.0.9"))
    assert "'0.0.9'" in why and "'0.1.0'" in why


@pytest.fixture
def message(monkeypatch) -> Message:
    """A message as flwr-clientapp pulls it (its task identity set)."""
    for field in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, field, 7)
    msg = Message(RecordDict(), dst_node_id=7, message_type="train")
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg


def test_pinned_pull_replies_invalid_fab_and_raises_before_returning(message):
    """A wrong bundle never reaches flwr's install: error reply, then BundleRefused."""
    fab_bytes = _zip(FILES)
    pin = app_pin.bundle_digest(fab_bytes)
    context = SimpleNamespace(node_config={"app-sha256": pin})
    replies = []

    def reply(client, msg, ctx):
        replies.append(msg)

    good = (message, context, *_served(fab_bytes))
    assert app_pin.pinned(lambda client: good, reply)(None) == good
    assert replies == []

    bad = (message, context, *_served(_zip(FILES | {"evil.py": b""})))
    with pytest.raises(app_pin.BundleRefused, match=f"expected {pin}, received"):
        app_pin.pinned(lambda client: bad, reply)(None)
    [sent] = replies
    assert sent.error.code == ErrorCode.INVALID_FAB
    assert sent.metadata.reply_to_message_id == message.metadata.message_id
    assert sent.error.reason.startswith("hedrl: refused app bundle of run 7:")


def test_installed_flwr_has_the_hook_the_pin_uses():
    """flwr's ClientApp runner still looks pull_task_input up when it runs."""
    runner = app_pin._runner()
    assert runner.pull_task_input is not None and runner.push_message is not None


def test_bin_runs_the_pin_for_clientapps_and_refuses_other_task_types():
    """deploy/bin: flwr-clientapp → app_pin.py; flwr-agentapp etc. exit 1."""
    bin_dir = REPO / "deploy" / "bin"
    for name in ("flwr-clientapp", "flwr-agentapp", "flwr-serverapp", "flwr-model"):
        assert (bin_dir / name).resolve() == bin_dir / "hedrl-task", name
    proc = subprocess.run(
        [bin_dir / "flwr-agentapp", "--token", "t"], capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert "refused to start flwr-agentapp" in proc.stderr
