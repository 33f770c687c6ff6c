"""One round's HE-Adam step: encrypted sum, refreshed state, retries.

The accepted gradients are summed in node order and stepped with
k = K/K' (K participants, K' accepted). Round 1 has no state yet: a key
holder turns the summed squares into m0, V0, r0. Later rounds unmask the
rotating refresher's m, V, r; when that refresh is missing or unusable a
spare participant is asked once. A reply or refresh whose ciphertexts do not
parse is dropped and the step retried without it; θ and the state change
only when a step completes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from coordinator.exchange import check_terminal, error_reason, exchange
from coordinator.replies import ExpectFor, Reply, read_refresh, vector_bytes
from coordinator.workers import (
    BadChunks,
    ChunkPool,
    Premasked,
    masks_by_chunk,
    step_chunks,
)
from protocol import messages as msg
from protocol.adam import AdamHyper, StateUnits
from protocol.backend import Backend, Ct
from protocol.codec import receive_cts, send_cts
from protocol.config import RunConfig
from protocol.errors import HedrlError, ReplyRejected
from protocol.params import ParamSet

log = logging.getLogger("flwr.hedrl.coordinator")


class StepMixin:
    """``Federation``'s step of a round (round-1 state, spare refresher, retries).

    A mixin: it uses the attributes and helpers annotated below, which the
    Federation provides, and replaces its ``theta`` and ``state``.
    """

    be: Backend
    cfg: RunConfig
    hp: AdamHyper
    params: ParamSet
    grid: Grid
    nodes: list[int]
    n_chunks: int
    #: handles, or bytes as a pool returns them (each only serialised again
    #: for the broadcast, so its workers' copies need no loading)
    theta: list[Ct | bytes]
    state: list[tuple[Ct, Ct, Ct]] | None
    pool: ChunkPool | None
    keep_aggregate: bool
    last_aggregate: list[Ct] | None
    _spare: dict[str, Any]
    _step_timings: dict[str, float]
    _pool_chunks: list[int] | None
    _expect: ExpectFor
    _message: Callable[[int, str, RecordDict, int], Message]
    _task: Callable[..., ConfigRecord]
    _masked_state: Callable[..., tuple[RecordDict, list[np.ndarray], int]]
    _draw_masks: Callable[[], list[np.ndarray]]
    _premasked: Premasked | None
    _round: int  # the round as sent in this round's messages

    def _aggregate_and_step(
        self,
        t: int,
        accepted: list[Reply],
        refreshers: list[int],
        rejected: dict[str, str],
        missing: list[int],
    ) -> bool:
        """Sum the accepted gradients (node order), refresh, step with k = K/K'.

        Ciphertexts parse here (in the workers when there are any): a reply
        with a chunk that does not parse is rejected like one with a bad
        header, an unparsable refresh falls back to the spare's, and the step
        is retried without them; the state changes only when a step completes.
        """
        be = self.be
        need = self.cfg.min_participants_for(len(self.nodes))
        fresh: list[list[Ct]] | None = None
        if self.state is None:
            sq = self._squares_sum(accepted)
            fresh = self._initial_state(
                self._round, accepted[0].node, sq, len(self.nodes) / len(accepted)
            )
        spares: list[Reply] = []
        tried = list(refreshers)
        ref: Reply | None = None  # the refresh in use (None in round 1: V0)
        masks_next: list[np.ndarray] | None = None
        while True:
            k = len(self.nodes) / len(accepted)
            if fresh is not None:
                state = list(zip(*fresh, strict=True))
                level, unmask = StateUnits.levels(be.top_level), None
            else:
                by_node = {r.node: r for r in accepted}
                usable = [
                    by_node[n]
                    for n in refreshers
                    if n in by_node and by_node[n].refresh is not None
                ] + [r for r in spares if r.refresh is not None]
                if not usable and self.cfg.spare_refresher and len(tried) < 2:
                    spare = self._spare_refresh(self._round, tried, list(by_node))
                    if spare is not None:
                        spares.append(spare)
                        usable = [spare]
                if not usable:
                    raise HedrlError(
                        f"no usable refresh from {tried} (refresher and spare)"
                    )
                ref = usable[0]
                assert ref.refresh is not None and ref.masks is not None
                state = list(zip(*ref.refresh, strict=True))
                level = StateUnits.levels(be.top_level)
                unmask = masks_by_chunk(ref.masks, self.n_chunks)
            grads = [[r.gradient[i] for r in accepted] for i in range(self.n_chunks)]
            args = (self.theta, state, level, unmask, grads, t, self.hp)
            if masks_next is None:  # for the next round's refresher
                masks_next = self._draw_masks()
            mask_next = masks_by_chunk(masks_next, self.n_chunks)
            try:
                if self.pool is not None:
                    res = self.pool.step(
                        *args, optimizer=self.cfg.optimizer, k=k, mask_next=mask_next
                    )
                else:
                    res = step_chunks(
                        be,
                        *args,
                        optimizer=self.cfg.optimizer,
                        k=k,
                        keep_aggregate=self.keep_aggregate,
                        mask_next=mask_next,
                    )
            except BadChunks as exc:
                bad = {f.index for f in exc.failures if f.source == "gradient"}
                for f in exc.failures:
                    if f.source == "gradient":
                        node = accepted[f.index].node
                        rejected.setdefault(str(node), f.error)
                    elif ref is None:  # round 1: the key holder's m0, V0, r0
                        raise HedrlError(
                            f"initial state from participant {accepted[0].node} "
                            f"unusable: {f.error}"
                        ) from exc
                    else:  # only refresh chunks are not gradients
                        log.warning(
                            "hedrl: round %d: refresh of participant %d unusable: %s",
                            t,
                            ref.node,
                            f.error,
                        )
                        ref.refresh = None
                for i in sorted(bad):
                    log.warning(
                        "hedrl: round %d: reply of participant %d rejected: %s",
                        t,
                        accepted[i].node,
                        rejected[str(accepted[i].node)],
                    )
                    missing.append(accepted[i].node)
                accepted[:] = [r for i, r in enumerate(accepted) if i not in bad]
                if len(accepted) < need:
                    raise HedrlError(
                        f"{len(accepted)} usable replies after parsing "
                        f"(< min-participants {need})"
                    ) from exc
                continue
            break
        self.last_aggregate = res.aggregate
        self._step_timings = dict(res.timings)
        self.theta = list(res.theta)  # type: ignore[arg-type]
        self.state = list(res.state)  # type: ignore[arg-type]
        assert res.masked is not None and masks_next is not None
        self._premasked = (res.masked, masks_next)
        return True

    def _squares_sum(self, accepted: list[Reply]) -> list[Ct]:
        """Σ w·g² over the accepted replies (round 1); a failing addition
        raises :class:`ReplyRejected` naming the reply added."""
        sq = accepted[0].squares
        assert sq is not None
        for r in accepted[1:]:
            assert r.squares is not None
            try:
                sq = [self.be.add(a, b) for a, b in zip(sq, r.squares, strict=True)]
            except Exception as exc:
                raise ReplyRejected(
                    participant=r.node, reason=f"squares: {type(exc).__name__}: {exc}"
                ) from exc
        return sq

    def _initial_state(
        self, t: int, refresher: int, sq: list[Ct], k: float
    ) -> list[list[Ct]]:
        """Round 1: a key holder turns Σ w·g² (times k = K/K') into m0, V0, r0
        (``t`` is the round as sent)."""
        rd = RecordDict({msg.TASK: self._task(t, refresher=1, k=float(k))})
        send_cts(
            self.be,
            rd,
            msg.SQUARES,
            sq,
            self._expect("squares", self.be.top_level, None),
            t,
            self.n_chunks * self.params.slots,
        )
        reply = exchange(
            self.grid,
            [self._message(refresher, msg.V0, rd, t)],
            timeout=self.cfg.round_timeout,
        )[refresher]
        check_terminal({refresher: reply})
        if reply is None or reply.has_error():
            raise HedrlError(f"refresher {refresher} did not return V0")
        levels = StateUnits.levels(self.be.top_level)
        try:
            return [
                receive_cts(
                    self.be,
                    reply.content,
                    msg.state_key("v0", n),
                    self._expect("v0", level, t, n),
                )
                for n, level in zip(msg.STATE_NAMES, levels, strict=True)
            ]
        except Exception as exc:  # typed: the step is skipped, the run goes on
            reason = f"v0: {type(exc).__name__}: {exc}"
            raise ReplyRejected(participant=refresher, reason=reason) from exc

    def _spare_refresh(
        self, t: int, tried: list[int], replied: list[int]
    ) -> Reply | None:
        """Ask the next participant that replied in round ``t`` (as sent) to
        refresh m, V, r.

        One extra exchange, only in a round whose refresher failed; the spare
        gets freshly masked state. Returns its reply, or None if it fails too.
        """
        k = len(self.nodes)
        order = [self.nodes[(t + i) % k] for i in range(1, k)]
        spare = next((n for n in order if n in replied and n not in tried), None)
        if spare is None:
            return None
        tried.append(spare)
        log.warning(
            "hedrl: round %d: no usable refresh from %s; asking participant %d",
            t,
            tried[:-1],
            spare,
        )
        content = RecordDict({msg.TASK: self._task(t, refresher=1)})
        _, masks, sent = self._masked_state(into=content)
        self._spare.update(node=spare, down=sent)
        reply = exchange(
            self.grid,
            [self._message(spare, msg.REFRESH, content, t)],
            timeout=self.cfg.round_timeout,
        )[spare]
        check_terminal({spare: reply})
        why = None
        refresh = None
        if reply is None or reply.has_error():
            why = error_reason(reply)
        else:
            self._spare["up"] = vector_bytes(reply.content)
            try:
                refresh = read_refresh(
                    reply.content, t, self._expect, StateUnits.levels(self.be.top_level)
                )
            except Exception as exc:  # whatever the reply holds: the spare failed
                why = f"{type(exc).__name__}: {exc}"
        if refresh is None:
            log.warning(
                "hedrl: round %d: spare refresher %d failed too: %s", t, spare, why
            )
            return None
        return Reply(spare, [], None, refresh, masks, None, None, 0, 0)
