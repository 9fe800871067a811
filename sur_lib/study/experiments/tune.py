"""A tuned recipe (ours, labelled as ours): the method's own knobs searched on the tuning set.

    python -m sur_lib.study.experiments tune [--configs 24] [--images 8] [--max-minutes M] [--quick]

Not in the paper (the paper gives one setting, appendix B.1). A seeded random search over the
knobs the SUR-adapter itself has (``SPACE``): training steps, learning rate, eta, lambda_LLM,
lambda_CP, the KL temperature T of Eq. 5 and 9, and SURD-mini's size (rows; the paper has
57k triples, ``sur`` uses 3,000). Configuration 0 is ``tiny.yaml`` as it is (the paper's
lambdas and eta, 500 steps, 3,000 rows); configurations 1.. are drawn uniformly and
independently per knob from ``SPACE`` with ``numpy.random.default_rng([seed, 10])``,
duplicates skipped. Each configuration is trained (``recipes.train_recipe``: step_cache, fp16
adapter) and judged on the TUNING SET ONLY (``convergence``'s: 10 fresh training-distribution
prompts per type, train nouns and phrasings, ``--images`` images each, the same seeds for
every configuration); its per-type accuracy with Wilson intervals and its paired difference
to configuration 0 are recorded in ``tune.partial.json`` as soon as it is done, and a
finished configuration is skipped on the next run (``--max-minutes`` stops between
configurations). Two jobs may run side by side (``jobs``: each configuration and each final
unit is claimed with a lock, results are merged under a lock).

The choice (``choose``) reads only those tuning-set summaries: the highest overall tuning
accuracy; ties go to fewer steps, then fewer rows, then the lower index. It is written to the
partial file (``choice``) before any test prompt is drawn. Then, once: the chosen recipe and
the paper's settings (tiny.yaml with the chosen number of steps: the same budget) on the 45
test prompts and the extended held-out set (``--extended-images``), beside the base model with
the simple and the complex prompts (from ``convergence.json`` when it has the same seeds, else
drawn), with paired tests over prompts and the share of the gap each closes; ``tune.json``.

Budget (defaults): 24 configurations, steps in {500, 1000, 2000} (26,500 steps in all for
seed 0), 30 tuning prompts x 8 images each. At ~1.6 s per step and ~1 s per image (1 CPU
thread beside another job, as ``convergence`` measured) that is ~13.4 CPU hours;
``budget_estimate`` states it in the results. The 12,000-row SURD-mini needs ~0.9 GB of
cached text-encoder states. ``--max-minutes`` is checked between configurations (one takes
up to ~1 hour). The best of 24 on 30 prompts is an optimistic estimate of its own tuning
accuracy (the winner's curse): that is why the test prompts judge it, once.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..statistics import compare, summarize
from sur_lib.infra.fileio import clean_json, write_json
from sur_lib.infra.provenance import rel_path
from .inputs import record_inputs
from . import common, jobs, recipes
from .convergence import gap_closed, minimum_detectable_effect

SPACE = {"steps": (500, 1000, 2000), "learning_rate": (3e-5, 1e-4, 3e-4, 1e-3),
         "eta": (0.05, 0.1, 0.3, 1.0), "lambda_llm": (0.0, 1e-5, 1e-3, 1e-1, 1.0),
         "lambda_cp": (0.0, 1e-5, 1e-3, 1e-1, 1.0), "temperature": (0.5, 1.0, 2.0, 4.0),
         "rows": (3000, 6000, 12000)}
QUICK_SPACE = dict(SPACE, steps=(2, 4), rows=(48, 64))
PAPER = {"steps": 500, "learning_rate": 1e-4, "eta": 0.1, "lambda_llm": 1e-5, "lambda_cp": 1e-5,
         "temperature": 1.0, "rows": common.SURD_MINI_ROWS}  # tiny.yaml as it is
QUICK_PAPER = dict(PAPER, steps=2, rows=64)
S_PER_STEP, S_PER_IMAGE = 1.6, 1.0  # measured by convergence (1 thread beside another job)


@dataclass
class TuneConfig:
    configs: int = 24
    images: int = 8
    extended_images: int = 8
    seed: int = 0
    quick: bool = False
    max_minutes: float | None = None
    out: str = str(common.RESULTS_DIR)
    progress: bool = True
    cache: bool = True
    reuse: str | None = None  # a dose-response run folder (recipes.train_recipe's ``reuse``)
    redo: tuple[int, ...] = ()  # configurations to train and judge again (``redo``)
    argv: tuple[str, ...] = ()

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None) -> "TuneConfig":
        ap = argparse.ArgumentParser(prog="python -m sur_lib.study.experiments tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        ap.add_argument("--configs", type=int, default=None, help="configurations (24; quick 3)")
        ap.add_argument("--images", type=int, default=None, help="images per prompt (8; quick 2)")
        ap.add_argument("--extended-images", type=int, default=None)
        ap.add_argument("--no-reuse", action="store_true", help=(
            "train the paper's settings again instead of taking the dose-response run's "
            "adapter at the same step (the same weights)"))
        ap.add_argument("--redo", default="", help=(
            "configurations to train and judge again, comma-separated indices (once: their old "
            "records move to 'superseded'; the choice and the chosen recipe's final units are "
            "made again)"))
        common.add_long_run_options(ap)
        a = common.parse_long_run_args(ap, argv)
        images = a.images or (2 if a.quick else 8)
        try:
            redo = tuple(int(x) for x in a.redo.split(",") if x.strip())
        except ValueError:
            ap.error(f"--redo takes comma-separated configuration indices, got {a.redo!r}")
        return cls(configs=a.configs or (3 if a.quick else 24), images=images,
                   extended_images=a.extended_images or images, seed=a.seed, quick=a.quick,
                   max_minutes=a.max_minutes, out=a.out, progress=not a.no_progress,
                   cache=not a.no_cache, reuse=common.reuse_dir(a.quick, a.no_reuse), redo=redo,
                   argv=tuple(sys.argv[2:] if argv is None else argv))

    def generation(self) -> common.GenSettings:
        return common.GenSettings(steps=common.QUICK["sampler_steps"]) if self.quick else common.GenSettings()


def search_space(n: int, seed: int = 0, quick: bool = False) -> list[dict]:
    """Configuration 0 = the paper's settings (tiny.yaml); then ``n - 1`` distinct draws."""
    space, paper = (QUICK_SPACE, QUICK_PAPER) if quick else (SPACE, PAPER)
    rng = np.random.default_rng([seed, 10])
    out, seen = [dict(paper)], {json.dumps(paper, sort_keys=True)}
    for _ in range(10_000):
        if len(out) >= n:
            break
        c = {k: v[int(rng.integers(len(v)))] for k, v in space.items()}
        key = json.dumps(c, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return [dict(c, index=i) for i, c in enumerate(out)]


def overrides_of(knobs: dict) -> dict:
    """TrainConfig overrides of a configuration (steps and rows are set by ``recipe_config``)."""
    return {k: knobs[k] for k in ("learning_rate", "eta", "lambda_llm", "lambda_cp", "temperature")}


def budget_estimate(configs: Sequence[dict], n_prompts: int, images: int) -> dict:
    steps = sum(c["steps"] for c in configs)
    secs = steps * S_PER_STEP + len(configs) * n_prompts * images * S_PER_IMAGE
    return {"configurations": len(configs), "training_steps": steps, "tuning_images":
            len(configs) * n_prompts * images, "s_per_step": S_PER_STEP, "s_per_image": S_PER_IMAGE,
            "cpu_hours": round(secs / 3600, 2)}


def choose(tried: dict[str, dict]) -> dict:
    """The best configuration by tuning-set overall accuracy (ties: fewer steps, fewer rows,
    lower index). ``tried``: {index: {"knobs", "tuning": summarize(...)}}; nothing else is read."""
    if not tried:
        raise ValueError("choose: no configuration has been evaluated")
    best = min(tried.values(), key=lambda r: (-r["tuning"]["overall"]["acc"], r["knobs"]["steps"],
                                              r["knobs"]["rows"], r["knobs"]["index"]))
    return {"index": best["knobs"]["index"], "knobs": best["knobs"],
            "tuning_overall": best["tuning"]["overall"], "rule": "max tuning overall accuracy; "
            "ties: fewer steps, fewer rows, lower index"}


def redo(partial: dict, indices: Sequence[int], n_configs: int) -> list[str]:
    """Mark configurations ``indices`` to be trained and judged again, once each: their records
    move to ``partial["superseded"][index]`` (kept, as measured), the choice moves to
    ``superseded["choice"]``, and the chosen recipe's final units (``tuned/...``) go with it;
    the paper-settings units stay unless the new choice has another number of steps (then
    ``run_tune`` moves them too). Indices already redone (``partial["redone"]``) are skipped, so
    the same command resumes instead of starting over, and so are indices not judged yet (a
    fresh search judges them anyway). Returns the indices marked now.

    Why it exists: knowledge vectors used to be computed in padded batches, which changed them
    at rounding level with their batch companions, so configuration 9 (lambda_LLM = 0.1)
    trained again to another adapter than the one judged and could not be exported."""
    bad = [i for i in indices if not 0 <= i < n_configs]
    if bad:
        raise ValueError(f"--redo: no configuration {bad} (this search has 0..{n_configs - 1})")
    done_before = set(partial.setdefault("redone", []))
    now = [str(i) for i in indices if str(i) not in done_before and str(i) in partial["tried"]]
    if not now:
        return []
    sup = partial.setdefault("superseded", {})
    for key in now:
        if key in partial["tried"]:
            sup[key] = partial["tried"].pop(key)
    if "choice" in partial:
        sup["choice"] = partial.pop("choice")
        final = partial.get("final", {})
        for name in [u for u in final if u.startswith("tuned/")]:
            sup[f"final/{name}"] = final.pop(name)
    partial["redone"] += now
    return now


def runs_dir(tc: TuneConfig) -> Path:
    """Where the chosen recipe is exported: data/runs/tune beside data/results (``--out``'s parent)."""
    return Path(tc.out).parent / "runs" / ("tune-quick" if tc.quick else "tune")


def _config(tc: TuneConfig, knobs: dict, minfo: dict):
    run_root = common.WORK_DIR / ("tune-quick" if tc.quick else "tune")
    return recipes.recipe_config(overrides_of(knobs), knobs["rows"], knobs["steps"], run_root,
                                 minfo["unet_digest"], tc.seed, batch_size=8 if tc.quick else None,
                                 progress=tc.progress)


def _train(tc: TuneConfig, knobs: dict, backbone, minfo: dict):
    return recipes.train_recipe(_config(tc, knobs, minfo), backbone,
                                info={"made_by": "python -m sur_lib.study.experiments tune"},
                                progress=tc.progress, reuse=tc.reuse and Path(tc.reuse))


def run_tune(tc: TuneConfig, backbone=None, convergence_file: Path | None = None) -> tuple[dict, bool]:
    """Search, choose, then evaluate the choice once. Returns (document, complete)."""
    from .images import make_pipe

    t0, deadline = time.time(), jobs.Deadline(tc.max_minutes)
    backbone = backbone if backbone is not None else common.load_base()
    minfo, gen = common.model_info(backbone), tc.generation()
    configs = search_space(tc.configs, tc.seed, tc.quick)
    tuning = recipes.prompt_set("tuning", tc.seed, tc.quick)
    settings = clean_json({"configs": configs, "images": tc.images, "seed": tc.seed,
                           "extended_images": tc.extended_images, "generation": gen.to_dict(),
                           "model_digest": minfo["unet_digest"], "tuning_prompts": [p["id"] for p in tuning]})
    ppath = Path(tc.out) / ("tune-quick.partial.json" if tc.quick else "tune.partial.json")
    partial = json.loads(ppath.read_text()) if ppath.is_file() else {}
    if partial.get("settings") != settings:
        partial = {"settings": settings, "tried": {}}
    cache = common.WORK_DIR / "cache" if tc.cache else None
    pipe = make_pipe(backbone, gen)
    tried = partial["tried"]

    def sync():  # what the other job has written (call under jobs.locked)
        jobs.merge(partial, ppath, ("tried", "final"), ("choice",))

    if tc.redo:
        with jobs.locked(ppath):
            partial = json.loads(ppath.read_text()) if ppath.is_file() else partial
            if partial.get("settings") != settings:
                partial = {"settings": settings, "tried": {}}
            marked = redo(partial, tc.redo, len(configs))
            for key in marked:  # its run folder was trained with what is being redone
                shutil.rmtree(_config(tc, configs[int(key)], minfo).output_dir, ignore_errors=True)
            if marked:
                write_json(partial, ppath)
                print(f"tune: configurations {', '.join(marked)} will be trained and judged again",
                      flush=True)
        tried = partial["tried"]

    def config_unit(knobs):
        key = str(knobs["index"])

        def judged():
            tv = time.time()
            rr = _train(tc, knobs, backbone, minfo)
            recs = recipes.evaluate(backbone, rr.adapter, tuning, tc.images, tc.seed, gen, pipe,
                                    cache=cache, progress=tc.progress, desc=f"tune/{key}")
            return {"knobs": knobs, "run": rel_path(rr.folder), "digest": rr.digest,
                    "tuning": summarize(recs), "records": recs, "seconds": round(time.time() - tv, 1)}

        return jobs.Unit(key, judged, tried, claim=f"config-{key}")

    # phase 1: the search, tuning set only (a configuration another job holds is left to it)
    jobs.run_units(partial, ppath, sync, [config_unit(k) for k in configs], deadline)
    with jobs.locked(ppath):
        sync()
    doc = {"experiment": "tune", "command": "python -m sur_lib.study.experiments tune " + " ".join(tc.argv),
           "seed": tc.seed, "quick": tc.quick, "versions": common.versions(),
           "label": "ours: a recipe tuned by this book, not the paper's",
           "where": "CPU (1 torch thread)", "step_cache": True, "model": minfo,
           "judge": common.judge_info(), "settings": settings, "space": QUICK_SPACE if tc.quick else SPACE,
           "budget_estimate": budget_estimate(configs, len(tuning), tc.images)}
    if len(tried) < len(configs):  # not all done (or another job is still on one)
        with jobs.locked(ppath):
            sync()
            jobs.add_job_time(partial, ppath, time.time() - t0)
            write_json(partial, ppath)
        return {**doc, "tried": tried, "complete": False}, False
    base_recs = tried["0"]["records"]
    for r in tried.values():
        r["vs_paper_settings"] = compare(base_recs, r["records"])
    with jobs.locked(ppath):  # phase 2: the choice, from tuning-set summaries only
        sync()
        if "choice" not in partial:
            partial["choice"] = choose({k: {"knobs": v["knobs"], "tuning": v["tuning"]}
                                        for k, v in tried.items()})
            old = partial.get("superseded", {}).get("choice")
            if old and old["knobs"]["steps"] != partial["choice"]["knobs"]["steps"]:
                for name in [u for u in partial.get("final", {}) if u.startswith("paper_settings/")]:
                    partial["superseded"][f"final/{name}"] = partial["final"].pop(name)
            write_json(partial, ppath)  # written before any test prompt is drawn
    choice = partial["choice"]
    final = partial.setdefault("final", {})
    best = dict(choice["knobs"])
    paper = dict(QUICK_PAPER if tc.quick else PAPER, steps=best["steps"], index="paper")

    def tested(name, knobs, specs, n, set_name):
        def work():
            # the training is claimed too: two units of one recipe never train it at once (a
            # job waits for the other's training, then loads the stored adapter)
            held = jobs.claim(ppath, f"train-{name}", wait=True)
            try:
                rr = _train(tc, knobs, backbone, minfo)
            finally:
                held.close()
            recs, src = recipes.recipe_records(
                backbone, rr, specs, set_name, n, tc.seed, gen, minfo["unet_digest"], pipe,
                cache, tc.progress, f"tune/{name}/{set_name}", convergence_file)
            out = {"digest": rr.digest, "records": recs, "source": src}
            if rr.copied_from is not None:
                out["copied_from"] = rel_path(rr.copied_from)
            return out
        return work

    def drawn(field, specs, n, set_name):
        def work():
            recs, src = recipes.base_records(backbone, specs, set_name, field, n, tc.seed, gen,
                                             minfo["unet_digest"], pipe, cache, tc.progress,
                                             convergence_file)
            return {"source": src, "records": recs}
        return work

    finals = []  # phase 3, once: claimed like the configurations
    for set_name, n in (("test", tc.images), ("extended", tc.extended_images)):
        specs = recipes.prompt_set(set_name, tc.seed, tc.quick)
        finals += [jobs.Unit(f"{name}/{set_name}", tested(name, knobs, specs, n, set_name), final,
                             claim=f"final-{name}/{set_name}")
                   for name, knobs in (("tuned", best), ("paper_settings", paper))]
        finals += [jobs.Unit(f"{name}/{set_name}", drawn(field, specs, n, set_name), final,
                             claim=f"final-{name}/{set_name}")
                   for field, name in (("text", "base_simple"), ("prompt", "base_complex"))]
    jobs.run_units(partial, ppath, sync, finals, deadline)
    units = [f"{a}/{s}" for s in ("test", "extended")
             for a in ("tuned", "paper_settings", "base_simple", "base_complex")]
    complete = all(u in final for u in units)
    doc.update(tried=tried, choice=choice, paper_settings=paper, complete=complete,
               **{k: partial[k] for k in ("superseded", "redone") if k in partial})
    if complete:  # the chosen recipe's adapter and loss log, committed for verify
        rr = _train(tc, best, backbone, minfo)  # retrained where this machine lost it
        judged_digest = tried[str(choice["index"])]["digest"]
        if rr.digest != judged_digest:
            raise RuntimeError(f"the chosen recipe trained again to {rr.digest[:12]}, not the adapter "
                               f"judged on the tuning set ({judged_digest[:12]}): training is not "
                               "deterministic on this machine, so its results cannot be exported")
        doc["tuned_run"] = recipes.export_run(rr, runs_dir(tc) / "tuned")
        doc["final"] = {s: final_block({a: final[f"{a}/{s}"]["records"] for a in
                                        ("tuned", "paper_settings", "base_simple", "base_complex")})
                        for s in ("test", "extended")}
        doc["final_records"] = final
    with jobs.locked(ppath):
        sync()
        doc["wall_time_s"] = jobs.add_job_time(partial, ppath, time.time() - t0)
        write_json(partial, ppath)
    return doc, complete


def final_block(recs: dict[str, list[dict]]) -> dict:
    """Summaries, paired tests (tuned vs paper settings, each vs the base model), the share of
    the simple-to-complex gap closed and the minimum detectable effect of tuned vs paper."""
    out = {k: summarize(v) for k, v in recs.items()}
    out["tuned_vs_paper_settings"] = compare(recs["paper_settings"], recs["tuned"])
    base, ceil = out["base_simple"], out["base_complex"]
    for name in ("tuned", "paper_settings"):
        out[f"{name}_vs_base"] = compare(recs["base_simple"], recs[name])
        out[f"{name}_gap_closed"] = {t: gap_closed(base[t]["acc"], out[name][t]["acc"], ceil[t]["acc"])
                                     for t in out[name] if t in base and t in ceil}
    by = {r["id"]: r["acc"] for r in recs["paper_settings"]}
    out["mde_80_tuned_vs_paper"] = {t: minimum_detectable_effect(
        [r["acc"] - by[r["id"]] for r in recs["tuned"] if t == "overall" or r["type"] == t])
        for t in out["tuned"]}
    return out


def verify_tune(doc: dict, backbone, current_digest: str, draws: int | None,
                progress: bool = False, out: Path | str | None = None) -> list[dict]:
    """``verify`` for the tuned recipe: the choice recomputed from the stored tuning-set
    summaries, those summaries from their records, the chosen recipe's first training steps
    replayed against its stored loss log, and ``draws`` random images of the exported adapter
    re-drawn on the tuning and the test prompts. The verify hooks' signature (``registry``;
    ``out`` is not used)."""
    from sur_lib.infra.provenance import ROOT
    from .checks import redraw_conditions

    if doc["model"]["unet_digest"] != current_digest:
        return [{"check": "base model", "ok": False, "message": (
            "the tuned recipe was made with another base model: re-run tune")}]
    tried = doc["tried"]
    again = choose({k: {"knobs": v["knobs"], "tuning": v["tuning"]} for k, v in tried.items()})
    checks = [{"check": "tune: the choice from the stored tuning-set summaries",
               "ok": again["index"] == doc["choice"]["index"],
               "message": f"recomputed {again['index']}, stored {doc['choice']['index']}"}]
    bad = [k for k, v in tried.items() if summarize(v["records"])["overall"] != v["tuning"]["overall"]]
    checks.append({"check": "tune: tuning-set summaries from their records", "ok": not bad,
                   "message": f"{len(tried) - len(bad)}/{len(tried)} agree" + (f"; not {bad}" if bad else "")})
    checks += recipes.replay(ROOT / doc["tuned_run"]["folder"], backbone, progress=progress)
    ref = {"dir": str(ROOT / doc["tuned_run"]["dir"]), "digest": doc["tuned_run"]["digest"]}
    conditions = {"tuned/tuning": {"records": tried[str(doc["choice"]["index"])]["records"], "adapter": ref},
                  "tuned/test": {"records": doc["final_records"]["tuned/test"]["records"], "adapter": ref}}
    return checks + redraw_conditions(doc, conditions, backbone, current_digest, draws, progress)


def main(argv: Sequence[str] | None = None) -> int:
    tc = TuneConfig.from_args(argv)
    doc, complete = run_tune(tc)
    if not complete:
        print(f"not complete yet ({len(doc['tried'])} of {tc.configs} configurations): run the same "
              "command again to go on")
        return 0
    path = write_json(record_inputs(doc), Path(tc.out) / ("tune-quick.json" if tc.quick else "tune.json"))
    print(f"wrote {rel_path(path)} (choice: configuration {doc['choice']['index']}, "
          f"{doc['wall_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    from sur_lib.infra.cli import run as run_cli
    run_cli(main)
