"""One recipe: hashed run folder, resume to the same adapter, stored adapter reused, prompt
sets shared with convergence, truncated records, base records reused from convergence, a
recipe that is the dose-response run at a stored step copied from it (same weights)."""
import json
import shutil
from pathlib import Path

import pytest

from sur_lib.study import experiments as ex
from sur_lib.study.experiments import common, recipes
from sur_lib.study.experiments import convergence as conv


def _cfg(standin, tmp_path, over=None, source="llm", steps=4):
    return recipes.recipe_config(over or {}, 16, steps, tmp_path / "runs",
                                 ex.state_digest(standin.unet), 0, source, batch_size=4,
                                 checkpoint_every=2, progress=False)


def test_an_interrupted_recipe_resumes_to_the_same_adapter(standin, cheap, tmp_path):
    cfg = _cfg(standin, tmp_path)
    first = recipes.train_recipe(cfg, standin, keep_checkpoints=True, progress=False)
    assert first.trained and (first.folder / "sur_adapter.json").is_file()
    # as if killed after the step-2 checkpoint, before step 4 and the fp16 adapter
    shutil.rmtree(first.folder)
    shutil.rmtree(tmp_path / "runs" / first.folder.parent.name / "checkpoints" / "step-000004")
    again = recipes.train_recipe(cfg, standin, progress=False)
    assert again.trained and again.resumed_from == 2 and again.digest == first.digest
    assert not (first.folder.parent / "checkpoints").exists()  # dropped once the adapter is stored
    stored = recipes.train_recipe(cfg, standin, progress=False)  # now loaded, not trained
    assert not stored.trained and stored.digest == first.digest
    assert ex.state_digest(stored.adapter) == first.digest


def test_the_knowledge_source_and_knobs_change_the_run_folder(standin, cheap, tmp_path):
    a = _cfg(standin, tmp_path)
    assert _cfg(standin, tmp_path).output_dir == a.output_dir
    assert _cfg(standin, tmp_path, source="oracle").output_dir != a.output_dir
    assert _cfg(standin, tmp_path, {"temperature": 2.0}).output_dir != a.output_dir
    assert _cfg(standin, tmp_path, steps=6).output_dir != a.output_dir
    with pytest.raises(ValueError, match="knowledge"):
        _cfg(standin, tmp_path, source="gpt")


def test_oracle_recipe_trains_with_the_llm_width_and_norm(standin, cheap, tmp_path):
    from sur_lib.study.oracle import mean_norm

    cfg = _cfg(standin, tmp_path, source="oracle", steps=2)
    rr = recipes.train_recipe(cfg, standin, "oracle", progress=False)
    llm = recipes.knowledge_vectors(cfg, [{"text": p} for p in rr.knowledge], "llm")
    v = next(iter(rr.knowledge.values()))
    assert v.shape == next(iter(llm.values())).shape
    assert mean_norm(rr.knowledge) == pytest.approx(mean_norm(llm), rel=1e-5)
    assert json.loads((rr.folder / "sur_adapter.json").read_text())["knowledge"] == "oracle"


def test_prompt_sets_are_convergences():
    full = conv.prompt_sets(conv.ConvergenceConfig())
    for name in ("tuning", "test", "extended"):
        assert recipes.prompt_set(name) == full[name]
    quick = recipes.prompt_set("test", quick=True)
    assert len(quick) == 3 and {p["type"] for p in quick} == {"counting", "color", "action"}
    with pytest.raises(ValueError, match="prompt set"):
        recipes.prompt_set("validation")


def _rec(i, correct, type_="counting"):
    return {"id": f"p{i}", "type": type_, "correct": correct, "acc": sum(correct) / len(correct),
            "k": sum(correct), "n": len(correct), "hits": {}}


def test_truncate_keeps_the_first_images():
    r = recipes.truncate([_rec(0, [1, 0, 1, 1])], 2)[0]
    assert r["correct"] == [1, 0] and r["k"] == 1 and r["n"] == 2 and r["acc"] == 0.5
    assert "hits" not in r and r["lo"] < 0.5 < r["hi"]
    with pytest.raises(ValueError, match="fewer"):
        recipes.truncate([_rec(0, [1])], 2)


def test_base_records_come_from_convergence_when_they_match(standin, cheap, tmp_path):
    specs = recipes.prompt_set("test", quick=True)
    gen = common.GenSettings()
    digest = ex.state_digest(standin.unet)
    doc = {"seed": 0, "generation": gen.to_dict(), "model": {"unet_digest": digest},
           "records": {"base-simple/test": [dict(_rec(0, [1, 1, 0, 0]), id=s["id"]) for s in specs]}}
    path = tmp_path / "convergence.json"
    path.write_text(json.dumps(doc))
    recs, src = recipes.base_records(standin, specs, "test", "text", 2, 0, gen, digest,
                                     convergence_file=path, progress=False)
    assert src == "convergence.json:base-simple/test" and recs[0]["correct"] == [1, 1]
    assert not cheap  # nothing drawn
    recs, src = recipes.base_records(standin, specs, "test", "text", 8, 0, gen, digest,
                                     convergence_file=path, progress=False)
    assert src == "drawn" and len(cheap) == 1  # too few stored images: drawn
    recs, src = recipes.base_records(standin, specs, "test", "text", 2, 1, gen, digest,
                                     convergence_file=path, progress=False)
    assert src == "drawn"  # another seed


def _losses(folder):
    from sur_lib.infra.run_state import read_log

    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_log(folder)]


def test_a_recipe_at_a_stored_dose_response_step_is_that_runs_adapter(standin, trained, cheap,
                                                                      tmp_path):
    """A run trained to 2 steps has exactly the weights of the dose-response run's step-2
    adapter (which that run trained on its way to 4): the copy is what training would give."""
    straight = recipes.train_recipe(_cfg(standin, tmp_path / "a", steps=2), standin, progress=False)
    assert straight.trained and straight.copied_from is None
    run = Path(trained.run_dir)
    cfg = _cfg(standin, tmp_path / "b", steps=2)
    copied = recipes.train_recipe(cfg, standin, progress=False, reuse=run)
    assert not copied.trained and copied.copied_from == conv.adapter_dir(trained, 2)
    assert copied.digest == straight.digest == ex.state_digest(copied.adapter)
    assert _losses(cfg.output_dir) == _losses(straight.cfg.output_dir)  # the log's first 2 rows
    run_log = (run / "train" / "log.csv").read_bytes().splitlines(keepends=True)
    assert (Path(cfg.output_dir) / "log.csv").read_bytes() == b"".join(run_log[:3])  # header + 2 rows
    meta = json.loads((copied.folder / "sur_adapter.json").read_text())
    assert meta["copied_from"].endswith("adapters/step-00002")
    again = recipes.train_recipe(cfg, standin, progress=False, reuse=run)  # loaded, still a copy
    assert again.copied_from == copied.copied_from and again.digest == copied.digest
    # what is not that run is trained: another step count, another knob, another teacher
    digest = ex.state_digest(standin.unet)
    assert recipes.stored_step(cfg, run, digest) == conv.adapter_dir(trained, 2)
    assert recipes.stored_step(_cfg(standin, tmp_path / "c", steps=3), run, digest) is None
    assert recipes.stored_step(_cfg(standin, tmp_path / "c", {"temperature": 2.0}, steps=2), run, digest) is None
    assert recipes.stored_step(cfg, run, digest, source="oracle") is None
    assert recipes.stored_step(cfg, run, "another-base-model") is None
    assert recipes.stored_step(cfg, None, digest) is None
    # the export names the committed dose-response adapter instead of a second copy
    out = recipes.export_run(copied, tmp_path / "export")
    assert out["dir"] == out["copied_from"] and not (tmp_path / "export" / "adapter-fp16").exists()
    assert (tmp_path / "export" / "log.csv").is_file()


def test_a_copied_recipes_records_come_from_convergence_when_the_digests_agree(standin, trained,
                                                                             cheap, tmp_path):
    cfg = _cfg(standin, tmp_path, steps=2)
    rr = recipes.train_recipe(cfg, standin, progress=False, reuse=trained.run_dir)
    specs = recipes.prompt_set("test", quick=True)
    gen, digest = common.GenSettings(), ex.state_digest(standin.unet)
    doc = {"seed": 0, "generation": gen.to_dict(), "model": {"unet_digest": digest},
           "adapters": {"2": {"digest": rr.digest}},
           "records": {"step-2/test": [dict(_rec(0, [1, 0, 1, 0]), id=s["id"]) for s in specs]}}
    path = tmp_path / "convergence.json"
    path.write_text(json.dumps(doc))
    recs, src = recipes.recipe_records(standin, rr, specs, "test", 2, 0, gen, digest,
                                       progress=False, convergence_file=path)
    assert src == "convergence.json:step-2/test" and recs[0]["correct"] == [1, 0] and not cheap
    doc["adapters"]["2"]["digest"] = "another adapter"
    path.write_text(json.dumps(doc))
    recs, src = recipes.recipe_records(standin, rr, specs, "test", 2, 0, gen, digest,
                                       progress=False, convergence_file=path)
    assert src == "drawn" and len(cheap) == 1
    trained_rr = recipes.train_recipe(_cfg(standin, tmp_path / "t", steps=2), standin, progress=False)
    recs, src = recipes.recipe_records(standin, trained_rr, specs, "test", 2, 0, gen, digest,
                                       progress=False, convergence_file=path)
    assert src == "drawn" and len(cheap) == 2  # a trained recipe is always drawn
