"""Structured fuzz of the relay a participant receives with every θ: the
coordinator writes it as it likes. Every mutation ends in a typed
WireFormatError (RelayError is one) or a relay that holds together, never
another exception; sealed garbage never opens."""

from __future__ import annotations

import json
import random

import numpy as np
from flwr.app import ConfigRecord

from protocol.errors import WireFormatError
from protocol.ledger import Entry
from protocol.relay import Relay, Update, open_sealed, parse_relay, relay_key, seal

D1, D2 = "ab" * 32, "cd" * 32


def _valid(steps: int = 3) -> Relay:
    entries = [
        Entry(
            t,
            t + 2,
            t - 1,
            1.0,
            [(0, D1), (1, D2)],
            *((1.0, [(0, D1)]) if t == 1 else ()),
        )
        for t in range(1, steps + 1)
    ]
    sealed = {(i, t + 2): bytes(40) for t in range(1, steps + 1) for i in (0, 1)}
    return Relay(0, "", steps, "ef" * 32, entries, sealed)


JSON_WEIRD = [None, True, 0, -1, 2**40, 1.5, float("nan"), "", "x", [], [1], ["a"]]
WEIRD = [
    None,
    True,
    0,
    -1,
    2**40,
    1.5,
    float("nan"),
    "",
    "x",
    b"",
    [],
    [1],
    ["a"],
    [b"x"],
]


def _mutate(rng: random.Random) -> ConfigRecord:
    rec = dict(_valid().record())
    kind = rng.randrange(5)
    key = rng.choice([*rec, "extra"])
    if kind == 0:
        rec[key] = rng.choice(WEIRD)
    elif kind == 1:  # the entries' JSON: a field of one step changed
        entries = json.loads(rec["entries"])
        e = rng.choice(entries)
        e[rng.choice([*e, "init"])] = rng.choice([*JSON_WEIRD, [[0, D1]], {"k": 1.0}])
        rec["entries"] = json.dumps(entries, allow_nan=True)
    elif kind == 2:  # truncated or nested JSON
        text = rec["entries"]
        rec["entries"] = rng.choice([text[: rng.randrange(len(text))], "[" * 50000])
    elif kind == 3:  # list lengths that disagree, duplicated updates
        name = rng.choice(["sealed-index", "sealed-round", "sealed"])
        rec[name] = rec[name][:-1] if rng.random() < 0.5 else rec[name] * 2
    else:  # steps reordered or a step dropped
        entries = json.loads(rec["entries"])
        rng.shuffle(entries) if rng.random() < 0.5 else entries.pop(rng.randrange(3))
        rec["entries"] = json.dumps(entries)
    out = ConfigRecord()
    for k, v in rec.items():
        try:
            out[k] = v
        except (TypeError, ValueError):  # not a value a ConfigRecord can hold
            pass
    return out


def test_fuzz_relay_parser_only_typed_errors():
    rng = random.Random(20261207)
    counts = {"typed": 0, "valid": 0}
    for _ in range(1500):
        try:
            relay = parse_relay(_mutate(rng))
        except WireFormatError:
            counts["typed"] += 1
            continue
        counts["valid"] += 1
        at = relay.base
        for e in relay.entries:
            assert e.parent == at
            at = e.step
        assert at == relay.head
    assert counts["typed"] > 500 and counts["valid"] > 50, counts


def test_fuzz_sealed_updates_open_only_unchanged():
    """A sealed update opens only under its key, round and index, and every
    flipped byte makes it fail typed."""
    rng = np.random.default_rng(7)
    key = relay_key(bytes(32))
    grad = np.round(rng.normal(0, 1e-3, 100) / 2**-22) * 2**-22
    blob = seal(key, 5, 1, Update(grad, D1))
    assert np.array_equal(open_sealed(key, blob, 5, 1, 100).gradient, grad)
    for args in (
        (relay_key(bytes(31) + b"\x01"), blob, 5, 1),
        (key, blob, 6, 1),
        (key, blob, 5, 0),
    ):
        try:
            open_sealed(*args, 100)
            raise AssertionError("opened")
        except WireFormatError:
            pass
    for _ in range(300):
        bad = bytearray(blob)
        bad[int(rng.integers(len(bad)))] ^= 1 << int(rng.integers(8))
        try:
            open_sealed(key, bytes(bad), 5, 1, 100)
            raise AssertionError("a flipped byte opened")
        except WireFormatError:
            pass
