"""The coordinator's run: setup, then one loop over rounds.

:meth:`Federation.run` reads like Flower's ``Strategy.start()``: setup, then
for each round :meth:`Federation.run_round` (broadcast, exchange, collect,
decide, step; :mod:`coordinator.rounds`, :mod:`coordinator.step`), its row to
``metrics.jsonl``, a checkpoint every ``checkpoint-every`` rounds; at the end
the final θ (:mod:`coordinator.final`), the last checkpoint and
``summary.json``. A round's data travel in one record
(:class:`~coordinator.rounds.Round`); what lasts from round to round — θ, the
optimiser state, the last θ a majority accepted — lives here.

The coordinator holds only the evaluation context it receives from a
participant at setup (refusing one with a secret key) and checks that every
participant reports the same context fingerprint.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from coordinator.exchange import check_terminal, exchange, wait_for_nodes
from coordinator.final import finish
from coordinator.masking import StateMasker
from coordinator.persistence import (
    Good,
    Resume,
    checkpoint,
    load_resume,
    resume_state,
)
from coordinator.relay import RelayStore
from coordinator.rounds import Round, broadcast, collect, decide
from coordinator.run_dir import open_metrics, run_dir
from coordinator.setup import agree, first_wire_round, make_pool, setup_info
from coordinator.step import ledger_entry, take_step
from coordinator.summary import log_round, progress_for, summary
from coordinator.workers import ChunkPool
from protocol import keys, ledger
from protocol import messages as msg
from protocol.backend import Backend, Ct
from protocol.codec import receive_cts, send_cts
from protocol.config import RunConfig
from protocol.errors import FingerprintMismatch, HedrlError, RunEnded
from protocol.memory import retain_freed_memory
from protocol.packing import n_chunks
from protocol.params import get_param_set
from protocol.wire import Expect

log = logging.getLogger("flwr.hedrl.coordinator")


class Federation:
    """One training run driven through a Flower ``Grid``."""

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
        self.grid, self.cfg, self.run_id = grid, cfg, run_id
        self.params = get_param_set(cfg.param_set)
        self.hp = cfg.hyper
        self.out_dir = run_dir(cfg)
        self.start_round = 0
        self.wire_offset = 0  # set at setup (first_wire_round)
        self.key_run_id = run_id
        self.resume: Resume | None = None
        if cfg.resume_from:
            path = Path(cfg.resume_from).expanduser()
            self.resume = load_resume(path, cfg, self.params.id)
            self.key_run_id = int(self.resume[0]["key_run_id"])
        self.history: list[dict[str, Any]] = []
        self.pool: ChunkPool | None = None
        self.keep_aggregate = False  # benchmarks: keep Σ x of each step
        self.last_aggregate: list[Ct] | None = None
        # set at setup
        self.be: Backend
        self.fingerprint = ""
        self.layout_digest = ""
        self.param_count = self.n_chunks = 0
        self.nodes: list[int] = []
        self.indices: dict[int, int] = {}  # node → participant index
        self.masker: StateMasker
        self.theta: list[Ct | bytes] = []
        self.state: list[tuple[Ct, Ct, Ct]] | None = None
        # the last θ a majority accepted, its state and the steps it includes:
        # what a rollback returns to and what periodic checkpoints hold
        self.good: Good | None = None
        self.head = 0  # the step whose output self.theta is (0: θ0)
        self.ledger: ledger.Writer | None = None
        self.relays = RelayStore()
        # per node, the (step, chain hash) it last replayed: relays start there
        self.replayed: dict[int, tuple[int, str]] = {}

    # ---- what every message needs ----------------------------------------------
    def expect(
        self, kind: str, level: int, round_: int | None, name: str | None = None
    ) -> Expect:
        """The header fields of a vector of this run."""
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

    def message(self, node: int, mtype: str, content: RecordDict, wire: int) -> Message:
        return Message(
            content=content, dst_node_id=node, message_type=mtype, group_id=str(wire)
        )

    def task(self, wire: int, **extra: Any) -> ConfigRecord:
        return ConfigRecord(
            {
                "round": wire,
                "fingerprint": self.fingerprint,
                "backend": self.cfg.backend,
                **extra,
            }
        )

    def wire(self, t: int) -> int:
        """The round number messages of step ``t`` carry (participants require
        them to increase under a key, across runs)."""
        return t + self.wire_offset

    def theta_record(self, wire: int) -> tuple[RecordDict, int]:
        """θ as sent in round ``wire`` (bottom level) and its bytes."""
        rd = RecordDict()
        sent = send_cts(
            self.be,
            rd,
            msg.THETA,
            self.theta,
            self.expect("theta", 0, None),
            wire,
            self.param_count,
        )
        return rd, sent

    def relay_record(self, node: int) -> ConfigRecord:
        """The steps to θ and their sealed updates, for ``node`` (protocol/relay.py)."""
        return self.relays.relay(self.head, self.replayed.get(node, (0, ""))).record()

    def refreshers(self, t: int) -> list[int]:
        """Step t's refresher (rotating); none before there is a state."""
        return [] if self.state is None else [self.nodes[t % len(self.nodes)]]

    def masked_state(
        self, wire: int, into: RecordDict | None = None
    ) -> tuple[RecordDict, list[np.ndarray], int]:
        """m, V, r at the bottom level plus masks, as records of round ``wire``
        (added to ``into`` if given): (records, masks, bytes)
        (:meth:`StateMasker.records`)."""
        assert self.state is not None
        return self.masker.records(
            self.state, lambda name: self.expect("state", 0, None, name), wire, into
        )

    # ---- setup -----------------------------------------------------------------------
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
        out = [
            self.message(
                node,
                msg.SETUP,
                RecordDict(
                    {
                        msg.TASK: ConfigRecord(
                            {
                                "round": 0,
                                "backend": self.cfg.backend,
                                "send-context": int(i == 0),
                            }
                        )
                    }
                ),
                0,
            )
            for i, node in enumerate(self.nodes)
        ]
        replies = exchange(self.grid, out, timeout=self.cfg.round_timeout)
        check_terminal(replies)
        infos = [
            setup_info(node, replies[node], context=i == 0)
            for i, node in enumerate(self.nodes)
        ]
        ctx_bytes = infos[0]["context"]
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
        self.indices = agree(self.nodes, infos, self.fingerprint)
        self.layout_digest = infos[0]["layout-digest"]
        self.param_count = infos[0]["param-count"]
        self.n_chunks = n_chunks(self.param_count, self.params.slots)
        self.masker = StateMasker(self.be, self.hp, self.n_chunks, self.cfg.mask_bits)
        theta0 = receive_cts(
            self.be,
            replies[self.nodes[0]].content,  # type: ignore[union-attr]
            msg.THETA,
            self.expect("theta", self.be.top_level, 0),
        )
        self.theta = [self.be.to_bottom(c) for c in theta0]
        accepted_at = 0  # the round participants accepted the starting θ in
        if self.resume is not None:
            self.theta, self.state, self.start_round = resume_state(
                self.be,
                *self.resume,
                fingerprint=self.fingerprint,
                layout_digest=self.layout_digest,
            )
            accepted_at = int(self.resume[0].get("wire_round", self.start_round + 1))
            self.head = int(self.resume[0].get("head", self.start_round))
        carried = None
        if self.cfg.resume_from:
            carried = Path(self.cfg.resume_from).expanduser().parent / ledger.FILE
            self.relays = RelayStore(ledger.read_entries(carried))
        self.ledger = ledger.Writer(self.out_dir / ledger.FILE, carried)
        self.replayed = {
            node: (info["twin-step"], info["twin-hash"])
            for node, info in zip(self.nodes, infos, strict=True)
        }
        self.wire_offset = first_wire_round(
            self.nodes,
            infos,
            start_round=self.start_round,
            accepted_at=accepted_at,
            num_rounds=self.cfg.num_rounds,
        ) - (self.start_round + 1)
        self.pool = make_pool(self.cfg, ctx_bytes, self.n_chunks, self.keep_aggregate)
        log.info(
            "hedrl: evaluation context accepted (no secret key), fingerprint %s…; "
            "%d parameters in %d chunks; results in %s",
            self.fingerprint[:16],
            self.param_count,
            self.n_chunks,
            self.out_dir,
        )

    # ---- the run -----------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Setup, then rounds until num-rounds or stop-return; the final θ;
        metrics.jsonl, checkpoints and summary.json."""
        start = time.perf_counter()
        try:
            self.setup()
            metrics_path = self.out_dir / "metrics.jsonl"
            progress = progress_for(self)
            t = self.start_round
            with open_metrics(self.out_dir, self.start_round) as fh:
                for t in range(self.start_round + 1, self.cfg.num_rounds + 1):
                    try:
                        row = self.run_round(t)
                    except RunEnded as exc:
                        log.error("hedrl: round %d: %s", t, exc)
                        checkpoint(self, t)  # the last θ a majority accepted
                        raise
                    fh.write(json.dumps(row) + "\n")
                    fh.flush()
                    self.history.append(row)
                    if self.on_round is not None:
                        self.on_round(t, self)
                    last20 = progress.add(t, row)
                    log_round(self, t, row, progress)
                    if t % self.cfg.checkpoint_every == 0:
                        checkpoint(self, t)
                    stop = self.cfg.stop_return
                    if stop > 0 and last20 is not None and last20 >= stop:
                        log.info(
                            "hedrl: mean return %.1f ≥ stop-return %.1f at round %d",
                            last20,
                            stop,
                            t,
                        )
                        break
            ckpt = checkpoint(self, t, final=True)
            assert ckpt is not None
            final = finish(self, t)
            out = summary(self, t, progress, time.perf_counter() - start, ckpt)
            out["final"] = final
            (self.out_dir / "summary.json").write_text(json.dumps(out, indent=2))
            log.info(
                "hedrl: done after %d rounds; metrics %s; checkpoint %s",
                t,
                metrics_path,
                ckpt,
            )
            return out
        finally:
            self.close()

    def run_round(self, t: int) -> dict[str, Any]:
        """Round t: broadcast θ, exchange, collect, decide, HE-Adam step t;
        its metrics.jsonl row."""
        now = time.perf_counter
        rnd = Round(t=t, wire=self.wire(t), started=now())
        rnd.sent = broadcast(self, t, rnd.wire)
        rnd.sent_at = now()
        replies = exchange(self.grid, rnd.sent.messages, timeout=self.cfg.round_timeout)
        rnd.received_at = now()
        check_terminal(replies)
        rnd.got = collect(self, t, rnd.wire, replies, rnd.sent.masks)
        for reply in rnd.got.accepted:  # it replayed what was relayed to it
            self.replayed[reply.node] = (self.head, self.relays.hash[self.head])
        need = self.cfg.min_participants_for(len(self.nodes))
        decision = decide(t, rnd.got, self.nodes, need)
        if decision == "rollback":
            rnd.rolled_back = self.rollback(t, rnd.got.refused)
        elif decision == "step":
            self.good = Good(self.theta, self.state, t - 1, self.head)  # θ_t accepted
            try:
                stepped = take_step(self, rnd)
            except HedrlError as exc:
                log.warning("hedrl: round %d: step skipped, state kept: %s", t, exc)
            else:
                res = stepped.result
                self.last_aggregate = res.aggregate
                self.theta = list(res.theta)  # type: ignore[arg-type]
                self.state = list(res.state)  # type: ignore[arg-type]
                assert res.masked is not None
                self.masker.pending = (res.masked, stepped.masks_next)
                rnd.stepped = True
                assert self.ledger is not None
                entry = ledger_entry(self, t, rnd.wire, stepped)
                self.ledger.step(entry)
                senders = stepped.used + (stepped.init[1] if stepped.init else [])
                self.relays.add(
                    entry, {(self.indices[r.node], rnd.wire): r.sealed for r in senders}
                )
                self.head = t  # θ is step t's output
        return rnd.row(self.cfg.backend, need, now())

    def rollback(self, t: int, refused: list[int]) -> bool:
        """A majority refused θ_t: return to the last θ a majority accepted."""
        if self.good is None:
            log.error(
                "hedrl: round %d: θ refused by %s and no good state to roll back to",
                t,
                refused,
            )
            return False
        self.theta, self.state, self.head = (
            self.good.theta,
            self.good.state,
            self.good.head,
        )
        self.masker.pending = None  # masked the refused step's state
        log.warning(
            "hedrl: round %d: θ refused by participant(s) %s; rolled back to the "
            "last θ a majority accepted",
            t,
            refused,
        )
        return True

    def close(self) -> None:
        """Stop the worker processes, if any; close the ledger."""
        if self.ledger is not None:
            self.ledger.close()
        if self.pool is not None:
            self.pool.close()
            self.pool = None
