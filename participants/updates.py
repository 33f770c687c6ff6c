"""Every update a participant sent, in plaintext, on its own disk.

A release is the float64 twin of the run's optimiser replayed over these
updates (:mod:`participants.twin`), never a decryption of a ciphertext the
coordinator chose (docs/threat-model.md, "Release"). Each train reply's
gradient (and round-1 squares) is kept exactly as it was encrypted — values on
the encryption grid — with the SHA-256 of the ciphertext chunks sent, so the
coordinator's ledger can name an update only by a digest its sender recorded.

One ``.npz`` per round in ``<guard stem>-updates/`` beside the guard state,
written atomically before the reply leaves. Another participant's directory
copied into the state directory is read the same way (deployment: the sites
pool their update directories on the releasing host; docs/deploy.md).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocol.errors import KeyMaterialError
from protocol.files import write_atomic

_NAME = re.compile(r"w(\d{1,9})\.npz")


@dataclass(frozen=True)
class Update:
    """One participant's update of one round."""

    index: int
    wire: int
    gradient_digest: str
    gradient: np.ndarray
    squares_digest: str | None = None
    squares: np.ndarray | None = None


def updates_dir(state_dir: Path, fingerprint: str, index: int) -> Path:
    """Where participant ``index`` keeps its updates under the key ``fingerprint``."""
    return state_dir / f"guard-{fingerprint[:16]}-p{index}-updates"


def save(directory: Path, update: Update) -> None:
    """Keep ``update`` (before the reply carrying it leaves)."""
    arrays = {
        "gradient": _compact(update.gradient),
        "gradient_digest": np.frombuffer(bytes.fromhex(update.gradient_digest), "u1"),
    }
    if update.squares is not None and update.squares_digest is not None:
        arrays["squares"] = _compact(update.squares)
        arrays["squares_digest"] = np.frombuffer(
            bytes.fromhex(update.squares_digest), "u1"
        )
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # not compressed: zlib took 6 ms a CartPole round
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(directory / f"w{update.wire:07d}.npz", buf.getvalue())


def _compact(values: np.ndarray) -> np.ndarray:
    """float32 when that holds every value exactly (grid values below 4 do:
    24 bits of mantissa), else float64."""
    values = np.asarray(values, dtype="<f8")
    small = values.astype("<f4")
    return small if np.array_equal(small.astype("<f8"), values) else values


class Kept:
    """The kept updates under the key ``fingerprint`` in ``state_dir``, every
    participant's directory found there; each loaded only when asked for (a
    release reads the ones its chain names, nothing else)."""

    def __init__(self, state_dir: Path, fingerprint: str, size: int) -> None:
        self.size = size
        self._paths: dict[tuple[int, int], Path] = {}
        pattern = re.compile(
            rf"guard-{re.escape(fingerprint[:16])}-p(\d{{1,6}})-updates"
        )
        for directory in sorted(state_dir.iterdir()):
            m = pattern.fullmatch(directory.name)
            if not m or not directory.is_dir():
                continue
            for path in directory.iterdir():
                w = _NAME.fullmatch(path.name)
                if w:
                    self._paths[(int(m.group(1)), int(w.group(1)))] = path

    def keys(self) -> list[tuple[int, int]]:
        """(participant index, round) of every kept update, sorted."""
        return sorted(self._paths)

    def get(self, key: tuple[int, int]) -> Update | None:
        """Participant ``key[0]``'s update of round ``key[1]``, if kept."""
        path = self._paths.get(key)
        return None if path is None else _load(path, *key, self.size)


def _load(path: Path, index: int, wire: int, size: int) -> Update:
    try:
        with np.load(path, allow_pickle=False) as data:
            grad = data["gradient"].astype(np.float64)
            sq = data["squares"].astype(np.float64) if "squares" in data else None
            gd = bytes(data["gradient_digest"]).hex()
            sd = bytes(data["squares_digest"]).hex() if "squares" in data else None
    except (OSError, ValueError, KeyError) as exc:
        raise KeyMaterialError(f"update file {path} unreadable: {exc}") from exc
    if grad.shape != (size,) or (sq is not None and sq.shape != (size,)):
        raise KeyMaterialError(
            f"update file {path}: expected {size} values per vector "
            "(another run's policy?)"
        )
    return Update(index, wire, gd, grad, sd, sq)
