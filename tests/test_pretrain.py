"""The base model's pretraining script: resume gives the same weights as a straight run, and
the exported folder records every session that trained it."""
import json

import pytest
import torch
from safetensors.torch import load_file

from sur_lib import pretrain

ARGS = ["--batch", "4", "--pool", "16", "--seed", "3", "--warmup", "2", "--threads", "1",
        "--checkpoint-every", "1"]


def _run(tmp, steps):
    threads = torch.get_num_threads()
    try:
        pretrain.main(ARGS + ["--steps", str(steps), "--work", str(tmp / "work"), "--out", str(tmp / "out")])
    finally:
        torch.set_num_threads(threads)
    return load_file(tmp / "work" / "state" / "model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    straight = tmp_path_factory.mktemp("straight")
    resumed = tmp_path_factory.mktemp("resumed")
    a = _run(straight, 3)
    _run(resumed, 2)
    b = _run(resumed, 3)
    return straight, resumed, a, b


def test_resume_equals_straight_run(runs):
    _, _, a, b = runs
    assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sessions_and_loss_log_are_recorded(runs):
    straight, resumed, _, _ = runs
    info = json.loads((resumed / "out" / "pretrain.json").read_text())
    assert info["step"] == 3
    assert [(s["from_step"], s["to_step"]) for s in info["sessions"]] == [(0, 2), (2, 3)]
    assert all(s["command"].startswith("python -m sur_lib.pretrain") for s in info["sessions"])
    one = json.loads((straight / "out" / "pretrain.json").read_text())
    assert [(s["from_step"], s["to_step"]) for s in one["sessions"]] == [(0, 3)]
    log = (resumed / "out" / "loss_log.csv").read_text().splitlines()
    assert log[0] == "step,loss,lr,seconds" and [r.split(",")[0] for r in log[1:]] == ["1", "2", "3"]
    straight_log = (straight / "out" / "loss_log.csv").read_text().splitlines()
    assert [r.split(",")[1] for r in log[1:]] == [r.split(",")[1] for r in straight_log[1:]]
    assert (resumed / "out" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
