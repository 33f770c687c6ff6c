"""Bad input the coordinator can check itself: typed errors, nothing parsed early."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, Message, RecordDict

from coordinator.exchange import exchange
from coordinator.replies import Reply, parse_reply, participant_stages
from protocol import messages as msg
from protocol.codec import receive_cts, send_plain
from protocol.config import RunConfig
from protocol.errors import (
    CiphertextError,
    ConfigError,
    ReplyRejected,
    UpdateRejected,
    WireFormatError,
)
from protocol.records import write_vector
from protocol.wire import MAX_CHUNK_BYTES, make_header
from tests.helpers import wire_expect


def test_oversize_chunk_rejected_before_parsing(ckks_pair, ps):
    """A chunk above MAX_CHUNK_BYTES is refused by size, naming the limit."""
    _, coord, fp, _ = ckks_pair
    rd = RecordDict()
    big = bytes(MAX_CHUNK_BYTES + 1)
    write_vector(
        rd,
        "gradient",
        make_header(wire_expect(ps, fp), value_count=10, round_=1),
        [big],
    )
    with pytest.raises(WireFormatError, match=f"at most {MAX_CHUNK_BYTES}"):
        receive_cts(coord, rd, "gradient", wire_expect(ps, fp))


def test_ciphertext_at_wrong_level_rejected(ckks_pair, ps):
    """A chunk one level down with a header claiming the top level is refused."""
    part, coord, fp, _ = ckks_pair
    ct = coord.load(part.encrypt(np.ones(ps.slots)), level=ps.depth)
    lower = coord.to_level(ct, ps.depth - 1)
    rd = RecordDict()
    write_vector(
        rd,
        "gradient",
        make_header(wire_expect(ps, fp), value_count=10, round_=1),
        [coord.dump(lower)],
    )
    with pytest.raises(CiphertextError, match=f"level {ps.depth - 1}, expected level"):
        receive_cts(coord, rd, "gradient", wire_expect(ps, fp))


def test_ciphertext_of_other_parameter_set_rejected(ckks_pair, ps):
    """A 16k-50x6 ciphertext under an 8k-35x3 header does not parse as ours."""
    from protocol.keys import generate, participant_backend
    from protocol.params import get_param_set

    ps16 = get_param_set("16k-50x6")
    sec, _, _ = generate(ps16, "ckks")
    import tempfile
    from pathlib import Path

    d = Path(tempfile.mkdtemp())
    (d / "participant.ctx").write_bytes(sec)
    other, _ = participant_backend(d / "participant.ctx", ps16, "ckks")
    _, coord, fp, _ = ckks_pair
    rd = RecordDict()
    write_vector(
        rd,
        "gradient",
        make_header(wire_expect(ps, fp), value_count=10, round_=1),
        [other.encrypt(np.ones(ps16.slots))],
    )
    with pytest.raises(CiphertextError):
        receive_cts(coord, rd, "gradient", wire_expect(ps, fp))


def test_absurd_magnitude_refused_before_encryption(plain, ps):
    """|value| > 2^22 is refused at the participant (it would overflow CKKS)."""
    values = np.zeros(100)
    values[3] = 1e9
    with pytest.raises(UpdateRejected, match="at most"):
        send_plain(
            plain,
            RecordDict(),
            "gradient",
            values,
            wire_expect(ps, "f" * 64, backend="plain"),
            1,
        )


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"param-set": "32k-nope"}, "unknown parameter set"),
        ({"param-set": "8k-40x2"}, "depth 2; HE-Adam needs 3"),
        ({"backend": "paillier"}, "backend"),
        ({"lr": -1.0}, "lr: must be > 0"),
        ({"num-minibatches": 3}, "must divide the rollout"),
        ({"min-participants": 9}, "min-participants"),
        ({"optimizer": "exact-adam"}, "only with backend 'plain'"),
        ({"num-rounds": "many"}, "expected int"),
        ({"spare-refresher": "maybe"}, "expected bool"),
        ({"layer-bounds": "actor.0=0"}, "layer-bounds: expected 'layer-prefix=bound'"),
        ({"layer-bounds": "actor.0"}, "layer-bounds: expected 'layer-prefix=bound'"),
        ({"layer-bounds": "=0.1"}, "layer-bounds: expected 'layer-prefix=bound'"),
        ({"layer-bounds": "critic=nan"}, "layer-bounds: expected 'layer-prefix=bound'"),
        ({"layer-bounds": "critic=0.1,critic=0.2"}, "prefix 'critic' given twice"),
        ({"mask-bits": 23}, r"mask-bits: must be in \[1, 22\]"),
        # ±2^20 at Δ = 2^50 does not fit a 60-bit bottom prime: refused at start
        # instead of failing in the first step ("encoded values are too large")
        ({"param-set": "16k-50x6"}, r"mask-bits: must be in \[1, 8\].*bottom prime"),
    ],
)
def test_impossible_run_config_fails_at_start(raw, match):
    """Unknown parameter sets and impossible values raise ConfigError naming the key."""
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_mapping(raw)


class _DupGrid:
    """Returns every reply twice (a duplicated or replayed delivery)."""

    def __init__(self) -> None:
        self.replies: list[Message] = []
        self.first: dict[int, Message] = {}

    def push_messages(self, messages):
        ids = []
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"m{i}"
            first, second = (Message(RecordDict(), reply_to=m) for _ in range(2))
            self.first[m.metadata.dst_node_id] = first
            self.replies += [first, second]
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, ids):
        out, self.replies = self.replies, []
        return out


def test_second_reply_to_same_message_ignored():
    """Two replies to one request: the first counts, the second is dropped."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    grid = _DupGrid()
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (5, 6)]
    got = exchange(grid, msgs, timeout=1.0)
    assert set(got) == {5, 6}
    assert got[5] is grid.first[5] and got[6] is grid.first[6]


def test_raw_array_required(ps):
    """Chunk data that is not a raw uint8 Array is refused."""
    from protocol.records import read_vector

    rd = RecordDict()
    exp = wire_expect(ps, "a" * 64, "plain", layout_digest="b" * 64)
    write_vector(rd, "gradient", make_header(exp, value_count=1, round_=1), [b"x"])
    rd["gradient"]["data"] = Array(np.zeros(3, dtype=np.float32))
    with pytest.raises(WireFormatError, match="'data' missing or not a raw uint8"):
        read_vector(rd, "gradient", exp)


def test_ciphertext_at_wrong_scale_rejected(ckks_pair, ps):
    """A product whose SEAL scale is Δ²/q (not Δ) is refused, naming the scale."""
    import os
    import tempfile

    import tenseal.sealapi as sealapi

    part, coord, fp, _ = ckks_pair
    ct = coord.load(part.encrypt(np.full(ps.slots, 0.5)), level=ps.depth)
    raw = ct.data
    ev = sealapi.Evaluator(coord.ctx.seal_context().data)
    prod = sealapi.Ciphertext()
    ev.multiply(raw, raw, prod)
    ev.relinearize_inplace(prod, coord.ctx.relin_keys().data)
    ev.rescale_to_next_inplace(prod)  # SEAL keeps the true scale Δ²/q_l
    fd, path = tempfile.mkstemp()
    os.close(fd)
    prod.save(path)
    data = open(path, "rb").read()
    os.unlink(path)
    rd = RecordDict()
    exp = wire_expect(ps, fp, level=ps.depth - 1)
    write_vector(rd, "gradient", make_header(exp, value_count=10, round_=1), [data])
    with pytest.raises(
        CiphertextError,
        match=r"ciphertext scale 2\^35\.0000\d+ \(x1\.0000\d+ of Δ\), expected 2\^35",
    ):
        receive_cts(coord, rd, "gradient", exp)


@pytest.mark.parametrize("value", [float("nan"), -1.0, "x"])
def test_bad_stage_timing_rejects_reply_before_ciphertexts(plain, ps, value):
    """A timing that is not a finite, non-negative number rejects the reply
    (ReplyRejected naming the participant and the field) before any ciphertext
    is read."""
    metrics = {"episodes": 1, "return-sum": 1.0, "env-steps": 4}
    metrics["time-encrypt"] = value
    content = RecordDict({msg.METRICS: ConfigRecord(metrics)})  # no gradient at all
    match = rf"participant 7: metrics field 'time-encrypt': .*received {value!r}"
    with pytest.raises(ReplyRejected, match=match):
        parse_reply(
            content,
            t=2,
            node=7,
            masks=None,
            be=plain,
            expect=lambda *a, **k: None,
            squares=False,
        )


@pytest.mark.parametrize(
    ("episodes", "ret", "field"),
    [
        (0, 1e6, "return-sum"),
        (0, -0.5, "return-sum"),
        (2, 2.1e6, "return-sum"),
        (10**9, 1e15, "episodes"),
    ],  # more episodes than the 4 env steps
)
def test_a_return_without_its_episodes_rejects_the_reply(plain, episodes, ret, field):
    """A reply with no episodes carries no return (one such reply would set the
    round's mean return alone); with some, at most 1e6 per episode."""
    metrics = {"episodes": episodes, "return-sum": ret, "env-steps": 4}
    content = RecordDict({msg.METRICS: ConfigRecord(metrics)})
    with pytest.raises(ReplyRejected, match=rf"participant 7: metrics field '{field}'"):
        parse_reply(
            content,
            t=2,
            node=7,
            masks=None,
            be=plain,
            expect=lambda *a, **k: None,
            squares=False,
        )


def test_participant_stages_are_the_slowest_reply_per_stage():
    """Per stage the maximum over replies; busy is the largest per-reply sum;
    replies without timings (or none at all) add nothing."""
    times = [
        {"decrypt": 0.01, "learn": 0.05, "encrypt": 0.02, "refresh": 0.0},
        {"decrypt": 0.03, "learn": 0.01, "encrypt": 0.02, "refresh": 0.09},
        {},
    ]
    replies = [
        Reply(n, [], None, None, None, 0, 0.0, 0, 0, s) for n, s in enumerate(times)
    ]
    got = participant_stages(replies)
    assert got == pytest.approx(
        {
            "participant/decrypt_s": 0.03,
            "participant/learn_s": 0.05,
            "participant/encrypt_s": 0.02,
            "participant/refresh_s": 0.09,
            "participant/busy_s": 0.15,
            "participant/total_s": 0.23,
        }
    )
    assert participant_stages(replies[2:]) == {}
