"""One participant's handling of a message: keys, checks, learner, codec."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, MetricRecord, RecordDict

from participants.learner import Learner, clip_and_scale
from protocol import keys
from protocol import messages as msg
from protocol.adam import StateUnits, initial_state
from protocol.backend import Backend
from protocol.codec import receive_plain, refresh_state, send_plain
from protocol.config import RunConfig, expand_dir
from protocol.errors import BackendMismatch, FingerprintMismatch, ThetaRejected
from protocol.memory import retain_freed_memory
from protocol.packing import n_chunks
from protocol.params import get_param_set
from protocol.wire import Expect

log = logging.getLogger("flwr.hedrl.participant")

STATE_KEY = "hedrl"
LAST_THETA_KEY = "hedrl-last-theta"  # local only; never leaves the participant
THETA_ABS_LIMIT = 1e4


class Node:
    """A participant bound to one Flower ``Context``."""

    def __init__(self, context: Context) -> None:
        t0 = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.round: int | None = None
        self.context = context
        self.cfg = RunConfig.from_mapping(dict(context.run_config))
        if self.cfg.retain_freed_memory:
            retain_freed_memory()
        self.params = get_param_set(self.cfg.param_set)
        nc = context.node_config
        self.index = int(nc.get("partition-id", nc.get("participant-index", 0)))
        self.run_id = int(context.run_id)
        self.key_run_id = self.run_id  # a resumed run keeps the original run's key
        self.learner = Learner(self.cfg, self.index)
        self.timings["node"] = time.perf_counter() - t0

    @contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    # ---- keys ----------------------------------------------------------------
    def _key_path(self) -> Path:
        explicit = self.context.node_config.get("secret-context")
        if explicit:
            return Path(str(explicit)).expanduser()
        return (
            expand_dir(self.cfg.keys_dir)
            / f"run-{self.key_run_id}"
            / keys.PARTICIPANT_FILE
        )

    def _backend(self, *, provision: bool = False) -> tuple[Backend, str]:
        path = self._key_path()
        if provision and not self.context.node_config.get("secret-context"):
            info = keys.provision(path.parent, self.params, self.cfg.backend)
            if info.created:
                log.info(
                    "hedrl: participant %d created the run's key in %s",
                    self.index,
                    path.parent,
                )
        return keys.participant_backend(path, self.params, self.cfg.backend)

    def _evaluation_context(self, be: Backend) -> bytes:
        """The public context of the key ``be`` holds, without loading it again.

        A deployed participant host has only ``participant.ctx``: derive the
        evaluation context from the context this message already loaded (loading
        a secret context again regenerates its keys) instead of from the file.
        """
        path = self._key_path()
        public = path.with_name(keys.COORDINATOR_FILE)
        if self.cfg.backend == "ckks" and not public.exists():
            from protocol import ckks

            return ckks.serialize_public(be.ctx, be.relin_key_bytes)
        return keys.evaluation_context(path, self.params, self.cfg.backend)

    def _expect(
        self,
        fp: str,
        kind: str,
        level: int,
        round_: int | None,
        name: str | None = None,
    ) -> Expect:
        layout = self.learner.layout
        return Expect(
            param_set=self.params.id,
            fingerprint=fp,
            backend=self.cfg.backend,
            run_id=self.run_id,
            layout_digest=self.learner.layout_digest,
            slot_count=self.params.slots,
            chunk_count=n_chunks(layout.size, self.params.slots),
            kind=kind,
            level=level,
            round=round_,
            name=name,
        )

    def _check_task(self, task: Any, fp: str | None) -> None:
        if task["backend"] != self.cfg.backend:
            raise BackendMismatch(
                field="backend", expected=self.cfg.backend, received=task["backend"]
            )
        if fp is not None and "fingerprint" in task and task["fingerprint"] != fp:
            raise FingerprintMismatch(
                expected=fp,
                received=str(task["fingerprint"]),
                where="task from coordinator",
            )

    def _begin(self, content: RecordDict) -> tuple[Any, int, Backend, str]:
        """A round's task: (task, round, backend, fingerprint), checked."""
        task = content[msg.TASK]
        self.key_run_id = int(task.get("key-run-id", self.run_id))
        t = self.round = int(task["round"])
        with self._timed("key"):
            be, fp = self._backend()
        self._check_task(task, fp)
        return task, t, be, fp

    # ---- handlers ------------------------------------------------------------
    def setup(self, content: RecordDict) -> RecordDict:
        """Provision/load the key; report fingerprint, layout (maybe context, θ0)."""
        task = content[msg.TASK]
        self.key_run_id = int(task.get("key-run-id", self.run_id))
        self._check_task(task, None)
        with self._timed("key"):
            be, fp = self._backend(provision=True)
        info: dict[str, Any] = {
            "fingerprint": fp,
            "layout-digest": self.learner.layout_digest,
            "param-count": int(self.learner.layout.size),
            "participant-index": self.index,
        }
        out = RecordDict()
        if int(task["send-context"]):
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

    def _decrypt_theta(
        self, be: Backend, fp: str, content: RecordDict, t: int, k: int
    ) -> np.ndarray:
        """Decrypt θ and check it where the key is (a keyless coordinator can't).

        Refused: non-finite values, |θ| > 1e4, or a change since the last θ this
        participant accepted larger than 10·K·lr per element and round (one Adam
        step moves an element by at most ≈ lr·(1−β1)/sqrt(1−β2) ≈ 3.2·lr, times
        k ≤ K after dropouts). A ciphertext under a foreign key decrypts to noise
        far beyond that.
        """
        theta = receive_plain(be, content, msg.THETA, self._expect(fp, "theta", 0, t))
        if not np.all(np.isfinite(theta)):
            raise ThetaRejected(f"round {t}: decrypted θ holds non-finite values")
        peak = float(np.max(np.abs(theta)))
        if peak > THETA_ABS_LIMIT:
            raise ThetaRejected(
                f"round {t}: |θ| up to {peak:.3g} > {THETA_ABS_LIMIT:.0g}"
            )
        last = self.context.state.get(LAST_THETA_KEY)
        if last is not None:
            prev = np.frombuffer(bytes(last["theta"]), dtype="<f8")
            rounds = max(1, t - int(last["round"]))
            bound = 10.0 * k * self.cfg.lr * rounds
            change = (
                float(np.max(np.abs(theta - prev)))
                if prev.size == theta.size
                else float("inf")
            )
            if change > bound:
                raise ThetaRejected(
                    f"round {t}: θ changed by up to {change:.3g} in {rounds} "
                    f"round(s) since the last accepted θ; at most {bound:.3g} expected"
                )
        self.context.state[LAST_THETA_KEY] = ConfigRecord(
            {"theta": theta.astype("<f8").tobytes(), "round": t}
        )
        return theta

    def train(self, content: RecordDict) -> RecordDict:
        """Decrypt θ, one PPO minibatch gradient, encrypt; refresh state if asked."""
        task, t, be, fp = self._begin(content)
        with self._timed("decrypt"):
            theta = self._decrypt_theta(
                be, fp, content, t, int(task["num-participants"])
            )
        with self._timed("learn"):
            saved = self.context.state.get(STATE_KEY)
            grad, stats, new_saved = self.learner.step(
                theta,
                None if saved is None else bytes(saved["blob"]),
                cache_scope=(self.run_id, self.context.node_id),
            )
            self.context.state[STATE_KEY] = ConfigRecord({"blob": new_saved})
            weight = 1.0 / int(task["num-participants"])
            g_n = clip_and_scale(grad, self.learner.layout, self.learner.bounds)
        hp = self.cfg.hyper
        out = RecordDict()
        with self._timed("encrypt"):
            send_plain(
                be,
                out,
                msg.GRADIENT,
                hp.c * weight * be.gradient_factor * g_n,
                self._expect(fp, "gradient", be.top_level, None),
                t,
            )
            if int(task["init"]):
                send_plain(
                    be,
                    out,
                    msg.SQUARES,
                    weight * g_n * g_n,
                    self._expect(fp, "squares", be.top_level, None),
                    t,
                )
        if int(task["refresher"]):
            self._refresh_into(be, fp, content, t, out)
        out[msg.METRICS] = MetricRecord(
            {
                "episodes": int(stats["episodes"]),
                "return-sum": float(stats["return_sum"]),
                "env-steps": int(stats["env_steps"]),
                # seconds of this handler's stages (the round's breakdown)
                **{
                    msg.stage_time_key(k): float(self.timings.get(k, 0.0))
                    for k in msg.PARTICIPANT_STAGES
                },
            }
        )
        return out

    def _refresh_into(
        self, be: Backend, fp: str, content: RecordDict, t: int, out: RecordDict
    ) -> None:
        """Decrypt the masked m, V, r and re-encrypt them (``refresh_state``)."""
        with self._timed("refresh"):
            refresh_state(
                be,
                self.cfg.hyper,
                content,
                out,
                lambda kind, level, name: self._expect(fp, kind, level, None, name),
                t,
            )

    def refresh(self, content: RecordDict) -> RecordDict:
        """Spare refresher: the round's refresher failed; refresh only."""
        task, t, be, fp = self._begin(content)
        out = RecordDict()
        self._refresh_into(be, fp, content, t, out)
        return out

    def initial_state(self, content: RecordDict) -> RecordDict:
        """Decrypt Σ w·g², return Enc(0), Enc(V0 = Σ + δ), Enc(V0^(−1/2))
        (in the step's input units, :class:`~protocol.adam.StateUnits`)."""
        task, t, be, fp = self._begin(content)
        squares = receive_plain(
            be, content, msg.SQUARES, self._expect(fp, "squares", be.top_level, t)
        )
        if not np.all(np.isfinite(squares)) or np.any(squares < -1e-3):
            raise ThetaRejected(
                f"round {t}: squared-gradient sum is not a sum of squares"
            )
        k = float(task.get("k", 1.0))  # K/K': mean over the replies that arrived
        out = RecordDict()
        units = StateUnits.of(be, self.cfg.hyper)
        for name, values, factor, level in zip(
            msg.STATE_NAMES,
            initial_state(k * np.maximum(squares, 0.0), self.cfg.hyper),
            units.inp,
            units.levels(be.top_level),
            strict=True,
        ):
            send_plain(
                be,
                out,
                msg.state_key("v0", name),
                factor * values,
                self._expect(fp, "v0", level, None, name),
                t,
            )
        return out


__all__ = ["Node", "dataclasses"]
