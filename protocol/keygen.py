"""``hedrl-keygen``: write a participant and a coordinator context to a directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from protocol import hedrl_version
from protocol.errors import HedrlError
from protocol.keys import COORDINATOR_FILE, PARTICIPANT_FILE, write_keys
from protocol.params import DEFAULT_PARAM_SET, PARAM_SETS, get_param_set


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hedrl-keygen``."""
    ap = argparse.ArgumentParser(
        prog="hedrl-keygen",
        description=(
            f"Create CKKS key material for one training run: DIR/{PARTICIPANT_FILE} "
            "(secret key, mode 0600: copy it to participant hosts only) and "
            f"DIR/{COORDINATOR_FILE} (public + relinearisation keys, no secret and no "
            "Galois keys: the only file the coordinator host gets). Prints the "
            "context fingerprint both sides check."
        ),
    )
    ap.add_argument(
        "--version", action="version", version=f"%(prog)s {hedrl_version()}"
    )
    ap.add_argument(
        "--param-set",
        default=DEFAULT_PARAM_SET,
        choices=sorted(PARAM_SETS),
        help=f"CKKS parameter set (default: {DEFAULT_PARAM_SET})",
    )
    ap.add_argument("--out", required=True, type=Path, help="output directory")
    ap.add_argument(
        "--backend",
        default="ckks",
        choices=["ckks", "plain"],
        help="ckks (default) or the plaintext twin's key-less stand-in",
    )
    ap.add_argument("--force", action="store_true", help="overwrite existing key files")
    args = ap.parse_args(argv)
    try:
        info = write_keys(
            args.out, get_param_set(args.param_set), args.backend, force=args.force
        )
    except HedrlError as exc:
        print(f"hedrl-keygen: error: {exc}", file=sys.stderr)
        return 2
    print(f"participant context: {info.participant_path} (secret; mode 0600)")
    print(f"coordinator context: {info.coordinator_path} (public + relin keys)")
    print(f"fingerprint: {info.fingerprint}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
