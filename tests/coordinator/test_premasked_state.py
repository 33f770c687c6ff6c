"""The state a step masked for the next refresher is sent once; anyone asking
again in the same round (a spare) gets newly drawn masks (plaintext twin)."""

from __future__ import annotations

import numpy as np
from flwr.app import RecordDict

from coordinator.chunks import masks_by_chunk, step_chunks
from coordinator.masking import StateMasker
from protocol import messages as msg
from protocol.adam import AdamHyper, StateUnits
from protocol.backend import Ct
from protocol.records import read_vector
from tests.helpers import wire_expect


def _expect(plain, n: int):
    return lambda name: wire_expect(
        plain.params, "f" * 64, "plain", "state", 0, chunk_count=n, name=name, round=3
    )


def _sent(plain, n: int, rd: RecordDict) -> list[list[np.ndarray]]:
    """The masked m, V, r per chunk as the refresher would read them."""
    out, expect = [], _expect(plain, n)
    for name in msg.STATE_NAMES:
        _, chunks = read_vector(rd, msg.state_key("state", name), expect(name))
        out.append([plain.load(c, level=0).data for c in chunks])
    return [list(per) for per in zip(*out, strict=True)]


def test_step_masks_once_then_fresh_masks(plain):
    n, top, slots = 2, plain.top_level, plain.slots
    rng = np.random.default_rng(0)
    masker = StateMasker(plain, AdamHyper(), n, 20, np.random.default_rng(1))
    theta = [Ct(rng.uniform(-1, 1, slots), 0) for _ in range(n)]
    state = [
        (
            Ct(rng.uniform(-0.1, 0.1, slots), top),
            Ct(rng.uniform(0.01, 0.1, slots), top),
            Ct(rng.uniform(3.0, 10.0, slots), top),
        )
        for _ in range(n)
    ]
    grads = [[Ct(rng.uniform(-0.01, 0.01, slots), top)] for _ in range(n)]
    masks_next = masker.draw()
    assert len(masks_next) == 3 * n
    res = step_chunks(
        plain,
        theta,
        state,
        top,
        None,
        grads,
        1,
        AdamHyper(),
        mask_next=masks_by_chunk(masks_next, n),
    )
    assert res.masked is not None
    masker.pending = (res.masked, masks_next)

    rd, masks, _ = masker.records(res.state, _expect(plain, n), 3)
    assert masks is masks_next and masker.pending is None
    per_chunk = masks_by_chunk(masks, n)
    out = StateUnits.of(plain, AdamHyper()).out  # stored data = out·value; masks too
    for i, got in enumerate(_sent(plain, n, rd)):
        for j in range(3):
            new = res.state[i][j].data
            np.testing.assert_array_equal(got[j], new + out[j] * per_chunk[i][j])
            assert np.max(np.abs(got[j] - new)) > 1e5  # masked at ±2^20

    # a second request in the same round (a spare): other masks, same state
    rd2, masks2, _ = masker.records(res.state, _expect(plain, n), 3)
    assert all(not np.array_equal(a, b) for a, b in zip(masks, masks2, strict=True))
    per_chunk2 = masks_by_chunk(masks2, n)
    for i, got in enumerate(_sent(plain, n, rd2)):
        for j in range(3):
            want = res.state[i][j].data + out[j] * per_chunk2[i][j]
            np.testing.assert_array_equal(got[j], want)
