"""``failure``: the Table 1 analogue. The base model on each of the 45 held-out test prompts,
with its simple text and with its complex counterpart, ``--images`` (16) images per prompt,
judged by ``evaluate.score``; per-prompt accuracy with Wilson 95% intervals, per-type and
overall averages, the paired difference complex - simple, image quality, and the judge's own
accuracy (``data/results/judge.json``) next to the numbers."""
from __future__ import annotations

import time
from dataclasses import dataclass

from ..statistics import compare, quality_tests, summarize
from .common import IMAGES, ExperimentConfig, header, judge_info, load_base, model_info
from .images import evaluate_condition, make_pipe


@dataclass
class FailureConfig(ExperimentConfig):
    """``python -m sur_lib.study.experiments failure``: the common options only."""


def run_failure(exp: FailureConfig, backbone=None) -> dict:
    """Table 1 analogue: base model, simple vs complex text of every held-out test prompt."""
    t0 = time.time()
    backbone = backbone if backbone is not None else load_base(exp.model_dir)
    gen, n_img, seed = exp.generation(), exp.n_images(IMAGES), exp.seed
    specs = exp.test_specs()
    pipe = make_pipe(backbone, gen)
    conds = {}
    for cond, key in (("simple", "text"), ("complex", "prompt")):
        conds[cond] = {"adapter": None, "records": evaluate_condition(
            backbone, specs, [s[key] for s in specs], n_img, seed, gen, quality=True, pipe=pipe,
            progress=exp.progress, desc=f"failure/{cond}", cache=exp.cache_dir())}
    simple, complex_ = conds["simple"]["records"], conds["complex"]["records"]
    sum_s, sum_c = summarize(simple), summarize(complex_)
    gap = sum_c["overall"]["acc"] - sum_s["overall"]["acc"]
    doc = header("failure", exp)
    doc.update({
        "model": model_info(backbone, exp.model_dir), "judge": judge_info(),
        "generation": gen.to_dict(), "images_per_prompt": n_img,
        "prompts": [{k: s[k] for k in ("id", "type", "text", "prompt")} for s in specs],
        "conditions": conds,
        "summary": {"simple": sum_s, "complex": sum_c, "complex_minus_simple": compare(simple, complex_),
                    "quality": quality_tests(simple, complex_)},
        "claim": {"aim": "complex >= 0.80 overall and complex - simple >= 0.25",
                  "complex": sum_c["overall"]["acc"], "simple": sum_s["overall"]["acc"],
                  "gap": gap, "met": bool(sum_c["overall"]["acc"] >= 0.80 and gap >= 0.25)},
        "wall_time_s": round(time.time() - t0, 1),
    })
    return doc
