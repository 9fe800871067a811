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

from sur_lib.data import SURDDataset, collate
from sur_lib.infra.config import parse_overrides
from sur_lib.infra.surd_files import write_metadata
from sur_lib.models import tiny_random_backbone
from sur_lib.train import (
    TrainConfig,
    build_adapter,
    compute_losses,
    train,
)
from sur_lib.infra.micro_batches import batch_indices
from sur_lib.infra.run_state import latest_checkpoint, read_log
from tests.helpers import LLM_DIM, cfg_for, one_batch


def _grads(cfg, surd, lambdas=(0.0, 0.0)):
    backbone = tiny_random_backbone(seed=0)
    torch.manual_seed(0)
    cfg.lambda_llm, cfg.lambda_cp = lambdas
    adapter = build_adapter(cfg, backbone.text_dim, LLM_DIM)
    losses = compute_losses(cfg, backbone, adapter, one_batch(surd, cfg), torch.float32)
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
    assert parse_overrides(TrainConfig, ["--max_steps", "7", "--eta", "0.5", "--resume", "false"]) == {
        "max_steps": 7, "eta": 0.5, "resume": False}
    cfg_file = Path(__file__).parents[1] / "sur_lib" / "configs" / "rtx3090.yaml"
    cfg = TrainConfig.from_yaml(cfg_file)
    assert (cfg.max_steps, cfg.batch_size, cfg.resolution, cfg.learning_rate, cfg.mixed_precision) == (
        5000, 16, 512, 1e-5, "fp16")
    assert cfg.lambda_llm == cfg.lambda_cp == 1e-5 and cfg.eta == 0.1


def test_config_dict_keeps_the_stored_runs_names():
    """The run folders behind stored results are named by a hash of ``TrainConfig.to_dict()``
    (``LATER_KEYS`` options left out at their defaults; a resume compares it outside
    ``RESUME_FREE_KEYS``): tiny.yaml's dict, in its key order, and both key lists stay
    byte-identical. A change here renames every stored run."""
    import hashlib
    import json

    from sur_lib.train import LATER_KEYS, RESUME_FREE_KEYS

    cfg = TrainConfig.from_yaml(Path(__file__).parents[1] / "sur_lib" / "configs" / "tiny.yaml")
    text = json.dumps([cfg.to_dict(), LATER_KEYS, list(RESUME_FREE_KEYS)])
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == "5cc270ee150a74c5"

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
    assert "resuming from" in out and f"(step {step})" in out
    # the resumed run's weights: those of its saved adapter
    from sur_lib.adapter import SURAdapter

    got = SURAdapter.from_pretrained(tmp_path / "killed" / "adapter").state_dict()
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert [r["step"] for r in read_log(tmp_path / "killed")] == list(range(1, steps + 1))


def test_processes_get_different_batches_and_noise():
    """With accelerate launch, process p of P takes micro-step m*P + p: no two processes (and no
    two micro-steps) share a batch slice or a seed; one process keeps the plain numbering."""
    from sur_lib.infra.micro_batches import micro_step_seed

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
        batch = one_batch(surd, cfg)
        torch.manual_seed(1)
        compute_losses(cfg, backbone, adapter, batch, torch.float32)["loss"].backward()
        grads.append(adapter.fc.weight.grad.clone())
        assert bool(calls) == ckpt
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


# --- the RTX 3090 path (issue: mixed precision, several processes, NaN, the authors' files) -------

# log.csv of the tiny-random runs below as written by train() BEFORE it read batches through a
# DataLoader (commit 460ef7c; loss, l_simple, l_llm, l_cp, grad_norm per step): the DataLoader
# must give the same batches, flips and noise, hence the same numbers
OLD_LOG = {
    "paper": [[31.20511245727539, 1.1277475357055664, 23.368873596191406, 6.708491325378418, 48.710174560546875],
              [30.396507263183594, 1.106995940208435, 22.094223022460938, 7.19528865814209, 40.354591369628906],
              [29.07473373413086, 1.1095271110534668, 21.506837844848633, 6.45836877822876, 37.039398193359375]],
    "official_crop": [
        [50.75592231750488, 1.1164001822471619, 42.64991760253906, 6.989604949951172, 80.23949432373047],
        [48.23971748352051, 1.0860011577606201, 40.22823524475098, 6.925480842590332, 67.42212677001953],
        [46.268571853637695, 1.0891487002372742, 38.31970405578613, 6.859720468521118, 56.94624328613281]],
}
OLD_LOG_CONFIGS = {"paper": {}, "official_crop": dict(official_adapter=True, center_crop=False,
                                                      gradient_accumulation_steps=2)}
TERMS = ("loss", "l_simple", "l_llm", "l_cp", "grad_norm")


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("name", sorted(OLD_LOG))
def test_dataloader_reproduces_the_old_loss_log(surd, tmp_path, name, workers):
    cfg = cfg_for(surd, tmp_path, lambda_llm=1.0, lambda_cp=1.0, resume=False,
                  dataloader_num_workers=workers, **OLD_LOG_CONFIGS[name])
    train(cfg)
    got = [[r[k] for k in TERMS] for r in read_log(tmp_path)]
    np.testing.assert_allclose(got, OLD_LOG[name], rtol=2e-5)


def test_dataloader_batches_equal_the_old_indexing(surd, tmp_path):
    """The old loop: seed torch with micro_step_seed, decode batch_indices in this process, then
    draw the noise. The DataLoader (in worker processes) must give the same pixels (crops,
    flips) and leave the generator where the old loop had it."""
    from sur_lib.infra.micro_batches import micro_batch_loader, micro_step_seed

    ds = SURDDataset(surd, resolution=32, center_crop=False)
    cfg = cfg_for(surd, tmp_path, dataloader_num_workers=2, batch_size=3)
    steps = [0, 1, 5, 2]
    new = []
    for batch in micro_batch_loader(ds, steps, batch_size=3, seed=cfg.seed, collate=collate,
                                    num_workers=cfg.dataloader_num_workers):
        torch.set_rng_state(batch["rng_state"])
        new.append((batch["micro_step"], batch["pixel_values"], batch["simple"], torch.randn(8)))
    for m, (got_m, pixels, simple, noise) in zip(steps, new):
        torch.manual_seed(micro_step_seed(cfg.seed, m))
        old = collate([ds[i] for i in batch_indices(len(ds), 3, m, cfg.seed)])
        assert got_m == m and simple == old["simple"]
        assert torch.equal(pixels, old["pixel_values"])
        assert torch.equal(noise, torch.randn(8))


def test_bf16_trains_generates_and_resumes(surd, tmp_path):
    """In a process of its own: accelerate keeps one mixed precision per process, and pytest's
    trains in fp32 (a second precision in one process is refused, the next test)."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_train; "
            f"test_train.bf16_run({str(surd)!r}, {str(tmp_path)!r})")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def bf16_run(surd: str, tmp: str) -> None:
    """bf16 training of both adapters: finite losses, a plain returned adapter that generates,
    and a resumed run equal to a straight one."""
    from sur_lib.adapter import SURAdapter
    from sur_lib.pipeline import generate

    surd, tmp = Path(surd), Path(tmp)
    for official in (False, True):
        tmp_path = tmp / f"official-{official}"
        kw = dict(mixed_precision="bf16", official_adapter=official, lambda_llm=1.0, lambda_cp=1.0,
                  checkpoint_every=2)
        res = train(cfg_for(surd, tmp_path / "straight", max_steps=3, **kw))
        log = read_log(tmp_path / "straight")
        assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log)
        # the returned adapter is a plain module: no autocast wrapper in its forward
        plain = SURAdapter.from_pretrained(tmp_path / "straight" / "adapter").eval()
        res.adapter.eval()
        x = torch.randn(2, 8, 32)
        with torch.no_grad():
            assert torch.equal(res.adapter(x).c, plain(x).c)
        images = generate(tiny_random_backbone(seed=0), ["one lemon"], adapter=res.adapter,
                          num_inference_steps=2, output_type="pt")
        assert images.shape[0] == 1 and torch.isfinite(images).all()

        train(cfg_for(surd, tmp_path / "resumed", max_steps=2, **kw))  # stops after checkpoint 2
        again = train(cfg_for(surd, tmp_path / "resumed", max_steps=3, **kw))
        assert again.resumed_from == 2
        a, b = res.adapter.state_dict(), again.adapter.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_mixed_precision_in_one_process_is_refused_clearly(tmp_path):
    """accelerate's state is process-wide and cannot be reset with a public API: a run with
    another mixed precision than an earlier one in the same process gets a one-line error."""
    from sur_lib.infra import run_state

    run_state.make_accelerator(tmp_path, "no", 1)
    with pytest.raises(ValueError, match="mixed_precision='bf16': this process already trained "
                                         "with mixed_precision='no'.*in a new process"):
        run_state.make_accelerator(tmp_path, "bf16", 1)


def test_a_nan_loss_stops_the_run_and_the_checkpoint_resumes(surd, tmp_path, monkeypatch):
    import sur_lib.train as tr
    from sur_lib.adapter import SURAdapter

    kw = dict(max_steps=4, checkpoint_every=2, lambda_llm=1.0, lambda_cp=1.0)
    ref = train(cfg_for(surd, tmp_path / "straight", **kw)).adapter.state_dict()

    real, calls = tr.compute_losses, []

    def poisoned(*args, **kwargs):  # step 3's L_LLM overflows
        losses = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            losses["l_llm"] = losses["l_llm"] * float("nan")
            losses["loss"] = losses["loss"] + losses["l_llm"]
        return losses

    monkeypatch.setattr(tr, "compute_losses", poisoned)
    with pytest.raises(tr.NonFiniteLossError) as err:
        train(cfg_for(surd, tmp_path / "nan", **kw))
    msg = str(err.value)
    assert "step 3" in msg and "l_llm=nan" in msg and "l_simple=" in msg and "l_cp=" in msg
    assert "step-000002" in msg and "resumes" in msg
    step, path = latest_checkpoint(tmp_path / "nan")
    assert step == 2
    saved = SURAdapter.from_pretrained(path / "adapter").state_dict()
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert [r["step"] for r in read_log(tmp_path / "nan")] == [1, 2]

    monkeypatch.setattr(tr, "compute_losses", real)
    resumed = train(cfg_for(surd, tmp_path / "nan", **kw))
    assert resumed.resumed_from == 2
    got = resumed.adapter.state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert [r["step"] for r in read_log(tmp_path / "nan")] == [1, 2, 3, 4]


def test_the_authors_pt_works_as_knowledge_file(tmp_path):
    from sur_lib.infra.knowledge_files import load_authors_prompt2vec

    authors = Path(__file__).parent / "data" / "authors_prompt2vec_13B_39.pt"
    prompt = next(iter(load_authors_prompt2vec(authors)))
    root = tmp_path / "surd"
    root.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 20, 200)).save(root / f"{i}.png")
    rows = [{"file_name": f"{i}.png", "text": prompt, "prompt": f"{prompt}, {i}, best quality"} for i in range(4)]
    write_metadata(root, rows)
    cfg = cfg_for(root, tmp_path / "run", knowledge_file=str(authors), llm="huggyllama/llama-13b",
                  max_steps=2, lambda_llm=1.0, lambda_cp=1.0)
    res = train(cfg)
    assert res.adapter.llm_projection.weight.shape == (32, 5120)
    assert all(r["l_llm"] > 0 for r in read_log(tmp_path / "run"))

    write_metadata(root, rows[:3] + [{**rows[3], "text": "a prompt the authors never embedded"}])
    with pytest.raises(ValueError, match="'a prompt the authors never embedded'") as err:
        train(cfg_for(root, tmp_path / "run2", knowledge_file=str(authors), max_steps=1))
    assert "authors' format" in str(err.value)
    foreign = tmp_path / "notes.pt"
    foreign.write_text("not a knowledge file")
    with pytest.raises(ValueError, match="is not a knowledge file") as err:
        train(cfg_for(root, tmp_path / "run3", knowledge_file=str(foreign), max_steps=1))
    assert str(foreign) in str(err.value)


@pytest.mark.parametrize("official", [False, True])
@pytest.mark.parametrize("path, lambdas", [("paper", (1.0, 1.0)), ("paper", (0.0, 0.0)),
                                           ("official", (1.0, 1.0)), ("official", (0.0, 1.0)),
                                           ("official", (1.0, 0.0))])
def test_every_trainable_parameter_gets_a_gradient(surd, tmp_path, official, path, lambdas):
    """DistributedDataParallel without find_unused_parameters waits for a gradient of every
    trainable parameter, or fails at the next step ("Expected to have finished reduction")."""
    cfg = cfg_for(surd, tmp_path, official_adapter=official, gradient_path=path)
    adapter, losses = _grads(cfg, surd, lambdas)
    losses["loss"].backward()
    unused = [n for n, p in adapter.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []


def test_trackers_get_every_logged_row(surd, tmp_path, monkeypatch):
    from accelerate.tracking import GeneralTracker

    class Recording(GeneralTracker):  # keeps what it is given: an offline stand-in for TensorBoard
        name, requires_logging_directory, main_process_only = "recording", False, True

        def __init__(self):
            super().__init__()
            self.config, self.rows, self.finished = None, [], False

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            self.config = values

        def log(self, values, step=None, **kwargs):
            self.rows.append((step, dict(values)))

        def finish(self):
            self.finished = True

    from sur_lib.infra import run_state

    rec = Recording()
    monkeypatch.setattr(run_state, "log_with", lambda report_to: [rec])
    train(cfg_for(surd, tmp_path, max_steps=3))
    assert [s for s, _ in rec.rows] == [1, 2, 3] and rec.finished
    assert rec.config["max_steps"] == 3 and rec.config["profile"] == "tiny-random"
    csv_rows = read_log(tmp_path)
    for (_, row), ref in zip(rec.rows, csv_rows):
        assert row["loss"] == ref["loss"] and set(row) == set(ref) - {"step"}


def test_report_to_without_the_package_says_what_to_install(surd, tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed")
    with pytest.raises(ImportError, match="pip install tensorboard"):
        train(cfg_for(surd, tmp_path, report_to="tensorboard", max_steps=1))
    with pytest.raises(ValueError, match="report_to"):
        train(cfg_for(surd, tmp_path, report_to="mlflow-ish", max_steps=1))
