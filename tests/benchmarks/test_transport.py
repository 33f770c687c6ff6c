"""benchmarks.transport: per-object push/pull through a real loopback HTTP link."""

from __future__ import annotations

import json

from benchmarks import transport


def test_layouts_round_trip_and_protocol_3_needs_fewer_objects(tmp_path):
    """At P = 12288 (3 chunks), K = 2: both layouts pull back exactly the bytes
    pushed (``measure`` raises otherwise), and protocol 3's one-array vectors
    take fewer objects; its object count does not grow with the chunk count."""
    out = tmp_path / "t.json"
    assert (
        transport.main(
            [
                "--params",
                "12288,40960",
                "--participants",
                "2",
                "--reps",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    recs = json.loads(out.read_text())
    assert len(recs) == 4
    by = {(r["layout"], r["params"]): r for r in recs}
    for r in recs:
        assert r["participants"] == 2 and r["reps"] == 1
        assert r["chunks"] == -(-r["params"] // transport.SLOTS)
        assert r["push_s"] > 0 and r["pull_s"] > 0 and len(r["push_s_all"]) == 1
    for p in (12288, 40960):
        assert by[3, p]["push_objects"] < by[2, p]["push_objects"]
        assert by[3, p]["pull_objects"] < by[2, p]["pull_objects"]
    # layout 2: two more objects per chunk (an Array and its piece) per vector
    assert by[2, 40960]["push_objects"] - by[2, 12288]["push_objects"] == 4 * 7 * 2
    assert by[3, 40960]["push_objects"] == by[3, 12288]["push_objects"]
    assert by[3, 40960]["pull_objects"] == by[3, 12288]["pull_objects"]
