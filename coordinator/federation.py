"""The coordinator's round loop: setup, encrypted sum, refresh, HE-Adam, metrics.

The coordinator holds only the evaluation context it receives from a
participant at setup (refusing one with a secret key) and checks that every
participant reports the same context fingerprint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from coordinator.exchange import exchange, wait_for_nodes
from coordinator.workers import BadChunks, ChunkPool, auto_workers, step_chunks
from protocol import keys
from protocol import messages as msg
from protocol.backend import Backend, Ct
from protocol.checkpoint import read_checkpoint, write_checkpoint
from protocol.codec import receive_cts, send_cts
from protocol.config import RunConfig, expand_dir
from protocol.errors import (
    ConfigError,
    FingerprintMismatch,
    HeaderMismatch,
    HedrlError,
    WireFormatError,
)
from protocol.params import get_param_set
from protocol.records import read_vector
from protocol.wire import Expect

log = logging.getLogger("flwr.hedrl.coordinator")


def _vector_bytes(rd: RecordDict) -> int:
    total = 0
    for value in rd.values():
        if isinstance(value, ConfigRecord):
            total += sum(len(v) for v in value.values() if isinstance(v, bytes))
        elif hasattr(value, "values"):
            total += sum(len(a.data) for a in value.values() if hasattr(a, "data"))
    return total


class _Good(NamedTuple):
    """θ a majority accepted in round ``step + 1``, with the state it came with."""

    theta: list[Ct]
    state: list[tuple[Ct, Ct, Ct]] | None
    step: int


@dataclass
class _Reply:
    """One participant's reply, headers validated (ciphertexts parse at the step)."""

    node: int
    gradient: list[bytes]
    squares: list[Ct] | None
    refresh: list[list[bytes]] | None  # per state name, per chunk (still masked)
    masks: list[np.ndarray] | None
    episodes: int
    return_sum: float
    env_steps: int
    gradient_bytes: int


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
        self.key_run_id = run_id
        self._resume: tuple[dict[str, Any], dict[str, list[bytes]]] | None = None
        if cfg.resume_from:
            self._resume = self._load_resume(Path(cfg.resume_from).expanduser())
            self.key_run_id = int(self._resume[0]["key_run_id"])
        # the last θ a majority accepted, its state and the rounds it includes:
        # what a rollback returns to and what periodic checkpoints hold
        self._good: _Good | None = None
        self.be: Backend
        self.fingerprint = ""
        self.history: list[dict[str, Any]] = []
        self.pool: ChunkPool | None = None
        self.keep_aggregate = False  # benchmarks: keep Σ x of each step
        self._spare: dict[str, Any] = {"node": None, "down": 0, "up": 0}  # per round
        self._step_timings: dict[str, float] = {}  # per round

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
                "key-run-id": self.key_run_id,
                "round": round_,
                "fingerprint": self.fingerprint,
                "backend": self.cfg.backend,
                **extra,
            }
        )

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
                    "participant-index": i,
                    "key-run-id": self.key_run_id,
                }
            )
            out.append(self._message(node, msg.SETUP, RecordDict({msg.TASK: task}), 0))
        replies = exchange(self.grid, out, timeout=self.cfg.round_timeout)
        infos = []
        for node in self.nodes:
            reply = replies[node]
            if reply is None or reply.has_error():
                err = "timeout" if reply is None else reply.error.reason
                raise HedrlError(f"participant {node} failed setup: {err}")
            infos.append(reply.content[msg.SETUP_REPLY])
        first = infos[0]
        ctx_bytes = bytes(first["context"])
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
        if self._resume is not None:
            self._apply_resume(*self._resume)
        workers = self.cfg.coordinator_workers
        if workers < 0:
            workers = auto_workers(self.n_chunks)
        if workers > 0 and not self.keep_aggregate:
            self.pool = ChunkPool(
                context=ctx_bytes,
                param_set=self.params.id,
                backend=self.cfg.backend,
                workers=workers,
            )
        log.info(
            "hedrl: coordinator work %s",
            f"sharded over {workers} worker processes"
            if self.pool
            else "in-process"
            + (" (keep_aggregate: workers do not return Σx)" if workers > 0 else ""),
        )
        log.info(
            "hedrl: evaluation context accepted (no secret key), fingerprint %s…; "
            "%d parameters in %d chunks; results in %s",
            self.fingerprint[:16],
            self.param_count,
            self.n_chunks,
            self.out_dir,
        )

    def _load_resume(self, path: Path) -> tuple[dict[str, Any], dict[str, list[bytes]]]:
        try:
            meta, vectors = read_checkpoint(path)
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(
                f"resume-from {path}: unreadable checkpoint: {exc}"
            ) from exc
        for key, want in (
            ("backend", self.cfg.backend),
            ("param_set", self.params.id),
            ("env_id", self.cfg.env_id),
        ):
            if meta.get(key) != want:
                raise ConfigError(
                    f"resume-from {path}: checkpoint {key} is {meta.get(key)!r}, "
                    f"this run's is {want!r}"
                )
        if int(meta["step"]) >= self.cfg.num_rounds:
            raise ConfigError(
                f"resume-from {path}: checkpoint is at step {meta['step']}, "
                f"num-rounds is {self.cfg.num_rounds}: nothing left to run"
            )
        meta.setdefault("key_run_id", meta["run_id"])
        return meta, vectors

    def _apply_resume(
        self, meta: dict[str, Any], vectors: dict[str, list[bytes]]
    ) -> None:
        """Replace θ0 by the checkpoint's θ (and m, V, r); continue after its step."""
        if meta["fingerprint"] != self.fingerprint:
            raise FingerprintMismatch(
                expected=meta["fingerprint"],
                received=self.fingerprint,
                where="participants' key vs checkpoint",
            )
        if meta["layout_digest"] != self.layout_digest:
            raise HeaderMismatch(
                field="layout_digest",
                expected=meta["layout_digest"],
                received=self.layout_digest,
            )
        levels = meta["levels"]
        self.theta = [
            self.be.load(c, level=int(levels["theta"])) for c in vectors["theta"]
        ]
        if all(n in vectors for n in msg.STATE_NAMES):
            per = [
                [self.be.load(c, level=int(levels[n])) for c in vectors[n]]
                for n in msg.STATE_NAMES
            ]
            self.state = list(zip(*per, strict=True))
        self.start_round = int(meta["step"])
        log.info(
            "hedrl: resumed from a checkpoint at step %d (key of run %s)",
            self.start_round,
            self.key_run_id,
        )

    # ---- one round ---------------------------------------------------------------
    def _masked_state(self) -> tuple[RecordDict, list[np.ndarray], int]:
        assert self.state is not None
        bound = float(2**self.cfg.mask_bits)
        rd = RecordDict()
        masks, sent = [], 0
        for j, name in enumerate(msg.STATE_NAMES):
            cts = []
            for chunk in self.state:
                mask = self._mask_rng.uniform(-bound, bound, self.params.slots)
                masks.append(mask)
                cts.append(self.be.add_plain(self.be.to_bottom(chunk[j]), mask))
            # every slot is refreshed, padding included: a padding slot left at
            # −mask after unmasking would overflow and corrupt the whole ciphertext
            sent += send_cts(
                self.be,
                rd,
                msg.state_key("state", name),
                cts,
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

    def _spare_refresh(
        self, t: int, tried: list[int], replied: list[int]
    ) -> _Reply | None:
        """Ask the next participant that replied this round to refresh m, V, r.

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
        srd, masks, sent = self._masked_state()
        for key, value in srd.items():
            content[key] = value
        self._spare.update(node=spare, down=sent)
        reply = exchange(
            self.grid,
            [self._message(spare, msg.REFRESH, content, t)],
            timeout=self.cfg.round_timeout,
        )[spare]
        why = None
        refresh = None
        if reply is None or reply.has_error():
            why = "timeout" if reply is None else reply.error.reason
        else:
            self._spare["up"] = _vector_bytes(reply.content)
            try:
                refresh = [
                    read_vector(
                        reply.content,
                        msg.state_key("refresh", name),
                        self._expect("refresh", self.be.top_level, t, name),
                    )[1]
                    for name in msg.STATE_NAMES
                ]
            except HedrlError as exc:
                why = f"{type(exc).__name__}: {exc}"
        if refresh is None:
            log.warning(
                "hedrl: round %d: spare refresher %d failed too: %s", t, spare, why
            )
            return None
        return _Reply(spare, [], None, refresh, masks, 0, 0.0, 0, 0)

    def run_round(self, t: int) -> dict[str, Any]:
        """Exchange with every participant, refresh, and take HE-Adam step t."""
        self._round = t
        self._spare = {"node": None, "down": 0, "up": 0}
        self._step_timings = {}
        t0 = time.perf_counter()
        refreshers = self._refreshers(t)
        theta_rd = RecordDict()
        theta_bytes = send_cts(
            self.be,
            theta_rd,
            msg.THETA,
            self.theta,
            self._expect("theta", 0, None),
            t,
            self.param_count,
        )
        masks: dict[int, list[np.ndarray]] = {}
        out, down = [], 0
        for node in self.nodes:
            task = self._task(
                t,
                refresher=int(node in refreshers),
                init=int(self.state is None),
                **{"num-participants": len(self.nodes)},
            )
            content = RecordDict({msg.TASK: task})
            content[msg.THETA] = theta_rd[msg.THETA]
            content[msg.THETA + ".hdr"] = theta_rd[msg.THETA + ".hdr"]
            down += theta_bytes
            if node in refreshers:
                srd, masks[node], sent = self._masked_state()
                for key, value in srd.items():
                    content[key] = value
                down += sent
            out.append(self._message(node, msg.TRAIN, content, t))
        t_send = time.perf_counter()
        replies = exchange(self.grid, out, timeout=self.cfg.round_timeout)
        t_recv = time.perf_counter()
        accepted: list[_Reply] = []
        missing: list[int] = []
        rejected: dict[str, str] = {}
        up = 0
        for node in self.nodes:
            reply = replies[node]
            if reply is None or reply.has_error():
                why = "timeout" if reply is None else reply.error.reason
                log.warning(
                    "hedrl: round %d: participant %d missing (%s)", t, node, why
                )
                missing.append(node)
                continue
            up += _vector_bytes(reply.content)
            try:
                accepted.append(self._parse_reply(t, node, reply, masks.get(node)))
            except HedrlError as exc:
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
            and "ThetaRejected" in replies[n].error.reason
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
            self._good = _Good(self.theta, self.state, t - 1)  # θ_t accepted
            try:
                stepped = self._aggregate_and_step(
                    t, accepted, refreshers, rejected, missing
                )
            except HedrlError as exc:
                log.warning("hedrl: round %d: step skipped, state kept: %s", t, exc)
        episodes = sum(r.episodes for r in accepted)  # replies that survived parsing
        ret_sum = sum(r.return_sum for r in accepted)
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
            # CPU seconds per stage, summed over chunks (and workers)
            **{f"time/{k}": v for k, v in self._step_timings.items()},
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
        log.warning(
            "hedrl: round %d: θ refused by participant(s) %s (content check); "
            "rolled back to the last θ every participant accepted",
            t,
            refused,
        )
        return True

    def _parse_reply(
        self, t: int, node: int, reply: Message, masks: list[np.ndarray] | None
    ) -> _Reply:
        """Validate one reply completely (headers before ciphertexts) or raise.

        Nothing here touches the coordinator's state, so a rejected reply leaves
        it unchanged; the round continues without it.
        """
        be, top = self.be, self.be.top_level
        content = reply.content
        metrics = content.get(msg.METRICS)
        if metrics is None:
            raise WireFormatError("reply carries no metrics record")
        try:
            episodes = int(metrics["episodes"])
            return_sum = float(metrics["return-sum"])
            env_steps = int(metrics["env-steps"])
        except (KeyError, TypeError, ValueError) as exc:
            raise WireFormatError(f"metrics record malformed: {exc}") from exc
        if episodes < 0 or env_steps < 0 or not np.isfinite(return_sum):
            raise WireFormatError(
                f"metrics out of range: episodes={episodes}, env-steps={env_steps}, "
                f"return-sum={return_sum}"
            )
        _, grad = read_vector(content, msg.GRADIENT, self._expect("gradient", top, t))
        squares = None
        if self.state is None:
            squares = receive_cts(
                be, content, msg.SQUARES, self._expect("squares", top, t)
            )
        refresh = None
        if masks is not None:
            try:
                refresh = [
                    read_vector(
                        content,
                        msg.state_key("refresh", name),
                        self._expect("refresh", top, t, name),
                    )[1]
                    for name in msg.STATE_NAMES
                ]
            except HedrlError as exc:
                log.warning(
                    "hedrl: round %d: refresh of participant %d unusable: %s",
                    t,
                    node,
                    exc,
                )
                refresh = None
        gbytes = _vector_bytes(
            RecordDict({k: content[k] for k in (msg.GRADIENT, msg.GRADIENT + ".hdr")})
        )
        return _Reply(
            node, grad, squares, refresh, masks, episodes, return_sum, env_steps, gbytes
        )

    def _aggregate_and_step(
        self,
        t: int,
        accepted: list[_Reply],
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
            sq = accepted[0].squares
            assert sq is not None
            for r in accepted[1:]:
                assert r.squares is not None
                sq = [be.add(a, b) for a, b in zip(sq, r.squares, strict=True)]
            fresh = self._initial_state(
                t, accepted[0].node, sq, len(self.nodes) / len(accepted)
            )
        spares: list[_Reply] = []
        tried = list(refreshers)
        ref: _Reply | None = None  # the refresh in use (None in round 1: V0)
        while True:
            k = len(self.nodes) / len(accepted)
            if fresh is not None:
                state = list(zip(*fresh, strict=True))
                level, unmask = be.top_level, None
            else:
                by_node = {r.node: r for r in accepted}
                usable = [
                    by_node[n]
                    for n in refreshers
                    if n in by_node and by_node[n].refresh is not None
                ] + [r for r in spares if r.refresh is not None]
                if not usable and self.cfg.spare_refresher and len(tried) < 2:
                    spare = self._spare_refresh(t, tried, list(by_node))
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
                level = be.top_level
                n = self.n_chunks
                unmask = [
                    [ref.masks[j * n + i] for j in range(len(msg.STATE_NAMES))]
                    for i in range(n)
                ]
            grads = [[r.gradient[i] for r in accepted] for i in range(self.n_chunks)]
            args = (self.theta, state, level, unmask, grads, t, self.hp)
            try:
                if self.pool is not None:
                    res = self.pool.step(*args, optimizer=self.cfg.optimizer, k=k)
                else:
                    res = step_chunks(
                        be,
                        *args,
                        optimizer=self.cfg.optimizer,
                        k=k,
                        keep_aggregate=self.keep_aggregate,
                    )
            except BadChunks as exc:
                bad = {f.index for f in exc.failures if f.source == "gradient"}
                for f in exc.failures:
                    if f.source == "gradient":
                        node = accepted[f.index].node
                        rejected.setdefault(str(node), f.error)
                    else:  # only refresh chunks are not gradients
                        assert ref is not None, f"{f.source} chunk without a refresh"
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
        return True

    def _initial_state(
        self, t: int, refresher: int, sq: list[Ct], k: float
    ) -> list[list[Ct]]:
        """Round 1: a key holder turns Σ w·g² (times k = K/K') into m0, V0, r0."""
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
        if reply is None or reply.has_error():
            raise HedrlError(f"refresher {refresher} did not return V0")
        return [
            receive_cts(
                self.be,
                reply.content,
                msg.state_key("v0", n),
                self._expect("v0", self.be.top_level, t, n),
            )
            for n in msg.STATE_NAMES
        ]

    # ---- outputs -------------------------------------------------------------------
    def checkpoint(self, t: int, *, final: bool = False) -> Path | None:
        """Write θ, m, V, r and the step counter atomically.

        A periodic checkpoint holds the last θ a majority of participants
        accepted (with the state and step count it came with), never a θ that
        nobody has checked yet: a coordinator that crashes right after a forged
        or corrupted step resumes from a state its key holders vouched for. The
        final checkpoint holds the run's last state, the one to release.
        """
        path = self.out_dir / "checkpoint.npz"
        if final:
            theta, state, step = self.theta, self.state, t
        elif self._good is None:
            log.info("hedrl: round %d: no accepted θ yet, no checkpoint", t)
            return None
        else:
            theta, state, step = self._good
        vectors = {"theta": [self.be.dump(c) for c in theta]}
        levels = {"theta": 0}
        if state is not None:
            for j, name in enumerate(msg.STATE_NAMES):
                vectors[name] = [self.be.dump(c[j]) for c in state]
                levels[name] = state[0][j].level
        meta = {
            "step": step,
            "run_id": self.run_id,
            "key_run_id": self.key_run_id,
            "backend": self.cfg.backend,
            "param_set": self.params.id,
            "fingerprint": self.fingerprint,
            "layout_digest": self.layout_digest,
            "param_count": self.param_count,
            "levels": levels,
            "env_id": self.cfg.env_id,
        }
        write_checkpoint(path, meta, vectors)
        return path

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

    def _run(self, start: float) -> dict[str, Any]:
        self.setup()
        metrics_path = self.out_dir / "metrics.jsonl"
        returns: list[float] = []
        reached: dict[str, int | None] = {"195": None, "475": None}
        t = 0
        with open(metrics_path, "w") as fh:
            for t in range(self.start_round + 1, self.cfg.num_rounds + 1):
                rec = self.run_round(t)
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                self.history.append(rec)
                if self.on_round is not None:
                    self.on_round(t, self)
                if rec["return_mean"] is not None:
                    returns.append(rec["return_mean"])
                last20 = statistics.fmean(returns[-20:]) if len(returns) >= 20 else None
                for key in reached:
                    if (
                        reached[key] is None
                        and last20 is not None
                        and last20 >= float(key)
                    ):
                        reached[key] = t
                rm = rec["return_mean"]
                log.info(
                    "hedrl: round %d/%d %s return %s (%d episodes) last-20 %s | "
                    "%.2f s/round, coordinator %.2f s | up %.1f kB, down %.1f kB",
                    t,
                    self.cfg.num_rounds,
                    self.cfg.backend,
                    "-" if rm is None else f"{rm:.1f}",
                    rec["episodes"],
                    "-" if last20 is None else f"{last20:.1f}",
                    rec["round_s"],
                    rec["coordinator_s"],
                    rec["upload_bytes"] / 1e3,
                    rec["broadcast_bytes"] / 1e3,
                )
                if t % self.cfg.checkpoint_every == 0:
                    self.checkpoint(t)
                if (
                    self.cfg.stop_return > 0
                    and last20 is not None
                    and last20 >= self.cfg.stop_return
                ):
                    log.info(
                        "hedrl: mean return %.1f ≥ stop-return %.1f at round %d",
                        last20,
                        self.cfg.stop_return,
                        t,
                    )
                    break
        ckpt = self.checkpoint(t, final=True)
        assert ckpt is not None
        summary = self._summary(t, returns, reached, time.perf_counter() - start, ckpt)
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info(
            "hedrl: done after %d rounds; metrics %s; checkpoint %s",
            t,
            metrics_path,
            ckpt,
        )
        return summary

    def _summary(
        self,
        t: int,
        returns: list[float],
        reached: dict[str, int | None],
        wall: float,
        ckpt: Path,
    ) -> dict[str, Any]:
        h = self.history
        ups = [r["crypto/gradient_bytes"] for r in h if r["crypto/gradient_bytes"]]
        slots = self.n_chunks * self.params.slots
        return {
            "run_id": self.run_id,
            "backend": self.cfg.backend,
            "env_id": self.cfg.env_id,
            "param_set": self.params.id,
            "rounds": t,
            "wall_s": wall,
            "config": dataclasses.asdict(self.cfg),
            "param_count": self.param_count,
            "chunks": self.n_chunks,
            "final_return_mean_last20": statistics.fmean(returns[-20:])
            if returns
            else None,
            "rounds_to_195": reached["195"],
            "rounds_to_475": reached["475"],
            "median_round_s": statistics.median(r["round_s"] for r in h) if h else None,
            "median_coordinator_s": statistics.median(r["coordinator_s"] for r in h)
            if h
            else None,
            # one participant's gradient upload, per parameter and per filled slot
            "upload_bytes_per_param": (statistics.median(ups) / self.param_count)
            if ups
            else None,
            "upload_bytes_per_slot": (statistics.median(ups) / slots) if ups else None,
            "env_steps": sum(r["env_steps"] for r in h),
            "skipped_steps": sum(1 for r in h if not r["stepped"]),
            "checkpoint": str(ckpt),
            "fingerprint": self.fingerprint,
        }
