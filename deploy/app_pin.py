"""Pin the app bundle a participant runs: refuse any other before flwr installs it.

flwr 1.42 runs whatever app bundle (FAB) the SuperLink serves: the SuperNode
verifies bundles only against Hub signatures (``--trusted-entities``), which a
locally submitted bundle never carries. This script closes that gap on a
participant host without network access. ``deploy/supernode.sh`` puts
``deploy/bin`` first on the SuperNode's PATH, so the ``flwr-clientapp`` that
Flower's SuperExec starts for each message is ``python app_pin.py clientapp``:
it pulls the task input as flwr does, checks the bundle against the
``app-sha256`` of the operator's node config, and only then lets flwr install
and import the bundle. A bundle that does not match gets an ``INVALID_FAB``
error reply and one log line naming both digests; none of its files is written
or imported.

``app-sha256`` is a SHA-256 over the bundle's entries (each name with the
SHA-256 of its bytes, sorted), not over the zip's bytes: those also depend on
the zlib build that compressed them, so two hosts can bundle the same tree into
different zips. ``python deploy/app_pin.py digest --app DIR`` prints the value
``flwr run DIR`` will produce (provision.sh pins it, submit.sh checks it).

Rule: this file imports only the standard library and flwr. It runs in the
process that later imports the bundle, and a hedrl package imported here would
shadow the bundle's copy of it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import sys
import tomllib
import zipfile
from collections.abc import Callable
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

from flwr.supercore import log

PIN_KEY = "app-sha256"
_HEX64 = re.compile(r"[0-9a-f]{64}")


class BundleRefused(Exception):
    """The app bundle the SuperLink served is not the one this participant pinned."""


def bundle_digest(fab: bytes) -> str:
    """app-sha256 of a FAB: SHA-256 of the sorted [name, sha256(bytes)] entries."""
    entries = []
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        for info in archive.infolist():
            h = hashlib.sha256()
            with archive.open(info) as member:
                for chunk in iter(lambda: member.read(1 << 20), b""):
                    h.update(chunk)
            entries.append([info.filename, h.hexdigest()])
    entries.sort()
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def tree_digest(app: Path) -> str:
    """app-sha256 of the bundle that ``flwr run APP`` builds from this tree."""
    from flwr.cli.build import build_fab_from_disk

    return bundle_digest(build_fab_from_disk(app))


def _bundle_metadata(fab: bytes) -> tuple[str, str]:
    """(fab_id, fab_version) as the bundle's own pyproject.toml declares them."""
    from flwr.common.config import get_metadata_from_config

    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        config = tomllib.loads(archive.read("pyproject.toml").decode())
    return get_metadata_from_config(config)


def check_bundle(pin: Any, run: Any, fab: Any) -> str | None:
    """Why this run's bundle must not run here, or None if it is the pinned one.

    Besides the content, the run's fab_hash, the bundle's hash_str and the
    SHA-256 of its bytes must agree, and the run's fab_id/fab_version must be
    the bundle's own: flwr installs the bundle under a directory named after its
    bytes but loads the ClientApp from one named after these fields, so a
    mismatch could make it load an earlier bundle still installed on this host.
    """
    if not isinstance(pin, str) or not _HEX64.fullmatch(pin):
        return (
            f"node config has no valid {PIN_KEY} (64 hex digits), got {pin!r}: "
            "provision this participant with deploy/provision.sh"
        )
    try:
        received = bundle_digest(fab.content)
    except Exception as exc:  # noqa: BLE001 - any unreadable bundle is refused
        return f"bundle is not a readable zip ({type(exc).__name__}); expected {pin}"
    if received != pin:
        return f"{PIN_KEY} expected {pin}, received {received}"
    sha = hashlib.sha256(fab.content).hexdigest()
    if not fab.hash_str == run.fab_hash == sha:
        return (
            f"{PIN_KEY} {pin} matches but the hash fields do not: run fab_hash "
            f"{run.fab_hash!r}, bundle hash_str {fab.hash_str!r}, bytes {sha}"
        )
    try:
        fab_id, version = _bundle_metadata(fab.content)
    except Exception as exc:  # noqa: BLE001 - an unreadable pyproject is refused
        return f"{PIN_KEY} {pin} matches but pyproject.toml is unreadable ({exc!r})"
    if (run.fab_id, run.fab_version) != (fab_id, version):
        return (
            f"{PIN_KEY} {pin} matches but the run names app {run.fab_id!r} "
            f"{run.fab_version!r}, the bundle {fab_id!r} {version!r}"
        )
    return None


def pinned(
    pull: Callable[[Any], tuple[Any, Any, Any, Any]],
    reply: Callable[[Any, Any, Any], None],
) -> Callable[[Any], tuple[Any, Any, Any, Any]]:
    """Wrap flwr's pull_task_input so a bundle is checked before anything uses it.

    On a refusal the message gets an INVALID_FAB error reply (through ``reply``)
    and BundleRefused is raised, which flwr's runner reports as a failed task.
    """
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode

    def pull_checked(client: Any) -> tuple[Any, Any, Any, Any]:
        message, context, run, fab = pull(client)
        why = check_bundle(context.node_config.get(PIN_KEY), run, fab)
        if why is None:
            log(INFO, "hedrl: app bundle of run %s matches %s", run.run_id, PIN_KEY)
            return message, context, run, fab
        why = f"hedrl: refused app bundle of run {run.run_id}: {why}"
        log(ERROR, "%s", why)
        reply(
            client,
            Message(Error(ErrorCode.INVALID_FAB, why), reply_to=message),
            context,
        )
        raise BundleRefused(why)

    return pull_checked


def _runner() -> Any:
    """flwr's ClientApp runner module, if it still has the hook the pin uses."""
    import flwr.supernode.runtime.run_clientapp as runner

    # run_clientapp must look pull_task_input up in its module when it runs, or
    # replacing it there would not put the check in front of the install.
    if "pull_task_input" not in runner.run_clientapp.__code__.co_names:
        sys.exit(
            "app_pin: this flwr's run_clientapp does not call pull_task_input: "
            "deploy/app_pin.py supports flwr 1.42; update it before running bundles"
        )
    return runner


def run_pinned_clientapp(flwr_args: list[str]) -> None:
    """flwr-clientapp (same arguments) with the bundle check in front."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    runner = _runner()
    runner.pull_task_input = pinned(runner.pull_task_input, runner.push_message)
    sys.argv = ["flwr-clientapp", *flwr_args]
    flwr_clientapp()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="deploy/app_pin.py", description=__doc__.splitlines()[0]
    )
    sub = ap.add_subparsers(dest="command", required=True)
    digest = sub.add_parser("digest", help="print the app-sha256 of a tree or .fab")
    src = digest.add_mutually_exclusive_group(required=True)
    src.add_argument("--app", type=Path, help="app tree, bundled as `flwr run` does")
    src.add_argument("--fab", type=Path, help="a .fab file (e.g. from `flwr build`)")
    sub.add_parser("selftest", help="check that this flwr has the hook the pin uses")
    sub.add_parser(
        "clientapp",
        help="flwr-clientapp with the pin, same arguments (deploy/bin runs this)",
    )
    opts, rest = ap.parse_known_args(argv)
    if opts.command == "clientapp":
        run_pinned_clientapp(rest)
        return
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if opts.command == "selftest":
        _runner()
        print("app_pin: flwr's ClientApp runner has the hook the pin uses")
    elif opts.app is not None:
        print(tree_digest(opts.app))
    else:
        print(bundle_digest(opts.fab.read_bytes()))


if __name__ == "__main__":
    main()
