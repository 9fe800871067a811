"""verify against forged results (issue 26): each forgery of the issue, made on a copy of the
committed sur.json, must fail verify's checks. These tests need no model: the checks that do not
draw are run on the forged file, and the image check is given the stored (true) verdicts as the
live draws, which is what a seeded re-draw on the same versions returns."""
import copy
import json
from pathlib import Path

import pytest

from sur_lib.study.statistics import compare_block
from sur_lib.study.experiments import verify
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


def test_flipped_verdicts_with_recomputed_summaries_pass_consistency_but_fail_the_redraw(sur, monkeypatch):
    # before: the chapter's asserts passed and verify said OK (a tolerance of 0.534)
    doc = flip(copy.deepcopy(sur), "adapter", range(4, 16))
    assert ok(verify.consistency_checks("sur", doc))  # a careful forgery: self-consistent
    monkeypatch.setattr(verify, "same_versions", lambda d: True)
    true = sur["conditions"]["adapter"]["records"]
    stored = verify.choose_records(doc["conditions"]["adapter"]["records"], None, "sur/adapter")  # --full
    res = verify.image_check("adapter", true, stored, 16, doc)
    assert not res["ok"] and "NO" in res["message"]


def test_changed_verdicts_of_the_redrawn_images_fail(sur, monkeypatch):
    # before: verify printed "image-for-image agreement 2/12" and still passed
    monkeypatch.setattr(verify, "same_versions", lambda d: True)
    verify._draw_seed = 7
    try:
        chosen = verify.choose_records(sur["conditions"]["adapter"]["records"], 1, "sur/adapter")
    finally:
        verify._draw_seed = None
    ids = {r["id"] for r in chosen}
    doc = flip(copy.deepcopy(sur), "adapter", range(0, 4),
               prompts={i for i, r in enumerate(sur["conditions"]["adapter"]["records"]) if r["id"] in ids})
    stored = [r for r in doc["conditions"]["adapter"]["records"] if r["id"] in ids]
    true = [r for r in sur["conditions"]["adapter"]["records"] if r["id"] in ids]
    res = verify.image_check("adapter", true, stored, 4, doc)
    assert not res["ok"] and res["same_images"] == 0 and res["compared_images"] == 12
    assert verify.image_check("adapter", true, true, 4, sur)["ok"]


def test_the_redrawn_subset_is_chosen_afresh_covers_every_type_and_follows_the_seed(sur):
    recs = sur["conditions"]["adapter"]["records"]
    picks = []
    for seed in (1, 2, 1):
        verify._draw_seed = seed
        try:
            picks.append([r["id"] for r in verify.choose_records(recs, 1, "sur/adapter")])
        finally:
            verify._draw_seed = None
    assert picks[0] == picks[2] and picks[0] != picks[1]
    assert sorted(i.split("-")[0] for i in picks[0]) == ["action", "color", "counting"]


def test_images_for_power_is_the_stated_size():
    s = verify.images_for_power(0.05, 0.95)
    assert s == 59 and 0.95 ** s <= 0.05 < 0.95 ** (s - 1)
