"""A round's HE-Adam step: encrypted sum, refreshed state, retries.

The accepted gradients are summed in node order and stepped with k = K/K'
(K participants, K' accepted). The first round of a run has no state yet: a
key holder turns the summed squares into m0, V0, r0. Later rounds unmask the
rotating refresher's m, V, r; when that refresh is missing or unusable a
spare participant is asked once. A reply or refresh whose ciphertexts do not
parse is dropped from the round and the step retried without it. The step
returns the new θ and state; the run takes them only when a step completes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import RecordDict

from coordinator.chunks import BadChunks, StepResult, masks_by_chunk, step_chunks
from coordinator.exchange import check_terminal, error_reason, exchange
from coordinator.replies import Reply, read_refresh, vector_bytes
from coordinator.rounds import Round
from protocol import ledger
from protocol import messages as msg
from protocol.adam import StateUnits
from protocol.backend import Ct
from protocol.codec import receive_cts, send_cts
from protocol.errors import HedrlError, ReplyRejected
from protocol.records import digest

if TYPE_CHECKING:
    from coordinator.federation import Federation

log = logging.getLogger("flwr.hedrl.coordinator")


@dataclass
class Stepped:
    """A completed step: its result and the masks the next round's refresher
    gets with the new state (``result.masked``)."""

    result: StepResult
    masks_next: list[np.ndarray]
    used: list[Reply]  # the gradients summed, in order
    k: float
    init: tuple[float, list[Reply]] | None  # round 1: k and whose squares made V0


def take_step(fed: Federation, rnd: Round) -> Stepped:
    """Sum the round's accepted gradients, refresh, step; raise HedrlError
    when no step is possible (the state is kept).

    Ciphertexts parse here (in the workers when there are any): a reply with a
    chunk that does not parse is dropped from the round like one with a bad
    header, an unparsable refresh falls back to the spare's, and the step is
    retried without them.
    """
    be, t = fed.be, rnd.t
    need = fed.cfg.min_participants_for(len(fed.nodes))
    assert rnd.sent is not None
    refreshers = rnd.sent.refreshers
    fresh: list[list[Ct]] | None = None
    init: tuple[float, list[Reply]] | None = None
    if fed.state is None:
        accepted = rnd.got.accepted
        init = (len(fed.nodes) / len(accepted), list(accepted))
        fresh = initial_state(
            fed, rnd.wire, accepted[0].node, squares_sum(be, accepted), init[0]
        )
    spares: list[Reply] = []
    tried = list(refreshers)
    ref: Reply | None = None  # the refresh in use (None in round 1: V0)
    masks_next = fed.masker.draw()  # for the next round's refresher
    mask_next = masks_by_chunk(masks_next, fed.n_chunks)
    while True:
        accepted = rnd.got.accepted
        k = len(fed.nodes) / len(accepted)
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
            if not usable and fed.cfg.spare_refresher and len(tried) < 2:
                spare = spare_refresh(fed, rnd, tried, list(by_node))
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
            unmask = masks_by_chunk(ref.masks, fed.n_chunks)
        grads = [[r.gradient[i] for r in accepted] for i in range(fed.n_chunks)]
        args = (fed.theta, state, level, unmask, grads, t, fed.hp)
        try:
            if fed.pool is not None:
                res = fed.pool.step(
                    *args, optimizer=fed.cfg.optimizer, k=k, mask_next=mask_next
                )
            else:
                res = step_chunks(
                    be,
                    *args,
                    optimizer=fed.cfg.optimizer,
                    k=k,
                    keep_aggregate=fed.keep_aggregate,
                    mask_next=mask_next,
                )
        except BadChunks as exc:
            bad: dict[int, str] = {}  # node → its first unusable chunk's error
            for f in exc.failures:
                if f.source == "gradient":
                    bad.setdefault(accepted[f.index].node, f.error)
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
            for node, why in bad.items():
                log.warning(
                    "hedrl: round %d: reply of participant %d rejected: %s",
                    t,
                    node,
                    why,
                )
                rnd.drop(node, why)
            if len(rnd.got.accepted) < need:
                raise HedrlError(
                    f"{len(rnd.got.accepted)} usable replies after parsing "
                    f"(< min-participants {need})"
                ) from exc
            continue
        rnd.timings = dict(res.timings)
        return Stepped(res, masks_next, list(accepted), k, init)


def squares_sum(be, accepted: list[Reply]) -> list[Ct]:  # noqa: ANN001
    """Σ w·g² over the accepted replies (round 1); a failing addition raises
    :class:`ReplyRejected` naming the reply added."""
    sq = accepted[0].squares
    assert sq is not None
    for r in accepted[1:]:
        assert r.squares is not None
        try:
            sq = [be.add(a, b) for a, b in zip(sq, r.squares, strict=True)]
        except Exception as exc:
            raise ReplyRejected(
                participant=r.node, reason=f"squares: {type(exc).__name__}: {exc}"
            ) from exc
    return sq


def initial_state(
    fed: Federation, wire: int, refresher: int, sq: list[Ct], k: float
) -> list[list[Ct]]:
    """A key holder turns Σ w·g² (times k = K/K') into m0, V0, r0."""
    rd = RecordDict({msg.TASK: fed.task(wire, refresher=1, k=float(k))})
    send_cts(
        fed.be,
        rd,
        msg.SQUARES,
        sq,
        fed.expect("squares", fed.be.top_level, None),
        wire,
        fed.n_chunks * fed.params.slots,
    )
    reply = exchange(
        fed.grid,
        [fed.message(refresher, msg.V0, rd, wire)],
        timeout=fed.cfg.round_timeout,
    )[refresher]
    check_terminal({refresher: reply})
    if reply is None or reply.has_error():
        raise HedrlError(f"refresher {refresher} did not return V0")
    levels = StateUnits.levels(fed.be.top_level)
    try:
        return [
            receive_cts(
                fed.be,
                reply.content,
                msg.state_key("v0", n),
                fed.expect("v0", level, wire, n),
            )
            for n, level in zip(msg.STATE_NAMES, levels, strict=True)
        ]
    except Exception as exc:  # typed: the step is skipped, the run goes on
        reason = f"v0: {type(exc).__name__}: {exc}"
        raise ReplyRejected(participant=refresher, reason=reason) from exc


def spare_refresh(
    fed: Federation, rnd: Round, tried: list[int], replied: list[int]
) -> Reply | None:
    """Ask the next participant that replied this round to refresh m, V, r
    (adding it to ``tried``).

    One extra exchange, only in a round whose refresher failed; the spare gets
    freshly masked state. Returns its reply, or None if it fails too.
    """
    w, k = rnd.wire, len(fed.nodes)
    order = [fed.nodes[(w + i) % k] for i in range(1, k)]
    spare = next((n for n in order if n in replied and n not in tried), None)
    if spare is None:
        return None
    tried.append(spare)
    log.warning(
        "hedrl: round %d: no usable refresh from %s; asking participant %d",
        rnd.t,
        tried[:-1],
        spare,
    )
    content = RecordDict({msg.TASK: fed.task(w, refresher=1)})
    _, masks, sent = fed.masked_state(w, into=content)
    rnd.spare.node, rnd.spare.down = spare, sent
    reply = exchange(
        fed.grid,
        [fed.message(spare, msg.REFRESH, content, w)],
        timeout=fed.cfg.round_timeout,
    )[spare]
    check_terminal({spare: reply})
    why = None
    refresh = None
    if reply is None or reply.has_error():
        why = error_reason(reply)
    else:
        rnd.spare.up = vector_bytes(reply.content)
        try:
            refresh = read_refresh(
                reply.content, w, fed.expect, StateUnits.levels(fed.be.top_level)
            )
        except Exception as exc:  # whatever the reply holds: the spare failed
            why = f"{type(exc).__name__}: {exc}"
    if refresh is None:
        log.warning(
            "hedrl: round %d: spare refresher %d failed too: %s", rnd.t, spare, why
        )
        return None
    return Reply(spare, [], None, refresh, masks, None, None, 0, 0)


def ledger_entry(fed: Federation, t: int, wire: int, stepped: Stepped) -> ledger.Entry:
    """Step ``t``'s line in the ledger (what a release replays): the step θ
    came from, k and each used update by participant index and the digest of
    the chunks received."""
    init = stepped.init
    return ledger.Entry(
        t,
        wire,
        fed.head,
        stepped.k,
        [(fed.indices[r.node], digest(r.gradient)) for r in stepped.used],
        None if init is None else init[0],
        None
        if init is None
        else [(fed.indices[r.node], digest(r.squares_chunks or [])) for r in init[1]],
    )
