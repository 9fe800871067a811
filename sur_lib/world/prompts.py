"""Which prompts an experiment uses: the held-out test prompts (a subset per type) and fresh
prompts of the adapter-training distribution (the tuning set: never the test prompts)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from . import toyworld as tw


def select_prompts(prompts: Sequence[dict], per_type: int | None) -> list[dict]:
    """The first ``per_type`` prompts of each type, in the original order (None: all)."""
    if per_type is None:
        return list(prompts)
    seen: dict[str, int] = {}
    out = []
    for p in prompts:
        if seen.get(p["type"], 0) < per_type:
            out.append(p)
            seen[p["type"]] = seen.get(p["type"], 0) + 1
    return out


_ARR_TEMPLATES = {a: [tw.template_regex(t) for t in tw.TEMPLATES["train"][a]]
                  for a in tw.ARRANGEMENTS}


def train_distribution_prompts(per_type: int, seed: int) -> list[dict]:
    """Fresh prompts of the adapter-training distribution (train nouns, train phrasings), typed
    like the test prompts: 1 object -> "color"; the simple prompt names an arrangement ->
    "action"; otherwise "counting" (arrangement left open). Each has the simple text and the
    canonical complex counterpart. These, not the test prompts, are what the recipe and the
    guidance scale may be tuned on."""
    rng = np.random.default_rng([seed, 424242])
    out, seen = [], {t: 0 for t in tw.TEST_TYPES}
    for _ in range(100_000):
        if all(v >= per_type for v in seen.values()):
            break
        scene = tw.sample_scene(rng, nouns=tw.TRAIN_NOUNS, p_clean=1.0)
        text = tw.simple_prompt(scene, rng)
        arr = next((a for a, regs in _ARR_TEMPLATES.items() if scene.arrangement == a
                    and any(r.match(text) for r in regs)), None)
        type_ = "color" if scene.count == 1 else ("action" if arr else "counting")
        if seen[type_] >= per_type:
            continue
        spec_scene = tw.Scene(scene.count, scene.color, scene.shape, arr, scene.noun)
        out.append({"id": f"val-{type_}-{seen[type_]:02d}", "type": type_, "text": text,
                    "prompt": tw.canonical_complex_prompt(spec_scene), "count": scene.count,
                    "color": scene.color, "shape": scene.shape, "arrangement": arr,
                    "noun": scene.noun})
        seen[type_] += 1
    order = {t: i for i, t in enumerate(tw.TEST_TYPES)}
    return sorted(out, key=lambda p: (order[p["type"]], p["id"]))


# ----------------------------------------------------------------------------- nouns outside SURD-mini

# Unseen nouns kept for CHOOSING settings from now on: disjoint from the training nouns, the
# held-out nouns of the test and extended sets, and the channel experiment's text-only nouns.
# Every class is one the base model was pretrained on. noun: (plural, colour, shape)
VALIDATION_NOUNS: dict[str, tuple[str, str, str]] = {
    "clementine": ("clementines", "orange", "circle"),
    "cabbage": ("cabbages", "green", "circle"),
    "cucumber slice": ("cucumber slices", "green", "circle"),
    "mothball": ("mothballs", "white", "circle"),
    "tofu cube": ("tofu cubes", "white", "square"),
    "nacho": ("nachos", "yellow", "triangle"),
    "ruby": ("rubies", "red", "circle"),
    "sapphire": ("sapphires", "blue", "circle"),
    "amethyst": ("amethysts", "purple", "circle"),
}


def noun_text(template: str, count: int, noun: str, plural: str) -> str:
    """A world template filled with a number word and a noun (any noun, not only ``tw.NOUNS``)."""
    a_noun = ("an " if noun[0] in "aeiou" else "a ") + noun
    return template.format(num=tw.NUMBER_WORDS[count], noun=noun, a_noun=a_noun, nouns=plural)


def noun_prompts(nouns: dict[str, tuple[str, str, str]], tag: str, seed: int, stream: int) -> list[dict]:
    """Per noun one colour prompt (one object), one counting prompt (2-6, the layout open) and
    one action prompt (3-6 in a named arrangement), held-out phrasings; noun ``k`` draws from
    ``default_rng([seed, k, stream])``. Ids ``<tag>-<noun>-<type>``."""
    T = tw.TEMPLATES["heldout"]
    specs = []
    for k, (noun, (plural, color, shape)) in enumerate(nouns.items()):
        rng = np.random.default_rng([seed, k, stream])
        pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
        n_count = int(rng.integers(2, tw.MAX_COUNT + 1))
        n_act, arr = int(rng.integers(tw.MIN_ARRANGED, tw.MAX_COUNT + 1)), pick(tw.ARRANGEMENTS)
        for type_, count, arrangement, key in (("color", 1, None, "single"),
                                               ("counting", n_count, None, "count"),
                                               ("action", n_act, arr, arr)):
            scene = tw.Scene(count, color, shape, arrangement)
            specs.append({"id": f"{tag}-{noun.replace(' ', '_')}-{type_}", "type": type_,
                          "text": noun_text(pick(T[key]), count, noun, plural),
                          "prompt": tw.canonical_complex_prompt(scene), "count": count,
                          "color": color, "shape": shape, "arrangement": arrangement, "noun": noun})
    return specs


VALIDATION_SEED = 20261207


def validation_prompts() -> list[dict]:
    """The validation set of unseen nouns (``VALIDATION_NOUNS``, 27 prompts): for choosing
    settings from now on, instead of the tuning set, whose nouns and phrasings are training's."""
    return noun_prompts(VALIDATION_NOUNS, "valnoun", VALIDATION_SEED, 5)
