"""The base model's pretraining script: resume gives the same weights as a straight run, and
the exported folder records every session that trained it."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sur_lib.world import pretrain

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
    assert all(s["command"].startswith("python -m sur_lib.world.pretrain") for s in info["sessions"])
    one = json.loads((straight / "out" / "pretrain.json").read_text())
    assert [(s["from_step"], s["to_step"]) for s in one["sessions"]] == [(0, 3)]
    log = (resumed / "out" / "loss_log.csv").read_text().splitlines()
    assert log[0] == "step,loss,lr,seconds" and [r.split(",")[0] for r in log[1:]] == ["1", "2", "3"]
    straight_log = (straight / "out" / "loss_log.csv").read_text().splitlines()
    assert [r.split(",")[1] for r in log[1:]] == [r.split(",")[1] for r in straight_log[1:]]
    assert (resumed / "out" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


# ----------------------------------------------------------------------------- the shipped states

SHIPPED = [Path(__file__).parents[1] / "data" / "models" / name
           for name in ("tiny-sur-world-state", "tiny-sur-world-retrain-state")]


def _objects():
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    unet = pretrain.build_unet()
    ema = EMAModel(unet.parameters(), decay=0.999, model_cls=type(unet), model_config=unet.config)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-2)
    return unet, ema, opt, get_scheduler("constant_with_warmup", opt, num_warmup_steps=500)


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("shipped", SHIPPED, ids=lambda p: p.name)
def test_shipped_state_loads_without_pickle_and_round_trips_exactly(shipped, tmp_path):
    folder = shipped / "state"
    assert not list(folder.glob("*.pt")) and (folder / "optimizer.safetensors").is_file()
    info = json.loads((folder / "state.json").read_text())
    a = _objects()
    step, seconds, sessions = pretrain.load_state(folder, *a)
    assert (step, seconds, sessions) == (info["step"], info["seconds"], info["sessions"])
    assert a[2].state_dict()["state"][0]["step"].item() == step  # AdamW's step count
    assert a[3].state_dict()["last_epoch"] == step and a[1].optimization_step == step
    pretrain.save_state(tmp_path / "state", *a, step, seconds, sessions)
    b = _objects()
    assert pretrain.load_state(tmp_path / "state", *b) == (step, seconds, sessions)
    for x, y in zip((a[0].state_dict(), a[2].state_dict(), a[3].state_dict(), list(a[1].shadow_params)),
                    (b[0].state_dict(), b[2].state_dict(), b[3].state_dict(), list(b[1].shadow_params))):
        assert _same(x, y)


def test_one_step_resumes_from_the_shipped_state(tmp_path):
    """The committed state resumes: one more step (small batch) from step N gives step N + 1,
    a finite loss, and the session recorded."""
    shipped = SHIPPED[0]
    work = tmp_path / "work"
    shutil.copytree(shipped / "state", work / "state")
    shutil.copy(shipped / "loss_log.csv", work / "loss_log.csv")
    step = json.loads((work / "state" / "state.json").read_text())["step"]
    threads = torch.get_num_threads()
    try:
        pretrain.main(["--steps", str(step + 1), "--batch", "2", "--pool", "8", "--threads", "1",
                       "--work", str(work), "--out", str(tmp_path / "out")])
    finally:
        torch.set_num_threads(threads)
    info = json.loads((work / "state" / "state.json").read_text())
    assert info["step"] == step + 1 and info["sessions"][-1]["from_step"] == step
    last = (work / "loss_log.csv").read_text().splitlines()[-1].split(",")
    assert int(last[0]) == step + 1 and math.isfinite(float(last[1]))
    before = (shipped / "loss_log.csv").read_text().splitlines()
    assert (work / "loss_log.csv").read_text().splitlines()[:len(before)] == before
