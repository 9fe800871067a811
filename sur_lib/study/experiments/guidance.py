"""``guidance``: picks the classifier-free guidance scale on training-distribution prompts
(pretraining-style complex prompts and SURD-mini-style simple prompts), never on test prompts."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from ..statistics import summarize
from .common import (GUIDANCE, QUICK, VAL_IMAGES, VAL_PER_TYPE, ExperimentConfig, header,
                     judge_info, load_base, model_info)
from .images import evaluate_condition, make_pipe
from sur_lib.world.prompts import train_distribution_prompts


@dataclass
class GuidanceConfig(ExperimentConfig):
    """``python -m sur_lib.study.experiments guidance``: the common options only."""


GUIDANCE_GRID = (1.0, 1.5, 2.0, 3.0)


def run_guidance(exp: GuidanceConfig, backbone=None) -> dict:
    """Accuracy of the base model for each CFG scale on training-distribution prompts (simple
    and canonical complex); the pick is the scale with the best complex-prompt accuracy
    (ties -> the smaller scale). Test prompts are not used."""
    t0 = time.time()
    backbone = backbone if backbone is not None else load_base(exp.model_dir)
    gen0, seed = exp.generation(), exp.seed
    n_img = exp.n_images(VAL_IMAGES)
    specs = train_distribution_prompts(QUICK["val_per_type"] if exp.quick else VAL_PER_TYPE, seed + 2)
    grid = (1.5, 2.0) if exp.quick else GUIDANCE_GRID
    conds, table = {}, {}
    for g in grid:
        gen = dataclasses.replace(gen0, guidance=float(g))
        pipe = make_pipe(backbone, gen)
        for cond, key in (("simple", "text"), ("complex", "prompt")):
            name = f"{cond}@cfg{g:g}"
            recs = evaluate_condition(backbone, specs, [s[key] for s in specs], n_img, seed, gen,
                                      pipe=pipe, progress=exp.progress, desc=f"guidance/{name}",
                                      cache=exp.cache_dir())
            conds[name] = {"adapter": None, "generation": gen.to_dict(), "records": recs}
            table.setdefault(f"{g:g}", {})[cond] = summarize(recs)
    best = max(grid, key=lambda g: (round(table[f"{g:g}"]["complex"]["overall"]["acc"], 12), -g))
    doc = header("guidance", exp)
    doc.update({"model": model_info(backbone, exp.model_dir), "judge": judge_info(),
                "generation": gen0.to_dict(), "images_per_prompt": n_img, "grid": list(grid),
                "prompts": specs, "conditions": conds, "summary": table,
                "pick": {"rule": "best overall complex-prompt accuracy on training-distribution "
                                 "prompts; ties -> smaller scale", "guidance": best,
                         "default_in_code": GUIDANCE},
                "wall_time_s": round(time.time() - t0, 1)})
    return doc
