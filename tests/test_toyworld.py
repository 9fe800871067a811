"""The SUR world: placement, rendering, prompts, SURD-mini and the fixed test prompts."""
import json
import re

import numpy as np
import pytest
from PIL import Image

from sur_lib.world import toyworld as tw

# Pinned: the test prompts are fixed once written. Changing them, or anything
# their canonical complex prompts are made of, must be a deliberate edit of this line.
TEST_PROMPTS_SHA256 = "1fc80aa3ea4c61d2dc0ebb467672782605ba7074a21629cb3eb3078552d0b84e"

LAYOUTS = [(n, None) for n in (1, 2)] + [(n, a) for n in range(3, 7) for a in tw.ARRANGEMENTS]


def _check_layout(objs, n, arrangement):
    assert len(objs) == n
    pts = np.array([(o.x, o.y) for o in objs])
    s = objs[0].s
    assert tw.MIN_OBJECT_SIZE_PX32 / 32 - 1e-9 <= s <= tw.OBJECT_SIZE_PX32[1] / 32 + 1e-9
    lo, hi = tw.MARGIN_PX32 / 32 + s / 2, 1 - tw.MARGIN_PX32 / 32 - s / 2
    assert np.all(pts >= lo - 1e-9) and np.all(pts <= hi + 1e-9)
    if n > 1:  # bounding boxes keep at least the row gap
        d = np.max(np.abs(pts[:, None] - pts[None]), axis=-1)
        np.fill_diagonal(d, np.inf)
        assert d.min() >= s + tw.ROW_GAP_PX32 / 32 - 1e-9
    assert tw.arrangement_of(pts) == arrangement


@pytest.mark.parametrize("n,arrangement", LAYOUTS)
def test_placement_is_bounded_and_valid(n, arrangement):
    for seed in range(200):
        for shape in tw.SHAPES:
            scene = tw.Scene(n, "red", shape, arrangement)
            _check_layout(tw.place(scene, np.random.default_rng([seed, n])), n, arrangement)


def test_rows_of_six_fit_and_sizes_are_as_documented():
    assert tw.max_object_size("row", 6) * 32 == pytest.approx(4.125)
    assert tw.max_object_size("stack", 5) * 32 == pytest.approx(5.2)
    assert tw.max_object_size("scattered", 6) * 32 == pytest.approx(7.0)
    assert all(tw.max_object_size(a, 6) * 32 >= 4.0 for a in tw.ARRANGEMENTS)


def test_impossible_placement_raises_instead_of_looping(monkeypatch):
    monkeypatch.setattr(tw, "SCATTER_GAP_PX32", 40.0)  # no two objects can keep this gap
    with pytest.raises(RuntimeError, match="could not place"):
        tw.place(tw.Scene(2, "red", "circle"), np.random.default_rng(0), max_restarts=5)


def test_scene_validation():
    with pytest.raises(ValueError):
        tw.Scene(7, "red", "circle", "row")
    with pytest.raises(ValueError):
        tw.Scene(2, "red", "circle", "row")  # 2 objects have no arrangement
    with pytest.raises(ValueError):
        tw.Scene(3, "red", "circle", "zigzag")
    with pytest.raises(ValueError, match="lime is a green circle"):
        tw.Scene(1, "red", "circle", noun="lime")
    assert tw.Scene(4, "red", "circle").arrangement is None  # unspecified is allowed


@pytest.mark.parametrize("size", [16, 32, 48, 64])
def test_render_is_deterministic_and_sized(size):
    scene = tw.Scene(5, "blue", "triangle", "ring", quality="degraded")
    a = tw.render(scene, np.random.default_rng(3), size)
    b = tw.render(scene, np.random.default_rng(3), size)
    c = tw.render(scene, np.random.default_rng(4), size)
    assert a.shape == (size, size, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_clean_render_is_flat_palette_and_antialiased():
    img = tw.render(tw.Scene(1, "green", "circle"), np.random.default_rng(0))
    bg = np.all(img == tw.BACKGROUND, axis=-1)
    full = np.all(img == tw.COLORS["green"], axis=-1)
    assert bg.mean() > 0.9 and full.sum() >= 9
    assert (~bg & ~full).sum() > 0  # anti-aliased edge pixels exist
    # coverage of a circle of side s is ~ pi/4 s^2 pixels
    rs, cs, a = tw.coverage("circle", 0.5, 0.5, 8 / 32, 32)
    assert a.sum() == pytest.approx(np.pi / 4 * 64, rel=0.03)
    rs, cs, a = tw.coverage("triangle", 0.5, 0.5, 8 / 32, 32)
    assert a.sum() == pytest.approx(32, rel=0.03)


def test_degraded_differs_from_clean():
    rng = np.random.default_rng(0)
    objs = tw.place(tw.Scene(3, "red", "square", "row"), rng)
    clean = tw.draw(objs)
    diffs = [np.abs(tw.degrade(clean, np.random.default_rng(s)).astype(int) - clean).mean()
             for s in range(6)]
    assert min(diffs) > 0.3


def _word_re(phrase):
    return re.compile(r"\b" + re.escape(phrase) + r"\b")


def test_train_prompts_never_use_heldout_nouns_or_phrasings():
    held_words = [_word_re(w) for n in tw.HELDOUT_NOUNS for w in (n, tw.NOUNS[n].plural)]
    held_tpl = [tw.template_regex(t) for ts in tw.TEMPLATES["heldout"].values() for t in ts]
    train_tpl = [tw.template_regex(t) for ts in tw.TEMPLATES["train"].values() for t in ts]
    texts = [tw.make_example(11, i)[1]["text"] for i in range(200)]  # SURD-mini rows
    rng = np.random.default_rng(12)
    seen_nouns = set()
    for _ in range(3000):
        scene = tw.sample_scene(rng)
        seen_nouns.add(scene.noun)
        texts.append(tw.simple_prompt(scene, rng))
    for text in texts:
        assert not any(r.search(text) for r in held_words), text
        assert not any(r.match(text) for r in held_tpl), text
        assert any(r.match(text) for r in train_tpl), text
    assert seen_nouns == set(tw.TRAIN_NOUNS)
    assert not set(tw.TRAIN_NOUNS) & set(tw.HELDOUT_NOUNS)


def test_heldout_nouns_share_a_class_with_a_train_noun():
    train_classes = {(tw.NOUNS[n].color, tw.NOUNS[n].shape) for n in tw.TRAIN_NOUNS}
    for n in tw.HELDOUT_NOUNS:
        assert (tw.NOUNS[n].color, tw.NOUNS[n].shape) in train_classes, n


def test_simple_prompt_examples():
    rng = np.random.default_rng(0)
    texts = {tw.simple_prompt(tw.Scene(1, "orange", "circle", noun="orange"), rng)
             for _ in range(50)}
    assert "an orange on a table" in texts and "a single orange" in texts
    texts = {tw.simple_prompt(tw.Scene(3, "white", "square", "stack", noun="die"), rng)
             for _ in range(200)}
    assert "a stack of three dice" in texts and "three dice" in texts
    with pytest.raises(ValueError):
        tw.simple_prompt(tw.Scene(1, "red", "circle", noun="cherry"), rng)  # held out
    assert tw.simple_prompt(tw.Scene(1, "red", "circle", noun="cherry"), rng,
                            nouns=tw.HELDOUT_NOUNS, phrasing="heldout") == "just one cherry by itself"


def test_complex_prompts_quality_tags_and_long_tail():
    rng = np.random.default_rng(0)
    lengths = []
    for i in range(2000):
        scene = tw.sample_scene(rng, nouns=None)
        p = tw.complex_prompt(scene, rng)
        obj = f"{scene.count} {scene.color} {scene.shape}" + ("s" if scene.count > 1 else "")
        assert re.search(r"(^|, )" + obj + r"(,|$)", p), p
        has_quality = all(t in p.split(", ") for t in tw.CORE_QUALITY_TAGS)
        assert has_quality == (scene.quality == "clean"), p
        if scene.quality == "degraded":
            assert not set(p.split(", ")) & set(tw.EXTRA_QUALITY_TAGS), p
        lengths.append(len(p.split()))
    lengths = np.array(lengths)
    assert np.median(lengths) <= 14 and lengths.max() >= 40  # most short, a few long
    scene = tw.Scene(4, "red", "circle", "row")
    assert tw.canonical_complex_prompt(scene) == \
        "4 red circles, horizontal row, gray background, masterpiece, best quality, sharp focus"


def test_pretraining_batch():
    b = tw.sample_pretraining_batch(np.random.default_rng(0), 64)
    assert b.images.shape == (64, 32, 32, 3) and b.images.dtype == np.uint8
    assert len(b.prompts) == len(b.scenes) == 64
    assert all(s.noun is None for s in b.scenes)
    nouns = [_word_re(w) for n in tw.NOUNS for w in (n, tw.NOUNS[n].plural)
             if w not in tw.COLORS]  # "orange" is a colour too
    assert not any(r.search(p) for p in b.prompts for r in nouns)
    b2 = tw.sample_pretraining_batch(np.random.default_rng(0), 64)
    assert np.array_equal(b.images, b2.images) and b.prompts == b2.prompts


def test_build_is_byte_identical(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    tw.build_dataset(a, 40, seed=5, progress=False)
    assert tw.main(["build", str(b), "--n", "40", "--seed", "5"]) == 0
    tw.build_dataset(c, 40, seed=6, progress=False)
    assert tw.dataset_digest(a) == tw.dataset_digest(b) != tw.dataset_digest(c)
    rows = [json.loads(line) for line in (a / "metadata.jsonl").read_text("utf-8").splitlines()]
    assert len(rows) == 40 and rows[0]["file_name"] == "00000.png"
    assert list(rows[0])[:3] == ["file_name", "text", "prompt"]
    for r in rows:
        assert {"count", "color", "shape", "arrangement", "noun", "quality"} <= set(r)
        assert r["noun"] in tw.TRAIN_NOUNS
        with Image.open(a / r["file_name"]) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
    # example i does not depend on how many examples are built
    _, row3 = tw.make_example(5, 3)
    assert row3 == rows[3]


def test_test_prompts_fixed_and_held_out():
    assert tw.test_prompts_digest() == TEST_PROMPTS_SHA256
    train_tpl = [tw.template_regex(t) for ts in tw.TEMPLATES["train"].values() for t in ts]
    held_tpl = [tw.template_regex(t) for ts in tw.TEMPLATES["heldout"].values() for t in ts]
    assert [sum(p["type"] == t for p in tw.TEST_PROMPTS) for t in tw.TEST_TYPES] == [15, 15, 15]
    assert len({p["id"] for p in tw.TEST_PROMPTS}) == 45
    assert len({p["text"] for p in tw.TEST_PROMPTS}) == 45
    for p in tw.test_prompts():
        assert p["heldout"], p
        assert ("noun" in p["heldout"]) == (p["noun"] in tw.HELDOUT_NOUNS), p
        is_held_phrase = any(r.match(p["text"]) for r in held_tpl)
        assert ("phrasing" in p["heldout"]) == is_held_phrase, p
        if not is_held_phrase:
            assert any(r.match(p["text"]) for r in train_tpl), p
        scene = tw.scene_of(p)
        assert p["prompt"] == tw.canonical_complex_prompt(scene)
        assert tw.NUMBER_WORDS[p["count"]] in p["text"] or p["count"] == 1
        if p["type"] == "action":
            assert p["arrangement"] in tw.ARRANGEMENTS and p["count"] >= 3
        if p["type"] == "counting":
            assert p["arrangement"] is None
    assert len(tw.test_prompts("color")) == 15
    with pytest.raises(ValueError):
        tw.test_prompts("shape")
