"""The relay: every update, sealed for the other key holders, and the steps.

A participant acts only on a θ it can recompute: the optimiser's float64 twin
over the updates the coordinator summed (participants/twin.py). So each train
reply carries, beside the CKKS ciphertexts, the same update sealed with
AES-256-GCM under a key derived from the secret key; the coordinator stores and
forwards it, and can neither read nor forge it. The associated data binds a
sealed update to its round, its sender's index and the SHA-256 of the CKKS
chunks sent: it can stand only for the update the step names.

With each θ the coordinator sends a :class:`Relay`: the steps from one the
participant already replayed (``base``) to the step whose output θ is
(``head``), as ledger entries (protocol/ledger.py), with the sealed updates
they use. Steps are identified by a hash chain over their entries, since a
resumed run may run a step number again with other updates.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from flwr.app import ConfigRecord

from protocol.errors import WireFormatError
from protocol.ledger import Entry, entry_record, parse_entry

NONCE_BYTES = 12
#: a sealed update holds at most gradient and squares of this many values
MAX_VALUES = 2**24
ROOT_HASH = ""
"""The chain hash of θ0 (step 0)."""
#: step numbers stay below this (snapshot file names have 9 digits)
MAX_STEP = 10**9
_HASH = re.compile(r"[0-9a-f]{64}")


class RelayError(WireFormatError):
    """A relay that does not hold together, or a sealed update that does not open."""


def relay_key(mac_key: bytes) -> bytes:
    """The AES-256 key of sealed updates, from the key holders' MAC key."""
    return hmac.new(mac_key, b"hedrl-relay-aead", hashlib.sha256).digest()


def _ad(wire: int, index: int) -> bytes:
    return f"hedrl-update\0{wire}\0{index}".encode()


def _compact(values: np.ndarray) -> np.ndarray:
    """float32 when that holds every value exactly (grid values below 4 do),
    else float64."""
    values = np.asarray(values, dtype="<f8")
    small = values.astype("<f4")
    return small if np.array_equal(small.astype("<f8"), values) else values


@dataclass(frozen=True)
class Update:
    """One participant's update of one round, as it sealed it."""

    gradient: np.ndarray
    gradient_digest: str  # SHA-256 of the CKKS chunks sent (protocol.records.digest)
    squares: np.ndarray | None = None  # round 1 only
    squares_digest: str = ""


def seal(key: bytes, wire: int, index: int, update: Update) -> bytes:
    """Participant ``index``'s update of round ``wire``, sealed: nonce ‖
    AES-GCM ciphertext and tag (round and index are its associated data)."""
    arrays = {
        "gradient": _compact(update.gradient),
        "digests": np.frombuffer(
            f"{update.gradient_digest}:{update.squares_digest}".encode(), "u1"
        ),
    }
    if update.squares is not None:
        arrays["squares"] = _compact(update.squares)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, buf.getvalue(), _ad(wire, index))


def open_sealed(key: bytes, blob: bytes, wire: int, index: int, size: int) -> Update:
    """A sealed update of participant ``index``, round ``wire``, or
    :class:`RelayError`."""
    try:
        plain = AESGCM(key).decrypt(
            blob[:NONCE_BYTES], blob[NONCE_BYTES:], _ad(wire, index)
        )
    except (InvalidTag, ValueError) as exc:
        raise RelayError(
            f"sealed update of participant {index}, round {wire}, does not open "
            "(forged, or another participant's or round's)"
        ) from exc
    with np.load(io.BytesIO(plain), allow_pickle=False) as data:
        grad = data["gradient"].astype(np.float64)
        sq = data["squares"].astype(np.float64) if "squares" in data else None
        gd, _, sd = bytes(data["digests"]).decode().partition(":")
    if grad.shape != (size,) or (sq is not None and sq.shape != (size,)):
        raise RelayError(f"sealed update of participant {index}: not {size} values")
    return Update(grad, gd, sq, sd)


def entry_hash(parent_hash: str, entry: Entry) -> str:
    """The chain hash of ``entry`` after its parent's."""
    body = json.dumps(entry_record(entry), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{parent_hash}\0{body}".encode()).hexdigest()


@dataclass(frozen=True)
class Relay:
    """What a θ comes with: the steps from ``base`` to ``head`` and the sealed
    updates they use, by (participant index, round)."""

    base: int
    base_hash: str
    head: int
    head_hash: str
    entries: list[Entry]
    sealed: dict[tuple[int, int], bytes]

    def record(self) -> ConfigRecord:
        keys = list(self.sealed)
        return ConfigRecord(
            {
                "base": self.base,
                "base-hash": self.base_hash,
                "head": self.head,
                "head-hash": self.head_hash,
                "entries": json.dumps([entry_record(e) for e in self.entries]),
                "sealed-index": [i for i, _ in keys],
                "sealed-round": [w for _, w in keys],
                "sealed": [self.sealed[k] for k in keys],
            }
        )


def _field(rec: ConfigRecord, name: str, kind: type) -> Any:
    value = rec.get(name)
    if type(value) is not kind:
        raise RelayError(f"relay {name!r}: expected {kind.__name__}")
    return value


def parse_relay(rec: Any) -> Relay:
    """A relay record checked for shape: the entries chain from ``base`` to
    ``head`` with increasing rounds, every named update sealed once."""
    if not isinstance(rec, ConfigRecord):
        raise RelayError("message carries no relay record")
    base, head = _field(rec, "base", int), _field(rec, "head", int)
    try:
        raw = json.loads(_field(rec, "entries", str))
    except (ValueError, RecursionError) as exc:
        raise RelayError("relay entries are not JSON") from exc
    if not isinstance(raw, list) or not all(isinstance(e, dict) for e in raw):
        raise RelayError("relay entries: expected a list of objects")
    entries = [parse_entry(e) for e in raw]
    at = base
    for e in entries:
        if e.parent != at:
            raise RelayError(f"relay: step {e.step} does not follow step {at}")
        at = e.step
    if at != head or not 0 <= base <= head < MAX_STEP:
        raise RelayError(f"relay: the steps from {base} do not end at {head}")
    wires = [e.wire for e in entries]
    if any(b <= a for a, b in zip(wires, wires[1:], strict=False)):
        raise RelayError("relay: rounds do not increase along the steps")
    index, rounds = rec.get("sealed-index", []), rec.get("sealed-round", [])
    blobs = rec.get("sealed", [])
    if not (
        isinstance(index, list)
        and isinstance(rounds, list)
        and isinstance(blobs, list)
        and len(index) == len(rounds) == len(blobs)
        and all(type(i) is int for i in index + rounds)
        and all(type(b) is bytes and NONCE_BYTES < len(b) for b in blobs)
    ):
        raise RelayError("relay: sealed updates must be matching lists")
    sealed = dict(zip(zip(index, rounds, strict=True), blobs, strict=True))
    if len(sealed) != len(blobs):
        raise RelayError("relay: an update is sealed twice")
    for name in ("base-hash", "head-hash"):
        value = _field(rec, name, str)
        if value != ROOT_HASH and not _HASH.fullmatch(value):
            raise RelayError(f"relay {name!r}: expected 64 hex digits or ''")
    return Relay(base, rec["base-hash"], head, rec["head-hash"], entries, sealed)
