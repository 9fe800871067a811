"""The ``compose`` experiment: the SUR-adapter composed with S-CFG and delayed conditioning.

    python -m sur_lib.study.experiments compose [--scales 2,3,4.5] [--alphas 0.3,0.5,0.7]
        [--complex-scales 2,3] [--images N] [--prompts-per-type N] [--threads 1]

Conditions, each on the held-out simple test prompts (``toyworld.test_prompts``) with the same
seeds (``experiments.prompt_seed``: common random numbers, so paired differences have less
noise):

* ``base/cfg@w``, ``base/scfg@w``: the base model, plain CFG and S-CFG at each scale w;
* ``adapter/cfg@w``, ``adapter/scfg@w``: the stored SUR-adapter (data/models/sur-adapter-tiny),
  conditional branch adapted, unconditional branch as ``pipeline.generate`` keeps it;
* ``adapter/delay-plain_first@a`` (and one ``adapted_first``), at the first scale: delayed
  conditioning, plain simple-prompt embedding for the first round(a N) steps, adapted after;
* ``complex/cfg@w``, ``complex/scfg@w``: S-CFG's own claim, on the base model with the
  canonical complex prompts (the prompts it was pretrained on), at ``--complex-scales``.

Every S-CFG or delayed condition is compared with plain CFG of the same model, text and scale
(``experiments.compare``: paired over prompts, t-test and Wilcoxon; ``quality_tests``: BRISQUE
and the clean-render distance). Before the conditions, ``measure_overhead`` times plain CFG,
S-CFG and S-CFG's recording alone (gamma fixed to 1) per image, interleaved, on this machine's
CPU with the run's thread count; those seconds are volatile (``timings``).

Records are cached like the other experiments' (outputs/experiments/cache, keyed also by the
guidance options and the code of ``guidance.py``), so an interrupted run resumes where it
stopped. ``evaluate_composed`` is ``images.evaluate_condition`` with the guidance
options passed to ``pipeline.generate`` (the record format is the same, so ``summarize`` and
``compare`` read it unchanged).
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Sequence

from dataclasses import dataclass

import numpy as np
import torch

from ..statistics import compare, quality_tests, summarize
from sur_lib.infra.fileio import write_json
from sur_lib.guidance import SCFGConfig
from sur_lib.infra.provenance import rel_path, state_digest
from .inputs import record_inputs
from .common import (ADAPTER_DIR, RESULTS_DIR, SAMPLER_STEPS, ExperimentConfig, GenSettings,
                     header, judge_info, load_base, model_info, versions)
from .images import evaluate_condition, make_pipe
from sur_lib.world.prompts import select_prompts
from .runs import load_adapter

SCALES = (2.0, 3.0, 4.5)
ALPHAS = (0.3, 0.5, 0.7)  # fraction of steps with the plain embedding first (FastComposer: 0.3)
REVERSED_ALPHA = 0.5  # one adapted_first condition
COMPLEX_SCALES = (2.0, 3.0)
IMAGES = 4
QUICK = dict(scales=(2.0,), alphas=(0.5,), complex_scales=(2.0,), images=2, prompts_per_type=1,
             sampler_steps=3)  # --quick: no adapted_first condition
OVERHEAD_REPEATS = 2  # interleaved repeats of each timed variant
VERIFY_CONDITIONS = 4


# =============================================================================== conditions


def condition_name(model: str, method: str, scale: float, alpha: float | None = None,
                   order: str = "plain_first") -> str:
    if alpha is not None:
        return f"{model}/delay-{order}@{alpha:g}/cfg@{scale:g}"
    return f"{model}/{method}@{scale:g}"


def plan(scales: Sequence[float], alphas: Sequence[float], complex_scales: Sequence[float],
         reversed_alpha: float | None = REVERSED_ALPHA) -> list[dict]:
    """Every condition as (name, model, text, method, scale, delay, reference): the reference
    is plain CFG of the same model and text at the same scale (None for plain CFG itself)."""
    out = []

    def add(model, text, method, w, alpha=None, order="plain_first"):
        name = condition_name("complex" if text == "prompt" else model, method, w, alpha, order)
        ref = None if (method == "cfg" and alpha is None) else condition_name(
            "complex" if text == "prompt" else model, "cfg", w)
        out.append({"name": name, "model": model, "text": text, "method": method, "scale": float(w),
                    "delay_alpha": alpha, "delay_order": order if alpha is not None else None,
                    "reference": ref})

    for w in scales:
        for model in ("base", "adapter"):
            for method in ("cfg", "scfg"):
                add(model, "text", method, w)
    for a in alphas:
        add("adapter", "text", "cfg", scales[0], a, "plain_first")
    if reversed_alpha is not None:
        add("adapter", "text", "cfg", scales[0], reversed_alpha, "adapted_first")
    for w in complex_scales:
        for method in ("cfg", "scfg"):
            add("base", "prompt", method, w)
    return out


def guidance_kwargs(cond: dict, scfg: SCFGConfig) -> dict:
    """The ``pipeline.generate`` options of a condition."""
    kw = {}
    if cond["method"] == "scfg":
        kw["scfg"] = scfg
    if cond.get("delay_alpha") is not None:
        kw.update(delay_alpha=float(cond["delay_alpha"]), delay_order=cond["delay_order"])
    return kw


def evaluate_composed(backbone, specs: Sequence[dict], texts: Sequence[str], n_images: int, seed: int,
                      gen: GenSettings, adapter=None, guidance: dict | None = None,
                      quality: bool = True, pipe=None, progress: bool = True, desc: str = "",
                      cache: Path | None = None, hits: list | None = None) -> list[dict]:
    """``images.evaluate_condition`` with the guidance options passed to ``pipeline.generate``
    (same record format; quality scores on by default)."""
    return evaluate_condition(backbone, specs, texts, n_images, seed, gen, adapter=adapter,
                              quality=quality, pipe=pipe, progress=progress, desc=desc,
                              cache=cache, guidance=guidance, hits=hits)


# =============================================================================== overhead


def measure_overhead(backbone, gen: GenSettings, n_images: int = 4, repeats: int = OVERHEAD_REPEATS,
                     text: str = "three red circles in a row") -> dict:
    """Seconds per image of plain CFG, S-CFG, and S-CFG's recording alone (gamma fixed to 1),
    timed interleaved (``repeats`` rounds of the three) with ``n_images`` images per call;
    the median per variant, and S-CFG / CFG. Both wall-clock seconds and this process's CPU
    seconds (``time.process_time``) are kept: on a shared machine the wall clock also counts
    the other jobs, the CPU time much less so (with one torch thread it is the work done)."""
    from sur_lib.pipeline import generate

    pipe = make_pipe(backbone, gen)
    variants = {"cfg": {}, "scfg": {"scfg": SCFGConfig()},
                "recording_only": {"scfg": SCFGConfig(fixed_gamma=1.0)}}
    kw = dict(num_inference_steps=gen.steps, guidance_scale=gen.guidance, seed=0,
              num_images_per_prompt=n_images, output_type="np", pipe=pipe)
    generate(backbone, [text], **{**kw, "num_inference_steps": 1})  # warm-up
    times = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    for _ in range(repeats):
        for k, extra in variants.items():
            t, c = time.perf_counter(), time.process_time()
            generate(backbone, [text], **kw, **extra)
            times[k].append((time.perf_counter() - t) / n_images)
            cpu[k].append((time.process_time() - c) / n_images)
    med = {k: float(np.median(v)) for k, v in times.items()}
    med_cpu = {k: float(np.median(v)) for k, v in cpu.items()}
    return {"seconds_per_image": med, "all": times, "scfg_over_cfg": med["scfg"] / med["cfg"],
            "recording_over_cfg": med["recording_only"] / med["cfg"],
            "cpu_seconds_per_image": med_cpu, "all_cpu": cpu,
            "cpu_scfg_over_cfg": med_cpu["scfg"] / med_cpu["cfg"],
            "cpu_recording_over_cfg": med_cpu["recording_only"] / med_cpu["cfg"],
            "torch_threads": torch.get_num_threads(), "images_per_call": n_images,
            "repeats": repeats, "steps": gen.steps,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "cpu_count": os.cpu_count(), "device": str(backbone.unet.device)}


# =============================================================================== the run


def _floats(text: str | None, default: Sequence[float]) -> tuple[float, ...]:
    if not text:
        return tuple(default)
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None


def table(conditions: dict) -> list[dict]:
    """One row per condition: overall and per-type accuracy with Wilson intervals, and the
    paired difference from plain CFG at the same scale (mean, t interval, p_t, p_wilcoxon)."""
    rows = []
    for name, c in conditions.items():
        s = c["summary"]
        row = {"condition": name, "n_prompts": s["overall"]["n_prompts"], "n_images": s["overall"]["n"],
               **{f"{t}": {k: s[t][k] for k in ("acc", "lo", "hi")} for t in s}}
        vs = c.get("vs_reference")
        if vs:
            p = vs["overall"]["paired"] or {}
            row["vs_reference"] = {"reference": c["reference"], "diff": vs["overall"]["diff"],
                                   "t_ci": p.get("t_ci"), "p_t": p.get("p_t"),
                                   "p_wilcoxon": p.get("p_wilcoxon")}
        rows.append(row)
    return rows


@dataclass
class ComposeConfig(ExperimentConfig):
    """``python -m sur_lib.study.experiments compose``: the common options, the adapter folder, and
    the grid (comma-separated lists; None: ``SCALES``, ``ALPHAS``, ``COMPLEX_SCALES``)."""

    adapter_dir: str | None = None
    scales: str | None = None
    alphas: str | None = None
    complex_scales: str | None = None
    no_overhead: bool = False


def run_compose(args: ComposeConfig, backbone=None, adapter=None) -> dict:
    """The compose experiment (see the module docstring)."""
    from sur_lib.world import toyworld as tw

    t0 = time.time()
    backbone = backbone if backbone is not None else load_base(args.model_dir)
    quick = bool(args.quick)
    scales = _floats(getattr(args, "scales", None), QUICK["scales"] if quick else SCALES)
    alphas = _floats(getattr(args, "alphas", None), QUICK["alphas"] if quick else ALPHAS)
    cscales = _floats(getattr(args, "complex_scales", None),
                      QUICK["complex_scales"] if quick else COMPLEX_SCALES)
    steps = args.sampler_steps or (QUICK["sampler_steps"] if quick else SAMPLER_STEPS)
    n_img = int(args.images or (QUICK["images"] if quick else IMAGES))
    per_type = args.prompts_per_type or (QUICK["prompts_per_type"] if quick else None)
    specs = select_prompts(tw.test_prompts(), per_type)
    seed = int(args.seed)
    adapter_dir = Path(args.adapter_dir) if getattr(args, "adapter_dir", None) else ADAPTER_DIR
    if adapter is None:
        adapter = load_adapter(adapter_dir)
    adapter_ref = {"dir": rel_path(adapter_dir), "digest": state_digest(adapter)}
    scfg = SCFGConfig()
    base_gen = GenSettings(steps=int(steps), guidance=float(scales[0]))
    progress = args.progress
    cache = args.cache_dir()

    overhead = None
    if not getattr(args, "no_overhead", False):
        print("timing CFG vs S-CFG per image ...", flush=True)
        overhead = measure_overhead(backbone, base_gen, repeats=1 if quick else OVERHEAD_REPEATS,
                                    n_images=2 if quick else 4)
        print(f"  {overhead['seconds_per_image']} s/image; S-CFG / CFG = {overhead['scfg_over_cfg']:.2f}",
              flush=True)

    conds = {}
    pipes = {}
    reversed_alpha = None if quick else REVERSED_ALPHA
    for c in plan(scales, alphas, cscales, reversed_alpha):
        tc = time.time()
        gen = dataclasses.replace(base_gen, guidance=c["scale"])
        pipe = pipes.setdefault(c["scale"], make_pipe(backbone, gen))
        use = adapter if c["model"] == "adapter" else None
        texts = [s[c["text"]] for s in specs]
        hits: list = []
        recs = evaluate_composed(backbone, specs, texts, n_img, seed, gen, adapter=use,
                                 guidance=guidance_kwargs(c, scfg), pipe=pipe, progress=progress,
                                 desc=f"compose/{c['name']}", cache=cache, hits=hits)
        block = {**c, "generation": gen.to_dict(), "adapter": adapter_ref if use is not None else None,
                 "records": recs, "summary": summarize(recs),
                 "timings": {"seconds": round(time.time() - tc, 1), "records_from_cache": len(hits)}}
        if c["reference"]:
            ref = conds[c["reference"]]["records"]
            block["vs_reference"] = compare(ref, recs)
            block["quality_vs_reference"] = quality_tests(ref, recs)
        conds[c["name"]] = block
        print(f"{c['name']}: {block['summary']['overall']['acc']:.3f} ({time.time() - tc:.0f} s)", flush=True)

    doc = header("compose", args)
    doc.update({
        "model": model_info(backbone, args.model_dir), "judge": judge_info(),
        "generation": base_gen.to_dict(), "images_per_prompt": n_img,
        "prompts": [{k: s[k] for k in ("id", "type", "text", "prompt")} for s in specs],
        "adapter": adapter_ref, "scfg": scfg.to_dict(),
        "grid": {"scales": list(scales), "alphas": list(alphas), "reversed_alpha": reversed_alpha,
                 "complex_scales": list(cscales)},
        "note": ("alpha = fraction of the denoising steps that get the plain simple-prompt "
                 "embedding first (plain_first; adapted_first: the adapted one first); S-CFG and "
                 "delayed conditions are compared with plain CFG of the same model, text and "
                 "scale, paired over prompts with the same seeds"),
        "conditions": conds,
        "table": table(conds),
        "verify": {"conditions": verify_conditions(conds)},
        "timings": {"overhead": overhead},
        "wall_time_s": round(time.time() - t0, 1),
    })
    return doc


# =============================================================================== verify


def verify_conditions(conds: dict, k: int = VERIFY_CONDITIONS) -> list[str]:
    """Which conditions ``verify`` re-runs: the first S-CFG condition of each model and text,
    and the first delayed one (at most ``k``)."""
    picks, seen = [], set()
    for name, c in conds.items():
        group = ("delay" if c.get("delay_alpha") is not None else c["method"], c["model"], c["text"])
        if group[0] == "cfg" or group in seen:
            continue
        seen.add(group)
        picks.append(name)
    return picks[:k]


def verify_compose(doc: dict, backbone, current_digest: str, draws: int | None,
                   progress: bool = False, out: Path | str | None = None) -> list[dict]:
    """Re-draw ``draws`` random images of a few conditions (``doc["verify"]``) with their
    guidance options and compare with the stored verdicts (``checks.redraw_check``). The verify
    hooks' signature (``registry``; ``out`` is not used)."""
    from .checks import redraw_check

    if doc["model"]["unet_digest"] != current_digest:
        return [{"check": "base model", "ok": False, "message": (
            "compose.json was made with another base model: re-run the experiment")}]
    adapter = None
    checks = []
    for name in doc["verify"]["conditions"]:
        block = doc["conditions"][name]
        if block.get("adapter") and adapter is None:
            ref = block["adapter"]
            adapter = load_adapter(ref["dir"])
            if state_digest(adapter) != ref["digest"]:
                return checks + [{"check": f"{name}: adapter", "ok": False,
                                  "message": f"{ref['dir']} is not the adapter compose.json was made with"}]
        checks.append(redraw_check(name, block["records"], draws, doc, backbone, GenSettings(**block["generation"]),
                                   adapter=adapter if block.get("adapter") else None,
                                   guidance=guidance_kwargs(block, SCFGConfig(**doc["scfg"]))))
    return checks


# =============================================================================== benchmark CLI


def bench_main(argv: Sequence[str] | None = None) -> int:
    """``python -m sur_lib.study.experiments.compose [--repeats R] [--threads T] [--out FILE]``:
    ``measure_overhead`` on the shipped base model (25 DDIM steps, CFG 2, 4 images per call),
    written to data/results/compose_bench.json (a benchmark: its seconds are this machine's)."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m sur_lib.study.experiments.compose", description=bench_main.__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--out", default=str(RESULTS_DIR / "compose_bench.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    backbone = load_base()
    gen = GenSettings()
    res = measure_overhead(backbone, gen, n_images=args.images, repeats=args.repeats)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    doc = {"experiment": "compose_bench",
           "command": "python -m sur_lib.study.experiments.compose " + " ".join(argv_list),
           "versions": versions(), "model": model_info(backbone), "generation": gen.to_dict(),
           "overhead": res, "wall_time_s": round(time.time() - t0, 1)}
    path = write_json(record_inputs(doc), Path(args.out))
    print(f"wrote {rel_path(path)}: wall {res['seconds_per_image']}, cpu {res['cpu_seconds_per_image']} s/image")
    return 0


if __name__ == "__main__":
    raise SystemExit(bench_main())
