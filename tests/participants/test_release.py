"""Release: the final θ leaves only with noise flooding and rounding; eval runs it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from participants import release as rel
from protocol import keys
from protocol.checkpoint import read_checkpoint
from protocol.params import get_param_set
from tests.helpers import decrypt_chunks, local_federation, local_raw

RUN_ID = 31


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rel")
    raw = local_raw(
        tmp,
        **{
            "backend": "ckks",
            "num-rounds": 3,
            "num-participants": 2,
            "seed": 2,
            "run-name": "r",
        },
    )
    local_federation(raw, RUN_ID).run()
    return tmp, tmp / "keys" / f"run-{RUN_ID}", tmp / "results" / "r" / "checkpoint.npz"


def test_release_floods_and_rounds_theta(trained, capsys):
    """Released θ = decrypted θ + noise, on the rounding grid, within 6σ + q/2."""
    tmp, key_dir, ckpt = trained
    out = tmp / "policy.npz"
    assert (
        rel.release_main(
            ["--keys", str(key_dir), "--checkpoint", str(ckpt), "--out", str(out)]
        )
        == 0
    )
    assert "retire this key" in capsys.readouterr().out
    theta, info = rel.load_policy(out)
    meta, vectors = read_checkpoint(ckpt)
    be, _ = keys.participant_backend(
        key_dir / "participant.ctx", get_param_set("8k-35x3"), "ckks"
    )
    exact = decrypt_chunks(be, vectors["theta"], theta.size)
    diff = theta - exact
    assert np.max(np.abs(diff)) <= 6 * info["noise_std"] + info["round_to"] / 2
    assert np.std(diff) > info["noise_std"] / 2  # noise really added
    grid = theta / info["round_to"]
    assert np.allclose(grid, np.round(grid))
    assert info["env_id"] == "CartPole-v1" and info["step"] == meta["step"]


def test_release_refuses_other_key(trained, tmp_path):
    """A key that does not match the checkpoint's fingerprint is refused."""
    _, _, ckpt = trained
    keys.write_keys(tmp_path / "k", get_param_set("8k-35x3"), "ckks", force=False)
    code = rel.release_main(
        [
            "--keys",
            str(tmp_path / "k"),
            "--checkpoint",
            str(ckpt),
            "--out",
            str(tmp_path / "p.npz"),
        ]
    )
    assert code == 2 and not (tmp_path / "p.npz").exists()


def test_eval_runs_released_policy(trained, capsys):
    """hedrl-eval plays the requested number of episodes with raw returns."""
    tmp, key_dir, ckpt = trained
    out = tmp / "policy2.npz"
    rel.release(key_dir, ckpt, out)
    assert rel.eval_main([str(out), "--episodes", "3", "--seed", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["episodes"] == 3 and len(res["returns"]) == 3
    assert all(1 <= r <= 500 for r in res["returns"])  # CartPole: +1 per step


def test_eval_records_gif(trained, tmp_path, capsys):
    """--gif writes an animated GIF of the first episode."""
    from PIL import Image  # in the test extra

    tmp, key_dir, ckpt = trained
    out = tmp / "policy3.npz"
    rel.release(key_dir, ckpt, out)
    gif = tmp_path / "ep.gif"
    assert rel.eval_main([str(out), "--episodes", "1", "--gif", str(gif)]) == 0
    res = json.loads(capsys.readouterr().out)
    with Image.open(gif) as im:
        # one frame per step; Pillow merges identical consecutive frames
        assert 2 <= im.n_frames <= int(res["returns"][0])
        assert im.size[0] > 100 and im.size[1] > 100
