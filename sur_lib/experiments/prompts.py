"""Which prompts an experiment uses: the held-out test prompts (a subset per type) and fresh
prompts of the adapter-training distribution (the tuning set: never the test prompts)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .. import toyworld as tw


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
