"""Setup, error and final replies crafted as an attacker would (second audit):
the coordinator fails setup with a typed error naming the participant, or goes
on without the reply; no reply ends a run without its summary.

Real participants and coordinator in-process (benchmarks.local_grid); a
``tamper`` hook replaces or edits replies on their way back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flwr.app import Error, Message

from protocol import keys
from protocol import messages as msg
from protocol.errors import HeaderMismatch, HedrlError, KeyMaterialError
from protocol.params import get_param_set
from tests.helpers import local_federation, local_raw

RUN_ID = 717
PS = get_param_set("8k-35x3")


def _run(tmp: Path, edit, backend: str = "plain", **extra: Any):
    """3 participants, 3 rounds; ``edit(request, reply)`` returns the reply."""
    raw = local_raw(
        tmp,
        **{
            "backend": backend,
            "num-participants": 3,
            "num-rounds": 3,
            "seed": 5,
            "run-name": "r",
            "round-timeout": 5.0,
            "coordinator-workers": 0,
            **extra,
        },
    )
    fed = local_federation(raw, RUN_ID, tamper=edit)
    return fed, fed.run()


def _error(request: Message, reason: str | None) -> Message:
    return Message(Error(code=2, reason=reason), reply_to=request)


@pytest.mark.parametrize("reason", [None, "", "x" * 1_000_000])
def test_malicious_error_reasons_do_not_end_the_run(tmp_path, reason):
    """Error replies with no reason (Flower hands an empty one over as None),
    an empty one or a huge one, in a round, in the round-1 V0 exchange and at
    the final: the run completes, the reason is kept short."""

    def edit(request: Message, reply: Message) -> Message:
        kind = request.metadata.message_type
        node = request.metadata.dst_node_id
        if (kind, node) in ((msg.TRAIN, 1001), (msg.V0, 1001), (msg.FINAL, 1002)):
            return _error(request, reason)
        return reply

    fed, summary = _run(tmp_path, edit)
    assert summary["rounds"] == 3 and summary["final"]["tagged"] == 2
    assert all(1001 in r["missing"] for r in fed.history)
    assert len(str(fed.history)) < 100_000


@pytest.mark.parametrize(
    "field, value, error",
    [
        ("last-round", 2**31, "'last-round': expected an int"),
        ("last-round", True, "'last-round': expected an int"),
        ("param-count", 9000, "param-count of participant 1001"),
        ("context", 2**40, "'context': expected bytes"),
        ("fingerprint", "zz", "'fingerprint': expected 64 hex digits"),
    ],
)
def test_malicious_setup_fields_fail_setup_naming_the_participant(
    tmp_path, field, value, error
):
    """Each setup field is type- and range-checked (a huge last-round would push
    every round number past what participants serve; a differing param-count
    would make every θ refused); all of them fail setup with a typed error."""

    def edit(request: Message, reply: Message) -> Message:
        node = request.metadata.dst_node_id
        target = 1000 if field == "context" else 1001
        if request.metadata.message_type == msg.SETUP and node == target:
            reply.content[msg.SETUP_REPLY][field] = value
        return reply

    with pytest.raises((HedrlError, HeaderMismatch), match=error):
        _run(tmp_path, edit)


def test_malicious_setup_without_record_or_past_max_rounds_fails_typed(tmp_path):
    """A setup reply without its record, and a last-round so high that the run
    would need rounds past what a participant serves, fail setup naming it."""

    def no_record(request: Message, reply: Message) -> Message:
        if request.metadata.message_type == msg.SETUP:
            if request.metadata.dst_node_id == 1002:
                del reply.content[msg.SETUP_REPLY]
        return reply

    with pytest.raises(HedrlError, match="participant 1002 failed setup"):
        _run(tmp_path / "a", no_record)

    def late(request: Message, reply: Message) -> Message:
        if request.metadata.message_type == msg.SETUP:
            reply.content[msg.SETUP_REPLY]["last-round"] = 60_000
        return reply

    with pytest.raises(HedrlError, match="serves rounds up to 100000"):
        _run(tmp_path / "b", late)


@pytest.mark.parametrize("index", [True, 2**40, "duplicate"])
def test_malicious_final_reply_index_is_dropped_not_fatal(tmp_path, index):
    """A final reply whose participant-index is a bool, out of range or another
    participant's is dropped; the others confirm and the summary is written."""

    def edit(request: Message, reply: Message) -> Message:
        if (
            request.metadata.message_type == msg.FINAL
            and request.metadata.dst_node_id == 1000
        ):
            value = 1 if index == "duplicate" else index
            reply.content[msg.FINAL_REPLY]["participant-index"] = value
        return reply

    _, summary = _run(tmp_path, edit)
    assert summary["final"]["tagged"] == 2
    assert sorted(summary["final"]["confirmed"])[-2:] == [1001, 1002]


def test_malicious_one_bad_tag_does_not_block_the_majority(tmp_path):
    """A relayed tag that matches nothing counts for nothing: with the other two
    tags matching, all three participants still confirm the final θ."""

    def edit(request: Message, reply: Message) -> Message:
        if (
            request.metadata.message_type == msg.FINAL
            and request.metadata.dst_node_id == 1002
        ):
            reply.content[msg.FINAL_REPLY]["tag"] = bytes(32)
        return reply

    _, summary = _run(tmp_path, edit)
    assert summary["final"]["tagged"] == 3
    assert summary["final"]["confirmed"] == [1000, 1001, 1002]


def test_malicious_one_reply_cannot_make_the_round_return(tmp_path):
    """With episode reporting a minority, a round reports no return: a single
    reply cannot decide return_mean (and so stop-return or the summary)."""

    def edit(request: Message, reply: Message) -> Message:
        if request.metadata.message_type == msg.TRAIN and not reply.has_error():
            metrics = reply.content[msg.METRICS]
            if request.metadata.dst_node_id != 1000:
                for key in ("episodes", "return-sum"):
                    if key in metrics:
                        del metrics[key]
            elif "episodes" in metrics:
                metrics["episodes"], metrics["return-sum"] = 1, 10_000.0
        return reply

    fed, summary = _run(tmp_path, edit, **{"stop-return": 100.0})
    assert summary["rounds"] == 3
    assert all(r["return_mean"] is None for r in fed.history)


def test_malicious_damaged_secret_key_is_refused(tmp_path):
    """A flipped bit in the secret-key part of participant.ctx (which the
    fingerprint over the public keys does not cover) is caught by the file's
    checksum instead of loading with the same fingerprint."""
    keys.write_keys(tmp_path, PS, "ckks", force=False)
    path = tmp_path / keys.PARTICIPANT_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 5] ^= 0x10  # inside the TenSEAL context (the secret key)
    path.write_bytes(bytes(data))
    with pytest.raises(KeyMaterialError, match="checksum"):
        keys.participant_backend(path, PS, "ckks")
