"""Time deployed rounds: the deploy/ recipe on loopback, per-message ClientApp log.

A measurement, not a test: it uses the multi-host test's process handling
(:mod:`benchmarks.deploy_lab`). It provisions a deployment (TLS + SuperNode
authentication), starts the real ``flower-superlink`` and one real
``flower-supernode`` per participant on 127.0.0.1, submits a run with
``deploy/submit.sh`` and prints the per-round ``round_s`` from the run's
``metrics.jsonl`` and the ClientApp's per-message timing lines (see
``participants/client_app.py``) from the SuperNode logs. Every process it
started is stopped afterwards.

    python -m benchmarks.round_times --backend ckks --rounds 8 \
        --run-config "update-epochs=2 num-minibatches=1 lr=0.003"
    # a whole deployed training run with a preset (provisioned from it, with
    # episode metrics so that its stop-return ends the run once solved):
    python -m benchmarks.round_times --preset deploy/presets/cartpole-delta.toml \
        --rounds 150 --json run.json --namespaces   # hosts as network namespaces
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.deploy_lab import (
    PARTICIPANTS,
    Lab,
    free_port,
    hand_out,
    provision,
    script,
)

SUBNET = "10.78.0"  # the namespaces' bridge (the multi-host test uses 10.77.0)
TIMING = re.compile(r"hedrl: participant \d+ (\w+)(?: round \d+)?: (.*)")


def clientapp_timings(text: str) -> dict[str, dict[str, list[float]]]:
    """{handler: {phase: [seconds, ...]}} from ClientApp timing log lines."""
    out: dict[str, dict[str, list[float]]] = {}
    for kind, rest in TIMING.findall(text):
        phases = out.setdefault(kind, {})
        for part in rest.split(", "):
            m = re.match(r"(.+?) ([\d.]+)", part)
            if m:
                phases.setdefault(m[1], []).append(float(m[2]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="ckks", choices=["ckks", "plain"])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--run-config", default="", help="more run-config overrides")
    ap.add_argument("--json", type=Path, help="write the measurements here")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument(
        "--preset",
        type=Path,
        help="run-config preset: provision.sh --preset (θ-step bound) and "
        "submit.sh --preset; participants then report episode metrics",
    )
    ap.add_argument(
        "--namespaces",
        action="store_true",
        help="put every host in its own network namespace on a bridge, as the "
        "multi-host test does (needs root and iproute2); default: loopback",
    )
    args = ap.parse_args(argv)
    names = ["coordinator"] + [f"participant-{i}" for i in range(PARTICIPANTS)]
    ips = [f"{SUBNET}.1"] + [f"{SUBNET}.{11 + i}" for i in range(PARTICIPANTS)]
    coord_ip = ips[0] if args.namespaces else "127.0.0.1"

    with tempfile.TemporaryDirectory(prefix="hedrl-round-times-") as tmp:
        lab = Lab(Path(tmp))
        try:
            extra: dict[str, object] = {}
            if args.preset:
                extra = {"preset": args.preset.resolve(), "report_metrics": "true"}
            ns: dict[str, str | None] = dict.fromkeys(names)
            if args.namespaces:
                ns.update(lab.make_hosts(names, ips))
            provision(lab, args.backend, coord_ip, lab.tmp / "operator", 3, **extra)
            started = time.perf_counter()
            dirs = hand_out(lab, lab.tmp / "operator")
            coord, cns = dirs["coordinator"], ns["coordinator"]
            bundle = coord / "bundle"
            port = 8000 if args.namespaces else free_port()
            address = f"{coord_ip}:{port}"
            listen = "0.0.0.0" if args.namespaces else "127.0.0.1"
            argv_ = script("superlink.sh", bundle=bundle, host=listen, port=port)
            lab.start("superlink", cns, argv_, coord)
            lab.wait_for_log("superlink", "Uvicorn running on https://")
            argv_ = script(
                "connect.sh", name="hedrl", address=address, ca=bundle / "ca.crt"
            )
            lab.run(cns, argv_, coord)
            pubs = sorted(str(p) for p in (bundle / "supernodes").glob("*.pub"))
            lab.run(cns, script("register.sh", *pubs, connection="hedrl"), coord)
            for i in range(PARTICIPANTS):
                host, hns = dirs[f"participant-{i}"], ns[f"participant-{i}"]
                argv_ = script(
                    "supernode.sh",
                    bundle=host / "bundle",
                    superlink=address,
                    port=9094 if hns else free_port(),
                )
                lab.start(f"supernode-{i}", hns, argv_, host)
            config = (
                f"backend='{args.backend}' num-participants={PARTICIPANTS} "
                f"num-rounds={args.rounds} round-timeout=120.0 node-wait=60.0 "
                f"{args.run_config}"
            )
            argv_ = script(
                "submit.sh",
                connection="hedrl",
                results_dir=coord / "results",
                run_name="timed",
                run_config=config,
                **({"preset": args.preset.resolve()} if args.preset else {}),
            )
            submitted = time.perf_counter()
            proc = lab.run(cns, argv_, coord, timeout=args.timeout)
            finished = time.perf_counter()
            run_dir = coord / "results" / "timed"
            if proc.returncode != 0 or not (run_dir / "metrics.jsonl").exists():
                tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
                print(
                    "the run did not complete; submit.sh ended with:", *tail, sep="\n"
                )
                return 1
            rows = [
                json.loads(x)
                for x in (run_dir / "metrics.jsonl").read_text().splitlines()
            ]
            logs = "".join(lab.log(f"supernode-{i}") for i in range(PARTICIPANTS))
        finally:
            lab.close()
    times = [r["round_s"] for r in rows]
    timings = clientapp_timings(logs)
    print(proc.stdout.strip().splitlines()[-1])
    returns = [r["return_mean"] for r in rows if r.get("return_mean") is not None]
    wall = {
        "start_s": round(submitted - started, 1),
        "run_s": round(finished - submitted, 1),
        "rounds": len(rows),
        "last20": round(statistics.mean(returns[-20:]), 1) if returns else None,
        "env_steps": sum(r["env_steps"] for r in rows),
    }
    print("wall:", json.dumps(wall))
    print("round_s:", " ".join(f"{t:.2f}" for t in times))
    print(
        f"median round_s {statistics.median(times):.2f}, "
        f"median after round 2 {statistics.median(times[2:] or times):.2f}, "
        f"median coordinator_s "
        f"{statistics.median(r['coordinator_s'] for r in rows):.3f}"
    )
    for kind, phases in timings.items():
        print(
            f"ClientApp {kind} ({len(next(iter(phases.values())))} messages), "
            "median s: "
            + ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in phases.items())
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"config": config, "wall": wall, "rows": rows, "clientapp": timings},
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
