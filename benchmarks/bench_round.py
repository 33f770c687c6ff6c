"""hedrl-bench: one synthetic aggregation round, its stages timed.

No environment: each participant draws a random gradient of P parameters and the
round runs through the real code of both sides —

    participant  clip/scale (participants.learner) → encrypt + records (protocol.codec
                 send_plain) → pushed as Flower 1.42 objects (bench_party.to_wire)
    coordinator  pulled records (bench_party.from_wire), headers (read_vector) →
                 ciphertext parsing, homomorphic sum,
                 unmasking of the refresher's re-encrypted state, HE-Adam and
                 masking the new state for the next refresher
                 (coordinator.chunks.step_chunks, or ChunkPool.step with --workers,
                 as the federation calls them) → θ records at the bottom level
                 (send_cts) → records of the state the step masked for the next
                 refresher (coordinator.masking.StateMasker), both pushed as objects
    participant  θ decrypt (receive_plain); the refresher decrypts and re-encrypts
                 the masked m, V, r (as participants.node does)

Every records stage includes Flower's object transport on its side (ids,
deflating, requests; pulling: parsing and inflating), not the socket work.
Stage names (``STAGES``) are the keys of ``stages_s`` in the JSON records.
"""

from __future__ import annotations

import numpy as np
from flwr.app import RecordDict

from benchmarks.bench_party import (
    Clock,
    Keys,
    Party,
    Wire,
    from_wire,
    relay,
    to_wire,
)
from coordinator.chunks import STEP_STAGES, masks_by_chunk, step_chunks
from coordinator.masking import StateMasker
from coordinator.workers import ChunkPool
from participants.learner import clip_and_scale
from participants.policy import Layout
from protocol import messages as msg
from protocol.adam import AdamHyper, StateUnits
from protocol.codec import receive_plain, refresh_state, send_cts, send_plain
from protocol.records import read_vector
from protocol.wire import Expect

BENCH_PARTICIPANT_STAGES = ("p_decrypt_s", "p_encode_s", "p_encrypt_s", "p_records_s")
COORDINATOR_STAGES = ("headers_s", "step_s", "broadcast_s", "state_s")
STAGES = BENCH_PARTICIPANT_STAGES + ("refresh_s",) + COORDINATOR_STAGES + STEP_STAGES


# ---- the round -----------------------------------------------------------------------
class Round:
    """Synthetic rounds of one configuration (K participants, P parameters)."""

    def __init__(
        self,
        party: Party,
        participants: int,
        hp: AdamHyper,
        mask_bits: int,
        rng: np.random.Generator,
        pool: ChunkPool | None,
    ) -> None:
        self.p, self.k, self.hp = party, participants, hp
        self.rng, self.pool = rng, pool
        self.layout = Layout(("theta",), ((party.params,),))
        self.clip = 0.1
        # the coordinator's real masking code
        self.masker = StateMasker(party.coord, hp, party.chunks, mask_bits, rng)

    # participant side ------------------------------------------------------------
    def _gradient(self, clock: Clock) -> np.ndarray:
        p = self.p
        g = self.rng.normal(0.0, self.clip, p.params)  # ~1/3 of the entries clip
        with clock("p_encode_s"):
            g_n = clip_and_scale(g, self.layout, self.clip)
            return self.hp.c * (1.0 / self.k) * p.part.gradient_factor * g_n

    def _participant(self, theta_wire: Wire, clock: Clock) -> Wire:
        p = self.p
        with clock("p_records_s"):
            receive_plain(
                p.part, from_wire(theta_wire), msg.THETA, p.expect("theta", 0)
            )
        values = self._gradient(clock)
        with clock("p_records_s"):
            rd = RecordDict()
            self.up_bytes = send_plain(
                p.part,
                rd,
                msg.GRADIENT,
                values,
                p.expect("gradient", p.ps.depth),
                p.t,
            )
            return to_wire(rd)

    def _refresher(self, state_wire: Wire, clock: Clock) -> Wire:
        p, top = self.p, self.p.ps.depth
        crypto = clock.t["_decrypt"], clock.t["_encrypt"]
        try:
            return self._refresh(state_wire, clock, p, top)
        finally:  # its decrypt/encrypt stay in refresh_s only
            clock.t["_decrypt"], clock.t["_encrypt"] = crypto

    def _refresh(self, state_wire: Wire, clock: Clock, p: Party, top: int) -> Wire:
        with clock("refresh_s"):
            content, out = from_wire(state_wire), RecordDict()
            refresh_state(p.part, self.hp, content, out, p.expect, p.t)
            return to_wire(out)

    # coordinator side -------------------------------------------------------------
    def _broadcast(self, clock: Clock) -> Wire:
        p = self.p
        with clock("broadcast_s"):
            rd = RecordDict()
            self.down_bytes = send_cts(
                p.coord, rd, msg.THETA, p.theta, p.expect("theta", 0), p.t, p.params
            )
            return to_wire(rd)

    def _mask(self, clock: Clock) -> tuple[Wire, list[np.ndarray]]:
        """The masked state's records; the masking itself is in the last step."""
        p, masker = self.p, self.masker
        if masker.pending is None:  # no step yet: what it would have masked
            masker.pending = masker.mask(p.state)
        with clock("state_s"):
            rd, masks, _ = masker.records(
                p.state, lambda name: p.expect("state", 0, name), p.t
            )
            return to_wire(rd), masks

    def _headers(self, wire: Wire, keys_exps: list[tuple[str, Expect]], clock: Clock):
        """Pulled records, header checks and raw chunks, as
        coordinator.replies.parse_reply does."""
        with clock("headers_s"):
            rd = from_wire(wire)
            return [read_vector(rd, key, exp)[1] for key, exp in keys_exps]

    def run(self, keys: Keys) -> dict[str, float]:
        """One timed round: stage seconds (participant stages per participant)."""
        p, be, top, n = self.p, self.p.coord, self.p.ps.depth, self.p.chunks
        clock = keys.current = Clock()
        # relay(): the SuperLink between push and pull, not timed
        theta_wire = relay(self._broadcast(clock))
        state_wire, masks = self._mask(clock)
        refresh = self._headers(
            relay(self._refresher(relay(state_wire), clock)),
            [
                (msg.state_key("refresh", name), p.expect("refresh", level, name))
                for name, level in zip(
                    msg.STATE_NAMES, StateUnits.levels(top), strict=True
                )
            ],
            clock,
        )
        grads = [
            self._headers(
                relay(self._participant(theta_wire, clock)),
                [(msg.GRADIENT, p.expect("gradient", top))],
                clock,
            )[0]
            for _ in range(self.k)
        ]
        args = (
            p.theta,
            list(zip(*refresh, strict=True)),
            StateUnits.levels(top),
            masks_by_chunk(masks, n),
            [[g[i] for g in grads] for i in range(n)],
            p.t,
            self.hp,
        )
        masks_next = self.masker.draw()
        with clock("step_s"):
            mask_next = masks_by_chunk(masks_next, n)
            if self.pool is None:
                res = step_chunks(be, *args, mask_next=mask_next)
            else:
                res = self.pool.step(*args, mask_next=mask_next)
        p.theta, p.state = res.theta, res.state
        assert res.masked is not None
        self.masker.pending = (res.masked, masks_next)
        p.t += 1
        t = clock.t
        t.update(res.timings)
        t["p_records_s"] -= t["_decrypt"] + t["_encrypt"]
        t["p_decrypt_s"], t["p_encrypt_s"] = t["_decrypt"], t["_encrypt"]
        out_t = {s: t.get(s, 0.0) for s in STAGES}
        for s in BENCH_PARTICIPANT_STAGES:
            out_t[s] /= self.k
        return out_t
