"""A run's folder, progress line, learning curve and summary fields."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from PIL import Image

from coordinator.curve import Curve
from coordinator.run_dir import default_name, open_metrics, run_dir
from coordinator.summary import Progress, solve_threshold, versions
from protocol.config import RunConfig
from protocol.errors import ConfigError


def _cfg(tmp_path: Path, **extra) -> RunConfig:
    return RunConfig.from_mapping({"results-dir": str(tmp_path), **extra})


def _row(ret: float | None, steps: int = 512, round_s: float = 2.0) -> dict:
    return {"return_mean": ret, "env_steps": steps, "round_s": round_s}


def test_default_names_are_dated_and_never_reused(tmp_path):
    first = run_dir(_cfg(tmp_path))
    second = run_dir(_cfg(tmp_path))
    assert re.fullmatch(r"CartPole-v1-\d{8}-\d{6}(-2)?", first.name)
    assert first != second and first.is_dir() and second.is_dir()
    assert default_name("Acrobot-v1", 0.0) == "Acrobot-v1-19700101-000000"


@pytest.mark.parametrize("held", ["metrics.jsonl", "summary.json", "checkpoint.npz"])
def test_a_named_folder_holding_a_run_is_refused_unless_resuming(tmp_path, held):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / held).write_text("{}")
    with pytest.raises(ConfigError, match=r"run-name 'r'.*already holds a run.*resume"):
        run_dir(_cfg(tmp_path, **{"run-name": "r"}))
    assert (tmp_path / "r" / held).read_text() == "{}"  # nothing overwritten
    ckpt = str(tmp_path / "r" / "checkpoint.npz")
    assert run_dir(_cfg(tmp_path, **{"run-name": "r", "resume-from": ckpt})).is_dir()
    # an empty folder of that name is not a run
    (tmp_path / "empty").mkdir()
    assert run_dir(_cfg(tmp_path, **{"run-name": "empty"})) == tmp_path / "empty"


def test_resuming_keeps_earlier_rows_and_sets_later_ones_aside(tmp_path):
    rows = [json.dumps({"round": t, "x": t}) for t in range(1, 8)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    with open_metrics(tmp_path, 5) as fh:
        fh.write(json.dumps({"round": 6, "x": "new"}) + "\n")
    kept = [
        json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().split("\n") if x
    ]
    assert [r["round"] for r in kept] == [1, 2, 3, 4, 5, 6] and kept[-1]["x"] == "new"
    later = (tmp_path / "metrics.superseded.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in later] == [6, 7]
    # a fresh run (start 0) starts the file anew
    with open_metrics(tmp_path, 0) as fh:
        fh.write("{}\n")
    assert (tmp_path / "metrics.jsonl").read_text() == "{}\n"


def test_progress_shows_the_window_it_has_and_an_eta():
    p = Progress(threshold=100.0)
    assert p.window is None
    p.add(1, _row(10.0))
    p.add(2, _row(None))  # no episode ended: the window stays
    assert p.window == (1, 10.0) and p.last20 is None
    for t in range(3, 25):
        p.add(t, _row(100.0 + t))
    assert p.window[0] == 20 and p.last20 == pytest.approx(114.5)  # 105 … 124
    # round 21 has the first 20 returns, 10 and 103 … 121: mean 106.9 ≥ 100
    assert p.reached == 21
    assert p.eta(24, 24) == "0:00"
    assert p.eta(0, 2000) == "1:06:40"  # 2000 rounds × 2 s


def test_solve_threshold_from_gymnasium_else_stop_return():
    assert solve_threshold("CartPole-v1", 0.0) == 475.0
    assert solve_threshold("Acrobot-v1", 0.0) == -100.0
    assert solve_threshold("Pendulum-v1", 0.0) is None  # gymnasium gives none
    assert solve_threshold("Pendulum-v1", 150.0) == 150.0
    assert solve_threshold("NoSuchEnv-v9", 0.0) is None


def test_versions_name_the_installed_packages():
    import flwr
    import tenseal

    v = versions()
    assert v["flwr"] == flwr.__version__ and v["tenseal"] == tenseal.__version__
    assert v["hedrl"] != "not installed"


def test_curve_draws_a_png_with_both_axes(tmp_path):
    path = tmp_path / "learning_curve.png"
    curve = Curve(path, "CartPole-v1 · ckks · test", 475.0)
    for t in range(1, 41):
        curve.add(t, _row(None if t % 4 else 10.0 * t), last=t == 40)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 2 * img.size[1] > 400
    assert curve.rounds == list(range(4, 41, 4)) and curve.steps[-1] == 40 * 512
    assert not (tmp_path / "learning_curve.tmp.png").exists()


def test_a_curve_that_cannot_be_drawn_never_ends_the_run(tmp_path, caplog):
    curve = Curve(tmp_path / "missing" / "learning_curve.png", "t", None)
    with caplog.at_level(logging.WARNING, logger="flwr.hedrl.coordinator"):
        curve.add(1, _row(5.0), last=True)
        curve.add(2, _row(6.0), last=True)
    warned = [r for r in caplog.records if "learning curve not drawn" in r.message]
    assert len(warned) == 1 and curve.broken


def test_waiting_for_participants_says_how_many_are_connected(monkeypatch, caplog):
    from coordinator import exchange

    class Grid:
        calls = 0

        def get_node_ids(self):
            Grid.calls += 1
            return [11, 12] if Grid.calls < 40 else [11, 12, 13]

    monkeypatch.setattr(exchange, "WAIT_REPORT_S", 0.05)
    sleep = exchange.time.sleep
    monkeypatch.setattr(exchange.time, "sleep", lambda s: sleep(0.01))
    with caplog.at_level(logging.INFO, logger="flwr.hedrl.coordinator"):
        assert exchange.wait_for_nodes(Grid(), 3, timeout=30) == [11, 12, 13]
    said = [r.getMessage() for r in caplog.records if "connected" in r.getMessage()]
    assert said and all(
        m.startswith("hedrl: 2 of 3 participants connected") for m in said
    )
    with pytest.raises(TimeoutError, match=r"only 2 of 4 .*num-supernodes=4"):
        Grid.calls = 0
        exchange.wait_for_nodes(Grid(), 4, timeout=0.1)


def test_run_names_stay_inside_results_dir_and_odd_env_ids_make_one_folder(tmp_path):
    for name in ("../x", "a/b", "..", "/abs"):
        with pytest.raises(ConfigError, match="expected a folder name"):
            run_dir(_cfg(tmp_path, **{"run-name": name}))
    path = run_dir(_cfg(tmp_path, **{"env-id": "ALE/Pong-v5"}))
    assert path.parent == tmp_path and path.name.startswith("ALE-Pong-v5-")


def test_rows_no_participant_can_send_still_never_end_the_progress(tmp_path):
    p = Progress(threshold=1.0)
    for ret, secs in ((1e308, 1.0), (1e308, float("nan")), (float("inf"), 2.0)):
        p.add(1, _row(ret, round_s=secs))
    assert p.window == (2, 1e12) and p.eta(1, 3) == "0:02"
    curve = Curve(tmp_path / "c.png", "a $cost$ run", None)
    curve.add(1, _row(float("nan")), last=True)
    curve.add(2, _row(3.0), last=True)
    assert (tmp_path / "c.png").exists() and not curve.broken


def test_unreadable_earlier_rows_are_set_aside_on_resume(tmp_path):
    rows = ['{"round": 1}', '{"round": Infinity}', "[" * 5000, '{"round": 3}']
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    with open_metrics(tmp_path, 2):
        pass
    assert (tmp_path / "metrics.jsonl").read_text() == '{"round": 1}\n'
    assert len((tmp_path / "metrics.superseded.jsonl").read_text().splitlines()) == 3


def test_tensorboard_events_per_round_when_asked(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )

    from tests.helpers import local_federation, local_raw

    raw = local_raw(
        tmp_path,
        **{
            "backend": "plain",
            "num-rounds": 3,
            "num-participants": 2,
            "tensorboard": True,
            "participant-update": "delta",
            "run-name": "tb",
        },
    )
    fed = local_federation(raw, 91)
    fed.run()
    (events,) = fed.out_dir.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    steps = [e.value for e in acc.Scalars("env/steps")]
    assert [e.step for e in acc.Scalars("env/steps")] == [1, 2, 3]
    per_round = 2 * fed.cfg.num_envs * fed.cfg.num_steps  # delta: a rollout each
    assert steps == [per_round, 2 * per_round, 3 * per_round]
    assert {"return/mean", "time/round_s", "bytes/up"} <= set(acc.Tags()["scalars"])


def test_without_tensorboard_installed_the_run_says_so_once(
    tmp_path, monkeypatch, caplog
):
    import sys

    from coordinator.tboard import Board

    for name in (  # each import fails, even after an earlier test loaded them
        "tensorboard",
        "tensorboard.compat.proto.event_pb2",
        "tensorboard.compat.proto.summary_pb2",
        "tensorboard.summary.writer.event_file_writer",
    ):
        monkeypatch.setitem(sys.modules, name, None)
    with caplog.at_level(logging.WARNING, logger="flwr.hedrl.coordinator"):
        board = Board(tmp_path)
        board.add(1, {"env_steps": 1}, None)
        board.close()
    assert caplog.text.count("pip install 'hedrl[tensorboard]'") == 1
    assert list(tmp_path.iterdir()) == []


def test_a_simulation_with_too_few_supernodes_fails_once_their_number_settles(
    monkeypatch,
):
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    from coordinator import exchange

    class Simulated(InMemoryGrid):
        def __init__(self):  # no state: only the node ids are asked for
            pass

        def get_node_ids(self):
            return [5, 6]

    monkeypatch.setattr(exchange, "SIMULATION_SETTLE_S", 0.3)
    start = __import__("time").monotonic()
    with pytest.raises(
        TimeoutError, match=r"this simulation has 2 SuperNodes for .*num-supernodes=4"
    ):
        exchange.wait_for_nodes(Simulated(), 4, timeout=120)
    assert __import__("time").monotonic() - start < 5  # not node-wait's 120 s


def test_the_run_configs_solve_threshold_comes_first():
    assert solve_threshold("Pendulum-v1", 0.0, -200.0) == -200.0
    assert solve_threshold("CartPole-v1", 0.0, 300.0) == 300.0
    assert solve_threshold("CartPole-v1", 195.0, 0.0) == 475.0


def test_earlier_rows_keep_only_what_progress_can_take(tmp_path):
    from coordinator.summary import earlier_rows

    rows = [
        {"round": 1, "return_mean": 0.0, "env_steps": 4, "round_s": 1.0},
        {"round": 2},
        {"round": 3, "return_mean": "12", "env_steps": 4},
        {"round": 4, "return_mean": float("nan"), "env_steps": 4},
        {"round": 5, "return_mean": None, "env_steps": -3, "round_s": None},
        {"round": 9, "return_mean": 1.0, "env_steps": 4},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    kept = earlier_rows(path, 5)
    assert [r["round"] for r in kept] == [1, 3, 5]
    assert kept[1]["return_mean"] == 12.0 and kept[2]["env_steps"] == 0
    p = Progress(1.0)
    for r in kept:
        p.add(r["round"], r)
    assert p.window == (2, 6.0)
