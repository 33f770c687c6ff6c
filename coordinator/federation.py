"""The coordinator's federation: setup and one round (exchange, sum, step).

:class:`Federation` registers the participants and obtains the evaluation
context and θ0 (:meth:`Federation.setup`), then runs rounds
(:meth:`Federation.run_round`): broadcast θ and the masked state to refresh,
collect and validate the replies (:mod:`coordinator.replies`), roll back when
a majority refuses θ, and take the HE-Adam step (:mod:`coordinator.step`).
The loop over rounds with its metrics and summary lives in
:mod:`coordinator.run_loop`, checkpoints and resuming in
:mod:`coordinator.persistence`.

The coordinator holds only the evaluation context it receives from a
participant at setup (refusing one with a secret key) and checks that every
participant reports the same context fingerprint.
"""

from __future__ import annotations

import logging
import secrets
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from coordinator.exchange import (
    check_terminal,
    error_reason,
    exchange,
    wait_for_nodes,
)
from coordinator.persistence import (
    CheckpointMixin,
    Good,
    Resume,
    load_resume,
    resume_state,
)
from coordinator.replies import (
    Reply,
    parse_reply,
    participant_stages,
    short_repr,
    vector_bytes,
)
from coordinator.run_loop import RunLoopMixin
from coordinator.step import StepMixin
from coordinator.workers import (
    Chunk,
    ChunkPool,
    Premasked,
    auto_workers,
    mask_state,
    masks_by_chunk,
)
from protocol import keys
from protocol import messages as msg
from protocol.adam import StateUnits
from protocol.backend import Backend, Ct
from protocol.codec import receive_cts, send_cts
from protocol.config import RunConfig, expand_dir
from protocol.errors import (
    FingerprintMismatch,
    HeaderMismatch,
    HedrlError,
    ReplyRejected,
)
from protocol.memory import retain_freed_memory
from protocol.params import get_param_set
from protocol.wire import Expect

log = logging.getLogger("flwr.hedrl.coordinator")


#: an evaluation context is a few MB (2.6 at 8k-35x3, ~30 at 16k-50x6)
MAX_CONTEXT_BYTES = 256 * 1024 * 1024
MAX_ROUND = 2**31 - 1  # a VectorHeader's round is a uint32


def setup_info(node: int, reply: Message | None, *, context: bool) -> dict[str, Any]:
    """One participant's setup reply, every field type- and range-checked, or a
    HedrlError naming the participant and the field."""
    if reply is None or reply.has_error():
        raise HedrlError(f"participant {node} failed setup: {error_reason(reply)}")
    record = reply.content.get(msg.SETUP_REPLY) if reply.has_content() else None
    if not isinstance(record, ConfigRecord):
        raise HedrlError(f"participant {node} failed setup: no setup record")

    def field(key: str, kind: type, ok: Callable[[Any], bool], expected: str) -> Any:
        value = record.get(key)
        if type(value) is not kind or not ok(value):
            got = short_repr(value)
            raise HedrlError(
                f"participant {node} failed setup: {key!r}: expected {expected}, "
                f"received {got}"
            )
        return value

    def hex64(v: str) -> bool:
        return len(v) == 64 and all(c in "0123456789abcdef" for c in v)

    def rounds(low: int) -> Callable[[int], bool]:
        return lambda v: low <= v <= MAX_ROUND

    info = {
        "fingerprint": field("fingerprint", str, hex64, "64 hex digits"),
        "layout-digest": field("layout-digest", str, hex64, "64 hex digits"),
        "param-count": field(
            "param-count", int, lambda v: 1 <= v <= 10**9, "an int in [1, 1e9]"
        ),
        "participant-index": field(
            "participant-index", int, rounds(0), f"an int in [0, {MAX_ROUND}]"
        ),
        "last-round": field(
            "last-round", int, rounds(0), f"an int in [0, {MAX_ROUND}]"
        ),
        "max-rounds": field(
            "max-rounds", int, rounds(1), f"an int in [1, {MAX_ROUND}]"
        ),
    }
    if context:
        info["context"] = field(
            "context",
            bytes,
            lambda v: 0 < len(v) <= MAX_CONTEXT_BYTES,
            f"bytes of an evaluation context (at most {MAX_CONTEXT_BYTES})",
        )
    return info


class Federation(StepMixin, CheckpointMixin, RunLoopMixin):
    """One training run driven through a Flower ``Grid``.

    The step, the loop over rounds and checkpoints come from the mixins
    :class:`~coordinator.step.StepMixin`,
    :class:`~coordinator.run_loop.RunLoopMixin` and
    :class:`~coordinator.persistence.CheckpointMixin`.
    """

    def __init__(
        self,
        grid: Grid,
        cfg: RunConfig,
        run_id: int,
        on_round: Callable[[int, Federation], None] | None = None,
    ) -> None:
        """``on_round(t, self)`` runs after each round (benchmarks, tests)."""
        self.on_round = on_round
        if cfg.retain_freed_memory and retain_freed_memory():
            log.info("hedrl: freed memory kept for reuse (retain-freed-memory)")
        self.last_aggregate: list[Ct] | None = None
        self.grid = grid
        self.cfg = cfg
        self.run_id = run_id
        self.params = get_param_set(cfg.param_set)
        self.hp = cfg.hyper
        self.out_dir = expand_dir(cfg.results_dir) / (cfg.run_name or f"run-{run_id}")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._mask_rng = np.random.default_rng(secrets.randbits(128))
        self.start_round = 0
        self.wire_offset = 0  # set at setup (_first_wire_round)
        self.key_run_id = run_id
        self._resume: Resume | None = None
        if cfg.resume_from:
            path = Path(cfg.resume_from).expanduser()
            self._resume = load_resume(path, cfg, self.params.id)
            self.key_run_id = int(self._resume[0]["key_run_id"])
        # the last θ a majority accepted, its state and the rounds it includes:
        # what a rollback returns to and what periodic checkpoints hold
        self._good: Good | None = None
        self.be: Backend
        self.fingerprint = ""
        self.history: list[dict[str, Any]] = []
        self.pool: ChunkPool | None = None
        self.keep_aggregate = False  # benchmarks: keep Σ x of each step
        self._spare: dict[str, Any] = {"node": None, "down": 0, "up": 0}  # per round
        self._step_timings: dict[str, float] = {}  # per round
        self._pool_chunks: list[int] | None = None  # per round: chunks per process
        # (m, V, r) of the last step already masked for the next round's
        # refresher (per chunk) and the masks, name-major; used once
        self._premasked: Premasked | None = None

    # ---- helpers ---------------------------------------------------------------
    def _expect(
        self, kind: str, level: int, round_: int | None, name: str | None = None
    ) -> Expect:
        return Expect(
            param_set=self.params.id,
            fingerprint=self.fingerprint,
            backend=self.cfg.backend,
            run_id=self.run_id,
            layout_digest=self.layout_digest,
            slot_count=self.params.slots,
            chunk_count=self.n_chunks,
            kind=kind,
            level=level,
            round=round_,
            name=name,
        )

    def _message(
        self, node: int, mtype: str, content: RecordDict, round_: int
    ) -> Message:
        return Message(
            content=content, dst_node_id=node, message_type=mtype, group_id=str(round_)
        )

    def _task(self, round_: int, **extra: Any) -> ConfigRecord:
        return ConfigRecord(
            {
                "round": round_,
                "fingerprint": self.fingerprint,
                "backend": self.cfg.backend,
                **extra,
            }
        )

    def _theta_record(self, w: int) -> tuple[RecordDict, int]:
        """θ as sent in round ``w`` (bottom level) and its bytes."""
        rd = RecordDict()
        sent = send_cts(
            self.be,
            rd,
            msg.THETA,
            self.theta,
            self._expect("theta", 0, None),
            w,
            self.param_count,
        )
        return rd, sent

    def _wire(self, t: int) -> int:
        """The round number messages of step ``t`` carry (participants require
        them to increase under a key, across runs: :meth:`_first_wire_round`)."""
        return t + self.wire_offset

    # ---- setup -----------------------------------------------------------------
    def setup(self) -> None:
        """Register participants, obtain the evaluation context and θ0."""
        self.nodes = wait_for_nodes(
            self.grid, self.cfg.num_participants, self.cfg.node_wait
        )
        log.info(
            "hedrl: %d participants registered; backend=%s param-set=%s",
            len(self.nodes),
            self.cfg.backend,
            self.params.id,
        )
        out = []
        for i, node in enumerate(self.nodes):
            task = ConfigRecord(
                {
                    "round": 0,
                    "backend": self.cfg.backend,
                    "send-context": int(i == 0),
                }
            )
            out.append(self._message(node, msg.SETUP, RecordDict({msg.TASK: task}), 0))
        replies = exchange(self.grid, out, timeout=self.cfg.round_timeout)
        check_terminal(replies)
        infos = [
            setup_info(node, replies[node], context=i == 0)
            for i, node in enumerate(self.nodes)
        ]
        first = infos[0]
        for node, info in zip(self.nodes, infos, strict=True):
            if info["param-count"] != first["param-count"]:
                raise HeaderMismatch(
                    field=f"param-count of participant {node}",
                    expected=first["param-count"],
                    received=info["param-count"],
                )
        indices = [info["participant-index"] for info in infos]
        if len(set(indices)) != len(indices):
            raise HedrlError(f"participants report the same index twice: {indices}")
        self.indices = dict(zip(self.nodes, indices, strict=True))
        ctx_bytes = first["context"]
        self.be, self.fingerprint = keys.coordinator_backend(
            ctx_bytes, self.params, self.cfg.backend
        )
        expected = self.cfg.expect_fingerprint.strip().lower()
        if expected and expected != self.fingerprint:
            raise FingerprintMismatch(
                expected=expected,
                received=self.fingerprint,
                where="evaluation context vs expect-fingerprint",
            )
        for node, info in zip(self.nodes, infos, strict=True):
            if info["fingerprint"] != self.fingerprint:
                raise FingerprintMismatch(
                    expected=self.fingerprint,
                    received=str(info["fingerprint"]),
                    where=f"participant {node}",
                )
            if info["layout-digest"] != first["layout-digest"]:
                raise HeaderMismatch(
                    field="layout_digest",
                    expected=first["layout-digest"],
                    received=info["layout-digest"],
                )
        self.layout_digest = str(first["layout-digest"])
        self.param_count = int(first["param-count"])
        self.n_chunks = -(-self.param_count // self.params.slots)
        theta0 = receive_cts(
            self.be,
            replies[self.nodes[0]].content,
            msg.THETA,
            self._expect("theta", self.be.top_level, 0),
        )
        self.theta = [self.be.to_bottom(c) for c in theta0]
        self.state: list[tuple[Ct, Ct, Ct]] | None = None
        accepted_at = 0  # the round participants accepted the starting θ in
        if self._resume is not None:
            self.theta, self.state, self.start_round = resume_state(
                self.be,
                *self._resume,
                fingerprint=self.fingerprint,
                layout_digest=self.layout_digest,
            )
            meta = self._resume[0]
            accepted_at = int(meta.get("wire_round", self.start_round + 1))
        self.wire_offset = self._first_wire_round(infos, accepted_at) - (
            self.start_round + 1
        )
        workers = self.cfg.coordinator_workers
        if workers < 0:
            workers = auto_workers(self.n_chunks)
        if workers > 1 and not self.keep_aggregate:
            self.pool = ChunkPool(
                context=ctx_bytes,
                param_set=self.params.id,
                backend=self.cfg.backend,
                workers=workers,
                retain_memory=self.cfg.retain_freed_memory,
            )
        log.info(
            "hedrl: coordinator work %s",
            f"sharded over {workers} processes (this one and {workers - 1} workers)"
            if self.pool
            else "in-process"
            + (" (keep_aggregate: workers do not return Σx)" if workers > 1 else ""),
        )
        log.info(
            "hedrl: evaluation context accepted (no secret key), fingerprint %s…; "
            "%d parameters in %d chunks; results in %s",
            self.fingerprint[:16],
            self.param_count,
            self.n_chunks,
            self.out_dir,
        )

    def _first_wire_round(self, infos: list[Any], accepted_at: int) -> int:
        """The first round to send: above every round the participants handled
        under this key, and far enough above it that the starting θ (accepted
        in round ``accepted_at``, 0 for θ0) is within their step bound of the
        last θ each accepted: that θ is at most (last − accepted_at) steps away.
        """
        last = max(info["last-round"] for info in infos)
        first = self.start_round + 1
        if last:
            first = max(first, 2 * last - min(accepted_at, last) + 1)
            log.info(
                "hedrl: participants handled rounds up to %d under this key: this "
                "run's messages carry rounds from %d",
                last,
                first,
            )
        # the last message (the final θ) is sent one round after the last step
        end = first + self.cfg.num_rounds - self.start_round
        for node, info in zip(self.nodes, infos, strict=True):
            if end > info["max-rounds"]:
                raise HedrlError(
                    f"participant {node} serves rounds up to {info['max-rounds']} "
                    f"under this key and this run would need up to {end}: resume "
                    "an interrupted run with resume-from, or start with a fresh key"
                )
        return first

    # ---- one round ---------------------------------------------------------------
    def _draw_masks(self) -> list[np.ndarray]:
        """Fresh uniform masks in ±2^mask-bits for m, V, r of every chunk
        (name-major: all of m's chunks, then V's, then r's)."""
        bound = float(2**self.cfg.mask_bits)
        return [
            self._mask_rng.uniform(-bound, bound, self.params.slots)
            for _ in msg.STATE_NAMES
            for _ in range(self.n_chunks)
        ]

    def _mask_state(self) -> Premasked:
        """The current (m, V, r) plus newly drawn masks, per chunk (bottom level)."""
        assert self.state is not None
        masks = self._draw_masks()
        per_chunk = masks_by_chunk(masks, self.n_chunks)
        units = StateUnits.of(self.be, self.hp)
        chunks: list[tuple[Chunk, Chunk, Chunk]] = [
            mask_state(self.be, mvr, per, units)
            for mvr, per in zip(self.state, per_chunk, strict=True)
        ]
        return chunks, masks

    def _masked_state(
        self, into: RecordDict | None = None
    ) -> tuple[RecordDict, list[np.ndarray], int]:
        """m, V, r at the bottom level plus fresh masks, as records (added to
        ``into`` if given): (records, masks, bytes).

        The regular refresher gets the state the last step masked (in the
        workers, alongside the step); anyone else asking in the same round (a
        spare) gets newly drawn masks.
        """
        assert self.state is not None
        rd = RecordDict() if into is None else into
        chunks, masks = self._premasked or self._mask_state()
        self._premasked = None
        # every slot is refreshed, padding included: a padding slot left at
        # −mask after unmasking would overflow and corrupt the whole ciphertext
        sent = 0
        for j, name in enumerate(msg.STATE_NAMES):
            sent += send_cts(
                self.be,
                rd,
                msg.state_key("state", name),
                [chunk[j] for chunk in chunks],
                self._expect("state", 0, None, name),
                self._round,
                self.n_chunks * self.params.slots,
            )
        return rd, masks, sent

    def _refreshers(self, t: int) -> list[int]:
        """This round's refresher (rotating); a spare is asked only when it fails."""
        if self.state is None:
            return []
        return [self.nodes[t % len(self.nodes)]]

    def run_round(self, t: int) -> dict[str, Any]:
        """Exchange with every participant, refresh, and take HE-Adam step t."""
        w = self._round = self._wire(t)
        self._spare = {"node": None, "down": 0, "up": 0}
        self._step_timings = {}
        self._pool_chunks = None
        t0 = time.perf_counter()
        refreshers = self._refreshers(t)
        theta_rd, theta_bytes = self._theta_record(w)
        masks: dict[int, list[np.ndarray]] = {}
        out, down = [], 0
        for node in self.nodes:
            task = self._task(
                w, refresher=int(node in refreshers), init=int(self.state is None)
            )
            content = RecordDict({msg.TASK: task})
            content[msg.THETA] = theta_rd[msg.THETA]
            content[msg.THETA + ".hdr"] = theta_rd[msg.THETA + ".hdr"]
            down += theta_bytes
            if node in refreshers:
                _, masks[node], sent = self._masked_state(into=content)
                down += sent
            out.append(self._message(node, msg.TRAIN, content, w))
        t_send = time.perf_counter()
        replies = exchange(self.grid, out, timeout=self.cfg.round_timeout)
        t_recv = time.perf_counter()
        check_terminal(replies)
        accepted: list[Reply] = []
        missing: list[int] = []
        rejected: dict[str, str] = {}
        up = 0
        for node in self.nodes:
            reply = replies[node]
            if reply is None or reply.has_error():
                log.warning(
                    "hedrl: round %d: participant %d missing (%s)",
                    t,
                    node,
                    error_reason(reply),
                )
                missing.append(node)
                continue
            up += vector_bytes(reply.content)
            try:
                accepted.append(self._parse_reply(w, node, reply, masks.get(node)))
            except Exception as exc:  # one guard per reply: it never ends the run
                if not isinstance(exc, HedrlError):
                    exc = ReplyRejected(
                        participant=node, reason=f"{type(exc).__name__}: {exc}"
                    )
                log.warning(
                    "hedrl: round %d: reply of participant %d rejected: %s: %s",
                    t,
                    node,
                    type(exc).__name__,
                    exc,
                )
                rejected[str(node)] = f"{type(exc).__name__}: {exc}"
                missing.append(node)
        rec: dict[str, Any] = {"round": t, "backend": self.cfg.backend}
        stepped = False
        need = self.cfg.min_participants_for(len(self.nodes))
        refused = [
            n
            for n in self.nodes
            if replies[n] is not None
            and replies[n].has_error()
            and msg.REFUSED_CODE in error_reason(replies[n])
        ]
        rec["refused"] = refused
        if refused and 2 * len(refused) >= len(refused) + len(accepted):
            # key holders' content checks failed: θ_t is not to be built on
            rec["rolled_back"] = self._rollback(t, refused)
        elif len(accepted) < need:
            log.warning(
                "hedrl: round %d: %d of %d participants usable (< min-participants "
                "%d); step skipped, state kept",
                t,
                len(accepted),
                len(self.nodes),
                need,
            )
        else:
            if refused:
                # θ_t decrypted fine for a majority: one participant refusing it
                # round after round must not be able to stall training
                log.warning(
                    "hedrl: round %d: participant(s) %s refused θ that %d other(s) "
                    "accepted; a minority refusal counts as missing, not as a bad θ",
                    t,
                    refused,
                    len(accepted),
                )
            self._good = Good(self.theta, self.state, t - 1)  # θ_t accepted
            try:
                stepped = self._aggregate_and_step(
                    t, accepted, refreshers, rejected, missing
                )
            except HedrlError as exc:
                log.warning("hedrl: round %d: step skipped, state kept: %s", t, exc)
        # replies that survived parsing and report episodes
        reporting = [r for r in accepted if r.episodes is not None]
        if len(reporting) < need:  # one reply's returns are not the round's
            reporting = []
        episodes = sum(r.episodes or 0 for r in reporting)
        ret_sum = sum(r.return_sum or 0.0 for r in reporting)
        rec.update(
            {
                "return_mean": (ret_sum / episodes) if episodes else None,
                "episodes": episodes,
                "env_steps": sum(r.env_steps for r in accepted),
                "upload_bytes": up + self._spare["up"],
                "broadcast_bytes": down + self._spare["down"],
                "spare_refresher": self._spare["node"],
                "participants": len(accepted),
                "missing": missing,
                "rejected": rejected,
                "crypto/gradient_bytes": (
                    statistics.median(r.gradient_bytes for r in accepted)
                    if accepted
                    else None
                ),
            }
        )
        done = time.perf_counter()
        rec.update(
            coordinator_s=(t_send - t0) + (done - t_recv),  # parsing included
            round_s=done - t0,
            stepped=stepped,
            **{"time/exchange_s": t_recv - t_send, "time/prepare_s": t_send - t0},
            # CPU seconds per stage, summed over chunks (and workers); with
            # workers also the pool's wall seconds in this process (pool_*)
            **{f"time/{k}": v for k, v in self._step_timings.items()},
            **{"pool/chunks": self._pool_chunks},
            **participant_stages(accepted),
        )
        return rec

    def _rollback(self, t: int, refused: list[int]) -> bool:
        """A majority refused θ_t: return to the last θ a majority accepted."""
        if self._good is None:
            log.error(
                "hedrl: round %d: θ refused by %s and no good state to roll back to",
                t,
                refused,
            )
            return False
        self.theta, self.state = self._good.theta, self._good.state
        self._premasked = None  # masked the refused step's state
        log.warning(
            "hedrl: round %d: θ refused by participant(s) %s; rolled back to the "
            "last θ a majority accepted",
            t,
            refused,
        )
        return True

    def _parse_reply(
        self, w: int, node: int, reply: Message, masks: list[np.ndarray] | None
    ) -> Reply:
        """Validate one reply completely (:func:`coordinator.replies.parse_reply`)."""
        return parse_reply(
            reply.content,
            t=w,
            node=node,
            masks=masks,
            be=self.be,
            expect=self._expect,
            squares=self.state is None,
        )

    # ---- the final θ ----------------------------------------------------------------
    def finish(self, t: int) -> dict[str, Any]:
        """After the last step: the final θ to every participant, then every
        participant's tag on it to each of them. A participant releases a θ
        (hedrl-release) only if it accepted it and a majority of the federation
        tagged the same ciphertext. Returns summary.json's ``final``; a failure
        here is recorded there, it does not end the run unfinished."""
        w = self._wire(t + 1)
        try:
            return self._finish(w)
        except Exception as exc:  # the run's results are written regardless
            log.error("hedrl: final θ (round %d): %s: %s", w, type(exc).__name__, exc)
            return {"round": w, "error": f"{type(exc).__name__}: {exc}"}

    def _finish(self, w: int) -> dict[str, Any]:
        theta_rd, _ = self._theta_record(w)
        out = []
        for node in self.nodes:
            content = RecordDict({msg.TASK: self._task(w)})
            for key in (msg.THETA, msg.THETA + ".hdr"):
                content[key] = theta_rd[key]
            out.append(self._message(node, msg.FINAL, content, w))
        replies = exchange(self.grid, out, timeout=self.cfg.round_timeout)
        tags: dict[int, bytes] = {}
        for node in self.nodes:
            reply = replies[node]
            if reply is None or reply.has_error():
                why = error_reason(reply)
                log.warning("hedrl: final θ: participant %d: %s", node, why)
                continue
            rec = reply.content.get(msg.FINAL_REPLY)
            tag = None if not isinstance(rec, ConfigRecord) else rec.get("tag")
            index = (
                None
                if not isinstance(rec, ConfigRecord)
                else rec.get("participant-index")
            )
            usable = (
                type(tag) is bytes
                and len(tag) == 32
                and type(index) is int
                and index == self.indices[node]  # what it reported at setup
            )
            if usable:
                tags[index] = tag
            else:
                log.warning("hedrl: final θ: participant %d sent no usable tag", node)
        confirmed: list[int] = []
        if tags:
            record = ConfigRecord(
                {"indices": list(tags), "tags": [tags[i] for i in tags]}
            )
            out = [
                self._message(
                    node,
                    msg.CONFIRM,
                    RecordDict({msg.TASK: self._task(w), msg.FINAL_TAGS: record}),
                    w,
                )
                for node in self.nodes
            ]
            replies = exchange(self.grid, out, timeout=self.cfg.round_timeout)
            for node in self.nodes:
                reply = replies[node]
                if reply is not None and not reply.has_error():
                    confirmed.append(node)
                else:
                    why = error_reason(reply)
                    log.warning("hedrl: final θ: participant %d: %s", node, why)
        log.info(
            "hedrl: final θ (round %d) accepted by %d of %d participants and "
            "confirmed by %d; release it on a participant's host: hedrl-release "
            "--keys <its key directory> --out policy.npz",
            w,
            len(tags),
            len(self.nodes),
            len(confirmed),
        )
        return {"round": w, "tagged": len(tags), "confirmed": confirmed}

    # ---- the run -------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Setup, then rounds until num-rounds or stop-return; write metrics."""
        start = time.perf_counter()
        try:
            return self._run(start)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the worker processes, if any."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None
