"""The extended held-out prompt set: fixed, pinned, held out, and distinct."""
import json
import re

import pytest

from sur_lib.world import extended_prompts as xp
from sur_lib.world import toyworld as tw


def test_stored_file_is_what_build_makes_and_is_pinned():
    stored = json.loads(xp.EXTENDED_FILE.read_text())["prompts"]
    assert stored == xp.build()
    assert xp.digest(stored) == xp.EXTENDED_DIGEST
    assert len(xp.extended_prompts()) == 150


def test_fifty_per_type_distinct_and_not_fixed_test_prompts():
    prompts = xp.extended_prompts()
    for t in tw.TEST_TYPES:
        assert len(xp.extended_prompts(t)) == 50
    texts = [p["text"] for p in prompts]
    assert len(set(texts)) == len(texts)
    assert not set(texts) & {p["text"] for p in tw.TEST_PROMPTS}
    assert len({p["id"] for p in prompts}) == 150


def _templates(split):
    return [tw.template_regex(t) for group in tw.TEMPLATES[split].values() for t in group]


def test_each_prompt_holds_out_what_it_says():
    train_t, held_t = _templates("train"), _templates("heldout")
    for p in xp.extended_prompts():
        noun_held = tw.NOUNS[p["noun"]].split == "heldout"
        assert ("noun" in p["heldout"]) == noun_held, p
        if "phrasing" in p["heldout"]:
            assert any(r.match(p["text"]) for r in held_t), p
        else:
            assert any(r.match(p["text"]) for r in train_t), p
        assert p["heldout"], p  # something is always held out
        assert re.search(rf"\b{tw.NUMBER_WORDS[p['count']]}\b", p["text"]) or p["count"] == 1


def test_types_follow_the_fixed_sets_rules():
    for p in xp.extended_prompts("counting"):
        assert 2 <= p["count"] <= 6 and p["arrangement"] is None
    for p in xp.extended_prompts("color"):
        assert p["count"] in (1, 2) and "noun" in p["heldout"]
    for p in xp.extended_prompts("action"):
        assert 3 <= p["count"] <= 6 and p["arrangement"] in tw.ARRANGEMENTS


def test_a_changed_file_is_refused(tmp_path):
    doc = json.loads(xp.EXTENDED_FILE.read_text())
    doc["prompts"][0]["text"] = "seven cherries"
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="pinned digest"):
        xp.extended_prompts(path=bad)
