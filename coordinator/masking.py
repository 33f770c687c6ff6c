"""The refresh masks: drawn fresh for each refresh, never stored, added to m, V, r.

The refresher sees the state only under uniform masks of ±2^mask-bits (about
that many bits of statistical hiding: obfuscation, not a proof; see
docs/threat-model.md). Masks come from a generator the OS seeds when the run
starts, on purpose also when it resumes: the rounds after a checkpoint run
again with new gradients, and two states under one mask would give the
refresher their difference.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence

import numpy as np
from flwr.app import RecordDict

from coordinator.chunks import Chunk, Premasked, mask_state, masks_by_chunk
from protocol import messages as msg
from protocol.adam import AdamHyper, StateUnits
from protocol.backend import Backend, Ct
from protocol.codec import send_cts
from protocol.wire import Expect

State = Sequence[tuple[Ct, Ct, Ct]]
"""m, V, r per chunk."""


class StateMasker:
    """Masks for the m, V, r of every chunk and the records a refresher gets."""

    def __init__(
        self,
        be: Backend,
        hp: AdamHyper,
        n_chunks: int,
        mask_bits: int,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.be, self.hp, self.n_chunks = be, hp, n_chunks
        self.bound = float(2**mask_bits)
        self.rng = rng or np.random.default_rng(secrets.randbits(128))
        #: the state the last step masked for the next round's refresher
        #: (alongside the step, in the workers) and its masks; used once
        self.pending: Premasked | None = None

    def draw(self) -> list[np.ndarray]:
        """Fresh masks for m, V, r of every chunk, name-major (all of m's
        chunks, then V's, then r's)."""
        return [
            self.rng.uniform(-self.bound, self.bound, self.be.slots)
            for _ in msg.STATE_NAMES
            for _ in range(self.n_chunks)
        ]

    def mask(self, state: State) -> Premasked:
        """``state`` (bottom level) plus newly drawn masks, per chunk, and the masks."""
        masks = self.draw()
        units = StateUnits.of(self.be, self.hp)
        per_chunk = masks_by_chunk(masks, self.n_chunks)
        chunks: list[tuple[Chunk, Chunk, Chunk]] = [
            mask_state(self.be, mvr, per, units)
            for mvr, per in zip(state, per_chunk, strict=True)
        ]
        return chunks, masks

    def records(
        self,
        state: State,
        expect: Callable[[str], Expect],
        wire: int,
        into: RecordDict | None = None,
    ) -> tuple[RecordDict, list[np.ndarray], int]:
        """``state`` masked, as records of round ``wire`` (added to ``into`` if
        given; ``expect(name)`` gives a vector's header fields): (records,
        masks, bytes). The regular refresher gets :attr:`pending`; anyone
        asking again in the same round (a spare) gets newly drawn masks. Every
        slot is sent, padding included: a padding slot left at −mask after
        unmasking would overflow and corrupt its chunk."""
        chunks, masks = self.pending or self.mask(state)
        self.pending = None
        rd = RecordDict() if into is None else into
        sent = 0
        for j, name in enumerate(msg.STATE_NAMES):
            sent += send_cts(
                self.be,
                rd,
                msg.state_key("state", name),
                [chunk[j] for chunk in chunks],
                expect(name),
                wire,
                self.n_chunks * self.be.slots,
            )
        return rd, masks, sent
