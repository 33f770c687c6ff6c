"""Fuzzing the receiving paths: whatever a peer sends, a typed error or a valid result.

Inputs (tests/protocol/fuzz_inputs.py) go through the coordinator's path
(``receive_cts``, ``CkksBackend.load``, ``load_file``) and the participant's
(``receive_plain``, ``decrypt``). Each attempt ends accepted-and-valid, in a
typed ``HedrlError``, or in an untyped exception; an input during which the
process dies is a crash, one that takes longer than ``--hang-after`` seconds a
hang. The inputs run in a child process that a supervisor restarts after the
input that killed or stalled it.

A bigger run prints its counts::

    python -m tests.protocol.test_fuzz_receive --inputs 20000 [--seed 1]
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

#: inputs of the CI-sized run: 9 s alone on this 2-vCPU machine (20,000 took 30 s)
CI_INPUTS = 6000
CI_SEED = 20261207
HANG_AFTER_S = 20.0
SETUP_S = 120.0  # a child's imports and keys, before its first input
MODULE = "tests.protocol.test_fuzz_receive"
MARK = "FUZZ "  # the child's lines for the supervisor start with it
PLANT_ENV = "HEDRL_FUZZ_PLANT"  # e.g. "crash:3,hang:5" (the supervisor's test)
_SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None
OUTCOMES = ("accepted", "typed", "untyped", "invalid")


# ---- the child: one process running inputs ------------------------------------------
def _bases(key_dir: Path) -> tuple[Any, Any, list[Any]]:
    from protocol import keys
    from protocol.params import get_param_set
    from tests.helpers import wire_expect
    from tests.protocol.fuzz_inputs import Base
    from tests.seal_bytes import SealCiphertext

    ps = get_param_set("8k-35x3")
    part, fp = keys.participant_backend(key_dir / "participant.ctx", ps, "ckks")
    coord, _ = keys.coordinator_backend(
        (key_dir / "coordinator.ctx").read_bytes(), ps, "ckks"
    )
    rng = np.random.default_rng(0)
    top = coord.load(part.encrypt(rng.uniform(-1, 1, ps.slots)), level=ps.depth)
    bottom = coord.to_bottom(top)
    primes = [int(p) for p in coord._primes]
    bases = []
    for name, ct, level, kind in (
        ("gradient", top, ps.depth, "gradient"),
        ("theta", bottom, 0, "theta"),
    ):
        other = 0 if level else 1
        bases.append(
            Base(
                name,
                part.encrypt(rng.uniform(-1, 1, ps.slots), level=level),
                SealCiphertext.of(ct.data),
                wire_expect(ps, fp, kind=kind, level=level),
                tuple(int(w) for w in coord._parms_by_level[other]),
                primes[: level + 1],
            )
        )
    return part, coord, bases


def _attempt(fn: Callable[[], Any], valid: Callable[[Any], bool]) -> list[str]:
    from protocol.errors import HedrlError

    try:
        out = fn()
    except HedrlError as exc:
        return ["typed", type(exc).__name__]
    except Exception as exc:  # what the test counts: must stay zero
        return ["untyped", f"{type(exc).__name__}: {exc}"[:300]]
    return ["accepted", ""] if valid(out) else ["invalid", repr(out)[:300]]


def _paths(inp: Any, part: Any, coord: Any, tmp: Path) -> dict[str, list[str]]:
    """Every receiving path this input applies to: outcome and detail."""
    from protocol.codec import receive_cts, receive_plain
    from tests.protocol.fuzz_inputs import KEY

    exp = inp.base.expect
    slots = part.params.slots

    def cts_ok(cts: Any) -> bool:
        return len(cts) == exp.chunk_count and all(
            c.level == exp.level and coord.check(c.data, exp.level) for c in cts
        )

    def values_ok(v: Any) -> bool:
        return isinstance(v, np.ndarray) and v.dtype == np.float64 and v.ndim == 1

    rd = inp.as_record()
    out = {
        "receive_cts": _attempt(lambda: receive_cts(coord, rd, KEY, exp), cts_ok),
        "receive_plain": _attempt(lambda: receive_plain(part, rd, KEY, exp), values_ok),
    }
    if inp.chunk is not None:
        chunk, path = inp.chunk, tmp / "chunk"
        path.write_bytes(chunk)
        out["load"] = _attempt(lambda: [coord.load(chunk, level=exp.level)], cts_ok)
        out["load_file"] = _attempt(
            lambda: [coord.load_file(path, level=exp.level)], cts_ok
        )
        out["decrypt"] = _attempt(
            lambda: part.decrypt(chunk, level=exp.level),
            lambda v: values_ok(v) and v.shape == (slots,),
        )
    return out


def child(key_dir: Path, seed: int, start: int, stop: int) -> None:
    """Run inputs ``start`` … ``stop`` − 1, one JSON line each, announced first."""
    from tests.protocol.fuzz_inputs import make_input

    part, coord, bases = _bases(key_dir)
    # the supervisor's own test: die or stall at these inputs
    planted = dict(
        (int(i), what)
        for what, i in (
            item.split(":") for item in os.environ.get(PLANT_ENV, "").split(",") if item
        )
    )
    with tempfile.TemporaryDirectory(dir=_SHM) as d:
        for i in range(start, stop):
            print(MARK + json.dumps({"start": i}), flush=True)
            if planted.get(i) == "crash":
                os.abort()
            if planted.get(i) == "hang":
                time.sleep(3600)
            inp = make_input(seed, i, bases)
            res = _paths(inp, part, coord, Path(d))
            line = json.dumps({"i": i, "cat": inp.category, "res": res})
            print(MARK + line, flush=True)


# ---- the supervisor -----------------------------------------------------------------
def _lines(proc: subprocess.Popen[bytes], limit: list[float]) -> Iterator[str | None]:
    """The child's output lines as they arrive (read unbuffered, so that waiting
    is on the pipe, not on a line a buffer already holds); None if none arrives
    within ``limit[0]`` seconds. Ends when the child closes its output."""
    assert proc.stdout is not None
    fd, pending = proc.stdout.fileno(), b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                yield line.decode(errors="replace")
            if not sel.select(timeout=limit[0]):
                yield None
                return
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return
            pending += chunk


def fuzz(
    key_dir: Path, inputs: int, seed: int, hang_after: float = HANG_AFTER_S
) -> dict[str, Any]:
    """Run ``inputs`` inputs in child processes; the counts (per attempt and per
    input) with the first examples of every outcome that is not allowed."""
    from tests.protocol.fuzz_inputs import CATEGORIES

    attempts: Counter[str] = Counter()
    per_category: dict[str, Counter[str]] = {c: Counter() for c in CATEGORIES}
    examples: dict[str, list[Any]] = {k: [] for k in ("untyped", "invalid")}
    examples.update(crash=[], hang=[])
    next_i, t0 = 0, time.perf_counter()
    cmd = [sys.executable, "-X", "faulthandler", "-m", MODULE, "--child"]
    cmd += ["--keys", str(key_dir), "--seed", str(seed), "--stop", str(inputs)]
    with tempfile.TemporaryFile("w+") as errors:  # the children's stderr
        while next_i < inputs:
            errors.seek(0)
            errors.truncate()
            proc = subprocess.Popen(
                [*cmd, "--start", str(next_i)],
                stdout=subprocess.PIPE,
                stderr=errors,
                cwd=Path(__file__).resolve().parents[2],
            )
            current: int | None = None  # the input started and not reported
            limit = [SETUP_S]  # imports and keys first, then one input at a time
            stalled = False
            for line in _lines(proc, limit):
                if line is None:
                    stalled = True
                    break
                if not line.startswith(MARK):  # a library's own output
                    continue
                limit[0] = hang_after
                rec = json.loads(line[len(MARK) :])
                if "start" in rec:
                    current = rec["start"]
                    continue
                current, next_i = None, rec["i"] + 1
                per_category[rec["cat"]]["inputs"] += 1
                for path, (outcome, detail) in rec["res"].items():
                    attempts[outcome] += 1
                    per_category[rec["cat"]][outcome] += 1
                    if outcome in examples and len(examples[outcome]) < 10:
                        examples[outcome].append((rec["i"], rec["cat"], path, detail))
            if proc.poll() is None:
                proc.kill()
            rc = proc.wait()
            errors.seek(0)
            err = errors.read()[-2000:]
            if current is None:  # between inputs: done, or a broken start
                if stalled or rc != 0:
                    raise RuntimeError(f"fuzz child failed (rc {rc}): {err}")
                continue
            examples["hang" if stalled else "crash"].append(
                current if stalled else (current, rc, err)
            )
            next_i = current + 1
    return {
        "inputs": inputs,
        "seed": seed,
        "attempts": sum(attempts.values()),
        **{o: attempts[o] for o in OUTCOMES},
        "crashes": len(examples["crash"]),
        "hangs": len(examples["hang"]),
        "wall_s": round(time.perf_counter() - t0, 1),
        "per_category": {c: dict(v) for c, v in per_category.items()},
        "examples": examples,
    }


@pytest.mark.slow  # CI-sized: CI runs it, the fast loop does not
def test_fuzz_receiving_paths_only_typed_errors(ckks_pair):
    """A CI-sized run: no untyped exception, crash or hang on any path, no
    accepted chunk that fails the checks; every category produced inputs, and
    both typed refusals and accepted inputs occur (the fuzzer reaches past the
    first check)."""
    from tests.protocol.fuzz_inputs import CATEGORIES

    counts = fuzz(ckks_pair[3], CI_INPUTS, CI_SEED)
    bad = {k: counts[k] for k in ("untyped", "invalid", "crashes", "hangs")}
    assert bad == dict.fromkeys(bad, 0), (bad, counts["examples"])
    for name in CATEGORIES:
        got = counts["per_category"][name]
        assert got.get("inputs", 0) >= CI_INPUTS // len(CATEGORIES) - 1, (name, got)
        assert got.get("typed", 0) > 0, (name, got)
    assert counts["accepted"] > 0 and counts["typed"] > counts["accepted"], counts


@pytest.mark.slow  # a sweep: CI runs it, the fast loop does not
def test_fuzz_supervisor_counts_planted_crash_and_hang(ckks_pair, monkeypatch):
    """A child that aborts at input 2 and stalls at input 4 is counted as one
    crash and one hang, restarted after each, and the other inputs still run."""
    monkeypatch.setenv(PLANT_ENV, "crash:2,hang:4")
    counts = fuzz(ckks_pair[3], 7, CI_SEED, hang_after=3.0)
    assert (counts["crashes"], counts["hangs"]) == (1, 1), counts
    assert [e[0] for e in counts["examples"]["crash"]] == [2]
    assert counts["examples"]["hang"] == [4]
    done = sum(c.get("inputs", 0) for c in counts["per_category"].values())
    assert done == 5 and counts["untyped"] == 0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--inputs", type=int, default=CI_INPUTS)
    ap.add_argument("--seed", type=int, default=CI_SEED)
    ap.add_argument("--keys", type=Path, help="key directory (default: a fresh key)")
    ap.add_argument("--hang-after", type=float, default=HANG_AFTER_S)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--stop", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.keys, args.seed, args.start, args.stop)
        return
    with tempfile.TemporaryDirectory() as d:
        key_dir = args.keys
        if key_dir is None:
            from protocol import keys
            from protocol.params import get_param_set

            key_dir = Path(d)
            keys.write_keys(key_dir, get_param_set("8k-35x3"), "ckks", force=True)
        counts = fuzz(key_dir, args.inputs, args.seed, args.hang_after)
    print(json.dumps(counts, indent=1))


if __name__ == "__main__":
    main()
