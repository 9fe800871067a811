"""sur_lib.study.experiments: determinism, the JSON schema, verify's tolerance, the rewrite prompts and
the resumable ablations -- all at --quick scale (a few prompts, images and sampler steps).

The base model is a copy of data/models/tiny-sur-world (taken once, so the pretraining job that
re-exports it every 100 steps cannot change it mid-test) or, when it does not exist yet, a random
stand-in of the same architecture in the same layout.
"""
import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

from sur_lib.study import experiments as ex
from sur_lib.study.experiments import ablations, common
from sur_lib.world import toyworld as tw
from tests.helpers import write_standin

COMMON = ["--quick", "--no-progress", "--no-cache"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(folder, backbone): a frozen copy of the shipped base model, or a random stand-in."""
    from sur_lib.models import load_tiny_backbone
    from sur_lib.world.paths import TINY_MODEL_DIR

    for attempt in range(2):
        if not (TINY_MODEL_DIR / "sur_backbone.json").is_file():
            break
        folder = tmp_path_factory.mktemp("tiny-sur-world")
        try:  # the exporter swaps the folder by a rename: a copy may catch it half-way
            shutil.copytree(TINY_MODEL_DIR, folder, dirs_exist_ok=True)
            return folder, load_tiny_backbone(folder)
        except Exception:  # noqa: BLE001
            time.sleep(3)
    folder = tmp_path_factory.mktemp("tiny-standin")
    write_standin(folder)
    return folder, load_tiny_backbone(folder)


def _run(argv, model, **kw):
    folder, backbone = model
    return ex.main(argv + ["--model-dir", str(folder)], backbone=backbone, **kw)


@pytest.fixture(scope="module")
def failure_quick(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    assert _run(["failure", *COMMON, "--images", "4", "--out", str(out)], model) == 0
    return out / "failure-quick.json"


# ------------------------------------------------------------------------------- failure


def test_quick_failure_is_deterministic_and_the_cache_changes_nothing(failure_quick, model, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setattr(common, "WORK_DIR", tmp_path / "work")
    argv = ["failure", "--quick", "--no-progress", "--images", "4", "--out", str(tmp_path)]
    a = json.loads(failure_quick.read_text())
    for _ in range(2):  # a fresh run that fills the record cache, then one that reads it
        assert _run(argv, model) == 0
        b = json.loads((tmp_path / "failure-quick.json").read_text())
        assert ex.strip_volatile(a) == ex.strip_volatile(b)
    assert len(list((tmp_path / "work" / "cache").rglob("*.json"))) == 6  # 3 prompts x 2
    assert "wall_time_s" in a and "versions" in a  # only those may differ


def test_failure_json_schema(failure_quick):
    doc = json.loads(failure_quick.read_text())
    for key in ("experiment", "command", "seed", "quick", "versions", "wall_time_s", "model",
                "judge", "generation", "images_per_prompt", "conditions", "summary", "claim"):
        assert key in doc, key
    assert doc["experiment"] == "failure" and doc["quick"] is True and doc["seed"] == 0
    assert doc["command"].startswith("python -m sur_lib.study.experiments failure")
    assert doc["generation"] == {"steps": ex.QUICK["sampler_steps"], "guidance": ex.GUIDANCE,
                                 "scheduler": "ddim", "timestep_spacing": "trailing"}
    assert len(doc["model"]["unet_digest"]) == 64
    assert doc["judge"]["clean"]["count"]["acc"] >= 0.97  # the judge's accuracy rides along
    n = doc["images_per_prompt"]
    assert set(doc["conditions"]) == {"simple", "complex"}
    specs = {p["id"]: p for p in tw.test_prompts()}
    for cond, block in doc["conditions"].items():
        recs = block["records"]
        assert [r["type"] for r in recs] == list(tw.TEST_TYPES)  # one prompt per type
        for r in recs:
            assert r["text"] == specs[r["id"]]["text" if cond == "simple" else "prompt"]
            assert len(r["correct"]) == r["n"] == n and r["k"] == sum(r["correct"])
            assert r["acc"] == r["k"] / n and 0 <= r["lo"] <= r["acc"] <= r["hi"] <= 1
    for cond in ("simple", "complex"):
        assert set(doc["summary"][cond]) == {*tw.TEST_TYPES, "overall"}
        assert doc["summary"][cond]["overall"]["n"] == 3 * n
    gap = doc["summary"]["complex_minus_simple"]["overall"]
    assert gap["paired"]["n"] == 3
    assert doc["claim"]["gap"] == pytest.approx(doc["claim"]["complex"] - doc["claim"]["simple"])


def test_draw_and_judge_gives_the_stored_records_images(failure_quick, model):
    """The chapters' live grids call draw_and_judge; its verdicts are the experiment's own."""
    folder, backbone = model
    doc = json.loads(failure_quick.read_text())
    gen = ex.GenSettings(**doc["generation"])
    rec = doc["conditions"]["simple"]["records"][0]
    images, scores = ex.draw_and_judge(backbone, rec, rec["text"], 2, doc["seed"], gen)
    assert images.shape[0] == 2 and images.dtype.name == "uint8"
    assert [int(s["correct"]) for s in scores] == rec["correct"][:2]  # the first 2 of its images
    assert all(set(s["judgement"]) >= {"count", "color", "shape", "arrangement"} for s in scores)


# ------------------------------------------------------------------------------- verify


def _verify(out, model, capsys):
    rc = _run(["verify", "--out", str(out), "--only", "failure", "--no-progress"], model)
    return rc, capsys.readouterr()


def test_verify_passes_on_an_agreeing_result(failure_quick, model, tmp_path, capsys):
    shutil.copy(failure_quick, tmp_path / "failure.json")
    rc, out = _verify(tmp_path, model, capsys)
    assert rc == 0, out.out + out.err
    assert "OK   failure" in out.out and "image-for-image agreement 12/12" in out.out


def test_verify_fails_on_a_disagreeing_result(failure_quick, model, tmp_path, capsys):
    doc = json.loads(failure_quick.read_text())
    for block in doc["conditions"].values():  # claim the opposite of what the model does
        acc = sum(r["k"] for r in block["records"]) / sum(r["n"] for r in block["records"])
        for r in block["records"]:
            r["correct"] = [int(acc <= 0.5)] * 48
            r["k"], r["n"] = sum(r["correct"]), 48
            r["acc"] = r["k"] / 48
    ex.write_json(doc, tmp_path / "failure.json")
    rc, out = _verify(tmp_path, model, capsys)
    assert rc == 1 and "FAIL failure" in out.out and "verify FAILED" in out.err


def test_verify_fails_when_the_base_model_changed(failure_quick, model, tmp_path, capsys):
    doc = json.loads(failure_quick.read_text())
    doc["model"]["unet_digest"] = "0" * 64
    ex.write_json(doc, tmp_path / "failure.json")
    rc, out = _verify(tmp_path, model, capsys)
    assert rc == 1 and "re-run the experiment" in out.out


def test_verify_draws_a_shared_condition_once_per_run(failure_quick, model, tmp_path, capsys,
                                                      monkeypatch):
    """Two results holding the same draws (here: the same file as `failure` and as `sur`):
    each chosen image of each condition is generated once, both results are compared with it,
    and a later run draws it live again."""
    from sur_lib.study.experiments import checks as shared

    shutil.copy(failure_quick, tmp_path / "failure.json")
    drawn = []
    real = shared.judge_images
    monkeypatch.setattr(shared, "judge_images", lambda bb, picks, *a, **k: drawn.append(len(picks)) or real(bb, picks, *a, **k))
    alone = ["verify", "--out", str(tmp_path), "--only", "failure", "--no-progress"]
    assert _run(alone, model) == 0
    n_draws = sum(drawn)  # what verifying `failure` alone draws
    assert n_draws > 0
    capsys.readouterr()
    shutil.copy(failure_quick, tmp_path / "sur.json")
    drawn.clear()
    argv = ["verify", "--out", str(tmp_path), "--only", "failure,sur", "--no-progress"]
    assert _run(argv, model) == 0
    out = capsys.readouterr().out
    assert sum(drawn) == n_draws  # not 2 x n_draws
    assert "OK   failure" in out and "OK   sur" in out
    conds = json.loads(failure_quick.read_text())["conditions"]
    assert out.count("drawn once in this run") == len(conds)
    assert _run(argv, model) == 0 and sum(drawn) == 2 * n_draws  # nothing kept between runs


def test_verify_parts_keep_shared_draws_together_and_cover_every_result():
    from sur_lib.study.experiments.verify import PARTS, parts_of

    names = list(ex.EXPERIMENTS)
    groups = parts_of(names, 2)
    assert len(groups) == 2 and sorted(sum(groups, [])) == sorted(names)  # each once
    assert {"failure", "sur", "rewrite", "convergence"} <= set(groups[0])  # the shared base draws
    assert set(sum(PARTS, ())) == set(names)  # a new result must be placed in a part
    assert parts_of(names, 1) == [names] and parts_of(names, 8) == groups
    assert parts_of(["tune", "new"], 2) == [["tune", "new"]]  # unplaced names join the last part
    assert parts_of(["sur", "tune"], 2) == [["sur"], ["tune"]]
    assert parts_of([], 2) == []


def test_verify_names_an_unknown_result(tmp_path):
    with pytest.raises(ValueError, match="unknown result.*'nope'"):
        ex.main(["verify", "--out", str(tmp_path), "--only", "failure,nope"])


def test_verify_skips_missing_results(tmp_path, capsys):
    assert ex.main(["verify", "--out", str(tmp_path), "--no-progress"]) == 0  # loads no model
    out = capsys.readouterr().out
    for name in ex.EXPERIMENTS:
        assert f"SKIP {name}" in out


@pytest.mark.slow
def test_verify_the_committed_results(capsys):
    """`python -m sur_lib.study.experiments verify` on data/results (skips what is not there yet)."""
    assert ex.main(["verify", "--no-progress"]) == 0, capsys.readouterr()


# ------------------------------------------------------------------------------- rewrite


def _word_re(words):
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.I)


def test_rewrite_few_shot_uses_only_train_nouns_and_phrasings():
    msgs = ex.rewrite_messages("two cherries on a table")
    assert msgs[0]["role"] == "system" and msgs[-1] == {"role": "user", "content": "two cherries on a table"}
    turns = msgs[1:-1]
    assert [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2) and turns
    heldout = [w for n in tw.HELDOUT_NOUNS for w in (n, tw.NOUNS[n].plural)]
    context = " ".join(m["content"] for m in msgs[:-1])
    assert not _word_re(heldout).search(context)
    heldout_tpl = [tw.template_regex(t) for ts in tw.TEMPLATES["heldout"].values() for t in ts]
    train_tpl = [tw.template_regex(t) for ts in tw.TEMPLATES["train"].values() for t in ts]
    test_texts = {p["text"] for p in tw.test_prompts()}
    for simple, complex_ in ex.few_shot_examples():
        assert any(r.match(simple) for r in train_tpl) and not any(r.match(simple) for r in heldout_tpl)
        assert simple not in test_texts
        assert "masterpiece" in complex_ and complex_[0].isdigit()
    assert all(tw.NOUNS[n].split == "train" for n, *_ in ex.FEW_SHOT)


def test_train_distribution_prompts_avoid_the_test_set():
    specs = ex.train_distribution_prompts(4, seed=1)
    assert [s["type"] for s in specs] == [t for t in tw.TEST_TYPES for _ in range(4)]
    assert all(s["noun"] in tw.TRAIN_NOUNS for s in specs)
    assert not {s["text"] for s in specs} & {p["text"] for p in tw.test_prompts()}
    assert all((s["arrangement"] is not None) == (s["type"] == "action") for s in specs)
    assert specs == ex.train_distribution_prompts(4, seed=1)


# ------------------------------------------------------------------------------- ablations


def _fake_trained(cfg):
    from sur_lib.adapter import SURAdapter
    from sur_lib.study.experiments.runs import Trained

    torch.manual_seed(0)
    adapter = SURAdapter(text_dim=384, num_layers=1, num_heads=2, ffn_dim=16)
    log = [{"step": s, "loss": 1.0 / s, "l_simple": 1.0, "l_llm": 0.0, "l_cp": 0.0,
            "grad_norm": 0.1} for s in range(1, cfg.max_steps + 1)]
    return Trained(adapter, log, None)


def _fake_eval(backbone, adapter, specs, n_img, seed, gen, pipe, progress, cache=None):
    return [{**{k: s.get(k) for k in ex.SPEC_KEYS}, "text": s["text"], "acc": 0.5, "lo": 0.1,
             "hi": 0.9, "k": 1, "n": 2, "correct": [1, 0]} for s in specs]


def test_ablations_resume_per_variant(model, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "WORK_DIR", tmp_path / "work")
    calls, crash_on = [], {"n": 2}

    def fake_train(cfg, backbone, progress=True, **kw):
        calls.append((cfg.lambda_llm, cfg.lambda_cp))
        if len(calls) == crash_on["n"]:
            raise RuntimeError("killed")
        return _fake_trained(cfg)

    monkeypatch.setattr(ablations, "train_adapter", fake_train)
    monkeypatch.setattr(ablations, "_evaluate_variant", _fake_eval)
    argv = ["ablations", *COMMON, "--out", str(tmp_path), "--only", "no_llm,no_cp,eta_0.1"]
    with pytest.raises(RuntimeError, match="killed"):
        _run(argv, model)
    partial = json.loads((tmp_path / "ablations-quick.partial.json").read_text())
    assert partial["complete"] is False and list(partial["variants"]) == ["reference"]
    assert not (tmp_path / "ablations-quick.json").exists()

    crash_on["n"] = -1
    n_before = len(calls)
    assert _run(argv, model) == 0
    assert calls[n_before:] == [(0.0, 1e-5), (1e-5, 0.0)]  # reference not retrained
    doc = json.loads((tmp_path / "ablations-quick.json").read_text())
    assert doc["complete"] is True and not (tmp_path / "ablations-quick.partial.json").exists()
    assert list(doc["variants"]) == ["reference", "no_llm", "no_cp", "eta_0.1"]
    assert doc["variants"]["eta_0.1"]["same_as"] == "reference"  # tiny.yaml's eta is 0.1
    assert doc["variants"]["no_llm"]["vs_reference"]["overall"]["diff"] == 0.0
    assert [r["step"] for r in doc["variants"]["no_cp"]["log"]] == [1, 2, 3]
    assert doc["verify"]["variant"] == "no_llm"
    # a partial file made with other settings is not resumed; --fresh drops a matching one
    ppath = tmp_path / "ablations-quick.partial.json"
    for other, extra in ((dict(partial, settings=dict(partial["settings"], seed=99)), []),
                         (partial, ["--fresh"])):
        ppath.write_text(json.dumps(other))
        n_before = len(calls)
        assert _run(argv + extra, model) == 0
        assert calls[n_before:] == [(1e-5, 1e-5), (0.0, 1e-5), (1e-5, 0.0)]  # reference trained again
        assert not ppath.exists()


def test_ablations_take_over_a_variant_another_job_left(model, tmp_path, monkeypatch):
    """The ablations run their variants through retest's loop (``runs.variant_unit``,
    ``jobs.run_units``): a variant whose run folder another job holds is left to it, and once
    that job is gone without storing it (killed), this job trains it; a twin (eta 0.1 is
    tiny.yaml's) takes the reference's numbers through the same helper."""
    from sur_lib.study.experiments import jobs

    monkeypatch.setattr(common, "WORK_DIR", tmp_path / "work")
    folder, backbone = model
    budget = ablations._ablation_budget(ablations.AblationsConfig(quick=True))
    digest = common.model_info(backbone, str(folder))["unet_digest"]
    data = tmp_path / f"surd-mini-n{budget['rows']}-s0"
    no_llm = Path(ex.train_config({**budget["overrides"], "lambda_llm": 0.0}, data, 0, tmp_path,
                                  digest, False).output_dir).name
    other_job = jobs.claim(tmp_path / "ablations-quick.partial.json", f"run-{no_llm}")
    assert other_job is not None
    calls = []

    def fake_train(cfg, backbone, progress=True, **kw):
        calls.append((cfg.lambda_llm, cfg.lambda_cp))
        if cfg.lambda_cp == 0.0:  # while no_cp trains, the job that held no_llm dies
            other_job.close()
        return _fake_trained(cfg)

    monkeypatch.setattr(ablations, "train_adapter", fake_train)
    monkeypatch.setattr(ablations, "_evaluate_variant", _fake_eval)
    argv = ["ablations", *COMMON, "--out", str(tmp_path), "--only", "no_llm,no_cp,eta_0.1"]
    assert _run(argv, model) == 0
    assert calls == [(1e-5, 1e-5), (1e-5, 0.0), (0.0, 1e-5)]  # no_llm last: it was held
    doc = json.loads((tmp_path / "ablations-quick.json").read_text())
    assert list(doc["variants"]) == ["reference", "no_llm", "no_cp", "eta_0.1"]
    assert doc["variants"]["no_llm"]["run"] == no_llm
    assert doc["variants"]["eta_0.1"]["same_as"] == "reference"
    assert doc["variants"]["eta_0.1"]["run"] == doc["variants"]["reference"]["run"]
    assert not (tmp_path / "ablations-quick.partial.json").exists()


def test_run_folders_keep_their_names_when_options_are_added(tmp_path):
    """A run folder is named by a hash of its config; an option added later (LATER_KEYS) enters
    the hash only when set, so the stored ablation runs keep their names (and twins)."""
    stored = ex.RESULTS_DIR / "ablations.json"
    if not stored.is_file():
        stored = ex.RESULTS_DIR / "ablations.partial.json"
    doc = json.loads(stored.read_text())
    data = tmp_path / f"surd-mini-n{doc['surd_mini']['rows']}-s{doc['seed']}"

    def run_name(overrides):
        over = {**doc["settings"]["budget"]["overrides"], **overrides}
        cfg = ex.train_config(over, data, doc["seed"], tmp_path, doc["model"]["unet_digest"], False)
        return Path(cfg.output_dir).name

    for name in ("reference", "no_llm", "eta_0.5"):
        var = doc["variants"][name]
        assert run_name(var["overrides"]) == var["run"], name
    assert run_name({"llm_drop_first": False}) == doc["variants"]["reference"]["run"]
    assert run_name({"llm_drop_first": True}) != doc["variants"]["reference"]["run"]


def test_ablations_only_refuses_to_overwrite_the_committed_result(capsys):
    assert ex.main(["ablations", "--only", "no_llm", "--no-progress"]) == 2  # before any work
    assert "--out" in capsys.readouterr().err
