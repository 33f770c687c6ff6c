"""Files written whole or not at all (a temp name, fsync, then an atomic rename),
and bytes passed through a temporary file in RAM to libraries that only read
and write paths (SEAL's objects through ``tenseal.sealapi``)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

#: temporary files live in RAM where the host has a tmpfs there
TMP_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` by ``data``; a crash leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def through_file(data: bytes, load: Callable[[str], T]) -> T:
    """``load`` applied to the path of a temporary file holding ``data``."""
    fd, path = tempfile.mkstemp(dir=TMP_DIR, prefix="hedrl-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return load(path)
    finally:
        os.unlink(path)


def saved_bytes(save: Callable[[str], object]) -> bytes:
    """The bytes ``save`` writes to the path of a temporary file."""
    return through_file(b"", lambda path: (save(path), Path(path).read_bytes())[1])
