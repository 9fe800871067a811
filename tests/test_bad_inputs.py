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

from sur_lib import cli
from sur_lib.data import SURDDataset, SURDError, write_metadata
from sur_lib.train import TrainConfig, _parse_overrides, read_log, train

ROOT = Path(__file__).parents[1]
PROMPTS = ["four tomatoes in a row", "a stack of three dice", "five limes in a circle", "one lemon"]


# ============================================================================ fixtures


@pytest.fixture(scope="module")
def surd(tmp_path_factory):
    root = tmp_path_factory.mktemp("surd")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": PROMPTS[i % 4], "prompt": f"{i} red circles"})
    write_metadata(root, rows)
    return root


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
    assert _parse_overrides(["--lambda_llm", "1e-5"]) == {"lambda_llm": 1e-5}
    assert isinstance(TrainConfig(lambda_llm="1e-5").lambda_llm, float)


def test_cli_learning_rate_1e_3_is_a_float():
    assert _parse_overrides(["--learning_rate", "1e-3"]) == {"learning_rate": 1e-3}


def test_yaml_file_with_1e_5_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lambda_llm: 1e-5\nlearning_rate: 1e-3\nmixed_precision: no\n")
    cfg = TrainConfig.from_yaml(path)
    assert (cfg.lambda_llm, cfg.learning_rate, cfg.mixed_precision) == (1e-5, 1e-3, "no")


def test_max_steps_abc_names_the_key():
    with pytest.raises(ValueError, match=r"--max_steps: expected a whole number, got the string 'abc'"):
        _parse_overrides(["--max_steps", "abc"])


def test_max_steps_1e3_is_a_whole_number_and_2_5_is_not():
    assert _parse_overrides(["--max_steps", "1e3"]) == {"max_steps": 1000}
    with pytest.raises(ValueError, match=r"--max_steps: expected a whole number, got the string '2.5'"):
        _parse_overrides(["--max_steps", "2.5"])


def test_mixed_precision_no_stays_text():
    # before: --mixed_precision no became False and was rejected
    assert _parse_overrides(["--mixed_precision", "no"]) == {"mixed_precision": "no"}


def test_unknown_override_key_suggests_the_right_one():
    with pytest.raises(ValueError, match=r"'lambda_lm' \(did you mean 'lambda_llm'\?\)"):
        _parse_overrides(["--lambda_lm", "1e-5"])


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
    f = out / "checkpoints" / "step-000004" / "accelerate" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    res = train(cfg_for(surd, out))
    said = capsys.readouterr().out
    assert "checkpoint step-000004 is damaged (accelerate/model.safetensors is" in said
    assert "resuming from" in said and "step-000002 (step 2)" in said
    assert res.resumed_from == 2 and same_weights(res.adapter.state_dict(), run4[1])


def test_truncated_optimizer_bin_falls_back_to_the_previous_checkpoint(surd, run4, tmp_path, capsys):
    out = copy_run(run4, tmp_path)
    f = out / "checkpoints" / "step-000004" / "accelerate" / "optimizer.bin"
    f.write_bytes(f.read_bytes()[:100])
    res = train(cfg_for(surd, out))
    said = capsys.readouterr().out
    assert "step-000004 is damaged (accelerate/optimizer.bin is 100 bytes" in said
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
    f = out / "checkpoints" / "step-000004" / "accelerate" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    res = train(cfg_for(surd, out))
    assert "accelerate/model.safetensors" in capsys.readouterr().out and res.resumed_from == 2


def test_every_checkpoint_damaged_is_refused(surd, run4, tmp_path):
    out = copy_run(run4, tmp_path)
    for step in ("step-000002", "step-000004"):
        (out / "checkpoints" / step / "accelerate" / "optimizer.bin").write_bytes(b"")
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

    from sur_lib import fileio

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


def _accelerated(tmp_path, keep):
    from accelerate import Accelerator

    from sur_lib.adapter import SURAdapter

    acc = Accelerator()
    adapter = SURAdapter(text_dim=8, num_layers=1, num_heads=2, ffn_dim=8, llm_dim=None)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-3)
    adapter, opt = acc.prepare(adapter, opt)
    cfg = TrainConfig(profile="tiny-random", output_dir=str(tmp_path), keep_checkpoints=keep)
    return acc, adapter, cfg


def test_pruning_never_deletes_the_last_good_checkpoint(tmp_path):
    """A run whose weights went NaN keeps saving; pruning to keep_checkpoints=1 must not delete
    the last checkpoint with finite weights, and resume picks that one."""
    from sur_lib import checkpoints
    from sur_lib.train import _save_checkpoint, resume_checkpoint

    acc, adapter, cfg = _accelerated(tmp_path, keep=1)
    _save_checkpoint(acc, adapter, 2, cfg)
    with torch.no_grad():
        next(acc.unwrap_model(adapter).parameters()).fill_(float("nan"))
    _save_checkpoint(acc, adapter, 4, cfg)
    _save_checkpoint(acc, adapter, 6, cfg)
    found, _ = checkpoints.scan(tmp_path / "checkpoints")
    assert [s for s, _ in found] == [2, 6]  # 4 pruned, 2 kept although keep_checkpoints=1
    (step, path), notes = resume_checkpoint(tmp_path)
    assert step == 2 and any("step-000006 is damaged (its weights are not finite" in n for n in notes)
    with torch.no_grad():
        for p in acc.unwrap_model(adapter).parameters():
            p.copy_(torch.zeros_like(p))
    _save_checkpoint(acc, adapter, 8, cfg)  # a good one again: now the old ones may go
    assert [s for s, _ in checkpoints.scan(tmp_path / "checkpoints")[0]] == [8]


def test_pruning_keeps_the_last_good_checkpoint_when_the_newest_are_damaged(tmp_path):
    from sur_lib import checkpoints

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

    from sur_lib import pretrain

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


# ============================================================================ dataset builds


def test_toyworld_build_into_an_existing_dataset_is_refused(tmp_path, capsys):
    # before: metadata.jsonl was replaced without asking
    from sur_lib import toyworld

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
    from sur_lib import toyworld

    code, out, err = run_cli(toyworld.main, ["build", str(tmp_path / "ds"), "--n", n], capsys)
    assert code == 2 and "wrote" not in out
    assert err.startswith(f"error: n (the number of examples) must be a positive whole number, got {n}")


def test_evaluate_n_must_be_positive(capsys):
    from sur_lib import evaluate

    code, _, err = run_cli(evaluate.main, ["judge-accuracy", "--n", "0"], capsys)
    assert code == 2 and err.startswith("error: --n must be >= 1, got 0")


def test_pretrain_bad_argument_is_a_usage_error(capsys):
    from sur_lib import pretrain

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
