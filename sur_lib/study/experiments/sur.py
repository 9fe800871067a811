"""``sur``: build SURD-mini (``toyworld.build_dataset``), SmolLM2 knowledge vectors (a cached
safetensors file), train the SUR-adapter (``runs.train_adapter``: ``sur_lib.train.train``) on
``sur_lib/configs/tiny.yaml`` (paper gradient path), store it in ``data/models/sur-adapter-tiny/``
and compare it with the base model on the held-out simple prompts: per-type accuracy change
with intervals, a paired test over prompts, image quality (BRISQUE and the clean-render
distance) with t-tests as in the paper's Table 3, and the same comparison on fresh
training-distribution prompts (train nouns and phrasings: the numbers to tune ``tiny.yaml``
on, never the test prompts)."""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..statistics import compare, compare_block, summarize
from sur_lib.infra.provenance import rel_path
from . import common
from .common import (ADAPTER_DIR, IMAGES, QUICK, SURD_MINI_ROWS, VAL_IMAGES, VAL_PER_TYPE,
                     TrainingExperimentConfig, header, judge_info, load_base, model_info)
from .images import evaluate_condition, make_pipe
from sur_lib.world.prompts import train_distribution_prompts
from .runs import PATH_KEYS, save_adapter, surd_mini, train_adapter, train_config


@dataclass
class SurConfig(TrainingExperimentConfig):
    """``python -m sur_lib.study.experiments sur``: plus where the adapter is stored."""

    adapter_dir: str | None = None  # data/models/sur-adapter-tiny (quick: OUT/sur-adapter-quick)


def _budget(exp: SurConfig) -> dict:
    """Dataset rows and training overrides for ``sur`` (quick: tiny)."""
    rows = exp.rows or (QUICK["rows"] if exp.quick else SURD_MINI_ROWS)
    over = {}
    if exp.quick:
        over.update(max_steps=QUICK["train_steps"], batch_size=QUICK["batch_size"], checkpoint_every=10**6)
    if exp.train_steps:
        over["max_steps"] = int(exp.train_steps)
    return {"rows": int(rows), "overrides": over}


def run_sur(exp: SurConfig, backbone=None) -> dict:
    """Train the SUR-adapter on SURD-mini and compare it with the base model."""
    t0 = time.time()
    backbone = backbone if backbone is not None else load_base(exp.model_dir)
    gen, n_img, seed = exp.generation(), exp.n_images(IMAGES), exp.seed
    minfo = model_info(backbone, exp.model_dir)
    budget = _budget(exp)
    data_dir = surd_mini(budget["rows"], seed, exp.progress)
    run_root = common.WORK_DIR / ("sur-quick" if exp.quick else "sur")
    if exp.fresh:
        shutil.rmtree(run_root, ignore_errors=True)
    cfg = train_config(budget["overrides"], data_dir, seed, run_root, minfo["unet_digest"], exp.progress)
    t_train = time.time()
    trained = train_adapter(cfg, backbone, progress=exp.progress)  # no step cache, as stored
    t_train = time.time() - t_train
    adapter_dir = Path(exp.adapter_dir) if exp.adapter_dir else (
        Path(exp.out) / "sur-adapter-quick" if exp.quick else ADAPTER_DIR)
    adapter, digest = save_adapter(trained.adapter, adapter_dir, {
        "made_by": "python -m sur_lib.study.experiments sur", "seed": seed, "quick": exp.quick,
        "base_model": minfo,
        "train_config": {k: v for k, v in cfg.to_dict().items() if k not in PATH_KEYS},
        "overrides": budget["overrides"], "surd_mini": {"rows": budget["rows"], "seed": seed}})

    specs = exp.test_specs()
    pipe = make_pipe(backbone, gen)
    texts = [s["text"] for s in specs]
    adapter_ref = {"dir": rel_path(adapter_dir), "digest": digest}
    conds = {
        "base": {"adapter": None, "records": evaluate_condition(
            backbone, specs, texts, n_img, seed, gen, quality=True, pipe=pipe,
            progress=exp.progress, desc="sur/base", cache=exp.cache_dir())},
        "adapter": {"adapter": adapter_ref, "records": evaluate_condition(
            backbone, specs, texts, n_img, seed, gen, adapter=adapter, quality=True, pipe=pipe,
            progress=exp.progress, desc="sur/adapter", cache=exp.cache_dir())},
    }
    val_specs = train_distribution_prompts(QUICK["val_per_type"] if exp.quick else VAL_PER_TYPE,
                                           seed + 1)
    val_img = QUICK["val_images"] if exp.quick else VAL_IMAGES
    vtexts = [s["text"] for s in val_specs]
    val = {"base": evaluate_condition(backbone, val_specs, vtexts, val_img, seed, gen, pipe=pipe,
                                      progress=exp.progress, desc="sur/val-base",
                                      cache=exp.cache_dir()),
           "adapter": evaluate_condition(backbone, val_specs, vtexts, val_img, seed, gen,
                                         adapter=adapter, pipe=pipe, progress=exp.progress,
                                         desc="sur/val-adapter", cache=exp.cache_dir())}
    doc = header("sur", exp)
    block = compare_block(conds["base"]["records"], conds["adapter"]["records"])
    doc.update({
        "model": minfo, "judge": judge_info(), "generation": gen.to_dict(),
        "images_per_prompt": n_img,
        "surd_mini": {"rows": budget["rows"], "seed": seed, "dir": rel_path(data_dir)},
        "train": {"config": {k: v for k, v in cfg.to_dict().items() if k not in PATH_KEYS},
                  "overrides": budget["overrides"], "steps": cfg.max_steps,
                  "batch_size": cfg.batch_size, "knowledge": trained.knowledge_stats, "log": trained.log},
        "adapter": adapter_ref,
        "conditions": conds,
        "summary": {"base": block["base"], "adapter": block["other"],
                    "adapter_minus_base": block["change"], "quality": block["quality"]},
        "train_distribution": {
            "note": "fresh prompts with TRAIN nouns and phrasings (seed + 1): the tuning set",
            "images_per_prompt": val_img, "prompts": val_specs,
            "base": summarize(val["base"]), "adapter": summarize(val["adapter"]),
            "adapter_minus_base": compare(val["base"], val["adapter"]),
            "records": val},
        "timings": {"train_s": round(t_train, 1)},
        "wall_time_s": round(time.time() - t0, 1),
    })
    return doc
