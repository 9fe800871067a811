"""sur_lib.infra.run_state on its own: the states a training checkpoint stores (AdamW, the LR
schedule, the fp16 loss scaler) survive the pickle-free format exactly, a config change on resume
edits the saved state dicts (public API only), and a checkpoint is complete in either format."""
import json
from types import SimpleNamespace

import pytest
import torch
from diffusers.optimization import get_scheduler

from sur_lib.infra import checkpoints, run_state


def _trained(steps=3, warmup=5):
    """A linear model, AdamW, a constant-with-warmup schedule and a CPU loss scaler after
    ``steps`` scaled steps."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=1e-2)
    sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=warmup)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    for _ in range(steps):
        scaler.scale(model(torch.randn(4, 3)).pow(2).sum()).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        opt.zero_grad()
    return model, opt, sched, scaler


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_optimizer_schedule_and_scaler_states_round_trip_without_pickle(tmp_path):
    _, opt, sched, scaler = _trained()
    states = run_state.training_states(SimpleNamespace(scaler=scaler), opt, sched)
    assert set(states) == {"opt", "lr_sched", "scaler"} and states["scaler"]["_growth_tracker"] == 1
    written = checkpoints.save_state_dict(states, tmp_path, run_state.OPTIMIZER)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written) == [
        "optimizer.json", "optimizer.safetensors"]
    back = checkpoints.load_state_dict(tmp_path, run_state.OPTIMIZER)
    assert _same(back, states)

    _, opt2, sched2, scaler2 = _trained(steps=0)  # fresh objects take the saved states
    opt2.load_state_dict(back["opt"])
    sched2.load_state_dict(back["lr_sched"])
    scaler2.load_state_dict(back["scaler"])
    assert _same(opt2.state_dict(), opt.state_dict())
    assert sched2.state_dict() == sched.state_dict() and scaler2.state_dict() == scaler.state_dict()


def test_new_optimizer_settings_go_into_the_saved_state_dicts(tmp_path):
    _, opt, sched, _ = _trained(steps=3, warmup=5)  # 3 of 5 warm-up steps: factor 0.6
    states = {"opt": opt.state_dict(), "lr_sched": sched.state_dict()}
    states = run_state.with_optimizer_settings(states, sched.lr_lambdas, lr=1e-2, betas=(0.8, 0.9),
                                               weight_decay=0.0, eps=1e-6)
    _, opt2, sched2, _ = _trained(steps=0, warmup=5)
    opt2.load_state_dict(states["opt"])
    sched2.load_state_dict(states["lr_sched"])
    group = opt2.param_groups[0]
    assert group["lr"] == sched2.get_last_lr()[0] == 1e-2 * 3 / 5
    assert (group["betas"], group["weight_decay"], group["eps"], group["initial_lr"]) == (
        (0.8, 0.9), 0.0, 1e-6, 1e-2)
    sched2.step()  # the schedule continues from the new base rate
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-2 * 4 / 5)


def test_a_checkpoint_is_complete_in_either_format(tmp_path):
    new, old = tmp_path / "new", tmp_path / "old"
    for folder, names in ((new, run_state.CHECKPOINT_FILES), (old, run_state.ACCELERATE_FILES)):
        for name in names:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(b"x")
        (folder / "state.json").write_text(json.dumps({"step": 1, "files": checkpoints.manifest(folder)}))
        assert checkpoints.verify(folder, run_state.FORMATS) is None
    (new / "optimizer.json").unlink()
    state = json.loads((new / "state.json").read_text())
    del state["files"]["optimizer.json"]
    (new / "state.json").write_text(json.dumps(state))
    assert checkpoints.verify(new, run_state.FORMATS) == "optimizer.json missing"


def test_config_differences_count_a_missing_key_at_its_default():
    diff = run_state.config_differences({"a": 1, "b": 2, "steps": 9}, {"a": 1, "steps": 5},
                                        defaults={"a": 0, "b": 3, "steps": 1}, free_keys=("steps",))
    assert diff == {"b": (3, 2)}
