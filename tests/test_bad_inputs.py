"""The project's table of bad inputs: what a hostile but realistic user tries, and what they get.

One test per case, grouped by where the input enters. Each case ends either in a clear error
that names the bad input (a one-line message and exit status 2 on the command line) or in
correct behaviour with a note; faults (a damaged checkpoint, a kill while the log is rewritten)
lose nothing. (Bad knowledge files are tested in tests/test_knowledge.py.)
"""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sur_lib.data import SURDDataset
from sur_lib.infra import cli
from sur_lib.infra.run_state import read_log
from sur_lib.infra.surd_files import SURDError, write_metadata
from sur_lib.infra.config import parse_overrides
from sur_lib.train import TrainConfig, train

ROOT = Path(__file__).parents[1]
PROMPTS = ["four tomatoes in a row", "a stack of three dice", "five limes in a circle", "one lemon"]


# ============================================================================ fixtures


@pytest.fixture(scope="module")
def surd(tmp_path_factory, make_surd):
    return make_surd(tmp_path_factory.mktemp("surd"), PROMPTS, 6)


def cfg_for(surd, out, **kw):
    values = dict(profile="tiny-random", data_dir=str(surd), output_dir=str(out), llm="random",
                  num_layers=1, num_heads=4, ffn_dim=32, batch_size=2, max_steps=4,
                  checkpoint_every=2, keep_checkpoints=3, learning_rate=1e-3, lambda_llm=0.0,
                  lambda_cp=1.0, progress=False)
    values.update(kw)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def run4(surd, tmp_path_factory):
    """A finished 4-step run: checkpoints at steps 2 and 4, log rows 1-4, final adapter."""
    out = tmp_path_factory.mktemp("run4") / "run"
    res = train(cfg_for(surd, out))
    return out, {k: v.clone() for k, v in res.adapter.state_dict().items()}


def copy_run(run4, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run4[0], out)
    return out


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run_cli(main, argv, capsys):
    """``cli.run(main, argv)`` as the command line does it: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        cli.run(main, argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


# ============================================================================ config values


def test_cli_lambda_in_paper_notation_is_a_float():
    # before: YAML 1.1 read 1e-5 as the string '1e-5' and training crashed deep in the losses
    assert parse_overrides(TrainConfig, ["--lambda_llm", "1e-5"]) == {"lambda_llm": 1e-5}
    assert isinstance(TrainConfig(lambda_llm="1e-5").lambda_llm, float)


def test_cli_learning_rate_1e_3_is_a_float():
    assert parse_overrides(TrainConfig, ["--learning_rate", "1e-3"]) == {"learning_rate": 1e-3}


def test_yaml_file_with_1e_5_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lambda_llm: 1e-5\nlearning_rate: 1e-3\nmixed_precision: no\n")
    cfg = TrainConfig.from_yaml(path)
    assert (cfg.lambda_llm, cfg.learning_rate, cfg.mixed_precision) == (1e-5, 1e-3, "no")


def test_max_steps_abc_names_the_key():
    with pytest.raises(ValueError, match=r"--max_steps: expected a whole number, got the string 'abc'"):
        parse_overrides(TrainConfig, ["--max_steps", "abc"])


def test_max_steps_1e3_is_a_whole_number_and_2_5_is_not():
    assert parse_overrides(TrainConfig, ["--max_steps", "1e3"]) == {"max_steps": 1000}
    with pytest.raises(ValueError, match=r"--max_steps: expected a whole number, got the string '2.5'"):
        parse_overrides(TrainConfig, ["--max_steps", "2.5"])


def test_mixed_precision_no_stays_text():
    # before: --mixed_precision no became False and was rejected
    assert parse_overrides(TrainConfig, ["--mixed_precision", "no"]) == {"mixed_precision": "no"}


def test_unknown_override_key_suggests_the_right_one():
    with pytest.raises(ValueError, match=r"'lambda_lm' \(did you mean 'lambda_llm'\?\)"):
        parse_overrides(TrainConfig, ["--lambda_lm", "1e-5"])


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just a string\n", "string")])
def test_yaml_file_that_is_not_a_mapping(tmp_path, text, kind):
    # before: AttributeError: 'list' object has no attribute 'update'
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"{path}: a config file must be a mapping.*{kind}"):
        TrainConfig.from_yaml(path)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("max_steps: 5\nlambda_llm: [1e-5\n")
    with pytest.raises(ValueError, match=rf"{path} line \d+: not valid YAML"):
        TrainConfig.from_yaml(path)


def test_temperature_zero_is_refused():
    # before: every KL term divided by 0 -> NaN losses, and the run exited 0
    with pytest.raises(ValueError, match="temperature must be > 0, got 0.0"):
        TrainConfig(temperature=0)


@pytest.mark.parametrize("key, value, message", [
    ("learning_rate", "nan", "learning_rate: expected a finite number"),
    ("learning_rate", -1e-4, "learning_rate must be > 0"),
    ("lambda_cp", -1, "lambda_cp must be >= 0"),
    ("dropout", 1.0, "dropout must be < 1"),
    ("adam_beta2", 1.0, "adam_beta2 must be < 1"),
    ("eta", 2, "eta must be <= 1"),
    ("keep_checkpoints", 0, "keep_checkpoints must be >= 1"),
    ("llm_dtype", "float8", "llm_dtype must be one of"),
    ("resume", "maybe", "resume: expected true or false"),
    ("batch_size", True, "batch_size: expected a whole number, got the boolean True"),
    ("profile", 3, "profile: expected text, got the number 3"),
])
def test_every_field_is_range_checked(key, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{key: value})


def test_train_cli_error_is_one_line_with_exit_status_2(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("profile: tiny-random\n")
    env = dict(os.environ, SUR_DEBUG="")
    cmd = [sys.executable, "-m", "sur_lib.train", str(cfg), "--max_steps", "abc"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr
    assert p.stderr.startswith("error: --max_steps: expected a whole number, got the string 'abc'")
    p = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert p.returncode == 1 and "Traceback" in p.stderr and "UsageError" in p.stderr


def test_train_cli_missing_config_file(tmp_path, capsys):
    from sur_lib.train import main

    code, _, err = run_cli(main, [str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and err.startswith(f"error: config file not found: {tmp_path / 'nope.yaml'}")


# ============================================================================ resume


def test_truncated_model_safetensors_falls_back_to_the_previous_checkpoint(surd, run4, tmp_path, capsys):
    # before: load_state failed with a safetensors error naming no file, though step-2 was intact
    out = copy_run(run4, tmp_path)
    f = out / "checkpoints" / "step-000004" / "adapter" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    res = train(cfg_for(surd, out))
    said = capsys.readouterr().out
    assert "checkpoint step-000004 is damaged (adapter/diffusion_pytorch_model.safetensors is" in said
    assert "resuming from" in said and "step-000002 (step 2)" in said
    assert res.resumed_from == 2 and same_weights(res.adapter.state_dict(), run4[1])


def test_truncated_optimizer_state_falls_back_to_the_previous_checkpoint(surd, run4, tmp_path, capsys):
    out = copy_run(run4, tmp_path)
    f = out / "checkpoints" / "step-000004" / "optimizer.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    res = train(cfg_for(surd, out))
    said = capsys.readouterr().out
    assert "step-000004 is damaged (optimizer.safetensors is 100 bytes" in said
    assert res.resumed_from == 2 and same_weights(res.adapter.state_dict(), run4[1])
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4]


def test_checkpoint_without_manifest_is_checked_by_structure(surd, run4, tmp_path, capsys):
    """Checkpoints written before manifests existed: a truncated safetensors file is still found."""
    out = copy_run(run4, tmp_path)
    for step in ("step-000002", "step-000004"):
        state_file = out / "checkpoints" / step / "state.json"
        state = json.loads(state_file.read_text())
        del state["files"], state["finite"]
        state_file.write_text(json.dumps(state))
    f = out / "checkpoints" / "step-000004" / "adapter" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    res = train(cfg_for(surd, out))
    assert "adapter/diffusion_pytorch_model.safetensors" in capsys.readouterr().out and res.resumed_from == 2


def test_every_checkpoint_damaged_is_refused(surd, run4, tmp_path):
    out = copy_run(run4, tmp_path)
    for step in ("step-000002", "step-000004"):
        (out / "checkpoints" / step / "optimizer.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="no intact checkpoint.*step-000004.*step-000002"):
        train(cfg_for(surd, out))


def test_stray_non_numeric_step_folder_is_skipped_with_a_note(surd, run4, tmp_path, capsys):
    # before: ValueError: invalid literal for int() with base 10: 'old'
    out = copy_run(run4, tmp_path)
    (out / "checkpoints" / "step-old").mkdir()
    (out / "checkpoints" / "step-old" / "state.json").write_text("{}")
    res = train(cfg_for(surd, out))
    assert "skipping step-old: 'step-old' is not step-<number>" in capsys.readouterr().out
    assert res.resumed_from == 4


def test_resume_with_another_learning_rate_is_refused(surd, run4, tmp_path):
    # before: the old learning rate was silently kept while config.yaml said the new one
    out = copy_run(run4, tmp_path)
    before = (out / "config.yaml").read_text()
    with pytest.raises(ValueError, match=r"learning_rate: 0\.001 -> 0\.01.*allow_config_change"):
        train(cfg_for(surd, out, max_steps=6, learning_rate=1e-2))
    assert (out / "config.yaml").read_text() == before  # nothing rewritten


def test_resume_with_allowed_config_change_applies_and_records_it(surd, run4, tmp_path, capsys):
    out = copy_run(run4, tmp_path)
    shutil.rmtree(out / "checkpoints" / "step-000004")  # resume from step 2, two steps to go
    train(cfg_for(surd, out, learning_rate=1e-2), allow_config_change=True)
    assert "learning_rate 0.001 -> 0.01" in capsys.readouterr().out
    lrs = [r["lr"] for r in read_log(out)]
    assert lrs == [1e-3, 1e-3, 1e-2, 1e-2]  # the new rate is the one in effect
    state = json.loads((out / "checkpoints" / "step-000004" / "state.json").read_text())
    assert state["config"]["learning_rate"] == 1e-2
    assert state["config_changes"] == [{"at_step": 2, "from_checkpoint": "step-000002", "changed": {
        "learning_rate": {"checkpoint": 1e-3, "now": 1e-2}}}]
    assert yaml.safe_load((out / "config.yaml").read_text())["learning_rate"] == 1e-2


def test_run_length_may_change_on_resume(surd, run4, tmp_path):
    out = copy_run(run4, tmp_path)
    res = train(cfg_for(surd, out, max_steps=5, checkpoint_every=5, keep_checkpoints=2))
    assert res.resumed_from == 4 and [r["step"] for r in read_log(out)] == [1, 2, 3, 4, 5]


def test_resume_with_max_steps_below_the_checkpoint_is_refused(surd, run4, tmp_path, capsys):
    # before: it printed "done: 3 steps" for an adapter that was at step 4
    from sur_lib.train import main

    out = copy_run(run4, tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(cfg_for(surd, out, max_steps=3).to_dict()))
    code, stdout, err = run_cli(main, [str(cfg)], capsys)
    assert code == 2 and "done" not in stdout
    assert "step-000004 is at step 4, beyond max_steps=3" in err


# ============================================================================ faults


class Killed(BaseException):
    """Stands for SIGKILL arriving at that line."""


def test_kill_while_the_log_is_rewritten_on_resume_loses_nothing(surd, run4, tmp_path, monkeypatch):
    """On resume the log is cut back to the checkpoint's step. A kill while that happens must
    leave the old log whole. The kill is simulated at every place the rewrite can touch the
    log: the csv writer's calls and the atomic rename. (Before: the log was reopened with "w",
    which empties it, then rewritten; a kill in between left it empty.)"""
    import csv

    from sur_lib.infra import fileio

    out = copy_run(run4, tmp_path)
    shutil.rmtree(out / "checkpoints" / "step-000004")  # killed after step 4, before its checkpoint
    log_before = (out / "log.csv").read_bytes()

    def killed(*a, **k):
        raise Killed
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == "log.csv":
            raise Killed
        return real_replace(src, dst)
    monkeypatch.setattr(csv.DictWriter, "writeheader", killed)
    monkeypatch.setattr(csv.DictWriter, "writerows", killed)
    monkeypatch.setattr(fileio.os, "replace", replace)
    with pytest.raises(Killed):
        train(cfg_for(surd, out))
    assert (out / "log.csv").read_bytes() == log_before
    assert not [p for p in out.iterdir() if p.name.startswith(".log.csv")]  # no temp file left
    assert (out / "checkpoints" / "step-000002" / "state.json").is_file()
    # started again, the run completes as if nothing had happened
    monkeypatch.undo()
    res = train(cfg_for(surd, out))
    assert same_weights(res.adapter.state_dict(), run4[1])
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4]
    assert read_log(out)[:2] == read_log(run4[0])[:2]


def test_pruning_never_deletes_the_last_good_checkpoint(tmp_path):
    """A run whose weights went NaN keeps saving; pruning to keep_checkpoints=1 must not delete
    the last checkpoint with finite weights, and resume picks that one."""
    from sur_lib.adapter import SURAdapter
    from sur_lib.infra import checkpoints
    from sur_lib.infra.run_state import resume_checkpoint, save_checkpoint

    adapter = SURAdapter(text_dim=8, num_layers=1, num_heads=2, ffn_dim=8, llm_dim=None)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-3)
    config = TrainConfig(profile="tiny-random", output_dir=str(tmp_path), keep_checkpoints=1).to_dict()

    def save(step):
        save_checkpoint(tmp_path, step, adapter, {"opt": opt.state_dict()}, config, keep=1)

    save(2)
    with torch.no_grad():
        next(adapter.parameters()).fill_(float("nan"))
    save(4)
    save(6)
    found, _ = checkpoints.scan(tmp_path / "checkpoints")
    assert [s for s, _ in found] == [2, 6]  # 4 pruned, 2 kept although keep_checkpoints=1
    (step, path), notes = resume_checkpoint(tmp_path)
    assert step == 2 and any("step-000006 is damaged (its weights are not finite" in n for n in notes)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.zeros_like(p))
    save(8)  # a good one again: now the old ones may go
    assert [s for s, _ in checkpoints.scan(tmp_path / "checkpoints")[0]] == [8]


def test_pruning_keeps_the_last_good_checkpoint_when_the_newest_are_damaged(tmp_path):
    from sur_lib.infra import checkpoints

    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        d = root / f"step-{step:06d}"
        d.mkdir(parents=True)
        (d / "weights.bin").write_bytes(bytes(range(50)))
        (d / "state.json").write_text(json.dumps({"step": step, "finite": True,
                                                  "files": checkpoints.manifest(d)}))
    for step in (4, 6):  # truncated after they were written
        (root / f"step-{step:06d}" / "weights.bin").write_bytes(b"x")
    deleted = checkpoints.prune(root, keep=1)
    assert [p.name for p in deleted] == ["step-000004"]
    assert [s for s, _ in checkpoints.scan(root)[0]] == [2, 6]


# ============================================================================ no pickle


def test_crafted_optimizer_pt_does_not_run_code(tmp_path):
    # before: torch.load(weights_only=False) ran whatever the pickle asked for
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from sur_lib.world import pretrain

    def objects():
        unet = pretrain.build_unet()
        ema = EMAModel(unet.parameters(), model_cls=type(unet), model_config=unet.config)
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
        return unet, ema, opt, get_scheduler("constant_with_warmup", opt, num_warmup_steps=1)

    folder = tmp_path / "state"
    pretrain.save_state(folder, *objects(), step=1, seconds=0.0)
    # make it look like a state of the old format, then plant the crafted file
    for name in ("optimizer.safetensors", "optimizer.json"):
        (folder / name).unlink(missing_ok=True)
    state = json.loads((folder / "state.json").read_text())
    state.pop("files", None)
    (folder / "state.json").write_text(json.dumps(state))
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))
    torch.save({"opt": Exploit()}, folder / "optimizer.pt")  # a well-formed torch zip file
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        pretrain.load_state(folder, *objects())
    assert not marker.exists()


def test_no_torch_load_without_weights_only_true_in_sur_lib():
    hits = []
    for path in sorted((ROOT / "sur_lib").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load" in line and "weights_only=True" not in line:
                hits.append(f"{path.name}:{n}: {line.strip()}")
    assert not hits, hits


def test_no_pickle_files_shipped_in_data_models():
    pickles = [p for p in (ROOT / "data" / "models").rglob("*")
               if p.suffix in (".pt", ".pth", ".pkl", ".bin", ".ckpt")]
    assert not pickles, pickles


def test_a_training_checkpoint_holds_no_pickle(run4):
    # before: accelerate's save_state wrote optimizer.bin, scheduler.bin and random_states_0.pkl
    for ckpt in sorted((run4[0] / "checkpoints").glob("step-*")):
        files = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
        assert {"optimizer.safetensors", "optimizer.json", "state.json",
                "adapter/diffusion_pytorch_model.safetensors"} <= set(files), files
        assert all(Path(f).suffix in (".safetensors", ".json", ".txt") for f in files), files


def _as_accelerate_checkpoint(ckpt: Path, marker: Path) -> None:
    """Rewrite ``ckpt`` in the format train used before (accelerate's save_state: an accelerate/
    folder with model.safetensors, optimizer.bin, scheduler.bin, random_states_0.pkl), with a
    random_states_0.pkl that would touch ``marker`` if it were ever unpickled."""
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    from sur_lib.adapter import SURAdapter
    from sur_lib.infra import checkpoints

    acc = Accelerator()
    adapter = SURAdapter.from_pretrained(ckpt / "adapter")
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-3)
    sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=0)
    adapter, opt, sched = acc.prepare(adapter, opt, sched)
    states = checkpoints.load_state_dict(ckpt, "optimizer")
    opt.load_state_dict(states["opt"])
    sched.load_state_dict(states["lr_sched"])
    acc.save_state(str(ckpt / "accelerate"))
    for name in ("optimizer.safetensors", "optimizer.json"):
        (ckpt / name).unlink()

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))
    rng = ckpt / "accelerate" / "random_states_0.pkl"
    assert rng.exists()
    torch.save(Exploit(), rng)
    state = json.loads((ckpt / "state.json").read_text())
    state["files"] = checkpoints.manifest(ckpt)
    (ckpt / "state.json").write_text(json.dumps(state))


def test_a_checkpoint_in_accelerates_old_format_resumes_without_arbitrary_pickle(surd, run4, tmp_path,
                                                                                capsys):
    """Runs checkpointed before the pickle-free format resume: weights from safetensors, the
    optimizer and LR schedule with torch.load(weights_only=True), the RNG pickle never read;
    a note says so, the result equals the straight run's, and the next checkpoint has no pickle."""
    out = copy_run(run4, tmp_path)
    marker = tmp_path / "pwned"
    shutil.rmtree(out / "checkpoints" / "step-000004")
    _as_accelerate_checkpoint(out / "checkpoints" / "step-000002", marker)
    capsys.readouterr()
    res = train(cfg_for(surd, out))
    said = capsys.readouterr().out
    assert "step-000002 is in accelerate's older checkpoint format" in said
    assert "weights_only=True" in said and "resuming from" in said
    assert res.resumed_from == 2 and same_weights(res.adapter.state_dict(), run4[1])
    def rows(folder):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in read_log(folder)]
    assert rows(out) == rows(run4[0])  # the same losses and learning rates, step for step
    assert not marker.exists()
    new = out / "checkpoints" / "step-000004"
    assert (new / "optimizer.safetensors").exists() and not (new / "accelerate").exists()


def test_a_crafted_optimizer_bin_in_an_old_checkpoint_runs_no_code(surd, run4, tmp_path):
    out = copy_run(run4, tmp_path)
    marker = tmp_path / "pwned"
    shutil.rmtree(out / "checkpoints" / "step-000004")
    ckpt = out / "checkpoints" / "step-000002"
    _as_accelerate_checkpoint(ckpt, marker)

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))
    torch.save({"state": Exploit()}, ckpt / "accelerate" / "optimizer.bin")
    state = json.loads((ckpt / "state.json").read_text())
    del state["files"]  # checked by structure: a well-formed torch zip file
    (ckpt / "state.json").write_text(json.dumps(state))
    with pytest.raises(RuntimeError, match="could not load the checkpoint.*(?i:weights.only|unpickl)"):
        train(cfg_for(surd, out))
    assert not marker.exists()


def test_no_private_accelerate_or_torch_state_in_training():
    """Training uses public APIs only: no reset of accelerate's process-wide state, no write to
    a scheduler's private attributes, no accelerate save_state/load_state (pickles)."""
    import ast

    banned = {"_reset_state", "_shared_state", "_last_lr", "save_state", "load_state"}
    hits = []
    for path in [ROOT / "sur_lib" / "train.py", *sorted((ROOT / "sur_lib" / "infra").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in banned:
                hits.append(f"{path.name}:{node.lineno}: .{node.attr}")
    assert not hits, hits


# ============================================================================ dataset builds


def test_toyworld_build_into_an_existing_dataset_is_refused(tmp_path, capsys):
    # before: metadata.jsonl was replaced without asking
    from sur_lib.world import toyworld

    (tmp_path / "ds").mkdir()
    meta = tmp_path / "ds" / "metadata.jsonl"
    meta.write_text('{"file_name": "mine.png", "text": "a", "prompt": "b"}\n')
    code, _, err = run_cli(toyworld.main, ["build", str(tmp_path / "ds"), "--n", "2"], capsys)
    assert code == 2 and "already holds a dataset (metadata.jsonl)" in err and "--force" in err
    assert meta.read_text().startswith('{"file_name": "mine.png"')
    code, out, _ = run_cli(toyworld.main, ["build", str(tmp_path / "ds"), "--n", "2", "--force"], capsys)
    assert code == 0 and "wrote 2 examples" in out and len(SURDDataset(tmp_path / "ds", resolution=32)) == 2


@pytest.mark.parametrize("n", ["-3", "0"])
def test_toyworld_n_must_be_positive(tmp_path, capsys, n):
    # before: --n -3 printed "wrote -3 examples"
    from sur_lib.world import toyworld

    code, out, err = run_cli(toyworld.main, ["build", str(tmp_path / "ds"), "--n", n], capsys)
    assert code == 2 and "wrote" not in out
    assert err.startswith(f"error: n (the number of examples) must be a positive whole number, got {n}")


def test_judge_accuracy_n_must_be_positive(capsys):
    from sur_lib.study import judge_accuracy

    code, _, err = run_cli(judge_accuracy.main, ["--n", "0"], capsys)
    assert code == 2 and err.startswith("error: --n must be >= 1, got 0")


def test_pretrain_bad_argument_is_a_usage_error(capsys):
    from sur_lib.world import pretrain

    code, _, err = run_cli(pretrain.main, ["--steps", "0"], capsys)
    assert code == 2 and err.startswith("error: --steps must be >= 1, got 0")


# ============================================================================ SURD rows


@pytest.mark.parametrize("name", ["../outside.png", "sub/../../outside.png"])
def test_file_name_outside_the_dataset_folder_is_refused(tmp_path, name):
    # before: the image next to the dataset folder was read
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    ds = tmp_path / "ds"
    write_metadata(ds, [{"file_name": name, "text": "a", "prompt": "b"}])
    with pytest.raises(SURDError, match="file_name points outside the dataset folder") as e:
        SURDDataset(ds, resolution=8)
    assert e.value.line == 1 and e.value.file_name == name


def test_absolute_file_name_is_refused(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    write_metadata(tmp_path / "ds", [{"file_name": str(tmp_path / "outside.png"), "text": "a", "prompt": "b"}])
    with pytest.raises(SURDError, match="outside the dataset folder"):
        SURDDataset(tmp_path / "ds", resolution=8)


def test_duplicate_rows_are_counted_in_the_report(tmp_path):
    # before: duplicates passed without a note
    ds = tmp_path / "ds"
    ds.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8)).save(ds / f"{i}.png")
    row0 = {"file_name": "0.png", "text": "a", "prompt": "b"}
    write_metadata(ds, [row0, {"file_name": "1.png", "text": "c", "prompt": "d"}, row0, row0])
    with pytest.warns(UserWarning, match="2 duplicate rows kept"):
        data = SURDDataset(ds, resolution=8)
    assert len(data) == 4 and data.report.duplicates == [(3, 1, "0.png"), (4, 1, "0.png")]


# ============================================================================ generation


@pytest.fixture(scope="module")
def backbone():
    from sur_lib.models import tiny_random_backbone

    return tiny_random_backbone(text_dim=32, sample_size=8, with_vae=False, seed=0)


@pytest.mark.parametrize("kw, message", [
    ({"prompts": []}, "prompts is empty"),
    ({"prompts": ["four tomatoes", 3]}, r"prompts\[1\] must be a string, got int 3"),
    ({"prompts": None}, "prompts must be a string or a list of strings, got NoneType"),
    ({"num_images_per_prompt": 0}, "num_images_per_prompt must be a whole number >= 1, got 0"),
    ({"num_images_per_prompt": -2}, "num_images_per_prompt must be a whole number >= 1"),
    ({"num_inference_steps": 0}, "num_inference_steps must be a whole number >= 1, got 0"),
    ({"guidance_scale": -3.0}, r"guidance_scale must be a finite number >= 0 .*got -3.0"),
    ({"guidance_scale": math.nan}, "guidance_scale must be a finite number >= 0 .*got nan"),
    ({"negative_prompt": ["a", "b"]}, "2 negative prompts for 1 prompts"),
])
def test_generate_arguments_are_checked(backbone, kw, message):
    # before: deep errors in the pipeline, or (guidance) silently unguided images
    from sur_lib.pipeline import generate

    kw = {"prompts": ["four tomatoes"], "num_inference_steps": 1, "output_type": "pt", **kw}
    with pytest.raises(ValueError, match=message):
        generate(backbone, kw.pop("prompts"), **kw)


def test_generate_warns_about_prompts_the_encoder_cuts(backbone):
    from sur_lib.pipeline import generate

    long = "four small red tomatoes " * 30
    with pytest.warns(UserWarning, match=rf"1 prompt\(s\) longer than the text encoder's "
                                         rf"{backbone.max_length} tokens .*'four small red"):
        generate(backbone, [long, "one lemon"], num_inference_steps=1, output_type="pt")


# ============================================================================ issue 26: silent cases


def test_16_bit_grayscale_png_is_scaled_not_clipped_to_white(tmp_path):
    # before: convert("RGB") clipped I;16 at 255, so 99.6% of the pixel values became +1.0
    ds = tmp_path / "ds"
    ds.mkdir()
    ramp = np.tile(np.linspace(0, 65535, 32).round().astype(np.uint16), (32, 1))
    Image.fromarray(ramp).save(ds / "g16.png")
    assert Image.open(ds / "g16.png").mode == "I;16"
    Image.fromarray((ramp / 257).round().astype(np.uint8)).save(ds / "g8.png")
    write_metadata(ds, [{"file_name": "g16.png", "text": "a", "prompt": "b"},
                        {"file_name": "g8.png", "text": "a", "prompt": "b"}])
    data = SURDDataset(ds, resolution=32, random_flip=False)
    x16, x8 = data[0]["pixel_values"], data[1]["pixel_values"]
    assert (x16 == 1.0).float().mean() < 0.1
    assert torch.allclose(x16, x8, atol=1.01 / 127.5)


@pytest.mark.parametrize("what", ["file", "folder"])
def test_symlink_in_the_dataset_pointing_outside_is_refused(tmp_path, what):
    # before: the '..'/absolute-path refusal was bypassed by a link
    outside = tmp_path / "secret"
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "x.png")
    ds = tmp_path / "ds"
    ds.mkdir()
    if what == "file":
        (ds / "x.png").symlink_to(outside / "x.png")
        name = "x.png"
    else:
        (ds / "sub").symlink_to(outside, target_is_directory=True)
        name = "sub/x.png"
    write_metadata(ds, [{"file_name": name, "text": "a", "prompt": "b"}])
    with pytest.raises(SURDError, match=r"outside the dataset folder.*a symbolic link leads to"):
        SURDDataset(ds, resolution=8)


def test_symlink_inside_the_dataset_is_read(tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir()
    Image.new("RGB", (8, 8)).save(ds / "x.png")
    (ds / "y.png").symlink_to(ds / "x.png")
    write_metadata(ds, [{"file_name": "y.png", "text": "a", "prompt": "b"}])
    assert len(SURDDataset(ds, resolution=8)) == 1


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_utf8_bom_is_stripped_when_reading_prompts(tmp_path, suffix):
    # before: the .txt reader stored the key '\ufeffone lemon'; the .jsonl reader refused the BOM
    from sur_lib.infra.extract import read_prompts

    path = tmp_path / f"p{suffix}"
    lines = ["one lemon", "two limes"]
    body = "\n".join(json.dumps({"text": t}) if suffix == ".jsonl" else t for t in lines)
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    assert read_prompts(path) == lines


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_extract_save_every_s_must_be_finite_and_not_negative(tmp_path, capsys, value):
    # before: nan was accepted and nothing was saved until the end
    from sur_lib import knowledge

    (tmp_path / "p.txt").write_text("one lemon\n")
    code, _, err = run_cli(knowledge.main, ["extract", str(tmp_path / "p.txt"), "--llm", "x", "--out",
                                            str(tmp_path / "k.safetensors"), "--save-every-s", value], capsys)
    assert code == 2 and err.startswith("error: --save-every-s must be a finite number of seconds >= 0")


def test_a_second_train_on_a_locked_output_dir_is_refused_and_its_temporaries_kept(surd, run4, tmp_path):
    # before: both runs wrote the same folder, and startup deleted the other run's .*.tmp folders
    from sur_lib.infra.fileio import folder_lock

    out = copy_run(run4, tmp_path)
    live_tmp = out / "checkpoints" / f".step-000006.{os.getpid()}-abc.tmp"
    live_tmp.mkdir()
    log_before = (out / "log.csv").read_bytes()
    with folder_lock(out):  # the first run, still working
        with pytest.raises(ValueError, match=rf"output_dir {out} is in use by another training run "
                                             rf"\(process {os.getpid()}\)"):
            train(cfg_for(surd, out, max_steps=6))
    assert live_tmp.is_dir() and (out / "log.csv").read_bytes() == log_before
    res = train(cfg_for(surd, out, max_steps=6))  # the first run has ended: the lock is free
    assert res.resumed_from == 4 and not live_tmp.exists()  # its temporaries are now stale


def test_resume_false_removes_the_old_runs_checkpoints(surd, run4, tmp_path, capsys):
    # before: the old run's step-4 stayed; the next default run resumed from it (log 1, 2, 4 ...)
    out = copy_run(run4, tmp_path)
    train(cfg_for(surd, out, max_steps=2, resume=False, learning_rate=1e-2))
    said = capsys.readouterr().out
    assert "resume false: removing the 2 checkpoint(s) of the earlier run" in said
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")) == ["step-000002"]
    res = train(cfg_for(surd, out, max_steps=4, learning_rate=1e-2))
    assert res.resumed_from == 2 and [r["step"] for r in read_log(out)] == [1, 2, 3, 4]


def test_duplicate_yaml_key_is_refused(tmp_path):
    # before: the last value won silently
    path = tmp_path / "c.yaml"
    path.write_text("max_steps: 4\nlambda_llm: 1e-5\nmax_steps: 400000\n")
    with pytest.raises(ValueError, match=rf"{path} line 3: not valid YAML \(duplicate key 'max_steps' "
                                         r"\(first on line 1\)"):
        TrainConfig.from_yaml(path)


def test_yaml_merge_key_may_be_overridden(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("extra:\n  base: &b {a: 1, b: 2}\n  run: {<<: *b, a: 3}\n")
    assert TrainConfig.from_yaml(path).extra["run"] == {"a": 3, "b": 2}


@pytest.mark.parametrize("key", ["output_dir", "data_dir", "knowledge_file", "profile"])
def test_tilde_is_expanded_in_every_path_key(tmp_path, key):
    # before: output_dir: ~/x made a literal ./~/x
    path = tmp_path / "c.yaml"
    path.write_text(f"{key}: ~/sur-x\n")
    assert getattr(TrainConfig.from_yaml(path), key) == os.path.expanduser("~/sur-x")


def _tiny_adapter():
    from sur_lib.adapter import SURAdapter

    torch.manual_seed(0)
    return SURAdapter(text_dim=16, num_layers=1, num_heads=2, ffn_dim=8)


def test_adapter_with_flipped_bytes_is_refused_on_load(tmp_path):
    # before: flipped bytes in the tensors loaded and generated
    from sur_lib.adapter import SURAdapter

    _tiny_adapter().save_pretrained(tmp_path / "a")
    f = tmp_path / "a" / "diffusion_pytorch_model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model.safetensors differs from what was saved"):
        SURAdapter.from_pretrained(tmp_path / "a")


def test_adapter_with_nan_weights_is_refused(tmp_path):
    # before: a NaN weight loaded, and generate returned NaN tensors or black images
    from safetensors.torch import load_file, save_file

    from sur_lib.adapter import SURAdapter

    a = _tiny_adapter()
    a.save_pretrained(tmp_path / "a")
    f = tmp_path / "a" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(f))
    tensors["fc.bias"][0] = float("nan")
    save_file(tensors, str(f))
    (tmp_path / "a" / "sur_manifest.json").unlink()  # as if saved before manifests existed
    with pytest.raises(ValueError, match=r"weights are not finite \(NaN or inf in fc.bias\)"):
        SURAdapter.from_pretrained(tmp_path / "a")
    with torch.no_grad():
        a.fc.bias[0] = float("nan")
    a.save_pretrained(tmp_path / "b")  # saved as it is (a checkpoint records NaN weights) ...
    with pytest.raises(ValueError, match=r"weights are not finite"):  # ... and refused on load
        SURAdapter.from_pretrained(tmp_path / "b")


@pytest.mark.parametrize("kw, message", [
    ({"blur_sigma": 0}, "blur_sigma must be > 0"),
    ({"blur_sigma": math.nan}, "blur_sigma must be a finite number"),
    ({"fixed_gamma": math.nan}, "fixed_gamma must be a finite number"),
    ({"fixed_gamma": -1.0}, "fixed_gamma must be >= 0"),
    ({"max_scale": -5}, "max_scale must be > 0"),
    ({"max_scale": math.inf}, "max_scale must be a finite number"),
])
def test_scfg_options_are_validated(kw, message):
    # before: blur_sigma 0 and fixed_gamma nan gave NaN images; max_scale -5 was accepted
    from sur_lib.guidance import SCFGConfig

    with pytest.raises(ValueError, match=message):
        SCFGConfig(**kw)


@pytest.mark.parametrize("scheduler, most", [("dpm", 999), ("ddim", 999), ("pndm", 999), ("ddpm", 999)])
def test_sampler_step_counts_are_bounded_per_scheduler(backbone, scheduler, most):
    # before: dpm with 1000 steps returned NaN images; DDIM/PNDM/DDPM ended in an IndexError
    from sur_lib.pipeline import generate

    with pytest.raises(ValueError, match=rf"num_inference_steps must be <= {most} for \w+Scheduler "
                                         r"\(the model was trained with 1000 timesteps\), got 1000"):
        generate(backbone, ["a"], num_inference_steps=1000, scheduler=scheduler, output_type="pt")


# ============================================================================ issue 26: cryptic / unbounded


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, c in zip("abcdefgh", "bcdefghi"))


def test_yaml_alias_bomb_is_refused(tmp_path):
    # before: under `extra` it hung; as max_steps it gave a 312,088,826-character message
    for text in ("extra:\n" + "".join("  " + ln + "\n" for ln in BOMB.splitlines()),
                 BOMB + "max_steps: *i\n"):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(ValueError, match=r"expands to more than 100,000 values") as e:
            TrainConfig.from_yaml(path)
        assert len(str(e.value)) < 400


def test_long_value_in_an_error_message_is_cut():
    with pytest.raises(ValueError) as e:
        TrainConfig(max_steps=[1] * 100_000)
    assert len(str(e.value)) < 400 and "characters)" in str(e.value)


@pytest.mark.parametrize("key, value, message", [
    ("max_steps", 10**12, "max_steps must be <= 10,000,000"),
    ("batch_size", 10**9, "batch_size must be <= 65,536"),
    ("dataloader_num_workers", 1000, "dataloader_num_workers must be <= 64"),
    ("resolution", 65536, "resolution must be <= 8,192"),
    ("dataloader_num_workers", -1, "dataloader_num_workers must be >= 0"),
    ("seed", 2**70, r"seed must be a whole number from 0 to 2\*\*63 - 1"),
    ("w0_seed", 2**64, r"w0_seed must be a whole number from 0 to 2\*\*63 - 1"),
])
def test_sizes_and_seeds_have_upper_bounds(key, value, message):
    # before: these hung, ran out of memory naming 0.png, or overflowed in torch
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{key: value})


def test_cli_max_steps_1e12_is_refused_at_once():
    with pytest.raises(ValueError, match="max_steps must be <= 10,000,000"):
        TrainConfig(**parse_overrides(TrainConfig, ["--max_steps", "1e12"]))


def test_generation_and_experiment_seeds_out_of_range(backbone, capsys):
    # before: "Overflow when unpacking long long"
    from sur_lib.study.experiments.common import ExperimentConfig
    from sur_lib.pipeline import generate

    with pytest.raises(ValueError, match=r"seed must be a whole number from 0 to 2\*\*63 - 1, got 18446744073709551616"):
        generate(backbone, ["a"], seed=2**64, num_inference_steps=1, output_type="pt")
    with pytest.raises(ValueError, match=r"--seed must be a whole number from 0 to 2\*\*63 - 1"):
        ExperimentConfig(seed=2**70)
    from sur_lib.world import toyworld

    code, _, err = run_cli(toyworld.main, ["build", "/nonexistent/ds", "--n", "2", "--seed", str(2**70)], capsys)
    assert code == 2 and "seed must be a whole number from 0 to 2**63 - 1" in err


def test_disk_full_names_the_file(tmp_path, monkeypatch):
    # before: "[Errno 28] No space left on device" naming no file
    import errno

    from sur_lib.infra import fileio

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(fileio.os, "fsync", full)
    with pytest.raises(OSError, match=rf"No space left on device while writing {tmp_path / 'r.json'}"):
        fileio.write_json({"a": 1}, tmp_path / "r.json")
    assert not list(tmp_path.iterdir())  # no temporary left
    with pytest.raises(OSError, match=rf"while writing {tmp_path / 'ck'}"):
        with fileio.atomic_folder(tmp_path / "ck"):
            raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("asked, stored", [("one lemon ", "one lemon"), ("cafe\u0301", "caf\u00e9")])
def test_prompt_differing_by_whitespace_or_normalisation_names_the_stored_one(tmp_path, asked, stored):
    # before: "no knowledge vector ... LLM could not be loaded (OSError: We couldn't connect to
    # huggingface.co ...)", with two prompts that look the same
    from sur_lib.infra.knowledge_files import save_knowledge
    from sur_lib.knowledge import cached_knowledge_vectors

    path = tmp_path / "k.safetensors"
    save_knowledge(path, [stored], torch.ones(1, 4), {"layer": -1, "include_bos": True, "batch_size": 1})

    def must_not_load():
        raise AssertionError("no LLM (and no Hub) for a prompt that is in the file in another form")
    with pytest.raises(ValueError, match=r"only by white space or Unicode normalisation") as e:
        cached_knowledge_vectors(path, must_not_load, [asked], -1, progress=False)
    assert ascii(asked) in str(e.value) and ascii(stored) in str(e.value)


def test_missing_prompt_shows_the_nearest_in_the_mapping():
    from sur_lib.knowledge import select_knowledge

    with pytest.raises(ValueError, match=r"the nearest prompt in it is 'four tomatoes in a row'"):
        select_knowledge({"four tomatoes in a row": torch.ones(3)}, ["four tomato in a row"])


def test_llm_path_that_looks_local_never_asks_the_hub(tmp_path):
    from sur_lib.infra.llms import load_causal_lm

    with pytest.raises(ValueError, match=rf"LLM folder {tmp_path / 'nope'} not found \(a path, so the Hub"):
        load_causal_lm(tmp_path / "nope")
    with pytest.raises(ValueError, match="LLM folder runs/llm/x not found"):
        load_causal_lm("runs/llm/x")


def test_width_0_vectors_are_refused(tmp_path):
    from sur_lib.infra.knowledge_files import save_knowledge
    from sur_lib.knowledge import select_knowledge

    with pytest.raises(ValueError, match=r"vectors of width 0"):
        save_knowledge(tmp_path / "k.safetensors", ["a"], torch.ones(1, 0))
    with pytest.raises(ValueError, match=r"the knowledge vector of 'a' in the knowledge mapping has width 0"):
        select_knowledge({"a": torch.ones(0)}, ["a"])


def test_non_utf8_prompt_file_names_the_file_and_line(tmp_path, capsys):
    # before: UnicodeDecodeError, no file named
    from sur_lib import knowledge

    path = tmp_path / "p.txt"
    path.write_bytes("one lemon\ncaf\u00e9\n".encode("latin-1"))
    code, _, err = run_cli(knowledge.main, ["extract", str(path), "--llm", "x", "--out",
                                            str(tmp_path / "k.safetensors")], capsys)
    assert code == 2 and err.startswith(f"error: {path}:2: not UTF-8 text")


def test_extract_out_that_is_a_folder(tmp_path, capsys):
    # before: "knowledge file ... not found"
    from sur_lib import knowledge

    (tmp_path / "p.txt").write_text("one lemon\n")
    code, _, err = run_cli(knowledge.main, ["extract", str(tmp_path / "p.txt"), "--llm", "x", "--out",
                                            str(tmp_path)], capsys)
    assert code == 2 and err.startswith(f"error: --out {tmp_path} is a folder")


def test_adapter_from_a_missing_path_never_asks_the_hub(tmp_path):
    from sur_lib.adapter import SURAdapter

    for name in (tmp_path / "nope", "runs/nope"):
        with pytest.raises(ValueError, match=rf"adapter folder {name} not found"):
            SURAdapter.from_pretrained(name)


def test_adapter_folder_without_weights(tmp_path):
    # before: "Defaulting to unsafe serialization" and a deep error
    from sur_lib.adapter import SURAdapter

    _tiny_adapter().save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"holds no adapter weights \(diffusion_pytorch_model.safetensors missing\)"):
        SURAdapter.from_pretrained(tmp_path / "a")


def test_adapter_of_another_width_never_suggests_ignore_mismatched_sizes(tmp_path):
    from sur_lib.adapter import SURAdapter

    _tiny_adapter().save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg["text_dim"] = 32
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "a" / "sur_manifest.json").unlink()
    with pytest.raises(ValueError, match=r"the weights do not fit the folder's config.json \(\S+ is \[16\] "
                                         r"in the weights file, \[32\] for its config.json\)") as e:
        SURAdapter.from_pretrained(tmp_path / "a")
    assert "ignore_mismatched_sizes" not in str(e.value)


def _deep(n=200_000):
    return "[" * n + "]" * n


def test_deeply_nested_state_json_is_a_damaged_checkpoint(surd, run4, tmp_path, capsys):
    # before: RecursionError stopped training
    out = copy_run(run4, tmp_path)
    (out / "checkpoints" / "step-000004" / "state.json").write_text(_deep())
    res = train(cfg_for(surd, out))
    assert "step-000004 is damaged (state.json is damaged (nested too deeply" in capsys.readouterr().out
    assert res.resumed_from == 2


def test_deeply_nested_result_file_is_named_as_damaged(tmp_path):
    from sur_lib.study import claims
    from sur_lib.study.experiments.verify import read_result

    (tmp_path / "sur.json").write_text(_deep())
    with pytest.raises(ValueError, match=rf"result file {tmp_path / 'sur.json'} is damaged \(nested too deeply"):
        read_result(tmp_path / "sur.json", "sur")
    for name in claims.RESULT_FILES:
        (tmp_path / f"{name}.json").write_text(_deep())
    with pytest.raises(ValueError, match=r"result file .*\.json is damaged \(nested too deeply"):
        claims.load_results(tmp_path)


def test_verify_on_an_empty_result_is_a_clear_error(tmp_path, capsys):
    # before: KeyError: 'model'
    from sur_lib.study.experiments import command

    (tmp_path / "sur.json").write_text("{}")
    code, _, err = run_cli(command.main, ["verify", "--only", "sur", "--out", str(tmp_path)], capsys)
    assert code == 2 and "is not a result of `sur`: it lacks 'experiment', 'model'" in err


def test_data_errors_exit_with_status_2_like_config_errors(tmp_path, capsys):
    # before: a SURDError (a data error) exited 1, a config error 2
    from sur_lib import knowledge

    (tmp_path / "ds").mkdir()
    code, _, err = run_cli(knowledge.main, ["extract", str(tmp_path / "ds"), "--llm", "x", "--out",
                                            str(tmp_path / "k.safetensors")], capsys)
    assert code == 2 and "metadata file not found" in err


def test_extract_removes_temporary_copies_of_dead_processes_only(tmp_path, capsys):
    # before: every SIGKILL of extract left a .NAME.XXXX.tmp copy of the cache for good
    from sur_lib.infra.knowledge_files import save_knowledge
    from sur_lib.knowledge import extract_knowledge

    path = tmp_path / "k.safetensors"
    meta = {"llm": "x", "layer": -1, "include_bos": True, "batch_size": 1}
    save_knowledge(path, ["one lemon"], torch.ones(1, 4), meta)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".k.safetensors.{dead}-x1y2.tmp"
    live = tmp_path / f".k.safetensors.{os.getppid()}-a1b2.tmp"
    other = tmp_path / ".other.safetensors.1-zz.tmp"
    for p in (stale, live, other):
        p.write_bytes(b"half a cache")

    def must_not_load():
        raise AssertionError("every prompt is in the cache")
    extract_knowledge(["one lemon"], path, must_not_load, meta={"llm": "x"}, progress=False)
    assert not stale.exists() and live.exists() and other.exists()
    assert f"removed {stale.name}" in capsys.readouterr().out
