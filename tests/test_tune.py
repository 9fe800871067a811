"""The tuned recipe: a seeded search on the tuning set, resumable; the choice is made from
tuning-set summaries only and written before any test prompt is drawn."""
import json

import pytest

from sur_lib.study.experiments import images, jobs, recipes
from sur_lib.study.experiments import tune
from tests.helpers import install_cheap_parts, stored_verdicts


def _fake_judge(monkeypatch, tuning_acc, test_acc, ppath, log):
    """Per-prompt records whose accuracy is ``tuning_acc(index)`` on the tuning set and
    ``test_acc(desc)`` on the test/extended sets; checks the choice is on disk before a test
    prompt is drawn."""
    test_ids = {p["id"] for s in ("test", "extended") for p in recipes.prompt_set(s, quick=True)}

    def evaluate(backbone, specs, texts, n, seed, gen, adapter=None, pipe=None, progress=True,
                 desc="", cache=None, quality=False, hits=None):
        log.append(desc)
        is_test = any(s["id"] in test_ids for s in specs)
        if is_test:
            assert "choice" in json.loads(ppath.read_text()), "a test prompt drawn before the choice"
            acc = test_acc(desc)
        else:
            acc = tuning_acc(int(desc.split("/")[1]))
        k = int(acc * n)
        return [{**{key: s.get(key) for key in images.SPEC_KEYS}, "text": t, "acc": k / n, "k": k,
                 "n": n, "correct": [1] * k + [0] * (n - k)} for s, t in zip(specs, texts)]

    monkeypatch.setattr(images, "evaluate_condition", evaluate)


def _tc(tmp_path, **kw):
    return tune.TuneConfig(**{**dict(configs=3, images=2, extended_images=2, quick=True,
                                     out=str(tmp_path / "out"), progress=False, cache=False), **kw})


def test_search_space_is_seeded_and_starts_with_the_papers_settings():
    a, b = tune.search_space(24), tune.search_space(24)
    assert a == b and len(a) == 24 and a[0] == dict(tune.PAPER, index=0)
    assert len({json.dumps({k: v for k, v in c.items() if k != "index"}, sort_keys=True) for c in a}) == 24
    assert all(c[k] in tune.SPACE[k] for c in a[1:] for k in tune.SPACE)
    assert tune.search_space(24, seed=1)[1:] != a[1:]
    est = tune.budget_estimate(a, 30, 8)
    assert est["configurations"] == 24 and est["cpu_hours"] > 0


def _tried(accs, steps=(500, 500, 500), rows=(3000, 3000, 3000)):
    return {str(i): {"knobs": {"index": i, "steps": steps[i], "rows": rows[i]},
                     "tuning": {"overall": {"acc": a}}} for i, a in enumerate(accs)}


def test_choose_by_tuning_accuracy_then_the_stated_tie_breaks():
    assert tune.choose(_tried([0.2, 0.5, 0.4]))["index"] == 1
    assert tune.choose(_tried([0.5, 0.5, 0.5], steps=(1000, 500, 500)))["index"] == 1
    assert tune.choose(_tried([0.5, 0.5, 0.5], rows=(3000, 6000, 3000)))["index"] == 0
    assert tune.choose(_tried([0.1, 0.5, 0.5], rows=(3000, 6000, 3000)))["index"] == 2
    with pytest.raises(ValueError, match="no configuration"):
        tune.choose({})


def test_tune_end_to_end_choice_ignores_the_test_prompts(standin, monkeypatch, tmp_path):
    install_cheap_parts(monkeypatch, tmp_path)
    seen = []
    real_choose = tune.choose
    monkeypatch.setattr(tune, "choose", lambda tried: seen.append(tried) or real_choose(tried))
    results = {}
    for run, test_acc in (("a", lambda d: 1.0 if d.startswith("tune/paper") else 0.0),
                          ("b", lambda d: 1.0 if d.startswith("tune/tuned") else 0.5)):
        tc = _tc(tmp_path / run)
        ppath = tmp_path / run / "out" / "tune-quick.partial.json"
        log = []
        _fake_judge(monkeypatch, lambda i: 1.0 if i == 2 else 0.5, test_acc, ppath, log)
        stop = iter([False, True])  # stop after the first configuration
        monkeypatch.setattr(jobs.Deadline, "passed", lambda self: next(stop, True))
        doc, complete = tune.run_tune(tc, backbone=standin, convergence_file=tmp_path / "none.json")
        assert not complete and list(doc["tried"]) == ["0"] and log == ["tune/0"]
        monkeypatch.setattr(jobs.Deadline, "passed", lambda self: False)
        doc, complete = tune.run_tune(tc, backbone=standin, convergence_file=tmp_path / "none.json")
        assert complete and log[:3] == ["tune/0", "tune/1", "tune/2"]  # config 0 not redone
        assert doc["choice"]["index"] == 2
        results[run] = doc
    # the choice saw tuning-set summaries only, and the same ones in both runs
    test_ids = {p["id"] for s in ("test", "extended") for p in recipes.prompt_set(s, quick=True)}
    assert len(seen) == 2 and "records" not in json.dumps(seen[0]) and seen[0] == seen[1]
    assert not any(i in json.dumps(seen[0]) for i in test_ids)
    assert results["a"]["choice"] == results["b"]["choice"]
    fa, fb = results["a"]["final"]["test"], results["b"]["final"]["test"]
    assert fa["tuned_vs_paper_settings"]["overall"]["diff"] == -1.0
    assert fb["tuned_vs_paper_settings"]["overall"]["diff"] == 0.5
    assert set(fa) >= {"tuned", "paper_settings", "base_simple", "base_complex", "tuned_gap_closed"}
    assert results["a"]["paper_settings"]["steps"] == results["a"]["choice"]["knobs"]["steps"]
    assert results["a"]["tried"]["1"]["vs_paper_settings"]["overall"]["diff"] == 0.0


def test_tune_and_retest_have_their_own_command_lines(capsys):
    from sur_lib.study.experiments import command

    for name in ("tune", "retest"):
        with pytest.raises(SystemExit) as e:
            command.main([name, "--help"])
        assert e.value.code == 0 and f"python -m sur_lib.study.experiments {name}" in capsys.readouterr().out


def test_two_tune_jobs_share_the_search(standin, monkeypatch, tmp_path):
    """A configuration another job has claimed is left to it, and what that job stores while
    this one works is merged, not overwritten."""
    from sur_lib.infra.fileio import write_json

    install_cheap_parts(monkeypatch, tmp_path)
    tc = _tc(tmp_path)
    ppath = tmp_path / "out" / "tune-quick.partial.json"
    log = []
    _fake_judge(monkeypatch, lambda i: 0.5, lambda d: 0.5, ppath, log)
    monkeypatch.setattr(jobs.Deadline, "passed", lambda self: False)
    real = recipes.evaluate
    knobs1 = tune.search_space(3, quick=True)[1]

    def evaluate(*a, desc="", **k):
        recs = real(*a, desc=desc, **k)
        if desc == "tune/2":  # meanwhile the other job stores configuration 1
            with jobs.locked(ppath):
                disk = json.loads(ppath.read_text())
                disk["tried"]["1"] = dict(disk["tried"]["0"], knobs=knobs1, run="the other job")
                write_json(disk, ppath)
        return recs

    monkeypatch.setattr(recipes, "evaluate", evaluate)
    held = jobs.claim(ppath, "config-1")  # the other job is on configuration 1
    try:
        doc, complete = tune.run_tune(tc, backbone=standin, convergence_file=tmp_path / "none.json")
    finally:
        held.close()
    assert log[:2] == ["tune/0", "tune/2"] and "tune/1" not in log
    assert sorted(doc["tried"]) == ["0", "1", "2"] and doc["tried"]["1"]["run"] == "the other job"
    assert complete and sorted(json.loads(ppath.read_text())["tried"]) == ["0", "1", "2"]


def test_verify_tune_replays_the_chosen_recipe_and_fails_on_a_changed_log(standin, monkeypatch, tmp_path):
    """The tuned recipe is exported (loss log, run.json, fp16 adapter) beside the results;
    verify recomputes the choice, replays 2 training steps and re-draws images of it."""
    from sur_lib.study.experiments import checks as shared, common

    install_cheap_parts(monkeypatch, tmp_path)
    tc = _tc(tmp_path, configs=2)
    ppath = tmp_path / "out" / "tune-quick.partial.json"
    _fake_judge(monkeypatch, lambda i: 0.5 + 0.5 * i, lambda d: 0.5, ppath, [])
    monkeypatch.setattr(shared, "judge_images", stored_verdicts)  # the fake judge draws no images
    monkeypatch.setattr(jobs.Deadline, "passed", lambda self: False)
    doc, complete = tune.run_tune(tc, backbone=standin, convergence_file=tmp_path / "none.json")
    assert complete and doc["choice"]["index"] == 1
    folder = tmp_path / "runs" / "tune-quick" / "tuned"
    assert doc["tuned_run"]["folder"] == str(folder)
    assert {p.name for p in folder.iterdir()} == {"log.csv", "run.json", "adapter-fp16"}
    digest = common.model_info(standin)["unet_digest"]
    checks = tune.verify_tune(doc, standin, digest, 6, False)
    assert all(c["ok"] for c in checks), checks
    assert sum("training: loss" in c["check"] for c in checks) == 2
    assert sum("compared_images" in c for c in checks) == 2  # re-drawn images: tuning and test records
    log = (folder / "log.csv").read_text().splitlines()
    head = log[0].split(",")
    row = log[1].split(",")
    row[head.index("loss")] = str(float(row[head.index("loss")]) * 1.1)
    (folder / "log.csv").write_text("\n".join([log[0], ",".join(row)] + log[2:]) + "\n")
    assert not tune.verify_tune(doc, standin, digest, 6, False)[2]["ok"]  # the first replayed step
    doc["choice"]["index"] = 0
    assert not tune.verify_tune(doc, standin, digest, 6, False)[0]["ok"]


def test_redo_judges_a_configuration_again_and_keeps_the_old_records(standin, monkeypatch, tmp_path):
    """--redo N, once: N is trained and judged again, its old record, the old choice and the old
    chosen recipe's final units are kept under 'superseded', the choice is made again; the same
    command run again resumes instead of redoing."""
    install_cheap_parts(monkeypatch, tmp_path)
    ppath = tmp_path / "out" / "tune-quick.partial.json"
    log = []
    acc = {0: 0.0, 1: 0.5, 2: 1.0}
    _fake_judge(monkeypatch, lambda i: acc[i], lambda d: 0.5, ppath, log)
    monkeypatch.setattr(jobs.Deadline, "passed", lambda self: False)
    doc, complete = tune.run_tune(_tc(tmp_path), backbone=standin, convergence_file=tmp_path / "none.json")
    assert complete and doc["choice"]["index"] == 2 and "superseded" not in doc
    log.clear()
    acc[2] = 0.0  # judged again, configuration 2 now does worse than 1
    doc, complete = tune.run_tune(_tc(tmp_path, redo=(2,)), backbone=standin,
                                  convergence_file=tmp_path / "none.json")
    assert complete and doc["choice"]["index"] == 1 and doc["redone"] == ["2"]
    assert [d for d in log if d.startswith("tune/") and d.count("/") == 1] == ["tune/2"]  # 0, 1 kept
    sup = doc["superseded"]
    assert sup["2"]["tuning"]["overall"]["acc"] == 1.0 and sup["choice"]["index"] == 2
    assert {"final/tuned/test", "final/tuned/extended"} <= set(sup)
    assert doc["tried"]["2"]["tuning"]["overall"]["acc"] == 0.0
    log.clear()
    doc2, complete = tune.run_tune(_tc(tmp_path, redo=(2,)), backbone=standin,
                                   convergence_file=tmp_path / "none.json")
    assert complete and not any(d.startswith("tune/2") for d in log)  # not redone twice
    assert doc2["choice"] == doc["choice"] and doc2["superseded"] == doc["superseded"]
    fresh = {"tried": {"0": {}}}
    assert tune.redo(fresh, [2], 3) == [] and fresh == {"tried": {"0": {}}, "redone": []}  # not judged yet
    with pytest.raises(ValueError, match=r"no configuration \[7\]"):
        tune.run_tune(_tc(tmp_path, redo=(7,)), backbone=standin, convergence_file=tmp_path / "none.json")
