"""The run's steps: which updates each optimiser step used.

One JSON line per completed step — its number, the round its messages carried,
the step whose θ it started from (``parent``; 0 is θ0), k = K/K' and each used
update as (participant index, SHA-256 of the ciphertext chunks received) — and
one line naming the final θ's step. The coordinator writes ``ledger.jsonl``
(and reads it back when a run resumes); the same entries travel to the
participants with every θ (protocol/relay.py), who check every field
(:func:`parse_entry`) and replay the steps over the sealed updates they name.
Nothing in it is secret.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from protocol.errors import WireFormatError

FILE = "ledger.jsonl"
MAX_K = 2.0**20
_DIGEST = re.compile(r"[0-9a-f]{64}")

Used = list[tuple[int, str]]
"""(participant index, digest) per update, in the order they were summed."""


@dataclass(frozen=True)
class Entry:
    """One completed step."""

    step: int
    wire: int
    parent: int
    k: float
    updates: Used
    init_k: float | None = None
    """Step from θ0 only: the k the round-1 squares were scaled by."""
    init: Used | None = None
    """Step from θ0 only: whose squares made V0."""


class Writer:
    """Appends the ledger's lines (the coordinator's side)."""

    def __init__(self, path: Path, carried: Path | None = None) -> None:
        """A new ledger at ``path``; a resumed run first copies the steps of
        the ledger ``carried`` (the checkpoint's run) into it."""
        lines: list[str] = []
        if carried is not None and carried.exists():
            lines = [
                line
                for line in carried.read_text().splitlines()
                if line and "final" not in json.loads(line)
            ]
        self.path = path
        self._fh: TextIO | None = open(path, "w")
        for line in lines:
            self._fh.write(line + "\n")
        self._fh.flush()

    def _write(self, record: dict[str, Any]) -> None:
        assert self._fh is not None
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def step(self, entry: Entry) -> None:
        """Record a completed step."""
        self._write(entry_record(entry))

    def final(self, wire: int, head: int) -> None:
        """The final θ, sent in round ``wire``, is the output of step ``head``."""
        self._write({"final": wire, "head": head})

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def entry_record(entry: Entry) -> dict[str, Any]:
    """A step as its ledger line (and relay entry) holds it."""
    record: dict[str, Any] = {
        "step": entry.step,
        "wire": entry.wire,
        "parent": entry.parent,
        "k": entry.k,
        "updates": [list(u) for u in entry.updates],
    }
    if entry.init is not None:
        squares = [list(u) for u in entry.init]
        record["init"] = {"k": entry.init_k, "squares": squares}
    return record


# ---- reading (the participant's side: every field is checked) -------------------
def _int(value: Any, lo: int, what: str) -> int:
    if type(value) is not int or value < lo:
        raise WireFormatError(
            f"ledger entry: {what} must be an int ≥ {lo}, got {value!r}"
        )
    return value


def _k(value: Any, what: str) -> float:
    if type(value) not in (int, float) or not (
        math.isfinite(value) and 1.0 <= value <= MAX_K
    ):
        raise WireFormatError(
            f"ledger entry: {what} must be a number in [1, {MAX_K:g}]"
        )
    return float(value)


def _used(value: Any, what: str) -> Used:
    if not isinstance(value, list) or not value:
        raise WireFormatError(f"ledger entry: {what} must be a non-empty list")
    out: Used = []
    for item in value:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or type(item[0]) is not int
            or not 0 <= item[0] < 2**31
            or not isinstance(item[1], str)
            or not _DIGEST.fullmatch(item[1])
        ):
            raise WireFormatError(f"ledger entry: {what}: [index, sha256 hex] expected")
        out.append((item[0], item[1]))
    if len({i for i, _ in out}) != len(out):
        raise WireFormatError(f"ledger entry: {what} names a participant twice")
    return out


def parse_entry(raw: dict[str, Any]) -> Entry:
    """A step from its ledger line, every field checked."""
    step = _int(raw.get("step"), 1, "step")
    parent = _int(raw.get("parent"), 0, "parent")
    if parent >= step:
        raise WireFormatError(f"ledger entry: step {step} starts from a later step")
    init = raw.get("init")
    init_k = init_used = None
    if parent == 0:
        if not isinstance(init, dict):
            raise WireFormatError(
                f"ledger entry: step {step} starts from θ0 without V0"
            )
        init_k = _k(init.get("k"), "init k")
        init_used = _used(init.get("squares"), "init squares")
    return Entry(
        step,
        _int(raw.get("wire"), 1, "wire"),
        parent,
        _k(raw.get("k"), "k"),
        _used(raw.get("updates"), "updates"),
        init_k,
        init_used,
    )


def read_entries(path: Path) -> list[Entry]:
    """The steps of a ledger this coordinator wrote (a resumed run's), in order."""
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [parse_entry(raw) for raw in lines if "final" not in raw]
