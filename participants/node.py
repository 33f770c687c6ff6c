"""One participant's handling of a message: trust, guard, learner, codec.

Each handler first checks everything that needs no decryption (task fields,
round order, headers, the ciphertexts' structure; errors say what is wrong),
then decrypts and uses what it decrypted inside
:meth:`participants.guard.Guard.decrypting`, where any failure becomes the one
constant refusal (docs/threat-model.md). What leaves a participant: fresh
encryptions of rounded values, a refusal, a tag on the final θ (an HMAC of its
ciphertext bytes), and, if its operator allows it, episode metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, RecordDict

from participants.final import confirm, final
from participants.guard import Guard, OutOfOrder, Terminal
from participants.learner import GradientSource, Learner, clip_and_scale
from participants.metrics import (
    diagnostics_path,
    reply_metrics,
    write_diagnostics,
)
from participants.state import initial_state, refresh, refresh_into
from participants.trust import Trust
from participants.twin import (
    Checked,
    Limits,
    Snapshots,
    TwinStore,
    check,
    matches,
    replay,
)
from protocol import keys, relay
from protocol import messages as msg
from protocol.backend import Backend
from protocol.codec import (
    Received,
    decrypt_received,
    on_grid,
    receive_checked,
    send_plain,
)
from protocol.config import RunConfig
from protocol.errors import (
    BackendMismatch,
    HeaderMismatch,
    KeyMaterialError,
    ThetaRejected,
    WireFormatError,
)
from protocol.memory import retain_freed_memory
from protocol.packing import n_chunks
from protocol.params import get_param_set
from protocol.records import digest, written_chunks
from protocol.relay import parse_relay, relay_key
from protocol.wire import Expect

log = logging.getLogger("flwr.hedrl.participant")

STATE_KEY = "hedrl"


class Node:
    """A participant bound to one Flower ``Context``."""

    def __init__(
        self, context: Context, gradients: GradientSource | None = None
    ) -> None:
        """``gradients``: where the learner's gradients come from instead of
        its PPO step (benchmarks; :func:`participants.client_app.make_app`)."""
        t0 = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.round: int | None = None
        self.context = context
        self.cfg = RunConfig.from_mapping(dict(context.run_config))
        if self.cfg.retain_freed_memory:
            retain_freed_memory()
        self.params = get_param_set(self.cfg.param_set)
        self.run_id = int(context.run_id)
        self.trust = Trust.from_context(context.node_config, self.cfg, self.run_id)
        self.trust.admit_run(self.cfg)
        self.index = self.trust.index
        self.learner = Learner(
            self.cfg, self.index, gradients, salt=self.trust.seed_salt
        )
        self.trust.admit_layout(self.learner.layout.size)
        self.guard: Guard | None = None
        self.timings["node"] = time.perf_counter() - t0

    @contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    # ---- keys and checks that need no decryption ----------------------------------
    def _key(self, *, provision: bool = False) -> tuple[Backend, str, Guard]:
        """The key this participant's own configuration names, and its guard."""
        path = self.trust.key_path
        with self._timed("key"):
            if provision and self.trust.may_provision:
                info = keys.provision(path.parent, self.params, self.cfg.backend)
                if info.created:
                    log.info(
                        "hedrl: participant %d created the run's key in %s",
                        self.index,
                        path.parent,
                    )
            if not path.exists():
                log.error("hedrl: participant %d: no key at %s", self.index, path)
                raise KeyMaterialError(
                    "no participant context where this participant's configuration "
                    "says (node config secret-context, or keys-dir in simulation)"
                )
            be, fp = keys.participant_backend(path, self.params, self.cfg.backend)
        self.guard = Guard(self.trust, fp)
        return be, fp, self.guard

    def close(self) -> None:
        """Release what the message held (its guard's lock)."""
        if self.guard is not None:
            self.guard.close()

    def _task_record(self, content: RecordDict) -> ConfigRecord:
        """The task record, after the backend check."""
        task = content.get(msg.TASK)
        if not isinstance(task, ConfigRecord):
            raise WireFormatError("message carries no task record")
        if task.get("backend") != self.cfg.backend:
            raise BackendMismatch(
                field="backend", expected=self.cfg.backend, received=task.get("backend")
            )
        return task

    def _task(self, content: RecordDict) -> tuple[Any, int]:
        """The task record and its round, after the backend check."""
        task = self._task_record(content)
        round_ = task.get("round")
        if not isinstance(round_, int) or isinstance(round_, bool):
            raise WireFormatError(f"task round: expected an int, received {round_!r}")
        self.round = round_
        return task, round_

    @staticmethod
    def _flag(task: Any, key: str) -> bool:
        value = task.get(key, 0)
        if value not in (0, 1):
            raise WireFormatError(f"task {key!r}: expected 0 or 1, received {value!r}")
        return bool(value)

    def _expect(
        self,
        fp: str,
        kind: str,
        level: int,
        round_: int | None,
        name: str | None = None,
    ) -> Expect:
        return Expect(
            param_set=self.params.id,
            fingerprint=fp,
            backend=self.cfg.backend,
            run_id=self.run_id,
            layout_digest=self.learner.layout_digest,
            slot_count=self.params.slots,
            chunk_count=n_chunks(self.learner.layout.size, self.params.slots),
            kind=kind,
            level=level,
            round=round_,
            name=name,
        )

    def _receive(
        self, be: Backend, key: str, expect: Expect, value_count: int
    ) -> Received:
        """A vector's header and chunks checked before decryption."""
        with self._timed("check"):
            got = receive_checked(be, self._content, key, expect)
        if got.header.value_count != value_count:
            raise HeaderMismatch(
                field="value_count",
                expected=value_count,
                received=got.header.value_count,
            )
        return got

    def _receive_state(self, be: Backend, fp: str, t: int) -> list[Received]:
        slots = (
            n_chunks(self.learner.layout.size, self.params.slots) * self.params.slots
        )
        return [
            self._receive(
                be, msg.state_key("state", n), self._expect(fp, "state", 0, t, n), slots
            )
            for n in msg.STATE_NAMES
        ]

    # ---- handlers ------------------------------------------------------------------
    def setup(self, content: RecordDict) -> RecordDict:
        """Load (in simulation, provision) the key; report fingerprint, layout and
        the last round handled under it (maybe the evaluation context and θ0)."""
        self._content = content
        task = self._task_record(content)
        be, fp, guard = self._key(provision=True)
        if guard.spent:
            raise Terminal()
        info: dict[str, Any] = {
            "fingerprint": fp,
            "layout-digest": self.learner.layout_digest,
            "param-count": int(self.learner.layout.size),
            "participant-index": self.index,
            "last-round": guard.last_round,
            "max-rounds": self.trust.max_rounds,
        }
        # the newest step it has replayed: relays start there
        info["twin-step"], info["twin-hash"] = TwinStore(guard.stem).newest()
        out = RecordDict()
        if self._flag(task, "send-context"):
            with self._timed("evaluation-context"):
                info["context"] = self._evaluation_context(be)
            send_plain(
                be,
                out,
                msg.THETA,
                self.learner.initial_theta(),
                self._expect(fp, "theta", be.top_level, None),
                0,
            )
        out[msg.SETUP_REPLY] = ConfigRecord(info)
        return out

    def _evaluation_context(self, be: Backend) -> bytes:
        """The public context of the key ``be`` holds, without loading it again
        (a deployed participant host has only ``participant.ctx``)."""
        path = self.trust.key_path
        if (
            self.cfg.backend == "ckks"
            and not path.with_name(keys.COORDINATOR_FILE).exists()
        ):
            from protocol import ckks

            return ckks.serialize_public(be.ctx, be.relin_key_bytes)  # type: ignore[attr-defined]
        return keys.evaluation_context(path, self.params, self.cfg.backend)

    def _relay(self, be: Backend, guard: Guard, content: RecordDict) -> Checked:
        """The steps and sealed updates relayed with θ, checked in everything
        that depends on no value (participants/twin.py): typed errors."""
        if be.mac_key is None:  # a participant backend always has one
            raise KeyMaterialError("no MAC key: not a participant's context")
        with self._timed("twin"):
            return check(
                TwinStore(guard.stem),
                parse_relay(content.get(msg.RELAY)),
                relay_key(be.mac_key),
                self._limits(be),
            )

    def _limits(self, be: Backend) -> Limits:
        return Limits(
            self.cfg.hyper,
            self.cfg.optimizer,
            be.gradient_factor,
            float(self.trust.federation_size),
            self.trust.theta_step_bound,
            self.learner.layout.size,
            self.trust.min_updates,
            self.trust.max_rounds,
        )

    def _theta(
        self, be: Backend, got: Received, t: int, guard: Guard, checked: Checked
    ) -> tuple[np.ndarray, np.ndarray, Snapshots]:
        """θ's twin (replayed) and θ decrypted and checked against this
        participant's own bound and the twin: (θ, twin, the twin's snapshots
        to keep once the message is accepted). Call inside
        :meth:`Guard.decrypting`: the replay's failures depend on values."""
        store, theta0 = TwinStore(guard.stem), self.learner.initial_theta()
        with self._timed("twin"):
            twin, snapshots = replay(store, checked, theta0, self._limits(be))
        with self._timed("decrypt"):
            theta = decrypt_received(be, got)
            guard.check_theta(theta, t, lambda: theta0)
            if not matches(twin, theta, theta0, self.params):
                raise ThetaRejected("θ is not its twin")
        return theta, twin, snapshots

    def train(self, content: RecordDict) -> RecordDict:
        """Check and decrypt θ, one PPO gradient, encrypt; refresh if asked."""
        self._content = content
        task, t = self._task(content)
        refresher, init = self._flag(task, "refresher"), self._flag(task, "init")
        be, fp, guard = self._key()
        guard.admit("train", t)
        if refresher:
            guard.admit("refresh", t)
        theta_in = self._receive(
            be, msg.THETA, self._expect(fp, "theta", 0, t), self.learner.layout.size
        )
        state_in = self._receive_state(be, fp, t) if refresher else None
        checked = self._relay(be, guard, content)
        kinds = ("train", "refresh") if refresher else ("train",)
        out = RecordDict()
        with guard.decrypting(kinds, t):
            theta, twin, snapshots = self._theta(be, theta_in, t, guard, checked)
            saved = self._learn_into(be, fp, twin, t, init, out)
            if state_in is not None:
                refresh_into(self, be, fp, state_in, t, out)
            out[msg.METRICS] = reply_metrics(
                self._stats, self.timings, self.trust.report_metrics
            )
            TwinStore(guard.stem).save(snapshots)
            guard.accept_theta(theta, t, digest(theta_in.chunks))
        path = diagnostics_path(self.trust.state_dir, fp, self.index)
        write_diagnostics(path, self.index, t, self._stats)
        # the learner moves on only with an accepted message: Flower keeps the
        # context of a failed one too, and a refusal's cause must not show later
        self.context.state[STATE_KEY] = ConfigRecord({"blob": saved})
        return out

    def _learn_into(
        self,
        be: Backend,
        fp: str,
        theta: np.ndarray,
        t: int,
        init: bool,
        out: RecordDict,
    ) -> bytes:
        """One gradient at θ, encrypted into ``out``; the learner's new state."""
        with self._timed("learn"):
            saved = self.context.state.get(STATE_KEY)
            grad, self._stats, new_saved = self.learner.step(
                theta,
                None if saved is None else bytes(saved["blob"]),
                cache_scope=(self.run_id, self.context.node_id),
            )
            weight = 1.0 / self.cfg.num_participants
            g_n = clip_and_scale(grad, self.learner.layout, self.learner.bounds)
        sent: dict[str, np.ndarray] = {
            msg.GRADIENT: self.learner.update_unit() * weight * be.gradient_factor * g_n
        }
        if init:
            sent[msg.SQUARES] = weight * g_n * g_n
        with self._timed("encrypt"):
            for key, values in sent.items():
                send_plain(
                    be, out, key, values, self._expect(fp, key, be.top_level, None), t
                )
        # the same update sealed for the other key holders (protocol/relay.py)
        assert be.mac_key is not None
        sq = msg.SQUARES in sent
        update = relay.Update(
            on_grid(be, sent[msg.GRADIENT]),
            digest(written_chunks(out, msg.GRADIENT)),
            on_grid(be, sent[msg.SQUARES]) if sq else None,
            digest(written_chunks(out, msg.SQUARES)) if sq else "",
        )
        out[msg.RELAY_UP] = ConfigRecord(
            {"sealed": relay.seal(relay_key(be.mac_key), t, self.index, update)}
        )
        return new_saved

    def refresh(self, content: RecordDict) -> RecordDict:
        """Spare refresher (:func:`participants.state.refresh`)."""
        return refresh(self, content)

    def initial_state(self, content: RecordDict) -> RecordDict:
        """m0, V0, r0 from Σ w·g² (:func:`participants.state.initial_state`)."""
        return initial_state(self, content)

    def final(self, content: RecordDict) -> RecordDict:
        """The run's last θ (:func:`participants.final.final`)."""
        return final(self, content)

    def confirm(self, content: RecordDict) -> RecordDict:
        """The others' tags on the final θ (:func:`participants.final.confirm`)."""
        return confirm(self, content)


__all__ = ["Node", "OutOfOrder"]
