"""Vectors ⇄ Flower records through a backend: the boundary where crypto happens.

Participants call :func:`send_plain` (encrypt as the last step of a reply) and
:func:`receive_plain` (decrypt as the first step of a task); the coordinator
only ever calls :func:`receive_cts` / :func:`send_cts` on ciphertext handles
(or on chunks a coordinator worker has already serialised).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from flwr.app import RecordDict

from protocol import messages as msg
from protocol.adam import AdamHyper, StateUnits
from protocol.backend import Backend, Ct
from protocol.errors import UpdateRejected
from protocol.packing import pack, unpack
from protocol.records import read_vector, write_vector
from protocol.wire import Expect, make_header

# CKKS needs |value|·Δ well below q/2 at every level; anything this large is a bug
# or an attack, and an encrypted NaN would poison the sum silently.
MAX_ABS_VALUE = 2.0**22


def _with(expect: Expect, **changes: object) -> Expect:
    return dataclasses.replace(expect, **changes)


def send_plain(
    be: Backend,
    rd: RecordDict,
    key: str,
    values: np.ndarray,
    expect: Expect,
    round_: int,
) -> int:
    """Encrypt ``values`` (flat) into ``rd[key]``; return the bytes added."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if not np.all(np.isfinite(values)):
        bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
        raise UpdateRejected(f"{key}: {bad} non-finite values; refusing to encrypt")
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    if peak > MAX_ABS_VALUE:
        raise UpdateRejected(
            f"{key}: |value| up to {peak:.3g}, at most {MAX_ABS_VALUE:.3g} allowed"
        )
    values = on_grid(be, values)
    chunks = [be.encrypt(c, level=expect.level) for c in pack(values, be.slots)]
    if len(chunks) != expect.chunk_count:
        raise UpdateRejected(
            f"{key}: {values.size} values make {len(chunks)} chunks, expected "
            f"{expect.chunk_count}"
        )
    header = make_header(expect, value_count=values.size, round_=round_)
    return write_vector(rd, key, header, chunks)


def on_grid(be: Backend, values: np.ndarray) -> np.ndarray:
    """``values`` as :func:`send_plain` encrypts them: rounded to the
    parameter set's grid (never a value's low, noisy bits)."""
    grid = be.params.encrypt_grid
    return np.round(np.asarray(values, dtype=np.float64) / grid) * grid


def receive_plain(be: Backend, rd: RecordDict, key: str, expect: Expect) -> np.ndarray:
    """Check the header of ``rd[key]``, then decrypt and unpack it."""
    received = receive_checked(be, rd, key, expect)
    return decrypt_received(be, received)


@dataclasses.dataclass(frozen=True)
class Received:
    """A vector checked before decryption: header, chunks as sent, handles."""

    header: Any
    chunks: list[bytes]
    cts: list[Ct]


def receive_checked(be: Backend, rd: RecordDict, key: str, expect: Expect) -> Received:
    """The header of ``rd[key]`` against ``expect``, then every chunk parsed and
    checked as a ciphertext of this context at ``expect.level``. Nothing is
    decrypted: what fails here depends only on the bytes received."""
    hdr, chunks = read_vector(rd, key, expect)
    return Received(hdr, chunks, [be.load(c, level=expect.level) for c in chunks])


def decrypt_received(be: Backend, received: Received) -> np.ndarray:
    """Decrypt and unpack a vector :func:`receive_checked` accepted."""
    values = [be.decrypt_ct(c) for c in received.cts]
    return unpack(values, int(received.header.value_count))


def refresh_state(
    be: Backend,
    hp: AdamHyper,
    content: RecordDict,
    out: RecordDict,
    expect: Callable[[str, int, str], Expect],
    round_: int,
) -> None:
    """The refresher's work: decrypt the masked m, V, r of round ``round_`` and
    re-encrypt them into ``out`` where the step uses them
    (:meth:`StateUnits.levels`), turned from the step's output units into its
    input units (:meth:`StateUnits.refresh_scale`). ``expect(kind, level,
    name)`` gives the run's header fields."""
    units = StateUnits.of(be, hp)
    levels = units.levels(be.top_level)
    for name, level in zip(msg.STATE_NAMES, levels, strict=True):
        values = receive_plain(
            be,
            content,
            msg.state_key("state", name),
            _with(expect("state", 0, name), round=round_),
        )
        send_plain(
            be,
            out,
            msg.state_key("refresh", name),
            units.refresh_scale(name) * values,
            expect("refresh", level, name),
            round_,
        )


def receive_cts(be: Backend, rd: RecordDict, key: str, expect: Expect) -> list[Ct]:
    """Check the header of ``rd[key]``, then parse its chunks as ciphertexts."""
    _, chunks = read_vector(rd, key, expect)
    return [be.load(c, level=expect.level) for c in chunks]


def send_cts(
    be: Backend,
    rd: RecordDict,
    key: str,
    cts: Sequence[Ct | bytes],
    expect: Expect,
    round_: int,
    value_count: int,
) -> int:
    """Serialise ciphertext handles into ``rd[key]``; return the bytes added.

    A chunk given as bytes (already serialised, e.g. by a coordinator worker)
    is written as it is.
    """
    chunks = [be.to_bytes(c) for c in cts]
    header = make_header(
        _with(expect, chunk_count=len(chunks)), value_count=value_count, round_=round_
    )
    return write_vector(rd, key, header, chunks)
