"""The ClientApp as a deployed participant runs it: one fresh process per message."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from participants import client_app
from participants.client_app import app
from protocol import ckks, keys
from protocol import messages as msg
from protocol.params import get_param_set

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """What flwr-clientapp sets before it calls the app (restored afterwards)."""
    for name, value in (("_run_id", 7), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _setup_message(backend: str) -> Message:
    task = ConfigRecord(
        {
            "round": 0,
            "backend": backend,
            "send-context": 1,
        }
    )
    message = Message(
        RecordDict({msg.TASK: task}), dst_node_id=1, message_type=msg.SETUP
    )
    message.metadata.__dict__["_message_id"] = "setup-0"
    return message


def _participant_host(tmp_path: Path, backend: str) -> Context:
    """A participant host as provision.sh leaves it: participant.ctx only."""
    bundle = tmp_path / "bundle"
    keys.write_keys(bundle, get_param_set("8k-35x3"), backend, force=False)
    (bundle / keys.COORDINATOR_FILE).unlink()
    return Context(
        run_id=7,
        node_id=1,
        node_config={
            "secret-context": str(bundle / keys.PARTICIPANT_FILE),
            "participant-index": 0,
            "federation-size": 3,
        },
        state=RecordDict(),
        run_config={"backend": backend, "num-participants": 3},
    )


def test_setup_on_a_participant_host_loads_the_secret_context_once(
    tmp_path, monkeypatch
):
    """The evaluation context is derived from the context already loaded."""
    context = _participant_host(tmp_path, "ckks")
    loads = []
    real = ckks.load_secret_context
    monkeypatch.setattr(
        ckks, "load_secret_context", lambda data: loads.append(1) or real(data)
    )
    reply = app(_setup_message("ckks"), context)
    assert not reply.has_error(), reply.error
    assert len(loads) == 1, f"secret context loaded {len(loads)} times"
    info = reply.content[msg.SETUP_REPLY]
    expected = (tmp_path / "bundle" / keys.FINGERPRINT_FILE).read_text().strip()
    assert info["fingerprint"] == expected
    # the coordinator accepts it (it refuses any context holding a secret key)
    _, fp = keys.coordinator_backend(
        bytes(info["context"]), get_param_set("8k-35x3"), "ckks"
    )
    assert fp == expected


def test_each_message_logs_where_its_time_went(tmp_path, caplog, monkeypatch):
    """A fresh process's first message logs at INFO, later ones at DEBUG."""
    monkeypatch.setattr(client_app, "_handled", 0)  # as in a fresh process
    context = _participant_host(tmp_path, "plain")
    with caplog.at_level(logging.DEBUG, logger="flwr.hedrl.participant"):
        for _ in range(2):
            reply = app(_setup_message("plain"), context)
            assert not reply.has_error(), reply.error
    records = [r for r in caplog.records if "participant 0 setup" in r.message]
    assert [r.levelno for r in records] == [logging.INFO, logging.DEBUG]
    lines = [records[0].getMessage()]
    phases = dict(re.findall(r"([\w-]+) (\d+\.\d+)", lines[0].split(": ", 1)[1]))
    assert {"import", "node", "key", "evaluation-context", "handler"} <= set(phases)
    assert float(phases["handler"]) >= float(phases["key"])


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux /proc only")
def test_process_age_counts_from_the_process_start():
    code = (
        "import time; time.sleep(1.0)\n"
        "from participants.client_app import process_age\n"
        "print(process_age())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    age = float(out.stdout.split()[-1])
    assert 1.0 <= age < 60.0, age
