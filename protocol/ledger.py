"""The run's ledger: which updates each optimiser step used.

The coordinator appends one JSON line per completed step — its number, the
round its messages carried, the step whose θ it started from (``parent``; 0 is
θ0), k = K/K' and each used update as (participant index, SHA-256 of the
ciphertext chunks received) — and one line naming the final θ's step. The
release replays the float64 twin of the optimiser over the updates a chain of
steps names (participants/twin.py). The ledger holds no ciphertext and nothing
secret; the coordinator can write it as it likes, and a participant uses only
updates whose digest it or their sender recorded, so whatever it says, the
replay is a function of genuine updates and public numbers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from protocol.errors import KeyMaterialError

FILE = "ledger.jsonl"
#: a ledger larger than this is not a run's (≈ 400 bytes per step at K = 4)
MAX_BYTES = 2**27
MAX_K = 2.0**20
#: one step's line names K updates of ~70 bytes each
MAX_LINE = 2**20
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
        record: dict[str, Any] = {
            "step": entry.step,
            "wire": entry.wire,
            "parent": entry.parent,
            "k": entry.k,
            "updates": [list(u) for u in entry.updates],
        }
        if entry.init is not None:
            record["init"] = {
                "k": entry.init_k,
                "squares": [list(u) for u in entry.init],
            }
        self._write(record)

    def final(self, wire: int, head: int) -> None:
        """The final θ, sent in round ``wire``, is the output of step ``head``."""
        self._write({"final": wire, "head": head})

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


# ---- reading (the participant's side: every field is checked) -------------------
def _int(value: Any, lo: int, what: str) -> int:
    if type(value) is not int or value < lo:
        raise KeyMaterialError(f"ledger: {what} must be an int ≥ {lo}, got {value!r}")
    return value


def _k(value: Any, what: str) -> float:
    if type(value) not in (int, float) or not (
        math.isfinite(value) and 1.0 <= value <= MAX_K
    ):
        raise KeyMaterialError(f"ledger: {what} must be a number in [1, {MAX_K:g}]")
    return float(value)


def _used(value: Any, what: str) -> Used:
    if not isinstance(value, list) or not value:
        raise KeyMaterialError(f"ledger: {what} must be a non-empty list")
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
            raise KeyMaterialError(f"ledger: {what}: [index, sha256 hex] expected")
        out.append((item[0], item[1]))
    if len({i for i, _ in out}) != len(out):
        raise KeyMaterialError(f"ledger: {what} names a participant twice")
    return out


def _entry(raw: dict[str, Any]) -> Entry:
    step = _int(raw.get("step"), 1, "step")
    parent = _int(raw.get("parent"), 0, "parent")
    if parent >= step:
        raise KeyMaterialError(f"ledger: step {step} starts from a later step")
    init = raw.get("init")
    init_k = init_used = None
    if parent == 0:
        if not isinstance(init, dict):
            raise KeyMaterialError(f"ledger: step {step} starts from θ0 without V0")
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


def read_chain(path: Path) -> tuple[int, list[Entry]]:
    """The final θ's round and the steps that made it, first step first.

    The last ``final`` line names the head; each step's ``parent`` leads back
    to θ0 (a later line for the same step replaces an earlier one: a resumed
    run re-runs steps). Rounds must increase along the chain.
    """
    try:
        if path.stat().st_size > MAX_BYTES:
            raise KeyMaterialError(f"ledger {path} is larger than {MAX_BYTES} bytes")
        with open(path, "rb") as fh:
            return _chain(fh)
    except OSError as exc:
        raise KeyMaterialError(f"ledger {path} unreadable: {exc}") from exc


def _chain(fh: BinaryIO) -> tuple[int, list[Entry]]:
    steps: dict[int, Entry] = {}
    final: tuple[int, int] | None = None
    for n, raw_line in enumerate(fh, start=1):
        try:
            line = raw_line.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise KeyMaterialError(f"ledger line {n} is not UTF-8") from exc
        if not line:
            continue
        if len(line) > MAX_LINE:
            raise KeyMaterialError(f"ledger line {n} is longer than {MAX_LINE} bytes")
        try:
            raw = json.loads(line)
        except (ValueError, RecursionError) as exc:  # RecursionError: deep nesting
            raise KeyMaterialError(f"ledger line {n} is not JSON") from exc
        if not isinstance(raw, dict):
            raise KeyMaterialError(f"ledger line {n} is not an object")
        if "final" in raw:
            final = (_int(raw["final"], 1, "final"), _int(raw.get("head"), 1, "head"))
        else:
            entry = _entry(raw)
            steps[entry.step] = entry
    if final is None:
        raise KeyMaterialError("the ledger names no final θ (the run did not finish)")
    chain: list[Entry] = []
    at = final[1]
    while at != 0:
        if at not in steps:
            raise KeyMaterialError(
                f"ledger: step {at} of the final θ's chain is missing"
            )
        chain.append(steps[at])
        at = steps[at].parent
    chain.reverse()
    _increasing([e.wire for e in chain] + [final[0]])
    return final[0], chain


def _increasing(wires: Sequence[int]) -> None:
    if any(b <= a for a, b in zip(wires, wires[1:], strict=False)):
        raise KeyMaterialError("ledger: rounds do not increase along the chain")
