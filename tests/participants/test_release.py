"""Release: only the twin of the final θ the participants accepted and agreed on
leaves, once, with noise flooding and rounding; eval runs it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from flwr.app import Message

from participants import release as rel
from protocol import keys
from protocol import messages as msg
from protocol.checkpoint import read_checkpoint
from protocol.params import get_param_set
from tests.helpers import decrypt_chunks, local_federation, local_raw

RUN_ID = 31
PS = get_param_set("8k-35x3")


def _run(tmp, run_id: int = RUN_ID, participants: int = 2, **grid_kw):
    raw = local_raw(
        tmp,
        **{
            "backend": "ckks",
            "num-rounds": 3,
            "num-participants": participants,
            "seed": 2,
            "run-name": "r",
        },
    )
    fed = local_federation(raw, run_id, **grid_kw)
    summary = fed.run()
    return fed, summary, tmp / "keys" / f"run-{run_id}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rel")
    fed, summary, key_dir = _run(tmp)
    return tmp, key_dir, tmp / "results" / "r" / "checkpoint.npz", summary


@pytest.fixture
def key_dir(trained, tmp_path):
    """A copy of the trained run's key directory (a release marks it used)."""
    return shutil.copytree(trained[1], tmp_path / "keys")


def test_release_floods_and_rounds_the_agreed_final_theta(trained, key_dir, capsys):
    """Released θ = the final θ's twin (what the final checkpoint holds, within
    the twin's tolerance) + noise, on the rounding grid, within 6σ + q/2; a
    second release from the key is refused."""
    _, _, ckpt, summary = trained
    assert summary["final"]["tagged"] == 2 and len(summary["final"]["confirmed"]) == 2
    out = key_dir.parent / "policy.npz"
    assert rel.release_main(["--keys", str(key_dir), "--out", str(out)]) == 0
    assert "releases nothing more" in capsys.readouterr().out
    theta, info = rel.load_policy(out)
    meta, vectors = read_checkpoint(ckpt)
    be, _ = keys.participant_backend(key_dir / "participant.ctx", PS, "ckks")
    exact = decrypt_chunks(be, vectors["theta"], theta.size)
    twin = np.load(next(key_dir.glob("guard-*-p0-final.npy")))
    diff = theta - twin
    assert np.max(np.abs(diff)) <= 6 * info["noise_std"] + info["round_to"] / 2
    # the twin is not the decryption, but within CKKS error of it (3 steps)
    assert 0 < np.max(np.abs(twin - exact)) <= 1e-4
    assert np.std(diff) > info["noise_std"] / 2  # noise really added
    grid = theta / info["round_to"]
    assert np.allclose(grid, np.round(grid))
    assert info["env_id"] == "CartPole-v1"
    assert info["round"] == summary["final"]["round"]
    again = key_dir.parent / "again.npz"
    assert rel.release_main(["--keys", str(key_dir), "--out", str(again)]) == 2
    assert "released already" in capsys.readouterr().err and not again.exists()


def test_malicious_checkpoint_is_never_read(trained, key_dir, monkeypatch, capsys):
    """A release reads only the final θ the participant checked and stored: the
    coordinator's checkpoint (which a deviating coordinator writes as it likes)
    is never opened, and the command takes no checkpoint."""
    import protocol.checkpoint

    def never(*_a, **_k):
        raise AssertionError("hedrl-release read a checkpoint")

    monkeypatch.setattr(protocol.checkpoint, "read_checkpoint", never)
    monkeypatch.setattr(np, "load", never)  # nor any .npz the coordinator wrote
    out = key_dir.parent / "p.npz"
    with pytest.raises(SystemExit):
        rel.release_main(
            ["--keys", str(key_dir), "--checkpoint", "c.npz", "--out", str(out)]
        )
    assert "unrecognized arguments: --checkpoint" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(protocol.checkpoint, "read_checkpoint", never)
    rel.release(key_dir, out)
    assert out.exists()


def test_release_refuses_other_key(trained, key_dir, tmp_path):
    """The key directory's key must be the one the stored final θ is under."""
    other = tmp_path / "k"
    keys.write_keys(other, PS, "ckks", force=False)
    for guard in key_dir.glob("guard-*"):
        if guard.is_file():
            shutil.copy(guard, other / guard.name)
        else:
            shutil.copytree(guard, other / guard.name)
    code = rel.release_main(["--keys", str(other), "--out", str(tmp_path / "p.npz")])
    assert code == 2 and not (tmp_path / "p.npz").exists()


def test_malicious_split_final_theta_is_released_by_one_group_at_most(tmp_path):
    """The coordinator sends participant 1002 another final θ than 1000 and 1001
    (θ of the round before, with the steps to it: it passes every check). The
    two who got the same θ confirm it (2 matching tags of 3 is a majority);
    1002's own tag is the only one matching its θ, so it does not. One θ is
    releasable, and only by them."""
    held_back: dict[str, object] = {}

    def split(request: Message) -> Message:
        kind = request.metadata.message_type
        if kind == msg.TRAIN and request.metadata.dst_node_id == 1002:
            held_back["theta"] = (
                request.content[msg.THETA],
                request.content[msg.THETA + ".hdr"],
            )
            held_back["relay"] = request.content[msg.RELAY]
        if kind == msg.FINAL and request.metadata.dst_node_id == 1002:
            from protocol.records import read_header, write_vector
            from protocol.wire import parse_header

            arr, hdr_rec = held_back["theta"]  # type: ignore[misc]
            hdr = parse_header(hdr_rec["header"])
            hdr.round = read_header(request.content, msg.THETA).round
            data = bytes(arr["data"].data)
            lengths = np.frombuffer(bytes(arr["lengths"].data), "<u4").astype(int)
            ends = np.cumsum(lengths)
            chunks = [data[e - n : e] for n, e in zip(lengths, ends, strict=True)]
            write_vector(request.content, msg.THETA, hdr, chunks)
            # with the steps to that θ: it is its twin, so 1002 accepts it
            request.content[msg.RELAY] = held_back["relay"]
        return request

    _, summary, key_dir = _run(tmp_path, participants=3, tamper_request=split)
    assert summary["final"]["tagged"] == 3
    assert summary["final"]["confirmed"] == [1000, 1001]
    with pytest.raises(rel.KeyMaterialError, match="not confirmed by a majority"):
        rel.release(key_dir, tmp_path / "p2.npz", participant=2)
    info = rel.release(key_dir, tmp_path / "p0.npz", participant=0)
    assert info["round"] == summary["final"]["round"]


def test_eval_runs_released_policy(key_dir, capsys):
    """hedrl-eval plays the requested number of episodes with raw returns."""
    out = key_dir.parent / "policy2.npz"
    rel.release(key_dir, out)
    assert rel.eval_main([str(out), "--episodes", "3", "--seed", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["episodes"] == 3 and len(res["returns"]) == 3
    assert all(1 <= r <= 500 for r in res["returns"])  # CartPole: +1 per step


def test_eval_names_a_checkpoint_or_a_mismatched_env_in_one_line(
    trained, key_dir, tmp_path, capsys
):
    """The coordinator's checkpoint, a file that is no policy, and an env whose
    spaces differ from the policy's each end in one line that says so."""
    _, _, ckpt, _ = trained
    assert rel.eval_main([str(ckpt)]) == 2
    assert "coordinator's encrypted checkpoint, not a policy" in capsys.readouterr().err
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    assert rel.eval_main([str(junk)]) == 2
    assert "not a policy file of hedrl-release" in capsys.readouterr().err
    out = key_dir.parent / "policy4.npz"
    rel.release(key_dir, out)
    assert rel.eval_main([str(out), "--env-id", "Acrobot-v1"]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and "trained on CartPole-v1 (4 observations, 2 actions)" in err
    )
    assert rel.eval_main([str(out), "--env-id", "CartPol-v1"]) == 2
    assert "--env-id 'CartPol-v1'" in capsys.readouterr().err


def test_eval_records_gif(key_dir, tmp_path, capsys):
    """--gif writes an animated GIF of the first episode."""
    from PIL import Image  # in the test extra

    out = key_dir.parent / "policy3.npz"
    rel.release(key_dir, out)
    gif = tmp_path / "ep.gif"
    assert rel.eval_main([str(out), "--episodes", "1", "--gif", str(gif)]) == 0
    res = json.loads(capsys.readouterr().out)
    with Image.open(gif) as im:
        # one frame per step; Pillow merges identical consecutive frames
        assert 2 <= im.n_frames <= int(res["returns"][0])
        assert im.size[0] > 100 and im.size[1] > 100


def test_release_once_per_key_whichever_participant(key_dir, tmp_path):
    """Several participants' states in one directory (a simulation): releasing
    as participant 0 marks the key released for all of them."""
    rel.release(key_dir, tmp_path / "p0.npz", participant=0)
    with pytest.raises(rel.KeyMaterialError, match="released already"):
        rel.release(key_dir, tmp_path / "p1.npz", participant=1)


def test_release_waits_for_a_message_in_flight(key_dir, tmp_path):
    """A release takes every guard's lock and reads the state under it: a
    message a SuperNode is handling meanwhile (here: one that is refused) is
    neither lost (its refusal stays charged) nor able to clear the release."""
    import threading
    import time

    from participants.guard import Guard, Refused
    from participants.trust import Trust

    fp = keys.participant_backend(key_dir / "participant.ctx", PS, "ckks")[1]
    trust = Trust.local(key_dir / "participant.ctx", key_dir, 0)
    busy = Guard(trust, fp)
    done: dict[str, float] = {}

    def release() -> None:
        rel.release(key_dir, tmp_path / "p.npz")
        done["finished"] = time.monotonic()

    thread = threading.Thread(target=release)
    with pytest.raises(Refused), busy.decrypting(("confirm",), 10**4):
        thread.start()
        time.sleep(0.3)  # the release starts while the message is handled
        raise ValueError
    released = time.monotonic()
    busy.close()
    thread.join(30)
    assert done["finished"] >= released
    after = Guard(trust, fp)
    assert after.state.refusals == 1 and after.state.released
    after.close()
