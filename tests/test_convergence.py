"""The dose-response experiment: resumable training to log-spaced steps, resumable evaluation."""
import json

import pytest
import torch

from sur_lib.study import experiments as ex
from sur_lib.study.experiments import images, jobs
from sur_lib.study.experiments import convergence as conv
from sur_lib.adapter import SURAdapter
from tests.helpers import convergence_cfg as _cfg, stored_verdicts


def test_config_checks_the_eval_steps():
    with pytest.raises(ValueError, match="end at steps"):
        conv.ConvergenceConfig(steps=10, eval_steps=(0, 5))
    with pytest.raises(ValueError, match="phase"):
        conv.ConvergenceConfig(phase="both")


def test_mde_and_gap_closed():
    assert conv.gap_closed(0.1, 0.3, 0.9) == pytest.approx(0.25)
    assert conv.gap_closed(0.5, 0.6, 0.5) is None
    # sd 0.1 over 16 prompts: (t_.975,15 + t_.8,15) * 0.1 / 4 = (2.131 + 0.866) * 0.025
    d = [0.1 * (-1) ** i for i in range(16)]
    sd = float(torch.tensor(d).std())
    assert conv.minimum_detectable_effect(d) == pytest.approx((2.1314 + 0.8662) * sd / 4, rel=1e-3)
    assert conv.minimum_detectable_effect([0.2]) is None


def test_interrupted_training_resumes_to_the_same_adapters(standin, trained, cheap, tmp_path,
                                                           monkeypatch):
    ref = {s: SURAdapter.from_pretrained(conv.adapter_dir(trained, s)) for s in (0, 2, 4)}
    stopped = _cfg(tmp_path, phase="train")
    ticks = iter([False, False, True])  # stop after the step-0 and step-2 adapters
    monkeypatch.setattr(jobs.Deadline, "passed", lambda self: next(ticks, True))
    conv.run(stopped, backbone=standin)
    assert sorted(p.name for p in (tmp_path / "run" / "adapters").iterdir()) == \
        ["step-00000", "step-00002"]
    monkeypatch.setattr(jobs.Deadline, "passed", lambda self: False)
    conv.run(stopped, backbone=standin)
    for s in (0, 2, 4):
        got = SURAdapter.from_pretrained(conv.adapter_dir(stopped, s))
        assert ex.state_digest(got) == ex.state_digest(ref[s]), s
    assert not (tmp_path / "out").exists()  # training alone writes no result


def test_evaluation_resumes_and_the_result_appears_when_complete(standin, trained, cheap,
                                                                 tmp_path, monkeypatch):
    cc = _cfg(tmp_path, phase="eval", run_dir=trained.run_dir)
    ticks = iter([False] * 3)  # stop within the evaluation
    monkeypatch.setattr(jobs.Deadline, "passed", lambda self: next(ticks, True))
    doc, complete = conv.run(cc, backbone=standin)
    assert not complete and len(doc["records"]) == 3 == len(cheap)
    monkeypatch.setattr(jobs.Deadline, "passed", lambda self: False)
    doc, complete = conv.run(cc, backbone=standin)
    assert complete and len(cheap) == len(conv._units(cc))  # nothing evaluated twice
    curve = doc["curve"]["test"]
    assert curve["steps"]["4"]["summary"]["overall"]["acc"] == 0.5
    assert curve["steps"]["4"]["change"]["overall"]["diff"] == 0.5
    assert set(doc["curve"]) == {"tuning", "test", "extended"}
    assert "4" in doc["curve"]["extended"]["steps"] and "2" not in doc["curve"]["extended"]["steps"]
    partial = json.loads((tmp_path / "out" / "convergence-quick.partial.json").read_text())
    assert set(partial["records"]) == set(doc["records"])
    # the partial file as it always was: records, seconds and the adapters judged, per unit
    assert set(partial["seconds"]) == set(partial["records"])
    assert partial["adapters"] == {str(s): {"dir": conv.rel_path(conv.adapter_dir(cc, s)), "digest": json.loads(
        (conv.adapter_dir(cc, s) / "sur_adapter.json").read_text())["digest"]} for s in (0, 2, 4)}


def test_the_committed_partial_file_resumes_with_nothing_to_do(cheap, tmp_path, monkeypatch):
    """The committed convergence.partial.json (written before the jobs loop was shared) is read
    as done: every unit of the committed run is found in it, none is drawn again."""
    from sur_lib.infra.provenance import ROOT

    committed = ROOT / "data" / "results" / "convergence.partial.json"
    cc = conv.ConvergenceConfig(out=str(tmp_path), progress=False, cache=False)
    (tmp_path / "convergence.partial.json").write_bytes(committed.read_bytes())
    partial = json.loads(committed.read_text())
    before = json.dumps(partial, sort_keys=True)
    monkeypatch.setattr(jobs.Deadline, "passed", lambda self: False)
    conv.run_evaluation(cc, None, jobs.Deadline(None), list(cc.eval_steps), partial)
    assert cheap == [] and json.dumps(partial, sort_keys=True) == before
    assert {u[0] for u in conv._units(cc)} == set(partial["records"])
    assert all((conv.adapter_dir(cc, s) / "sur_adapter.json").is_file() for s in cc.eval_steps)


def test_a_run_folder_refuses_other_settings(standin, trained, cheap, tmp_path):
    other = _cfg(tmp_path, phase="train", batch_size=2, run_dir=trained.run_dir)
    with pytest.raises(ValueError, match="other settings"):
        conv.run(other, backbone=standin)


def test_two_evaluation_jobs_share_the_work(standin, trained, cheap, tmp_path, monkeypatch):
    """A unit claimed by another job is left to it, and what another job writes to the
    partial file meanwhile is merged, not overwritten."""
    cc = _cfg(tmp_path, phase="eval", run_dir=trained.run_dir)
    monkeypatch.setattr(jobs.Deadline, "passed", lambda self: False)
    units = [u[0] for u in conv._units(cc)]
    other_unit = "step-4/extended"  # the other job finishes this one while we draw our first
    ppath = conv._partial_path(cc)
    held = jobs.claim(ppath, units[1])  # "the other job" is drawing units[1]
    assert held is not None and jobs.claim(ppath, units[1]) is None
    real = images.evaluate_condition

    def evaluate_and_meanwhile(*a, **kw):
        out = real(*a, **kw)
        if len(cheap) == 1:
            with jobs.locked(ppath):
                disk = json.loads(ppath.read_text()) if ppath.is_file() else {}
                specs = conv.prompt_sets(cc)["extended"]
                other = [dict(r, by="other job") for r in real(
                    standin, specs, [s["text"] for s in specs], 2, 0, None, adapter=True)]
                cheap.pop()  # that call stood for the other job's work
                disk.setdefault("records", {})[other_unit] = other
                ppath.write_text(json.dumps(disk))
        return out

    monkeypatch.setattr(images, "evaluate_condition", evaluate_and_meanwhile)
    doc, complete = conv.run(cc, backbone=standin)
    assert not complete and units[1] not in doc["records"]
    assert {r["by"] for r in doc["records"][other_unit]} == {"other job"}
    assert f"convergence/{other_unit}" not in cheap and len(cheap) == len(units) - 2
    held.close()  # the other job is gone: its unit is free again
    doc, complete = conv.run(cc, backbone=standin)
    assert units[1] in doc["records"] and len(cheap) == len(units) - 1


def test_verify_replays_training_and_redraws_images(standin, trained, cheap, tmp_path,
                                                    monkeypatch):
    from sur_lib.study.experiments import checks as shared

    cc = _cfg(tmp_path, phase="eval", run_dir=trained.run_dir)
    monkeypatch.setattr(jobs.Deadline, "passed", lambda self: False)
    monkeypatch.setattr(conv, "STEPS", 4)
    monkeypatch.setattr(conv, "VERIFY_UNITS", ("base-simple/test", "step-4/test"))
    monkeypatch.setattr(shared, "judge_images", stored_verdicts)  # the fake judge draws no images
    doc, complete = conv.run(cc, backbone=standin)
    assert complete
    digest = ex.state_digest(standin.unet)
    checks = conv.verify_convergence(doc, standin, digest, 6, False)
    names = [c["check"] for c in checks]
    # the first VERIFY_TRAIN_STEPS (5) steps, here the whole 4-step log
    assert names[:4] == [f"training: loss at step {s}" for s in range(1, 5)]
    # and the step after the stored adapter of step 2 (step 4 is the last logged step)
    assert names[4] == "convergence: training: loss at step 3 (from the stored adapter after step 2)"
    assert any(n.startswith("step-4/test") for n in names) and all(c["ok"] for c in checks)
    log = tmp_path / "log.csv"  # a stored log that the code no longer reproduces
    rows = (conv.Path(trained.run_dir) / "train" / "log.csv").read_text().splitlines()
    head, first = rows[0], rows[1].split(",")
    first[1] = str(float(first[1]) * 1.1)
    log.write_text("\n".join([head, ",".join(first)] + rows[2:]) + "\n")
    bad = conv.verify_convergence(dict(doc, train_log=str(log)), standin, digest, 6, False)
    assert not bad[0]["ok"] and bad[1]["ok"]


def test_plateau_is_the_first_step_from_which_the_curve_is_flat():
    cc = conv.ConvergenceConfig(steps=4, eval_steps=(0, 2, 3, 4))
    acc = {0: [0.0, 0.0, 0.1, 0.0], 2: [0.5, 0.6, 0.5, 0.7], 3: [0.6, 0.5, 0.7, 0.6],
           4: [0.6, 0.6, 0.6, 0.6]}
    recs = {f"step-{s}/tuning": [{"id": f"p{i}", "type": "color", "acc": a}
                                 for i, a in enumerate(v)] for s, v in acc.items()}
    p = conv.plateau(cc, recs)
    # step 0 is 0.575 below the last step, far outside noise; steps 2 and 3 are within it
    assert p["vs_last"]["0"]["t_ci"][1] < 0 and p["step"] == 2
    assert p["vs_last"]["2"]["diff"] == pytest.approx(-0.025)
    recs["step-3/tuning"] = [dict(r, acc=0.1) for r in recs["step-3/tuning"]]  # a dip at 3
    assert conv.plateau(cc, recs)["step"] == 4
    assert conv.plateau(cc, {}) is None


def test_the_last_step_is_evaluated_first_after_the_base_model(tmp_path):
    names = [u[0] for u in conv._units(_cfg(tmp_path))]
    assert names[:6] == [f"base-{k}/{s}" for k in ("simple", "complex")
                         for s in ("tuning", "test", "extended")]
    assert names[6:9] == ["step-4/extended", "step-4/test", "step-4/tuning"]
    assert names[9:] == ["step-0/tuning", "step-0/test", "step-2/tuning", "step-2/test"]


def test_a_unit_write_keeps_the_other_jobs_time(tmp_path):
    """The bug behind convergence.json's 2,310 s: a job's unit write overwrote the job-time sum
    that another job had just stored."""
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"records": {"a": [1]}, "wall_time_s": 8500.0}))
    mine = conv._merge_into({"records": {"b": [2]}}, path)
    assert mine["wall_time_s"] == 8500.0 and set(mine["records"]) == {"a", "b"}
