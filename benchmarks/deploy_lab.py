"""A deployment on one machine, for the multi-host test and the round-time
benchmark: the deploy/ scripts run as an operator would, every process found
again (and stopped) by an environment marker, hosts as network namespaces.

Never ``pkill -f`` a pattern: other SuperLinks on the machine are not ours.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PARTICIPANTS = 3


def _pids_with(marker: bytes) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    out.append(int(entry.name))
            except OSError:
                continue
    return out


def _kill(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class Lab:
    """Processes started for one test, found again by an environment marker."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.tag = secrets.token_hex(3)
        self.marker = f"HEDRL_DEPLOY_TEST={self.tag}"
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        (tmp / "logs").mkdir()

    def env(self, host_dir: Path, **extra: str) -> dict[str, str]:
        """A host's environment: its own HOME and FLWR_HOME, plus the marker."""
        env = dict(os.environ)
        env.update(
            HOME=str(host_dir / "home"),
            FLWR_HOME=str(host_dir / "flwr-home"),
            FLWR_DISABLE_UPDATE_CHECK="1",
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            HEDRL_DEPLOY_TEST=self.tag,
            **extra,
        )
        return env

    def _argv(self, ns: str | None, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv] if ns else argv

    def start(
        self, name: str, ns: str | None, argv: list[str], host_dir: Path
    ) -> subprocess.Popen:
        """Start a long-running process with its output in logs/<name>.log."""
        with open(self.tmp / "logs" / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                self._argv(ns, argv),
                env=self.env(host_dir),
                cwd=host_dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def run(
        self, ns: str | None, argv: list[str], host_dir: Path, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        """Run a command to completion; raise with its output if it fails."""
        proc = subprocess.run(
            self._argv(ns, argv),
            env=self.env(host_dir),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert proc.returncode == 0, f"{argv} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / "logs" / f"{name}.log").read_text(errors="replace")

    def wait_for_log(self, name: str, needle: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.log(name):
            assert time.monotonic() < deadline, (
                f"{name}: no {needle!r} within {timeout} s:\n{self.log(name)[-3000:]}"
            )
            time.sleep(0.2)

    # ---- network namespaces ------------------------------------------------------
    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    def make_hosts(self, names: list[str], ips: list[str]) -> dict[str, str]:
        """One namespace per host on a bridge in a switch namespace: {name: ns}."""
        sw = f"hd{self.tag}-sw"
        hosts = {n: f"hd{self.tag}-{n}" for n in names}
        try:
            for ns in (sw, *hosts.values()):
                self._ip("netns", "add", ns)
                self.namespaces.append(ns)
                self._ip("-n", ns, "link", "set", "lo", "up")
            self._ip("-n", sw, "link", "add", "br0", "type", "bridge")
            self._ip("-n", sw, "link", "set", "br0", "up")
            for k, (ns, ip) in enumerate(zip(hosts.values(), ips, strict=True)):
                port = f"v{k}"
                self._ip(
                    "-n",
                    sw,
                    "link",
                    "add",
                    port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    ns,
                )
                self._ip("-n", sw, "link", "set", port, "master", "br0", "up")
                self._ip("-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
                self._ip("-n", ns, "link", "set", "eth0", "up")
        except (subprocess.CalledProcessError, FileNotFoundError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            raise RuntimeError(
                "cannot create network namespaces/veth/bridge for the multi-host "
                f"deployment (needs root with CAP_NET_ADMIN and iproute2): {detail}"
            ) from None
        return hosts

    def close(self) -> None:
        """Stop every process we started (marker, then namespace members); drop ns."""
        marker = self.marker.encode()
        _kill(_pids_with(marker), signal.SIGTERM)
        deadline = time.monotonic() + 8
        while _pids_with(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        _kill(_pids_with(marker), signal.SIGKILL)
        for ns in self.namespaces:
            pids = subprocess.run(
                ["ip", "netns", "pids", ns], capture_output=True, text=True
            ).stdout.split()
            _kill([int(p) for p in pids], signal.SIGKILL)
        for proc in self.procs:  # reap our direct children
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def script(name: str, /, *args: str, **opts: object) -> list[str]:
    """``bash deploy/<name> ARGS --key value`` (max_retries=2: --max-retries 2)."""
    argv = ["bash", str(DEPLOY / name), *args]
    for key, value in opts.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def provision(
    lab: Lab, backend: str, host: str, out: Path, n: int, **opts: object
) -> None:
    """Run provision.sh as the operator (on this machine, outside the hosts);
    ``opts`` are more of its options (preset=..., report_metrics="true")."""
    argv = script("provision.sh", out=out, participants=n, backend=backend, **opts)
    lab.run(None, [*argv, "--coordinator-host", host], lab.tmp)


def hand_out(lab: Lab, bundles: Path) -> dict[str, Path]:
    """Copy each bundle to its host's directory (as scp would): {host: dir}."""
    dirs = {}
    for name in ["coordinator"] + [f"participant-{i}" for i in range(PARTICIPANTS)]:
        host = lab.tmp / "hosts" / name
        shutil.copytree(bundles / name, host / "bundle")
        (host / "home").mkdir()
        dirs[name] = host
    return dirs
