"""CPU a deployed coordinator spends moving one round's vectors, per vector layout.

A deployed flwr 1.42 ServerApp does not serialise a message whole: every Array of
its content (and every ≤ 5 MB piece of a large one) is an object with a SHA-256 id,
pushed to the SuperLink — and replies pulled from it — one HTTP request per object
(``flwr.superlink.grid.HttpGrid``). This benchmark does that on loopback against a
stand-in SuperLink (a small uvicorn app in a child process that stores and returns
objects) and times the coordinator's side with ``time.process_time`` (its own CPU,
not the server's):

    push   θ and the masked m, V, r (bottom level) as the coordinator sends them:
           object ids, then one request per object
    pull   K gradients (top level) the participants pushed beforehand (not timed):
           one request per object, the objects inflated back into records and the
           chunks read with ``protocol.records.read_vector``

for the layout of protocol 3 (``protocol.records``: one Array of chunks plus one of
lengths per vector) and, for comparison, protocol 2's (one Array per chunk). The
chunks are random bytes of the sizes ciphertexts have at ``8k-35x3`` (the content
does not matter to transport); what is pulled is checked against what was pushed.
Plaintext HTTP/1.1, requests one after another (Flower spreads them over a few
threads; the CPU is the same process's). Not Flower's own client code: an
approximation of its per-object work, to compare layouts.

    python -m benchmarks.transport --params 1M --participants 4 --reps 3 \\
        --out benchmarks/results/transport.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from benchmarks.bench import parse_list
from benchmarks.bench_party import Wire, from_wire, to_wire
from protocol.params import get_param_set
from protocol.records import read_vector, write_vector
from protocol.wire import Expect, make_header

#: ≈ bytes of one chunk (4096 values) at 8k-35x3: θ and the masked state at the
#: bottom level (32.03 per value), a seeded gradient at the top (49.5;
#: docs/benchmarks.md)
BOTTOM_CHUNK, TOP_CHUNK = 131_195, 202_752
PARAM_SET = get_param_set("8k-35x3")
SLOTS = PARAM_SET.slots
LAYOUTS = (3, 2)

SERVER = """
from flwr.proto.message_pb2 import PullObjectResponse, PushObjectRequest
STORE = {}
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    parts, more = [], True
    while more:
        msg = await receive()
        parts.append(msg.get("body", b""))
        more = msg.get("more_body", False)
    body = b"".join(parts)
    kind, oid = scope["path"].strip("/").split("/")
    if kind == "push":
        STORE[oid] = PushObjectRequest.FromString(body).object_content
        out = b""
    else:
        out = PullObjectResponse(object_content=STORE[oid]).SerializeToString()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": out})
"""


def _expect(name: str, chunks: int) -> Expect:
    return Expect(
        param_set=PARAM_SET.id,
        fingerprint="0" * 64,
        backend="ckks",
        run_id=1,
        layout_digest="0" * 64,
        slot_count=SLOTS,
        chunk_count=chunks,
        kind="gradient",
        level=0,
        round=1,
        name=name,
    )


def vectors(
    layout: int, names: list[str], chunks: int, size: int, rng: np.random.Generator
) -> tuple[RecordDict, dict[str, list[bytes]]]:
    """Records of random chunks, one vector per name, in ``layout``."""
    rd, sent = RecordDict(), {}
    for name in names:
        cts = [rng.bytes(size) for _ in range(chunks)]
        sent[name] = cts
        header = make_header(
            _expect(name, chunks), value_count=chunks * SLOTS, round_=1
        )
        write_vector(rd, name, header, cts)
        if layout == 2:  # protocol 2: one Array per chunk
            rd[name] = ArrayRecord(
                {
                    str(i): Array(dtype="uint8", shape=(len(c),), stype="raw", data=c)
                    for i, c in enumerate(cts)
                }
            )
    return rd, sent


def _read(layout: int, rd: RecordDict, name: str, chunks: int) -> list[bytes]:
    if layout == 3:
        return read_vector(rd, name, _expect(name, chunks))[1]
    arr = rd[name]
    return [bytes(arr[str(i)].data) for i in range(chunks)]


class Link:
    """The stand-in SuperLink: a uvicorn child process on a free loopback port."""

    def __init__(self, workdir: Path) -> None:
        import httpx

        (workdir / "hedrl_transport_link.py").write_text(SERVER)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "hedrl_transport_link:app"]
            + ["--port", str(port), "--log-level", "warning"],
            cwd=workdir,
        )
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client.post("/push/probe", content=b"")
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError(
                        "transport: the stand-in link did not start"
                    ) from None
                time.sleep(0.1)

    def push(self, rd: RecordDict) -> tuple[str, list[str]]:
        """Push every object of ``rd``; (its id, the object ids)."""
        wire = to_wire(rd)  # ids, deflated objects, push requests
        for oid, req in wire.objects.items():
            self.client.post(f"/push/{oid}", content=req)
        return wire.root, list(wire.objects)

    def pull(self, root: str, ids: list[str]) -> RecordDict:
        """Pull objects by id and inflate the records they make up."""
        bodies = {
            oid: self.client.post(f"/pull/{oid}", content=b"").content for oid in ids
        }
        return from_wire(Wire(root, bodies))

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


def measure(
    link: Link, layout: int, params: int, k: int, rng: np.random.Generator
) -> dict[str, Any]:
    """One round's push (θ + masked state) and pull (K gradients), timed."""
    chunks = -(-params // SLOTS)
    out, _ = vectors(layout, ["theta", "m", "V", "r"], chunks, BOTTOM_CHUNK, rng)
    out["task"] = ConfigRecord({"round": 1})
    c0 = time.process_time()
    _, push_ids = link.push(out)
    push_s = time.process_time() - c0
    replies = []
    for _ in range(k):  # the participants' uploads: not timed
        rd, sent = vectors(layout, ["gradient"], chunks, TOP_CHUNK, rng)
        replies.append((*link.push(rd), sent["gradient"]))
    c0 = time.process_time()
    got = [
        _read(layout, link.pull(root, ids), "gradient", chunks)
        for root, ids, _ in replies
    ]
    pull_s = time.process_time() - c0
    if got != [sent for _, _, sent in replies]:
        raise RuntimeError(f"transport: layout {layout} pulled other bytes than pushed")
    return {
        "push_s": push_s,
        "pull_s": pull_s,
        "push_objects": len(push_ids),
        "pull_objects": sum(len(ids) for _, ids, _ in replies),
        "chunks": chunks,
    }


def run(params: list[int], participants: list[int], reps: int) -> list[dict[str, Any]]:
    """Every (P, K), layouts interleaved per repetition; medians."""
    import tempfile

    rng = np.random.default_rng(0)
    records = []
    with tempfile.TemporaryDirectory(prefix="hedrl-transport-") as tmp:
        link = Link(Path(tmp))
        try:
            for p in params:
                for k in participants:
                    samples: dict[int, list[dict[str, Any]]] = {x: [] for x in LAYOUTS}
                    for _ in range(reps):
                        for layout in LAYOUTS:
                            samples[layout].append(measure(link, layout, p, k, rng))
                    for layout, runs in samples.items():
                        rec: dict[str, Any] = {
                            "layout": layout,
                            "params": p,
                            "participants": k,
                            "reps": reps,
                            **{
                                f: runs[0][f]
                                for f in ("chunks", "push_objects", "pull_objects")
                            },
                        }
                        for f in ("push_s", "pull_s"):
                            rec[f] = statistics.median(r[f] for r in runs)
                            rec[f + "_all"] = [r[f] for r in runs]
                        records.append(rec)
        finally:
            link.close()
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.transport",
        description=(
            "CPU the coordinator's process spends pushing one round's θ and masked "
            "state and pulling K gradients the way a deployed flwr 1.42 ServerApp "
            "does (every Array and ≤ 5 MB piece an object with a SHA-256 id, one "
            "HTTP request each), on loopback against a stand-in SuperLink, for "
            "protocol 3's vector layout (one Array of chunks per vector) and "
            "protocol 2's (one Array per chunk). Times are time.process_time of "
            "this process; the pulled bytes are checked against the pushed ones."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument(
        "--params", default="1M", help="parameters P: one value or a list (k/M)"
    )
    ap.add_argument(
        "--participants",
        default="4",
        help="gradients pulled per round K: one or a list",
    )
    ap.add_argument("--reps", type=int, default=3, help="rounds per layout (medians)")
    ap.add_argument(
        "--out",
        type=Path,
        default=Path("transport.json"),
        help="JSON records, one per layout × P × K (push_s, pull_s, object counts)",
    )
    args = ap.parse_args(argv)
    records = run(parse_list(args.params), parse_list(args.participants), args.reps)
    args.out.write_text(json.dumps(records, indent=1) + "\n")
    for r in records:
        print(
            f"layout {r['layout']} P={r['params']} K={r['participants']}: push "
            f"{r['push_objects']} objects {r['push_s']:.3f} s CPU, pull "
            f"{r['pull_objects']} objects {r['pull_s']:.3f} s CPU"
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    sys.exit(main())
