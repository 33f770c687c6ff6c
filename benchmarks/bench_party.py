"""hedrl-bench: both ends of one backend at one parameter count.

The keys of a sweep (one per backend, as one training run has one), the clock that
times a round's stages, Flower 1.42's object transport (:func:`to_wire`,
:func:`from_wire`), and a :class:`Party` holding θ and the encrypted Adam state
(m, V, r) of one configuration. The round itself is in
:mod:`benchmarks.bench_round`; the sweep and CLI in :mod:`benchmarks.bench`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import RecordDict
from flwr.proto.message_pb2 import PullObjectResponse, PushObjectRequest
from flwr.proto.node_pb2 import Node
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    get_object_tree,
    no_object_id_recompute,
)
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from coordinator.he_adam import StateUnits, initial_state
from protocol import keys
from protocol import messages as msg
from protocol.adam import AdamHyper
from protocol.backend import Backend, Ct
from protocol.codec import receive_cts, send_plain
from protocol.packing import n_chunks
from protocol.params import get_param_set
from protocol.wire import Expect

RUN_ID = 5


# ---- small helpers -------------------------------------------------------------------
class Clock:
    """Accumulates wall time per stage name."""

    def __init__(self) -> None:
        self.t: defaultdict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.t[stage] += time.perf_counter() - start


@dataclass
class Wire:
    """A message's content as flwr 1.42 moves it: objects, one request each.

    ``objects`` maps each object id to the bytes of one request: a
    ``PushObjectRequest`` as the sender made it (:func:`to_wire`), or after
    :func:`relay` the ``PullObjectResponse`` the receiver gets.
    """

    root: str
    objects: dict[str, bytes]

    @property
    def size(self) -> int:
        return sum(len(b) for b in self.objects.values())


_NODE = Node(node_id=1)


def to_wire(rd: RecordDict) -> Wire:
    """The sender's work in flwr 1.42's object transport (``HttpGrid.push_messages``
    and a SuperNode's push alike): each object's id (SHA-256 over its deflated
    bytes), the object tree, each object deflated into a ``PushObjectRequest``
    (every Array and every ≤ 5 MB piece of one is an object). The socket work
    of sending the requests is not included.
    """
    with no_object_id_recompute():
        root = rd.object_id
        objects = get_all_nested_objects(rd)
        get_object_tree(rd).SerializeToString()  # sent with the message
        return Wire(
            root,
            {
                oid: PushObjectRequest(
                    node=_NODE, run_id=RUN_ID, object_id=oid, object_content=o.deflate()
                ).SerializeToString()
                for oid, o in objects.items()
            },
        )


def relay(wire: Wire) -> Wire:
    """The SuperLink's part (not timed): pushed objects out as pull responses."""
    return Wire(
        wire.root,
        {
            oid: PullObjectResponse(
                object_found=True,
                object_available=True,
                object_content=PushObjectRequest.FromString(b).object_content,
            ).SerializeToString()
            for oid, b in wire.objects.items()
        },
    )


def from_wire(wire: Wire) -> RecordDict:
    """The receiver's work: pull responses parsed, the records inflated."""
    contents = {
        oid: PullObjectResponse.FromString(b).object_content
        for oid, b in wire.objects.items()
    }
    rd = inflate_object_from_contents(wire.root, contents)
    if not isinstance(rd, RecordDict):
        raise TypeError(f"wire: root object is {type(rd).__name__}, not RecordDict")
    return rd


# ---- one backend at one size ---------------------------------------------------------
@dataclass
class Party:
    """Both ends of one backend at one parameter count, and the running state."""

    backend: str
    params: int
    part: Backend
    coord: Backend
    context: bytes
    fingerprint: str
    clock: Clock = field(default_factory=Clock)
    theta: list[Ct | bytes] = field(default_factory=list)
    state: list[tuple[Ct, Ct, Ct]] = field(default_factory=list)
    t: int = 1

    @property
    def ps(self) -> Any:
        return self.coord.params

    @property
    def chunks(self) -> int:
        return n_chunks(self.params, self.ps.slots)

    def expect(self, kind: str, level: int, name: str | None = None) -> Expect:
        return Expect(
            param_set=self.ps.id,
            fingerprint=self.fingerprint,
            backend=self.backend,
            run_id=RUN_ID,
            layout_digest="bench",
            slot_count=self.ps.slots,
            chunk_count=self.chunks,
            kind=kind,
            level=level,
            name=name,
        )


def _instrument(be: Backend, clock_of: Callable[[], Clock]) -> None:
    """Time a participant backend's encrypt/decrypt inside the real codec calls."""
    enc, dec = be.encrypt, be.decrypt

    def encrypt(values: np.ndarray, level: int | None = None) -> bytes:
        with clock_of()("_encrypt"):
            return enc(values, level)

    def decrypt(chunk: bytes, *, level: int) -> np.ndarray:
        with clock_of()("_decrypt"):
            return dec(chunk, level=level)

    be.encrypt, be.decrypt = encrypt, decrypt  # type: ignore[method-assign]


class Keys:
    """One key per backend for the whole sweep (as one training run has one)."""

    def __init__(self, param_set: str, directory: Path, hp: AdamHyper) -> None:
        self.ps = get_param_set(param_set)
        self.hp = hp
        self.dir = directory
        self.current = Clock()
        self._made: dict[str, tuple[Backend, Backend, bytes, str]] = {}

    def get(self, backend: str) -> tuple[Backend, Backend, bytes, str]:
        if backend not in self._made:
            info = keys.write_keys(self.dir / backend, self.ps, backend, force=True)
            part, fp = keys.participant_backend(info.participant_path, self.ps, backend)
            ctx = info.coordinator_path.read_bytes()
            coord, fp_c = keys.coordinator_backend(ctx, self.ps, backend)
            assert fp == fp_c == info.fingerprint
            _instrument(part, lambda: self.current)
            self._made[backend] = (part, coord, ctx, fp)
        return self._made[backend]


# ---- setting up a configuration ------------------------------------------------------
def make_party(
    keys_: Keys, backend: str, params: int, rng: np.random.Generator
) -> Party:
    """θ0 and m0, V0, r0 encrypted by a participant (as in setup and round 1)."""
    part, coord, ctx, fp = keys_.get(backend)
    p = Party(backend, params, part, coord, ctx, fp)
    top = p.ps.depth
    theta0 = rng.normal(0.0, 0.1, params)
    g_n = np.clip(rng.normal(0.0, 0.5, params), -1, 1)
    vectors = {"theta": theta0}
    state0 = initial_state(g_n * g_n, keys_.hp)
    units = StateUnits.of(part, keys_.hp)  # stored, as a step leaves them
    vectors.update(
        (n, f * v) for n, v, f in zip(msg.STATE_NAMES, state0, units.out, strict=True)
    )
    cts = {}
    for name, values in vectors.items():
        rd = RecordDict()
        send_plain(part, rd, name, values, p.expect("v0", top), 0)
        cts[name] = receive_cts(coord, rd, name, p.expect("v0", top))
    p.theta = [coord.to_bottom(c) for c in cts["theta"]]
    p.state = list(zip(*(cts[n] for n in msg.STATE_NAMES), strict=True))
    return p
