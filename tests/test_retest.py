"""The re-test around a recipe: variants, strong lambdas from the gradient shares, Holm across
the variants, the gap closed, resumption."""
import json
import zlib

import pytest

from sur_lib.study.statistics import holm
from sur_lib.study.experiments import images, jobs, retest
from sur_lib.study.gradient_share import lambda_to_match
from tests.helpers import install_cheap_parts, stored_verdicts


def _fake_judge(monkeypatch, log):
    def evaluate(backbone, specs, texts, n, seed, gen, adapter=None, pipe=None, progress=True,
                 desc="", cache=None, quality=False, hits=None):
        log.append(desc)
        out = []
        for s, t in zip(specs, texts):
            k = zlib.crc32(f"{desc}/{s['id']}".encode()) % (n + 1)
            out.append({**{key: s.get(key) for key in images.SPEC_KEYS}, "text": t, "acc": k / n,
                        "k": k, "n": n, "correct": [1] * k + [0] * (n - k)})
        return out

    monkeypatch.setattr(images, "evaluate_condition", evaluate)


def _rc(tmp_path, **kw):
    return retest.RetestConfig(**{**dict(steps=2, images=2, extended_images=2, measure_batches=1,
                                         quick=True, out=str(tmp_path / "out"), progress=False,
                                         cache=False), **kw})


def test_config_and_tuned_recipe_checks(tmp_path):
    with pytest.raises(ValueError, match="recipe"):
        retest.RetestConfig(recipe="best")
    with pytest.raises(FileNotFoundError, match="tune"):
        retest.recipe_knobs(_rc(tmp_path, recipe="tuned", tune_file=str(tmp_path / "no.json")))
    doc = {"complete": True, "choice": {"knobs": {"index": 3, "steps": 1000, "learning_rate": 3e-4,
                                                  "eta": 0.3, "lambda_llm": 0.1, "lambda_cp": 0.0,
                                                  "temperature": 2.0, "rows": 6000}}}
    (tmp_path / "tune.json").write_text(json.dumps(doc))
    knobs = retest.recipe_knobs(_rc(tmp_path, recipe="tuned", tune_file=str(tmp_path / "tune.json"), steps=7))
    assert knobs["steps"] == 7 and knobs["eta"] == 0.3 and "index" not in knobs
    assert retest.recipe_knobs(_rc(tmp_path))["lambda_llm"] == 1e-5  # paper: tiny.yaml's
    # before tune.json: the partial file's choice (written once every configuration is judged)
    part = tmp_path / "p" / "tune.partial.json"
    part.parent.mkdir()
    part.write_text(json.dumps({"tried": {}}))
    with pytest.raises(ValueError, match="no choice yet"):
        retest.recipe_knobs(_rc(tmp_path, recipe="tuned", tune_file=str(part.parent / "tune.json")))
    part.write_text(json.dumps({"tried": {}, "choice": doc["choice"]}))
    knobs = retest.recipe_knobs(_rc(tmp_path, recipe="tuned", tune_file=str(part.parent / "tune.json"), steps=9))
    assert knobs["steps"] == 9 and knobs["lambda_llm"] == 0.1


def test_strong_lambda_rule():
    shares = {"raw_norm": {"l_simple": 2.0, "l_llm": 0.5, "l_cp": 0.0}}
    assert retest.strong_lambda(shares, "l_llm", 1e-5)[0] == 4.0
    assert retest.strong_lambda(shares, "l_llm", 10.0)[0] == 10.0  # never below the recipe's
    assert retest.strong_lambda(shares, "l_cp", 1e-5)[0] == pytest.approx(1e-2)  # no gradient: 1000x
    shares["raw_norm"]["l_llm"] = 3.0
    assert retest.strong_lambda(shares, "l_llm", 0.0)[0] == 0.67  # two significant digits


def test_retest_end_to_end(standin, monkeypatch, tmp_path):
    install_cheap_parts(monkeypatch, tmp_path)
    monkeypatch.setattr(retest.tune, "QUICK_PAPER", dict(retest.tune.QUICK_PAPER, rows=16))
    log = []
    _fake_judge(monkeypatch, log)
    rc = _rc(tmp_path)
    stop = iter([False, False, False, True])  # the lambdas unit (1 check), two variants (2), stop
    monkeypatch.setattr(jobs.Deadline, "passed", lambda self: next(stop, True))
    doc, complete = retest.run_retest(rc, backbone=standin, convergence_file=tmp_path / "none.json")
    assert not complete and list(doc["variants"]) == ["recipe", "no_llm"]
    monkeypatch.setattr(jobs.Deadline, "passed", lambda self: False)
    n_before = len(log)
    doc, complete = retest.run_retest(rc, backbone=standin, convergence_file=tmp_path / "none.json")
    assert complete and list(doc["variants"]) == list(retest.VARIANTS)
    assert not any(d.startswith(("retest/recipe/", "retest/no_llm/")) for d in log[n_before:])
    v = doc["variants"]
    lam = doc["lambdas"]
    # the strong lambdas come from the recipe's measured gradient shares
    shares = lam["recipe_shares"]
    assert lam["strong_llm"] == retest._round_sig(lambda_to_match(shares, "l_llm"))
    assert lam["strong_cp"] == retest._round_sig(lambda_to_match(shares, "l_cp"))
    pred = lam["predicted_strong_shares"]["strong_cp"]["share"]
    assert pred["l_cp"] == pytest.approx(pred["l_simple"], rel=0.05)
    assert v["strong_llm"]["config"]["lambda_llm"] == lam["strong_llm"]
    assert v["no_llm"]["shares"]["share"]["l_llm"] == 0.0 and v["no_llm"]["config"]["lambda_llm"] == 0
    assert v["strong_cp"]["shares"]["share"]["l_cp"] > v["recipe"]["shares"]["share"]["l_cp"]
    assert v["path_official"]["config"]["gradient_path"] == "official"
    assert v["path_official"]["shares"]["norm"]["l_simple"] == 0.0
    assert v["teacher_gemma"]["config"]["llm"] == "gemma3-270m"
    assert v["teacher_no_sink"]["config"]["llm_drop_first"] is True
    assert v["teacher_oracle"]["knowledge"] == "oracle"
    assert v["teacher_oracle"]["run"] != v["strong_llm"]["run"]
    assert all(v[t]["config"]["lambda_llm"] == lam["strong_llm"] for t in retest.TEACHERS)
    # Holm across the 8 variants vs the recipe, per type and overall
    for set_name in ("test", "extended"):
        rows = doc["table"][set_name]["variants"]
        family = [x for x in retest.VARIANTS if x != "recipe"]
        for t in ("overall", "counting"):
            paired = {x: rows[x]["vs_recipe"][t]["paired"] for x in family}
            if t == "counting":
                assert all(p is None for p in paired.values())  # 1 prompt per type: no test
                continue
            adj = holm({x: p["p_t"] for x, p in paired.items()})
            assert {x: p["p_t_holm"] for x, p in paired.items()} == pytest.approx(adj)
            assert all(p["p_t_holm"] >= p["p_t"] for p in paired.values())
        assert "p_t_holm" in rows["teacher_oracle"]["vs_strong_llm"]["overall"]["paired"]
        assert "overall" in rows["strong_llm"]["gap_closed"]
    assert doc["base"]["base_simple/test"]["source"] == "drawn"
    assert len(doc["variants"]["recipe"]["records"]["extended"]) == 3
    # exported for verify: every variant's loss log and run.json, the recipe's adapter too
    runs_dir = tmp_path / "runs" / "retest-quick"
    assert {p.name for p in (runs_dir / "recipe").iterdir()} == {"log.csv", "run.json", "adapter-fp16"}
    assert {p.name for p in (runs_dir / "no_llm").iterdir()} == {"log.csv", "run.json"}
    from sur_lib.study.experiments import checks as shared, common

    monkeypatch.setattr(shared, "judge_images", stored_verdicts)  # the fake judge draws no images
    digest = common.model_info(standin)["unet_digest"]
    checks = retest.verify_retest(doc, standin, digest, 6, False)
    assert all(c["ok"] for c in checks), checks
    assert [c["check"].split(":")[0] for c in checks[:4]] == ["recipe"] * 2 + ["teacher_oracle"] * 2
    oracle_log = runs_dir / "teacher_oracle" / "log.csv"
    lines = oracle_log.read_text().splitlines()
    head, row = lines[0].split(","), lines[1].split(",")
    row[head.index("loss")] = str(float(row[head.index("loss")]) + 1.0)
    oracle_log.write_text("\n".join([lines[0], ",".join(row)] + lines[2:]) + "\n")
    assert [c["ok"] for c in retest.verify_retest(doc, standin, digest, 6, False)[:4]] == [True, True, False, True]


def test_variant_overrides():
    base = {"learning_rate": 1e-4, "eta": 0.1, "lambda_llm": 1e-5, "lambda_cp": 1e-5, "temperature": 1.0}
    v = retest.variant_overrides(base, 0.5, 0.25)
    assert list(v) == list(retest.VARIANTS) and v["recipe"] == (base, "llm")
    assert v["strong_cp"][0]["lambda_cp"] == 0.25 and v["strong_cp"][0]["lambda_llm"] == 1e-5
    assert v["path_official"][0] == dict(base, gradient_path="official")
    assert all(v[t][0]["lambda_llm"] == 0.5 for t in retest.TEACHERS)
    assert v["teacher_oracle"][1] == "oracle" and v["teacher_gemma"][0]["llm"] == "gemma3-270m"
    # a recipe without KL terms: the official path (which detaches L_simple) gets the strong L_LLM
    none = retest.variant_overrides(dict(base, lambda_llm=0.0, lambda_cp=0.0), 0.5, 0.25)
    assert none["path_official"][0]["lambda_llm"] == 0.5


def test_better_recipe_is_read_on_the_tuning_set():
    """Tuned only when its tuning-set accuracy beats the paper's settings at the plateau with a
    paired interval above 0; a tie goes to the paper's settings."""
    def recs(accs):
        return [{"id": f"p{i}", "type": ("counting", "color", "action")[i % 3], "acc": a}
                for i, a in enumerate(accs)]

    paper = [0.5, 0.6, 0.4, 0.5, 0.7, 0.3]
    conv = {"plateau": {"step": 2000}, "records": {"step-2000/tuning": recs(paper)}}
    better = {"choice": {"index": 4}, "tried": {"4": {"records": recs([a + 0.2 + 0.01 * i for i, a in enumerate(paper)])}}}
    same = {"choice": {"index": 4}, "tried": {"4": {"records": recs([a + (0.1 if i % 2 else -0.1) for i, a in enumerate(paper)])}}}
    out = retest.better_recipe(better, conv)
    assert out["recipe"] == "tuned" and out["paper_step"] == 2000 and out["t_ci"][0] > 0
    assert abs(out["tuned_minus_paper"] - (0.2 + 0.025)) < 1e-9 and out["n_prompts"] == 6
    assert retest.better_recipe(same, conv)["recipe"] == "paper"
    with pytest.raises(ValueError, match="no choice"):
        retest.better_recipe({"tried": {}}, conv)


def test_preliminary_reads_finished_variants_only():
    def recs(accs):
        return [{"id": f"p{i}", "type": "color", "acc": a, "k": int(4 * a), "n": 4,
                 "correct": [1] * int(4 * a) + [0] * (4 - int(4 * a))} for i, a in enumerate(accs)]

    partial = {"variants": {"no_llm": {"records": {s: recs([0.5, 0.25, 0.75]) for s in retest.SETS}}}}
    with pytest.raises(ValueError, match="recipe"):
        retest.preliminary(partial)
    partial["variants"]["recipe"] = {"records": {s: recs([0.25, 0.25, 0.5]) for s in retest.SETS}}
    out = retest.preliminary(partial)
    assert out["finished"] == ["recipe", "no_llm"] and len(out["missing"]) == len(retest.VARIANTS) - 2
    row = out["sets"]["test"]["no_llm"]
    assert row["vs_recipe"]["overall"]["diff"] == pytest.approx((0.25 + 0 + 0.25) / 3)  # hand-computed
    assert "p_t_holm" not in row["vs_recipe"]["overall"]["paired"]  # no correction on a part
    assert "vs_recipe" not in out["sets"]["extended"]["recipe"]


def test_a_variant_with_a_finished_variants_run_takes_its_numbers():
    """The twin rule that retest and ablations share (``runs.twin``): same run folder, same
    numbers, marked with the first of the twins."""
    from sur_lib.study.experiments import runs

    done = {"recipe": {"run": "r1", "records": [1], "overrides": {"a": 1}}}
    same = runs.twin(done, "r1", overrides={"a": 2})
    assert same == {"run": "r1", "records": [1], "overrides": {"a": 2}, "same_as": "recipe"}
    done["strong_llm"] = same
    assert runs.twin({"strong_llm": same}, "r1")["same_as"] == "recipe"  # not a chain of twins
    assert runs.twin(done, "r2") is None
