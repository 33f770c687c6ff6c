"""The state a step masked for the next refresher is sent once; anyone asking
again in the same round (a spare) gets newly drawn masks (plaintext twin)."""

from __future__ import annotations

import numpy as np
from flwr.app import RecordDict

from coordinator.chunks import masks_by_chunk, step_chunks
from coordinator.federation import Federation
from protocol import messages as msg
from protocol.adam import AdamHyper, StateUnits
from protocol.backend import Ct
from protocol.config import RunConfig
from protocol.records import read_vector


def _fed(plain, n: int) -> Federation:
    """A Federation with only what masking needs (as hedrl-bench builds it)."""
    fed = Federation.__new__(Federation)
    fed.cfg = RunConfig(mask_bits=20, backend="plain")
    fed.params, fed.be, fed.fingerprint = plain.params, plain, "f" * 64
    fed.run_id, fed.layout_digest, fed.n_chunks = 7, "test", n
    fed._mask_rng, fed._premasked, fed._round = np.random.default_rng(1), None, 3
    fed.hp = AdamHyper()
    return fed


def _sent(fed: Federation, rd: RecordDict) -> list[list[np.ndarray]]:
    """The masked m, V, r per chunk as the refresher would read them."""
    out = []
    for name in msg.STATE_NAMES:
        exp = fed._expect("state", 0, None, name)
        _, chunks = read_vector(rd, msg.state_key("state", name), exp)
        out.append([fed.be.load(c, level=0).data for c in chunks])
    return [list(per) for per in zip(*out, strict=True)]


def test_step_masks_once_then_fresh_masks(plain):
    n, top, slots = 2, plain.top_level, plain.slots
    rng = np.random.default_rng(0)
    fed = _fed(plain, n)
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
    masks_next = fed._draw_masks()
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
    fed.state, fed._premasked = res.state, (res.masked, masks_next)

    rd, masks, _ = fed._masked_state()
    assert masks is masks_next and fed._premasked is None
    per_chunk = masks_by_chunk(masks, n)
    out = StateUnits.of(plain, fed.hp).out  # stored data = out·value; masks too
    for i, got in enumerate(_sent(fed, rd)):
        for j in range(3):
            new = res.state[i][j].data
            np.testing.assert_array_equal(got[j], new + out[j] * per_chunk[i][j])
            assert np.max(np.abs(got[j] - new)) > 1e5  # masked at ±2^20

    # a second request in the same round (a spare): other masks, same state
    rd2, masks2, _ = fed._masked_state()
    assert all(not np.array_equal(a, b) for a, b in zip(masks, masks2, strict=True))
    per_chunk2 = masks_by_chunk(masks2, n)
    for i, got in enumerate(_sent(fed, rd2)):
        for j in range(3):
            want = res.state[i][j].data + out[j] * per_chunk2[i][j]
            np.testing.assert_array_equal(got[j], want)
