"""Flower's command line and a local SuperLink of our own, for ``hedrl run``.

Like flwr's own local SuperLink, it listens on 127.0.0.1 without TLS or
authentication: it is for a machine whose local users trust each other (on a
shared host another local user could reach its port while it runs).

The SuperLink is started on free ports in its own session (its children, the
SuperExec and Ray, form its process group) and stopped by that group's id;
flwr's CLI reaches it through ``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` and
``FLWR_LOCAL_CONTROL_API_PORT``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class LaunchError(Exception):
    """Something to tell the user in one line (exit status 2)."""


STARTUP_S = 30.0
ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: hedrl's own ERROR log lines, and the last line of a traceback of a hedrl error
#: (``protocol.errors.FingerprintMismatch: …`` → ``FingerprintMismatch: …``)
HEDRL_ERROR = re.compile(
    r"^(?:ERROR :\s+(hedrl: .*)"
    r"|(?:protocol|coordinator|participants)\.[\w.]*?(\w+: .*))$"
)
RAY_PREFIX = re.compile(r"^\(\w+ pid=\d+\)\s*")
RAY_REPEATED = re.compile(r"\s*\[repeated \d+x across cluster\].*$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def local_superlink(work: Path, env: dict[str, str]) -> Iterator[dict[str, str]]:
    """A ``flower-superlink --simulation`` of our own on free ports; yields the
    environment that points flwr's CLI at it, and stops it (by PID) after."""
    http, control = free_port(), free_port()
    log_file = work / "superlink.log"
    proc = subprocess.Popen(
        [
            "flower-superlink",
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--control-api-address",
            f"127.0.0.1:{control}",
            "--host",
            "127.0.0.1",
            "--port",
            str(http),
            "--log-file",
            str(log_file),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its children (superexec, Ray) form its group
    )
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                code = proc.returncode
                raise LaunchError(f"flower-superlink exited ({code}); see {log_file}")
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{http}/health", timeout=1
                ) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise LaunchError(
                    f"flower-superlink not up after {STARTUP_S:.0f} s; see {log_file}"
                )
            time.sleep(0.2)
        yield {
            **env,
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http),
            "FLWR_LOCAL_CONTROL_API_PORT": str(control),
        }
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process's group, SIGKILL what is left after 10 s."""
    # the group may outlive its leader (SuperExec, Ray): signal it either way
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def flwr(
    args: list[str], env: dict[str, str], **kw: Any
) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["flwr", *args], env=env, capture_output=True, text=True, **kw
    )


def json_out(proc: subprocess.CompletedProcess) -> dict[str, Any]:
    """The JSON object flwr printed (``--format json``)."""
    out = proc.stdout
    start = out.find("{")
    if start >= 0:
        with contextlib.suppress(json.JSONDecodeError):
            return json.JSONDecoder().raw_decode(out[start:])[0]
    tail = (proc.stderr or out).strip().splitlines()[-1:] or ["no output"]
    raise LaunchError(f"flwr {proc.args[1]} failed: {ANSI.sub('', tail[0])}")


def status(run_id: str, env: dict[str, str]) -> tuple[str, str]:
    """(status, details) of a run; waits up to 30 s for it to finish."""
    deadline = time.monotonic() + 30
    while True:
        runs = json_out(flwr(["ls", "--run-id", run_id, "--format", "json"], env))
        run = (runs.get("runs") or [{}])[0]
        st = str(run.get("status", "unknown"))
        if st.startswith("finished") or time.monotonic() > deadline:
            return st, str(run.get("status-details", ""))
        time.sleep(1)


def follow(
    run_id: str, env: dict[str, str], verbose: bool
) -> tuple[str | None, str | None]:
    """Print the run's log as it comes; (its first error line, its results folder)."""
    first_error = results = None
    proc = subprocess.Popen(
        ["flwr", "log", run_id, "--stream"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    try:
        for raw in proc.stdout:
            line = RAY_PREFIX.sub("", ANSI.sub("", raw.rstrip()))
            line = RAY_REPEATED.sub("", line)
            text = line.split(":      ", 1)[-1] if " :  " in line else line
            if first_error is None and (m := HEDRL_ERROR.match(line)):
                first_error = m.group(1) or m.group(2)
            if m := re.search(r"results in (\S+)$", text):
                results = m.group(1)
            if verbose:
                print(line, flush=True)
            elif "hedrl:" in text:
                print(text[text.index("hedrl:") :], flush=True)
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait()
        proc.stdout.close()
    return first_error, results
