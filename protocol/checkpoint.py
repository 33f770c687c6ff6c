"""Encrypted checkpoints (written by the coordinator, read by key holders): atomic."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from protocol.files import write_atomic


def write_checkpoint(
    path: Path, meta: dict[str, Any], vectors: dict[str, list[bytes]]
) -> None:
    """Save serialized chunks of each vector plus JSON metadata to ``path``."""
    arrays: dict[str, np.ndarray] = {
        "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    }
    for name, chunks in vectors.items():
        for i, chunk in enumerate(chunks):
            arrays[f"{name}/{i}"] = np.frombuffer(chunk, dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomic(path, buf.getvalue(), mode=0o644)


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, list[bytes]]]:
    """Inverse of :func:`write_checkpoint`."""
    with np.load(path) as data:
        meta = json.loads(bytes(data["meta"]).decode())
        vectors: dict[str, list[bytes]] = {}
        keys = sorted(
            (k for k in data.files if k != "meta"),
            key=lambda k: (k.split("/")[0], int(k.split("/")[1])),
        )
        for key in keys:
            vectors.setdefault(key.split("/")[0], []).append(bytes(data[key]))
    return meta, vectors
