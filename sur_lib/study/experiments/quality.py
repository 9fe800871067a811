"""Table 3 at the plateau: does image quality hold, tested for equivalence, paired over prompts?

    python -m sur_lib.study.experiments quality [--step 2000] [--images 16]

The paper claims the adapter keeps image quality (Table 3). ``sur.json`` tested a 500-step
adapter with a two-sample t-test over 720 + 720 images, although the images are paired by prompt
and seed, and with no margin, so "no drop" could only ever be "no difference detected". Here:

* the adapter at the dose-response plateau (``--step``, 2,000: where tuning-set accuracy stops
  changing, ``convergence.json``'s ``plateau``), its stored fp16 weights
  (``data/runs/convergence/adapters/step-NNNNN``), on the 45 test prompts, ``--images`` (16)
  per prompt, drawn with the seeds ``sur`` used, so the base model's images are ``sur.json``'s
  own (the same base model, sampler, seeds and images: checked, else drawn);
* per prompt, the mean clean-render distance (RMS, 0-255 units, lower is better;
  ``evaluate.clean_render_distance``) and BRISQUE of its images; the adapter minus the base,
  paired over prompts (t interval, p);
* **equivalence** (TOST, two one-sided t-tests at 5%, i.e. the 90% interval inside the margin):
  ``MARGIN`` = 1.0 distance unit, fixed in this file before the run. Why 1.0: clean renders of
  this world score ~0.2, blur alone adds ~4 and noise 7-11; a change under a quarter of what a
  blur does is one a viewer would not call a quality drop. BRISQUE gets no margin (it was fitted
  to natural photographs and is erratic on 32 px flat images): its paired test is reported only.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from sur_lib.world import toyworld as tw
from ..statistics import paired_test, tost_paired
from sur_lib.infra.fileio import write_json
from sur_lib.infra.provenance import rel_path
from .inputs import record_inputs
from . import common, images, runs

MARGIN = 1.0  # clean-render distance units (0-255 RMS); fixed before the run, see the docstring
METRICS = ("clean_render_distance", "brisque")


def per_prompt(records: Sequence[dict], key: str) -> dict[str, float]:
    return {r["id"]: float(np.mean(r[key])) for r in records}


def quality_table(base: Sequence[dict], adapter: Sequence[dict], margin: float = MARGIN) -> dict:
    """Per metric: means, the paired difference (adapter - base) over prompts and, for the
    clean-render distance, TOST against ``margin``."""
    out = {}
    for key in METRICS:
        a, b = per_prompt(base, key), per_prompt(adapter, key)
        ids = [i for i in b if i in a]
        xa, xb = [a[i] for i in ids], [b[i] for i in ids]
        out[key] = {"mean_base": float(np.mean(xa)), "mean_adapter": float(np.mean(xb)),
                    "n_prompts": len(ids), "paired": paired_test(xa, xb)}
        if key == "clean_render_distance":
            out[key]["tost"] = tost_paired(xa, xb, margin)
    return out


def run_quality(step: int = 2000, n_images: int = 16, seed: int = 0, backbone=None,
                results: Path = common.RESULTS_DIR, progress: bool = True) -> dict:
    t0 = time.time()
    backbone = backbone if backbone is not None else common.load_base()
    minfo, gen = common.model_info(backbone), common.GenSettings()
    folder = common.DOSE_RESPONSE_DIR / "adapters" / f"step-{step:05d}"
    adapter = runs.load_adapter(folder)
    meta = json.loads((folder / "sur_adapter.json").read_text())
    specs = tw.test_prompts()
    sur = json.loads((Path(results) / "sur.json").read_text())
    base = sur["conditions"]["base"]["records"]
    same = (sur["model"]["unet_digest"] == minfo["unet_digest"] and sur["generation"] == gen.to_dict()
            and sur["seed"] == seed and all(len(r["correct"]) >= n_images and "brisque" in r for r in base)
            and [r["id"] for r in base] == [s["id"] for s in specs])
    source = "sur.json: conditions.base"
    if not same:
        base = images.evaluate_condition(backbone, specs, [s["text"] for s in specs], n_images, seed, gen,
                                         quality=True, progress=progress, desc="quality/base")
        source = "drawn"
    else:
        base = [dict(r, correct=r["correct"][:n_images], brisque=r["brisque"][:n_images],
                     clean_render_distance=r["clean_render_distance"][:n_images]) for r in base]
    recs = images.evaluate_condition(backbone, specs, [s["text"] for s in specs], n_images, seed, gen,
                                     adapter=adapter, quality=True, progress=progress,
                                     desc=f"quality/step-{step}")
    return {"experiment": "quality", "command": f"python -m sur_lib.study.experiments quality --step {step} "
            f"--images {n_images}", "seed": seed, "versions": common.versions(), "model": minfo,
            "generation": gen.to_dict(), "images_per_prompt": n_images, "margin": MARGIN,
            "adapter": {"step": step, "dir": rel_path(folder), "digest": meta["digest"]},
            "base_source": source, "table": quality_table(base, recs),
            "records": {"base": base, "adapter": recs}, "wall_time_s": round(time.time() - t0, 1)}


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(prog="python -m sur_lib.study.experiments quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step", type=int, default=2000)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--out", default=str(common.RESULTS_DIR))
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    doc = run_quality(a.step, a.images, results=Path(a.out), progress=not a.no_progress)
    path = write_json(record_inputs(doc), Path(a.out) / "quality.json")
    t = doc["table"]["clean_render_distance"]
    print(f"wrote {rel_path(path)} ({doc['wall_time_s']:.0f} s): distance {t['paired']['mean_diff']:+.2f}, "
          f"90% CI {t['tost']['ci']}, equivalent within +-{MARGIN}: {t['tost']['equivalent']}")
    return 0


if __name__ == "__main__":
    from sur_lib.infra.cli import run as run_cli
    run_cli(main)


def verify_quality(doc: dict, backbone, current_digest: str, draws: int | None,
                   progress: bool = False, out: Path | str | None = None) -> list[dict]:
    """``verify`` for ``quality.json``: the table recomputed from its records, and the stored
    adapter's images re-drawn (``draws`` of them). The verify hooks' signature (``registry``;
    ``out`` is not used)."""
    from ..statistics import same_numbers
    from sur_lib.infra.provenance import ROOT
    from .checks import verify_images

    ok = same_numbers(quality_table(doc["records"]["base"], doc["records"]["adapter"], doc["margin"]), doc["table"])
    checks = [{"check": "quality: table", "ok": ok, "message": "recomputed from the records" + ("" if ok else ": DIFFERS")}]
    sub = {"model": doc["model"], "seed": doc["seed"], "generation": doc["generation"], "versions": doc["versions"],
           "conditions": {"quality adapter": {"records": doc["records"]["adapter"],
                                              "adapter": {"dir": str(ROOT / doc["adapter"]["dir"]),
                                                          "digest": doc["adapter"]["digest"]}}}}
    return checks + verify_images(sub, backbone, current_digest, draws, progress)
