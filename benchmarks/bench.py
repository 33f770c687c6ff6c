"""hedrl-bench: synthetic aggregation rounds, CKKS and its plaintext twin (issue 5).

No environment: each participant draws a random gradient of P parameters and the
round runs through the real code of both sides —

    participant  clip/scale (participants.learner) → encrypt + records (protocol.codec
                 send_plain) → Flower wire bytes (flwr serde)
    coordinator  headers (read_vector) → ciphertext parsing, homomorphic sum,
                 unmasking of the refresher's re-encrypted state and HE-Adam
                 (coordinator.workers.step_chunks, or ChunkPool.step with --workers,
                 as the federation calls them) → θ records at the bottom level
                 (send_cts) → masked state for the next refresher
                 (Federation._masked_state)
    participant  θ decrypt (receive_plain); the refresher decrypts and re-encrypts
                 the masked m, V, r (as participants.node does)

Participants run in parallel in a federation, so a round's critical path is
``round_s = coordinator_s + participant_s + refresh_s`` (one participant's own
work, plus the refresher's extra work); transport latency is not included.
``--workers N`` shards the coordinator's per-chunk work (ciphertext parsing, sum,
unmask, HE-Adam) over N processes (coordinator.workers.ChunkPool); ``step_s`` is
that work's wall time and parse/sum/unmask/adam its breakdown (CPU seconds summed
over the workers when sharded).
Backends of one configuration run interleaved in one process; every number is the
median over ``--reps`` rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import RecordDict
from flwr.common import serde
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from coordinator.federation import Federation
from coordinator.he_adam import initial_state
from coordinator.workers import STEP_STAGES, ChunkPool, step_chunks
from participants.learner import clip_and_scale
from participants.policy import Layout
from protocol import keys
from protocol import messages as msg
from protocol.adam import AdamHyper
from protocol.backend import Backend, Ct
from protocol.codec import receive_cts, receive_plain, send_cts, send_plain
from protocol.config import RunConfig
from protocol.packing import n_chunks
from protocol.params import get_param_set
from protocol.records import read_vector
from protocol.wire import Expect

PARTICIPANT_STAGES = ("p_decrypt_s", "p_encode_s", "p_encrypt_s", "p_records_s")
COORDINATOR_STAGES = ("headers_s", "step_s", "broadcast_s", "mask_s")
STAGES = PARTICIPANT_STAGES + ("refresh_s",) + COORDINATOR_STAGES + STEP_STAGES
DEFAULT_PARTICIPANTS = "2,4,8,16,32,64"
DEFAULT_PARAMS = "10k,100k,1M"
RUN_ID = 5


# ---- small helpers -------------------------------------------------------------------
def parse_count(text: str) -> int:
    """``"100k"`` → 100000, ``"1M"`` → 1000000, ``"12288"`` → 12288."""
    s = text.strip().lower()
    mult = {"k": 10**3, "m": 10**6, "g": 10**9}.get(s[-1:], 1)
    if mult != 1:
        s = s[:-1]
    value = float(s) * mult
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"not a positive count: {text!r}")
    return int(value)


def parse_list(text: str, item: Callable[[str], Any] = parse_count) -> list[Any]:
    """A comma-separated list (one value is a list of one)."""
    return [item(x) for x in text.split(",") if x.strip()]


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


def to_wire_bytes(rd: RecordDict) -> bytes:
    """What Flower puts on the wire for a message's content."""
    return serde.recorddict_to_proto(rd).SerializeToString()


def from_wire_bytes(data: bytes) -> RecordDict:
    """Inverse of :func:`to_wire_bytes`."""
    return serde.recorddict_from_proto(ProtoRecordDict.FromString(data))


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
    theta: list[Ct] = field(default_factory=list)
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

    def encrypt(values: np.ndarray) -> bytes:
        with clock_of()("_encrypt"):
            return enc(values)

    def decrypt(chunk: bytes) -> np.ndarray:
        with clock_of()("_decrypt"):
            return dec(chunk)

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
        # the coordinator's real masking code, on a minimal Federation
        fed = Federation.__new__(Federation)
        fed.cfg = RunConfig(mask_bits=mask_bits, backend=party.backend)
        fed.params, fed.be, fed.fingerprint = party.ps, party.coord, party.fingerprint
        fed.run_id, fed.layout_digest, fed.n_chunks = RUN_ID, "bench", party.chunks
        fed._mask_rng = rng
        self.fed = fed

    # participant side ------------------------------------------------------------
    def _gradient(self, clock: Clock) -> np.ndarray:
        p = self.p
        g = self.rng.normal(0.0, self.clip, p.params)  # ~1/3 of the entries clip
        with clock("p_encode_s"):
            g_n = clip_and_scale(g, self.layout, self.clip)
            return self.hp.c * (1.0 / self.k) * p.part.gradient_factor * g_n

    def _participant(self, theta_wire: bytes, clock: Clock) -> bytes:
        p = self.p
        with clock("p_records_s"):
            receive_plain(
                p.part, from_wire_bytes(theta_wire), msg.THETA, p.expect("theta", 0)
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
            return to_wire_bytes(rd)

    def _refresher(self, state_wire: bytes, clock: Clock) -> bytes:
        p, top = self.p, self.p.ps.depth
        crypto = clock.t["_decrypt"], clock.t["_encrypt"]
        try:
            return self._refresh(state_wire, clock, p, top)
        finally:  # its decrypt/encrypt stay in refresh_s only
            clock.t["_decrypt"], clock.t["_encrypt"] = crypto

    def _refresh(self, state_wire: bytes, clock: Clock, p: Party, top: int) -> bytes:
        with clock("refresh_s"):
            content, out = from_wire_bytes(state_wire), RecordDict()
            for name in msg.STATE_NAMES:
                values = receive_plain(
                    p.part,
                    content,
                    msg.state_key("state", name),
                    p.expect("state", 0, name),
                )
                send_plain(
                    p.part,
                    out,
                    msg.state_key("refresh", name),
                    values,
                    p.expect("refresh", top, name),
                    p.t,
                )
            return to_wire_bytes(out)

    # coordinator side -------------------------------------------------------------
    def _broadcast(self, clock: Clock) -> bytes:
        p = self.p
        with clock("broadcast_s"):
            rd = RecordDict()
            self.down_bytes = send_cts(
                p.coord, rd, msg.THETA, p.theta, p.expect("theta", 0), p.t, p.params
            )
            return to_wire_bytes(rd)

    def _mask(self, clock: Clock) -> tuple[bytes, list[np.ndarray]]:
        p, fed = self.p, self.fed
        with clock("mask_s"):
            fed.state, fed._round = p.state, p.t
            rd, masks, _ = fed._masked_state()
            return to_wire_bytes(rd), masks

    def _headers(self, wire: bytes, keys_exps: list[tuple[str, Expect]], clock: Clock):
        """Header checks and raw chunks, as Federation._parse_reply does."""
        with clock("headers_s"):
            rd = from_wire_bytes(wire)
            return [read_vector(rd, key, exp)[1] for key, exp in keys_exps]

    def run(self, keys: Keys) -> dict[str, float]:
        """One timed round: stage seconds (participant stages per participant)."""
        p, be, top, n = self.p, self.p.coord, self.p.ps.depth, self.p.chunks
        clock = keys.current = Clock()
        theta_wire = self._broadcast(clock)
        state_wire, masks = self._mask(clock)
        refresh = self._headers(
            self._refresher(state_wire, clock),
            [
                (msg.state_key("refresh", name), p.expect("refresh", top, name))
                for name in msg.STATE_NAMES
            ],
            clock,
        )
        grads = [
            self._headers(
                self._participant(theta_wire, clock),
                [(msg.GRADIENT, p.expect("gradient", top))],
                clock,
            )[0]
            for _ in range(self.k)
        ]
        unmask = [[masks[j * n + i] for j in range(3)] for i in range(n)]
        args = (
            p.theta,
            list(zip(*refresh, strict=True)),
            top,
            unmask,
            [[g[i] for g in grads] for i in range(n)],
            p.t,
            self.hp,
        )
        with clock("step_s"):
            if self.pool is None:
                res = step_chunks(be, *args)
            else:
                res = self.pool.step(*args)
        p.theta, p.state = res.theta, res.state
        p.t += 1
        t = clock.t
        t.update(res.timings)
        t["p_records_s"] -= t["_decrypt"] + t["_encrypt"]
        t["p_decrypt_s"], t["p_encrypt_s"] = t["_decrypt"], t["_encrypt"]
        out_t = {s: t.get(s, 0.0) for s in STAGES}
        for s in PARTICIPANT_STAGES:
            out_t[s] /= self.k
        return out_t


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
    vectors.update(zip(msg.STATE_NAMES, state0, strict=True))
    cts = {}
    for name, values in vectors.items():
        rd = RecordDict()
        send_plain(part, rd, name, values, p.expect("v0", top), 0)
        cts[name] = receive_cts(coord, rd, name, p.expect("v0", top))
    p.theta = [coord.to_bottom(c) for c in cts["theta"]]
    p.state = list(zip(*(cts[n] for n in msg.STATE_NAMES), strict=True))
    return p


# ---- the sweep -----------------------------------------------------------------------
def _progress(done: int, total: int, label: str, start: float, quiet: bool) -> None:
    if quiet:
        return
    el = time.perf_counter() - start
    eta = el / done * (total - done) if done else 0.0
    bar = "#" * int(30 * done / total)
    sys.stderr.write(
        f"\r[{bar:<30}] {done}/{total} {el:6.0f} s (eta {eta:5.0f} s) {label:<40}"
    )
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def run_sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (P, K) configuration; backends and worker counts interleaved per rep."""
    rng = np.random.default_rng(args.seed)
    hp = AdamHyper(lr=args.lr)
    pools: dict[tuple[str, int], ChunkPool] = {}
    variants = [(b, w) for w in args.workers for b in args.backends]
    total = len(args.params) * len(args.participants) * args.reps * len(variants)
    done, start = 0, time.perf_counter()
    records = []
    with tempfile.TemporaryDirectory(prefix="hedrl-bench-") as tmp:
        keys_ = Keys(args.param_set, Path(tmp), hp)

        def pool_for(b: str, w: int) -> ChunkPool | None:
            if w > 0 and (b, w) not in pools:
                pools[b, w] = ChunkPool(
                    context=keys_.get(b)[2],
                    param_set=args.param_set,
                    backend=b,
                    workers=w,
                )
            return pools.get((b, w))

        try:
            for P in args.params:
                parties = {v: make_party(keys_, v[0], P, rng) for v in variants}
                for K in args.participants:
                    rounds = {}
                    for v in variants:
                        pool = pool_for(*v)
                        rounds[v] = Round(parties[v], K, hp, args.mask_bits, rng, pool)
                        for _ in range(args.warmup):  # not timed
                            rounds[v].run(keys_)
                    samples: dict[tuple[str, int], list[dict[str, float]]] = {
                        v: [] for v in variants
                    }
                    for rep in range(args.reps):
                        for v in variants:
                            samples[v].append(rounds[v].run(keys_))
                            done += 1
                            label = f"{v[0]} K={K} P={P} w={v[1]} rep {rep + 1}"
                            _progress(done, total, label, start, args.quiet)
                    for w in args.workers:
                        records.extend(
                            _records(
                                {b: rounds[b, w] for b in args.backends},
                                {b: samples[b, w] for b in args.backends},
                                w,
                            )
                        )
        finally:
            for pool in pools.values():
                pool.close()
    return records


def _records(
    rounds: dict[str, Round], samples: dict[str, list[dict[str, float]]], workers: int
) -> list[dict[str, Any]]:
    out = {}
    for b, rnd in rounds.items():
        p = rnd.p
        med = {s: statistics.median(x[s] for x in samples[b]) for s in STAGES}
        coord = sum(med[s] for s in COORDINATOR_STAGES)
        part = sum(med[s] for s in PARTICIPANT_STAGES)
        rounds_s = [sum(x[s] for s in STAGES) for x in samples[b]]
        slots = p.chunks * p.ps.slots
        out[b] = {
            "backend": b,
            "participants": rnd.k,
            "params": p.params,
            "workers": workers,
            "param_set": p.ps.id,
            "chunks": p.chunks,
            "reps": len(samples[b]),
            "stages_s": med,
            "participant_s": part,
            "coordinator_s": coord,
            "round_s": statistics.median(rounds_s),
            "upload_bytes_per_param": rnd.up_bytes / p.params,
            "upload_bytes_per_slot": rnd.up_bytes / slots,
            "broadcast_bytes_per_param": rnd.down_bytes / p.params,
            "broadcast_bytes_per_slot": rnd.down_bytes / slots,
            "padding_waste": 1.0 - p.params / slots,
            "coordinator_params_per_s": p.params / coord if coord > 0 else None,
            "float32_upload_ratio": rnd.up_bytes / (4 * p.params),
        }
    if "ckks" in out and "plain" in out:
        out["ckks"]["round_ratio"] = out["ckks"]["round_s"] / out["plain"]["round_s"]
        out["ckks"]["coordinator_ratio"] = (
            out["ckks"]["coordinator_s"] / out["plain"]["coordinator_s"]
        )
    return list(out.values())


# ---- outputs -------------------------------------------------------------------------
def _fmt_p(n: int) -> str:
    if n % 10**6 == 0:
        return f"{n // 10**6}M"
    if n % 10**3 == 0:
        return f"{n // 10**3}k"
    return str(n)


def markdown_table(records: list[dict[str, Any]]) -> str:
    """One row per configuration and backend."""
    head = (
        "| backend | K | P | workers | round s | coordinator s | step s | "
        "coord. params/s | up B/param | down B/param | padding | ckks/plain |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    for r in records:
        ratio = r.get("round_ratio")
        rows.append(
            f"| {r['backend']} | {r['participants']} | {_fmt_p(r['params'])} | "
            f"{r['workers']} | {r['round_s']:.3f} | {r['coordinator_s']:.3f} | "
            f"{r['stages_s']['step_s']:.3f} | "
            f"{r['coordinator_params_per_s']:,.0f} | "
            f"{r['upload_bytes_per_param']:.2f} | "
            f"{r['broadcast_bytes_per_param']:.2f} | "
            f"{100 * r['padding_waste']:.1f}% | "
            f"{'' if ratio is None else f'{ratio:.1f}×'} |"
        )
    return head + "\n".join(rows) + "\n"


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """Round time vs K (one line per backend and P) and vs P (per backend and K)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w0 = min(r["workers"] for r in records)
    recs = [r for r in records if r["workers"] == w0]
    fig, (ax_k, ax_p) = plt.subplots(1, 2, figsize=(11, 4.2))
    style = {"ckks": "-o", "plain": "--s"}
    for b in sorted({r["backend"] for r in recs}):
        for P in sorted({r["params"] for r in recs}):
            pts = sorted(
                (r["participants"], r["round_s"])
                for r in recs
                if r["backend"] == b and r["params"] == P
            )
            if pts:
                ax_k.plot(*zip(*pts, strict=True), style[b], label=f"{b} P={_fmt_p(P)}")
        for K in sorted({r["participants"] for r in recs}):
            pts = sorted(
                (r["params"], r["round_s"])
                for r in recs
                if r["backend"] == b and r["participants"] == K
            )
            if pts:
                ax_p.plot(*zip(*pts, strict=True), style[b], label=f"{b} K={K}")
    for ax, xl in ((ax_k, "participants K"), (ax_p, "parameters P")):
        ax.set_xscale("log", base=2 if ax is ax_k else 10)
        ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel("seconds per round (median)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"hedrl aggregation round (coordinator + participant critical path), "
        f"{recs[0]['param_set']}, workers={w0}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="hedrl-bench",
        description=(
            "Synthetic aggregation rounds (random normalised gradients, no "
            "environment) through hedrl's real participant and coordinator code: "
            "clip/scale, encrypt, Flower records, parse, homomorphic sum, masked "
            "refresh, HE-Adam, θ broadcast at the bottom level, decrypt. Each "
            "configuration runs every backend interleaved in this process; numbers "
            "are medians over --reps rounds after one warm-up round. round_s is the "
            "critical path: coordinator + one participant + the refresher's extra "
            "work (participants work in parallel; transport latency excluded)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument(
        "--participants",
        type=parse_list,
        default=DEFAULT_PARTICIPANTS,
        help="participants K per round: one value or a comma-separated list",
    )
    ap.add_argument(
        "--params",
        type=parse_list,
        default=DEFAULT_PARAMS,
        help="parameter counts P: one value or a comma-separated list; k/M "
        "suffixes allowed (10000,100k,1M). Bytes are exact per filled slot when P "
        "is a multiple of the slot count (4096 at 8k-35x3); otherwise the JSON "
        "reports the padding waste",
    )
    ap.add_argument(
        "--backends",
        type=lambda s: parse_list(s, str.strip),
        default="ckks,plain",
        help="backends to run, interleaved (ckks: CKKS; plain: the plaintext twin)",
    )
    ap.add_argument(
        "--reps", type=int, default=3, help="timed rounds per configuration and backend"
    )
    ap.add_argument(
        "--workers",
        type=lambda s: parse_list(s, int),
        default="0",
        help="coordinator worker processes sharding the ciphertext chunks (parse, "
        "sum, unmask, HE-Adam, masking); 0 runs in-process (the federation's "
        "current path). A list (0,1,2) measures each",
    )
    ap.add_argument(
        "--param-set", default="8k-35x3", help="CKKS parameter set (protocol/params.py)"
    )
    ap.add_argument("--lr", type=float, default=2e-3, help="HE-Adam learning rate")
    ap.add_argument(
        "--mask-bits", type=int, default=20, help="refresh masks are uniform ±2^bits"
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of gradients and masks")
    ap.add_argument(
        "--out", type=Path, default=Path("bench.json"), help="JSON records written here"
    )
    ap.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="PNG of round time vs K and vs P (default: --out with .png)",
    )
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG")
    ap.add_argument(
        "--table",
        type=Path,
        default=None,
        help="also write the Markdown table (always printed) to this file",
    )
    ap.add_argument(
        "--warmup", type=int, default=1, help="untimed rounds before the timed ones"
    )
    ap.add_argument(
        "--append",
        action="store_true",
        help="merge into the records already in --out (a configuration measured "
        "again replaces its old records); plot and table show the merged set",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bad = [b for b in args.backends if b not in ("ckks", "plain")]
    if (
        bad
        or args.reps < 1
        or args.warmup < 0
        or min(args.workers) < 0
        or min(args.participants) < 1
    ):
        build_parser().error(
            f"backends must be ckks/plain (got {bad}), reps ≥ 1, warmup ≥ 0, "
            "workers ≥ 0, K ≥ 1"
        )
    records = run_sweep(args)
    if args.append and args.out.exists():
        ident = ("backend", "participants", "params", "workers", "param_set")
        new_ids = {tuple(r[i] for i in ident) for r in records}
        old = json.loads(args.out.read_text())
        kept = [r for r in old if tuple(r[i] for i in ident) not in new_ids]
        records = sorted(
            kept + records,
            key=lambda r: (r["workers"], r["params"], r["participants"], r["backend"]),
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=1) + "\n")
    table = markdown_table(records)
    print(table, end="")
    if args.table is not None:
        args.table.write_text(table)
    if not args.no_plot:
        plot(records, args.plot or args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
