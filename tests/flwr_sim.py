"""Run ``flwr run .`` as a user would, in an isolated FLWR_HOME, and clean up.

``flwr run .`` starts a *detached* local SuperLink that outlives the run. Every
process it spawns inherits our unique ``FLWR_HOME``, so afterwards we stop
exactly the processes whose environment carries it (SuperLink, SuperExec,
ServerApp, Ray) — never anything else on the machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pids_with_env(marker: bytes) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def stop_processes(flwr_home: Path, grace: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL, every process started under ``flwr_home``."""
    marker = f"FLWR_HOME={flwr_home}".encode()
    pids = _pids_with_env(marker)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _pids_with_env(marker):
        time.sleep(0.2)
    for pid in _pids_with_env(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def _toml_value(v: object) -> str:
    if isinstance(v, str):
        return f"'{v}'"
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v)


def flwr_env(tmp: Path) -> tuple[dict[str, str], Path]:
    """Environment for ``flwr`` commands isolated under ``tmp``; (env, FLWR_HOME)."""
    flwr_home = tmp / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    (tmp / "home").mkdir(exist_ok=True)
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(_free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(_free_port()),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        HOME=str(tmp / "home"),
    )
    return env, flwr_home


def flwr_cmd(run_config: dict[str, object], num_supernodes: int) -> list[str]:
    """``flwr run . --stream`` with a run config and the simulation size."""
    cfg = " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())
    return [
        "flwr",
        "run",
        ".",
        "--stream",
        "--run-config",
        cfg,
        "--federation-config",
        f"num-supernodes={num_supernodes} client-resources-num-cpus=1",
    ]


def pids_matching(flwr_home: Path, needle: bytes) -> list[int]:
    """Processes started under ``flwr_home`` whose command line contains needle."""
    out = []
    for pid in _pids_with_env(f"FLWR_HOME={flwr_home}".encode()):
        try:
            if needle in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
        except OSError:
            continue
    return out


def flwr_run(
    tmp: Path,
    run_config: dict[str, object],
    *,
    num_supernodes: int = 4,
    timeout: float = 900.0,
) -> subprocess.CompletedProcess:
    """``flwr run . --stream`` with the given run config; processes stopped after."""
    env, flwr_home = flwr_env(tmp)
    try:
        return subprocess.run(
            flwr_cmd(run_config, num_supernodes),
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    finally:
        stop_processes(flwr_home)
