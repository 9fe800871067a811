"""verify against forged results (issue 26): each forgery of the issue, made on a copy of the
committed sur.json, must fail verify's checks. These tests need no model: the checks that do not
draw are run on the forged file, and the image check is given the stored (true) verdicts as the
live draws, which is what a seeded re-draw on the same versions returns."""
import copy
import json
from pathlib import Path

import pytest

from sur_lib.study.statistics import compare_block
from sur_lib.study.experiments import checks as shared, verify
from sur_lib.infra.fileio import clean_json

SUR = Path(__file__).parents[1] / "data" / "results" / "sur.json"


@pytest.fixture(scope="module")
def sur():
    return json.loads(SUR.read_text())


def ok(checks):
    return all(c["ok"] for c in checks)


def test_the_committed_result_passes_the_consistency_checks(sur):
    checks = verify.consistency_checks("sur", sur)
    assert ok(checks), checks


def test_headline_raised_by_005_fails(sur):
    # before: `verify --only sur --out COPY` printed OK sur
    doc = copy.deepcopy(sur)
    doc["summary"]["adapter"]["overall"]["acc"] += 0.05
    checks = verify.consistency_checks("sur", doc)
    assert not ok(checks)
    bad = [c for c in checks if not c["ok"]][0]
    assert "summary/adapter/overall/acc" in bad["message"]


def flip(doc, cond, images, prompts=None):
    """Flip the verdicts of ``images`` (0-based) of ``prompts`` (all when None) of ``cond``, and
    make the records and every summary agree with the new verdicts (as a careful forger would)."""
    from sur_lib.study.statistics import wilson_interval

    for i, r in enumerate(doc["conditions"][cond]["records"]):
        if prompts is not None and i not in prompts:
            continue
        for j in images:
            r["correct"][j] = 1 - r["correct"][j]
        r["k"] = sum(r["correct"])
        r["acc"] = r["k"] / r["n"]
        r["lo"], r["hi"] = wilson_interval(r["k"], r["n"])
    block = compare_block(doc["conditions"]["base"]["records"], doc["conditions"]["adapter"]["records"])
    doc["summary"] = clean_json({"base": block["base"], "adapter": block["other"],
                                 "adapter_minus_base": block["change"], "quality": block["quality"]})
    return doc


def live_verdicts(doc, cond, picks):
    """What a seeded re-draw on the same versions gives: the stored verdicts of ``doc``."""
    recs = doc["conditions"][cond]["records"]
    return [recs[i]["correct"][j] for i, j in picks]


def test_flipped_verdicts_with_recomputed_summaries_pass_consistency_but_fail_the_redraw(sur, monkeypatch):
    # before: the chapter's asserts passed and verify said OK (a tolerance of 0.534)
    doc = flip(copy.deepcopy(sur), "adapter", range(4, 16))
    assert ok(verify.consistency_checks("sur", doc))  # a careful forgery: self-consistent
    monkeypatch.setattr(shared, "same_versions", lambda d: True)
    recs = doc["conditions"]["adapter"]["records"]
    picks = shared.choose_images(recs, None, "sur/adapter")  # --full
    res = shared.image_check("adapter", live_verdicts(sur, "adapter", picks), recs, picks, doc)
    assert not res["ok"] and "NO" in res["message"]


def test_changed_verdicts_of_the_redrawn_images_fail(sur, monkeypatch):
    # before: verify printed "image-for-image agreement 2/12" and still passed
    monkeypatch.setattr(shared, "same_versions", lambda d: True)
    monkeypatch.setattr(shared, "_draw_seed", 7)
    recs = sur["conditions"]["adapter"]["records"]
    picks = shared.choose_images(recs, 12, "sur/adapter")
    doc = copy.deepcopy(sur)
    for i, j in picks:
        doc["conditions"]["adapter"]["records"][i]["correct"][j] ^= 1
    res = shared.image_check("adapter", live_verdicts(sur, "adapter", picks), doc["conditions"]["adapter"]["records"],
                             picks, doc)
    assert not res["ok"] and res["same_images"] == 0 and res["compared_images"] == 12
    assert shared.image_check("adapter", live_verdicts(sur, "adapter", picks), recs, picks, sur)["ok"]


def test_the_redrawn_images_are_chosen_afresh_among_all_and_follow_the_seed(sur, monkeypatch):
    recs = sur["conditions"]["adapter"]["records"]
    picks = []
    for seed in (1, 2, 1):
        monkeypatch.setattr(shared, "_draw_seed", seed)
        picks.append(shared.choose_images(recs, 12, "sur/adapter"))
    assert picks[0] == picks[2] and picks[0] != picks[1] and len(set(picks[0])) == 12
    monkeypatch.setattr(shared, "_draw_seed", 3)
    seen = {j for s in range(50) for _, j in shared.choose_images(recs, 12, f"sur/adapter/{s}")}
    assert seen == set(range(16))  # every image index can be drawn, not only the first 4


def test_an_edit_beyond_the_first_images_is_caught_at_the_stated_rate(sur, monkeypatch):
    # before: the default re-drew images 1-4 of 3 prompts: an edit of images 5-16 was never caught
    recs = sur["conditions"]["adapter"]["records"]
    total = sum(r["n"] for r in recs)
    changed = {(i, j) for i in range(0, 45, 5) for j in range(12, 16)}  # 36 verdicts: 5 points of 720
    assert len(changed) == 36 and total == 720
    runs, caught = 2000, 0
    for seed in range(runs):
        monkeypatch.setattr(shared, "_draw_seed", seed)
        caught += bool(changed & set(shared.choose_images(recs, verify.VERIFY_DRAWS, "sur/adapter")))
    p = shared.detection_probability(total, verify.VERIFY_DRAWS)
    assert 0.45 < p < 0.47
    assert abs(caught / runs - p) < 4 * (p * (1 - p) / runs) ** 0.5


def test_images_for_power_is_the_stated_size():
    s = shared.images_for_power(0.05, 0.95)
    assert s == 59 and 0.95 ** s <= 0.05 < 0.95 ** (s - 1)
    assert shared.images_for_power(0.05, 0.95, total=720) == 57
    assert shared.detection_probability(720, 57) >= 0.95 > shared.detection_probability(720, 56)
    assert shared.detection_probability(720, None or 720) == 1.0


# ----------------------------------------------------------------------------- input digests

from sur_lib.study.experiments import inputs  # noqa: E402

RESULTS = SUR.parent


def test_every_committed_result_records_its_inputs_and_they_hold():
    for name in ("ablations", "compose", "convergence", "failure", "guidance", "neighbours", "probe",
                 "quality", "retest", "rewrite", "sur", "tune"):
        res = inputs.input_check(json.loads((RESULTS / f"{name}.json").read_text()))
        assert res["ok"], (name, res)


def copied_inputs(doc, tmp_path, monkeypatch):
    """The files ``doc`` records, copied under ``tmp_path`` (which stands in for the repository)."""
    import shutil

    for f in doc["inputs"]:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(inputs.ROOT / f, tmp_path / f)
    monkeypatch.setattr(inputs, "ROOT", tmp_path)
    return tmp_path


def test_one_line_of_a_loss_log_changed_fails(tmp_path, monkeypatch):
    # before: no digest of the loss logs; a log edited at step 5 was never compared
    doc = json.loads((RESULTS / "retest.json").read_text())
    root = copied_inputs(doc, tmp_path, monkeypatch)
    assert inputs.input_check(doc)["ok"]
    log = root / "data/runs/retest/no_llm/log.csv"
    lines = log.read_text().splitlines(keepends=True)
    head = lines[0].rstrip("\n").split(",")
    row = lines[5].rstrip("\n").split(",")
    row[head.index("loss")] = repr(float(row[head.index("loss")]) * 1.5)
    lines[5] = ",".join(row) + "\n"
    log.write_text("".join(lines))
    res = inputs.input_check(doc)
    assert not res["ok"] and "data/runs/retest/no_llm/log.csv changed" in res["message"]


def test_one_byte_of_an_adapter_changed_fails(tmp_path, monkeypatch):
    doc = json.loads(SUR.read_text())
    root = copied_inputs(doc, tmp_path, monkeypatch)
    w = root / "data/models/sur-adapter-tiny/diffusion_pytorch_model.safetensors"
    b = bytearray(w.read_bytes())
    b[-1] ^= 1
    w.write_bytes(bytes(b))
    res = inputs.input_check(doc)
    assert not res["ok"] and "sur-adapter-tiny/diffusion_pytorch_model.safetensors changed" in res["message"]


def test_inputs_removed_or_left_out_fail(sur):
    doc = copy.deepcopy(sur)
    del doc["inputs"]["data/results/judge.json"]
    res = inputs.input_check(doc)
    assert not res["ok"] and "judge.json is named by the result but its digest is not recorded" in res["message"]
    del doc["inputs"]
    assert not inputs.input_check(doc)["ok"]
    assert inputs.input_check(doc, partial=True)["ok"]  # a run under way records them at its end


def test_a_single_redrawn_image_is_the_batch_image():
    # image j re-drawn alone from its own initial noise (images.initial_noise) is image j of the
    # seeded batch the experiments draw (to the pixel level: a batch of another size may differ
    # in the last float bit)
    import numpy as np

    from sur_lib.study.experiments.common import GenSettings, load_base
    from sur_lib.study.experiments.images import draw_and_judge, initial_noise, judge_images, make_pipe
    from sur_lib.pipeline import generate

    bb, gen = load_base(), GenSettings(steps=3, guidance=2.0)
    pipe = make_pipe(bb, gen)
    spec = json.loads(SUR.read_text())["conditions"]["base"]["records"][3]
    images, scores = draw_and_judge(bb, spec, spec["text"], 6, 0, gen, pipe=pipe)
    from sur_lib.study.experiments.common import prompt_seed

    one = generate(bb, [spec["text"]], num_inference_steps=gen.steps, guidance_scale=gen.guidance,
                   latents=initial_noise(bb, pipe, prompt_seed(0, spec["id"]), 4), output_type="np", pipe=pipe)
    one = np.clip(np.rint(np.asarray(one) * 255.0), 0, 255).astype(np.uint8)[0]
    assert np.abs(one.astype(int) - images[4].astype(int)).max() <= 1
    picks = [(spec, spec["text"], j) for j in (5, 1, 4)]
    assert judge_images(bb, picks, 0, gen, pipe=pipe, batch=2) == [int(scores[j]["correct"]) for j in (5, 1, 4)]


def test_two_conditions_share_draws_only_with_the_same_weights(sur):
    # a first version keyed the shared draws without the adapter: sur's adapter condition was
    # compared with the base model's verdicts (caught by verify's own run: agreement 11/12)
    import torch

    from sur_lib.study.experiments.common import GenSettings

    recs, gen = sur["conditions"]["base"]["records"], GenSettings(**sur["generation"])
    lin = torch.nn.Linear(2, 2)
    assert shared.draw_key(recs, 0, gen) == shared.draw_key(copy.deepcopy(recs), 0, gen)
    assert shared.draw_key(recs, 0, gen) != shared.draw_key(recs, 0, gen, adapter=lin)


# ----------------------------------------------------------------------------- loss replays beyond the start


def test_a_loss_forged_at_a_later_step_fails_the_replay_from_a_stored_adapter(tmp_path):
    """A small synthetic run of 5 steps with its adapter stored (fp16, as the experiments store
    them) after step 3: ``replay_from_states`` recomputes row 4 from that adapter alone (no
    optimizer state) and matches the log; the same log with the loss of step 4 raised by 2%
    fails (before: only the first two steps were replayed, so no replay could see it)."""
    import numpy as np
    import torch
    from PIL import Image

    from sur_lib.infra.surd_files import write_metadata
    from sur_lib.study.experiments.runs import save_adapter
    from sur_lib.infra.knowledge_files import load_knowledge, save_knowledge
    from sur_lib.models import tiny_random_backbone
    from sur_lib.train import TrainConfig, train
    from sur_lib.infra.run_state import read_log

    surd = tmp_path / "surd"
    surd.mkdir()
    rng = np.random.default_rng(0)
    prompts = ["four tomatoes in a row", "a stack of three dice", "one lemon"]
    rows = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(surd / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": prompts[i % 3], "prompt": f"{i} red circles"})
    write_metadata(surd, rows)
    save_knowledge(surd / "k.safetensors", prompts, torch.randn(3, 24, generator=torch.Generator().manual_seed(0)),
                   meta={"llm": "random", "layer": -1, "include_bos": True, "batch_size": 1})
    knowledge = load_knowledge(surd / "k.safetensors")
    out = tmp_path / "run"

    def cfg(steps):
        return TrainConfig(profile="tiny-random", data_dir=str(surd), knowledge_file=str(surd / "k.safetensors"),
                           llm="random", llm_layer=-1, output_dir=str(out), num_layers=1, num_heads=4,
                           ffn_dim=32, batch_size=4, max_steps=steps, checkpoint_every=3, learning_rate=1e-3,
                           progress=False)

    backbone = tiny_random_backbone(seed=0)
    res = train(cfg(3), backbone=backbone, knowledge=knowledge)
    _, digest = save_adapter(res.adapter, tmp_path / "step-00003", {})
    train(cfg(5), backbone=backbone, knowledge=knowledge)  # resumes from the checkpoint at step 3
    log = read_log(out)
    assert [int(r["step"]) for r in log] == [1, 2, 3, 4, 5]
    states = {3: {"dir": str(tmp_path / "step-00003"), "digest": digest}}

    checks = shared.replay_from_states(cfg(5), backbone, states, log, "synthetic", lambda rows: knowledge)
    assert len(checks) == 1 and ok(checks), checks
    assert "step 4" in checks[0]["check"]

    forged = copy.deepcopy(log)
    forged[3]["loss"] = float(forged[3]["loss"]) * 1.02
    assert not ok(shared.replay_from_states(cfg(5), backbone, states, forged, "synthetic", lambda rows: knowledge))
    forged = copy.deepcopy(log)
    forged[2]["loss"] = float(forged[2]["loss"]) * 1.5  # step 3: no stored state before it here
    assert ok(shared.replay_from_states(cfg(5), backbone, states, forged, "synthetic", lambda rows: knowledge))


# ----------------------------------------------------------------------------- loss logs of the cases
# The replays are given the stored (true) log as what they recompute, which is what a replay on
# the same versions returns (tests/test_experiments.py and the verify test on the committed
# results replay for real); what is tested here is which steps verify compares.


def _true_replays(monkeypatch, module, logs_by_overrides):
    """Replace training in ``module`` by a lookup of the stored log for the config's overrides."""
    monkeypatch.setattr(module, "surd_mini", lambda *a, **k: Path("surd"), raising=False)

    def fake_config(over, *a, **k):
        return dict(over)

    def fake_replay(cfg, backbone, steps, *a, **k):
        cfg.pop("max_steps")
        cfg.pop("checkpoint_every", None)
        return logs_by_overrides(cfg)[:steps]

    monkeypatch.setattr(module, "train_config", fake_config)
    monkeypatch.setattr(module, "replay_log", fake_replay)


def test_ablation_logs_forged_at_step_5_of_no_llm_and_step_1_of_reference_fail(monkeypatch):
    """The issue's cases: step 5 of ``no_llm`` and step 1 of ``reference`` raised by 50%. Before,
    verify replayed 2 steps of the one variant the result names (``no_llm``): both passed."""
    from sur_lib.study.experiments import ablations

    doc = json.loads((RESULTS / "ablations.json").read_text())
    by_over = {json.dumps(v["overrides"], sort_keys=True): v["log"] for v in doc["variants"].values()}
    budget = doc["settings"]["budget"]["overrides"]  # max_steps, checkpoint_every: set by the replay
    _true_replays(monkeypatch, ablations, lambda over: copy.deepcopy(by_over[json.dumps(
        {k: v for k, v in over.items() if k not in budget}, sort_keys=True)]))
    digest = doc["model"]["unet_digest"]
    assert ok(ablations.verify_ablations(doc, object(), digest))
    todo, skipped = ablations.ablation_replays(doc, full=False)
    assert doc["verify"]["variant"] == "no_llm" and ("no_llm", 5) in todo and ("reference", 1) in todo
    assert {s for n, s in todo if n != "no_llm"} == {1}
    assert len(todo) + len(skipped) == 15  # 21 variants, 6 of them twins of another
    for variant, row in (("no_llm", 4), ("reference", 0)):
        forged = copy.deepcopy(doc)
        forged["variants"][variant]["log"][row]["loss"] *= 1.5
        checks = ablations.verify_ablations(forged, object(), digest)
        failed = [c["check"] for c in checks if not c["ok"]]
        assert failed == [f"{variant}: loss at step {row + 1}"], failed
    # --full (draws None) replays every step of every variant, the skipped teachers included
    todo, skipped = ablations.ablation_replays(doc, full=True)
    assert not skipped and all(s == 150 for _, s in todo) and len(todo) == 15


def test_the_convergence_log_forged_at_step_3_fails(monkeypatch, tmp_path):
    """The issue's case: step 3 of the convergence log raised by 50% (before: 2 steps replayed)."""
    import csv

    from sur_lib.study.experiments import convergence, runs

    doc = json.loads((RESULTS / "convergence.json").read_text())
    src = Path(__file__).parents[1] / doc["train_log"]
    with open(src, newline="") as f:
        true_log = list(csv.DictReader(f))
    monkeypatch.setattr(runs, "surd_mini", lambda *a, **k: tmp_path)
    monkeypatch.setattr(convergence, "_train_cfg", lambda *a, **k: type("C", (), {"lambda_llm": 0})())
    monkeypatch.setattr(runs, "replay_run", lambda cfg, bb, steps, **k: true_log[:steps])
    monkeypatch.setattr(shared, "replay_from_states", lambda *a, **k: [])
    monkeypatch.setattr(shared, "verify_images", lambda *a, **k: [])
    monkeypatch.setattr(convergence, "ROOT", tmp_path)
    log = tmp_path / doc["train_log"]
    log.parent.mkdir(parents=True)
    for row, factor in ((None, 1.0), (2, 1.5)):
        rows = copy.deepcopy(true_log)
        if row is not None:
            rows[row]["loss"] = repr(float(rows[row]["loss"]) * factor)
        with open(log, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(true_log[0]))
            w.writeheader()
            w.writerows(rows)
        checks = convergence.verify_convergence(doc, None, doc["model"]["unet_digest"], 1, False)
        failed = [c["check"] for c in checks if not c["ok"]]
        assert failed == ([] if row is None else ["training: loss at step 3"]), failed


def test_replay_start_replays_a_short_log_whole_and_fails_an_empty_one(monkeypatch):
    """``checks.replay_start``, the one start-of-run replay of convergence, channel and the
    recipes: a log shorter than ``VERIFY_TRAIN_STEPS`` is replayed whole; an empty stored log is
    replayed in full and fails (convergence's own copy used to replay 0 steps and pass)."""
    from sur_lib.study.experiments import runs

    rows = [{"step": str(i + 1), "loss": str(0.1 * (i + 1))} for i in range(8)]
    asked = []

    def replay(cfg, backbone, steps, **kw):
        asked.append(steps)
        return rows[:steps]

    monkeypatch.setattr(runs, "replay_run", replay)
    assert ok(shared.replay_start(None, None, rows[:3])) and asked == [3]
    assert ok(shared.replay_start(None, None, rows)) and asked[-1] == shared.VERIFY_TRAIN_STEPS
    checks = shared.replay_start(None, None, [])
    assert not ok(checks) and "the stored log has 0 steps" in checks[0]["message"]
