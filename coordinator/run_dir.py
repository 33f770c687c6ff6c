"""A run's folder: a new name for every new run, never another run's files.

A run writes ``<results-dir>/<run-name>/``. Without ``run-name`` the folder is
``<env id>-<UTC date>-<time>`` (``-2``, ``-3`` … if that exists). A named
folder that already holds a run's files is refused unless the run resumes
(``resume-from``); a resumed run keeps the rows of metrics.jsonl up to the
round it resumes at and appends to them, and moves later rows (rounds the
checkpoint does not include) to ``metrics.superseded.jsonl``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from protocol.config import RunConfig, expand_dir
from protocol.errors import ConfigError

#: files whose presence makes a folder another run's
RUN_FILES = ("metrics.jsonl", "summary.json", "checkpoint.npz")


def default_name(env_id: str, now: float | None = None) -> str:
    """``<env id>-YYYYMMDD-HHMMSS`` in UTC (sorts by start time; a '/' of a
    namespaced env id becomes '-')."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    return f"{env_id.replace('/', '-')}-{stamp}"


def run_dir(cfg: RunConfig) -> Path:
    """Create and return the run's folder, or raise :class:`ConfigError`."""
    root = expand_dir(cfg.results_dir)
    if not cfg.run_name:
        root.mkdir(parents=True, exist_ok=True)
        base = default_name(cfg.env_id)
        for n in range(1, 10_000):
            path = root / (base if n == 1 else f"{base}-{n}")
            try:
                path.mkdir()  # never a folder another run just made
            except FileExistsError:
                continue
            return path
        raise ConfigError(f"no free run folder named {base}-N in {root}")
    name = cfg.run_name
    if name in (".", "..") or "/" in name or "\\" in name:
        raise ConfigError(
            f"run-name {name!r}: expected a folder name (no '/'); results-dir "
            "chooses where it goes"
        )
    path = root / name
    held = [f for f in RUN_FILES if (path / f).exists()]
    if held and not cfg.resume_from:
        raise ConfigError(
            f"run-name {name!r}: {path} already holds a run ({held[0]}); "
            "choose another run-name, leave it empty for a new dated folder, or "
            "resume that run with resume-from"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


def open_metrics(out_dir: Path, start_round: int):  # noqa: ANN201 (a text file)
    """metrics.jsonl for appending rows after ``start_round``; the rows of later
    rounds an earlier attempt wrote go to metrics.superseded.jsonl."""
    path = out_dir / "metrics.jsonl"
    if not path.exists() or start_round == 0:
        return open(path, "w")
    kept, later = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            later_row = int(json.loads(line).get("round", 0)) > start_round
        except Exception:  # noqa: BLE001 (an unreadable row is set aside, not fatal)
            later_row = True
        (later if later_row else kept).append(line)
    if later:
        with open(out_dir / "metrics.superseded.jsonl", "a") as fh:
            fh.write("\n".join(later) + "\n")
    path.write_text("".join(f"{line}\n" for line in kept))
    return open(path, "a")
