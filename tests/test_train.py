"""Algorithm 1: both gradient paths, logging, determinism, atomic checkpoints, SIGKILL + resume."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sur_lib.data import SURDDataset, collate, write_metadata
from sur_lib.knowledge import save_knowledge
from sur_lib.models import tiny_random_backbone
from sur_lib.train import (
    TrainConfig,
    _parse_overrides,
    batch_indices,
    build_adapter,
    compute_losses,
    latest_checkpoint,
    read_log,
    train,
)

LLM_DIM = 24
PROMPTS = ["four tomatoes in a row", "a stack of three dice", "five limes in a circle",
           "two tents on a field", "one lemon", "six cherries scattered"]


@pytest.fixture(scope="module")
def surd(tmp_path_factory):
    """8 tiny SURD rows + a knowledge-vector cache, on disk (the CLI reads them)."""
    root = tmp_path_factory.mktemp("surd")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
        p = PROMPTS[i % len(PROMPTS)]
        rows.append({"file_name": f"{i}.png", "text": p, "prompt": f"{i} red circles, best quality"})
    write_metadata(root, rows)
    gen = torch.Generator().manual_seed(0)
    save_knowledge(root / "knowledge.safetensors", PROMPTS, torch.randn(len(PROMPTS), LLM_DIM, generator=gen),
                   meta={"llm": "random", "layer": -1, "include_bos": True})
    return root


def cfg_for(surd, out, **kw):
    values = dict(profile="tiny-random", data_dir=str(surd), knowledge_file=str(surd / "knowledge.safetensors"),
                  llm="random", llm_layer=-1, output_dir=str(out), num_layers=1, num_heads=4, ffn_dim=32,
                  batch_size=4, max_steps=3, checkpoint_every=2, learning_rate=1e-3, progress=False)
    values.update(kw)
    return TrainConfig(**values)


def _one_batch(surd, cfg):
    from sur_lib.knowledge import load_knowledge

    knowledge = load_knowledge(surd / "knowledge.safetensors")
    ds = SURDDataset(surd, resolution=32, knowledge=knowledge)
    torch.manual_seed(0)
    return collate([ds[i] for i in range(4)])


def _grads(cfg, surd, lambdas=(0.0, 0.0)):
    backbone = tiny_random_backbone(seed=0)
    torch.manual_seed(0)
    cfg.lambda_llm, cfg.lambda_cp = lambdas
    adapter = build_adapter(cfg, backbone.text_dim, LLM_DIM)
    losses = compute_losses(cfg, backbone, adapter, _one_batch(surd, cfg), torch.float32)
    return adapter, losses


def test_paper_path_sends_l_simple_gradient_into_the_adapter(surd, tmp_path):
    adapter, losses = _grads(cfg_for(surd, tmp_path, gradient_path="paper"), surd)
    losses["l_simple"].backward()
    # g is zero-initialised, so only g (and nothing behind it) gets a gradient at step 0
    assert adapter.fc.weight.grad is not None and adapter.fc.weight.grad.abs().sum() > 0
    assert adapter.fc.bias.grad.abs().sum() > 0


def test_official_path_gives_l_simple_no_gradient(surd, tmp_path):
    adapter, losses = _grads(cfg_for(surd, tmp_path, gradient_path="official"), surd, (1e-5, 1e-5))
    assert not losses["l_simple"].requires_grad
    params = [p for p in adapter.parameters() if p.requires_grad]
    assert losses["l_llm"].requires_grad and losses["l_cp"].requires_grad
    grads = torch.autograd.grad(losses["l_llm"] + losses["l_cp"], params, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_paper_step_changes_the_adapter_through_l_simple_alone(surd, tmp_path):
    res = train(cfg_for(surd, tmp_path / "a", lambda_llm=0.0, lambda_cp=0.0, max_steps=1))
    assert res.adapter.fc.weight.abs().sum() > 0  # g left zero only if L_simple sent nothing


def test_official_step_with_only_l_simple_would_not_train(surd, tmp_path):
    with pytest.raises(ValueError, match="nothing trains"):
        cfg_for(surd, tmp_path, gradient_path="official", lambda_llm=0.0, lambda_cp=0.0)


def test_train_logs_every_term_and_saves(surd, tmp_path):
    res = train(cfg_for(surd, tmp_path, max_steps=3, lambda_llm=1.0, lambda_cp=1.0))
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == [1, 2, 3]
    for r in log:
        assert all(np.isfinite(r[k]) for k in ("loss", "l_simple", "l_llm", "l_cp", "grad_norm"))
        assert r["loss"] == pytest.approx(r["l_simple"] + r["l_llm"] + r["l_cp"], rel=1e-5)
        assert r["l_llm"] > 0 and r["l_cp"] > 0
    assert latest_checkpoint(tmp_path)[0] == 3
    assert (tmp_path / "adapter" / "diffusion_pytorch_model.safetensors").exists()
    assert res.adapter.llm_projection.weight.shape == (32, LLM_DIM)


def test_same_seed_same_weights(surd, tmp_path):
    a = train(cfg_for(surd, tmp_path / "a", resume=False)).adapter.state_dict()
    b = train(cfg_for(surd, tmp_path / "b", resume=False)).adapter.state_dict()
    c = train(cfg_for(surd, tmp_path / "c", resume=False, seed=1)).adapter.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_batches_cover_each_epoch_once():
    seen = [i for m in range(3) for i in batch_indices(6, 2, m, seed=0)]
    assert sorted(seen) == list(range(6))
    assert batch_indices(6, 2, 1, seed=0) == batch_indices(6, 2, 1, seed=0)


def test_config_errors_and_overrides(tmp_path):
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_dict({"lr": 1})
    with pytest.raises(ValueError, match="gradient_path"):
        TrainConfig(gradient_path="both")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    assert _parse_overrides(["--max_steps", "7", "--eta", "0.5", "--resume", "false"]) == {
        "max_steps": 7, "eta": 0.5, "resume": False}
    cfg_file = Path(__file__).parents[1] / "sur_lib" / "configs" / "rtx3090.yaml"
    cfg = TrainConfig.from_yaml(cfg_file)
    assert (cfg.max_steps, cfg.batch_size, cfg.resolution, cfg.learning_rate, cfg.mixed_precision) == (
        5000, 16, 512, 1e-5, "fp16")
    assert cfg.lambda_llm == cfg.lambda_cp == 1e-5 and cfg.eta == 0.1


def _cli(cfg: TrainConfig, tmp_path, name, **overrides):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    args = [sys.executable, "-m", "sur_lib.train", str(path)]
    for k, v in overrides.items():
        args += [f"--{k}", str(v)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def test_sigkill_and_resume_equals_straight_run(surd, tmp_path):
    steps = 6
    straight = cfg_for(surd, tmp_path / "straight", max_steps=steps, gradient_accumulation_steps=2,
                       lambda_llm=1.0, lambda_cp=1.0)
    ref = train(straight).adapter.state_dict()

    killed = cfg_for(surd, tmp_path / "killed", max_steps=steps, gradient_accumulation_steps=2,
                     lambda_llm=1.0, lambda_cp=1.0)
    proc = _cli(killed, tmp_path, "killed")
    lines = []
    for line in proc.stdout:  # kill the moment the first checkpoint is announced
        lines.append(line)
        if "checkpoint saved" in line:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, "".join(lines)
    step, _ = latest_checkpoint(tmp_path / "killed")
    assert 2 <= step < steps

    proc = _cli(killed, tmp_path, "resumed")
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    assert f"resuming from" in out and f"(step {step})" in out
    resumed = torch.load  # noqa: F841  (readability: weights come from the saved adapter)
    from sur_lib.adapter import SURAdapter

    got = SURAdapter.from_pretrained(tmp_path / "killed" / "adapter").state_dict()
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert [r["step"] for r in read_log(tmp_path / "killed")] == list(range(1, steps + 1))


def test_processes_get_different_batches_and_noise():
    """With accelerate launch, process p of P takes micro-step m*P + p: no two processes (and no
    two micro-steps) share a batch slice or a seed; one process keeps the plain numbering."""
    from sur_lib.train import micro_step_seed

    n_proc = 2
    slices = {(m, p): batch_indices(16, 4, m * n_proc + p, seed=0) for m in range(2) for p in range(n_proc)}
    assert sorted(i for s in slices.values() for i in s) == list(range(16))  # one epoch, no overlap
    seeds = {micro_step_seed(0, m * n_proc + p) for m in range(2) for p in range(n_proc)}
    assert len(seeds) == 4


def test_gradient_checkpointing_gives_the_same_adapter_gradients(surd, tmp_path):
    cfg = cfg_for(surd, tmp_path, gradient_path="paper", lambda_llm=0.0, lambda_cp=0.0)
    grads = []
    for ckpt in (False, True):
        backbone = tiny_random_backbone(seed=0)
        calls = []
        if ckpt:  # count the checkpointed block calls, so the test fails if nothing is checkpointed
            def counting(fn, *args, **kw):
                calls.append(fn)
                return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kw)
            backbone.unet.enable_gradient_checkpointing(counting)
        torch.manual_seed(0)
        adapter = build_adapter(cfg, backbone.text_dim, LLM_DIM)
        batch = _one_batch(surd, cfg)
        torch.manual_seed(1)
        compute_losses(cfg, backbone, adapter, batch, torch.float32)["loss"].backward()
        grads.append(adapter.fc.weight.grad.clone())
        assert bool(calls) == ckpt
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)
