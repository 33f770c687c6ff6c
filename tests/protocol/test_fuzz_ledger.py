"""Structured fuzz of the ledger reader: the coordinator writes ledger.jsonl as
it likes, and a participant's release reads it. Every mutation ends in the
typed KeyMaterialError or a valid chain, never another exception."""

from __future__ import annotations

import json
import random

from protocol.errors import KeyMaterialError
from protocol.ledger import read_chain

DIGEST = "ab" * 32


def _valid(steps: int = 4) -> list[dict]:
    lines: list[dict] = []
    for t in range(1, steps + 1):
        line = {
            "step": t,
            "wire": t + 2,
            "parent": t - 1,
            "k": 1.0,
            "updates": [[0, DIGEST], [1, "cd" * 32]],
        }
        if t == 1:
            line["init"] = {"k": 1.0, "squares": [[0, DIGEST], [1, "cd" * 32]]}
        lines.append(line)
    lines.append({"final": steps + 3, "head": steps})
    return lines


WEIRD = [
    None,
    True,
    0,
    -1,
    2**63,
    10**30,
    1.5,
    float("nan"),
    float("inf"),
    -float("inf"),
    1e308,
    "",
    "x",
    DIGEST.upper(),
    "g" * 64,
    [],
    [[]],
    [[0]],
    [[0, DIGEST, 1]],
    [["0", DIGEST]],
    [[-1, DIGEST]],
    [[True, DIGEST]],
    {},
    {"k": 1.0},
    [0] * 1000,
]


LONG = "".join(json.dumps(x) + "\n" for x in _valid(3000)).encode()


def _mutate(rng: random.Random, lines: list[dict]) -> bytes:
    kind = rng.randrange(8)
    if kind == 0:  # a field gets a weird value
        line = rng.choice(lines)
        key = rng.choice([*line, "step", "init", "final", "head", "extra"])
        line[key] = rng.choice(WEIRD)
    elif kind == 1:  # nested field
        line = rng.choice(lines)
        if "init" in line:
            line["init"][rng.choice(["k", "squares", "x"])] = rng.choice(WEIRD)
    elif kind == 2:  # lines dropped, repeated or shuffled
        op = rng.randrange(3)
        if op == 0 and lines:
            lines.pop(rng.randrange(len(lines)))
        elif op == 1:
            lines.insert(rng.randrange(len(lines) + 1), dict(rng.choice(lines)))
        else:
            rng.shuffle(lines)
    elif kind == 3:  # a parent cycle or a far parent
        line = rng.choice(lines)
        if "step" in line:
            line["parent"] = rng.choice([line["step"], line["step"] + 1, 10**9, -5])
    text = "".join(json.dumps(x, allow_nan=True) + "\n" for x in lines).encode()
    if kind == 4:  # truncated
        text = text[: rng.randrange(len(text) + 1)]
    elif kind == 5:  # bytes flipped
        data = bytearray(text)
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        text = bytes(data)
    elif kind == 6:  # not JSON at all, or deeply nested
        text = rng.choice([b"\xff\xfe\x00", b"[" * 100000, b"{}" * 10, b"\n\n", b""])
    elif kind == 7:  # a long chain of self-consistent steps
        text = LONG
    return text


def test_fuzz_ledger_reader_only_typed_errors(tmp_path):
    rng = random.Random(20261207)
    path = tmp_path / "ledger.jsonl"
    counts = {"typed": 0, "valid": 0}
    for _ in range(1000):
        path.write_bytes(_mutate(rng, _valid()))
        try:
            wire, chain = read_chain(path)
        except KeyMaterialError:
            counts["typed"] += 1
            continue
        counts["valid"] += 1
        assert chain and chain[0].parent == 0 and chain[0].init is not None
        wires = [e.wire for e in chain] + [wire]
        assert all(a < b for a, b in zip(wires, wires[1:], strict=False))
    assert counts["typed"] > 350 and counts["valid"] > 50
