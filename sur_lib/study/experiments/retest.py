"""The paper's loss-weight and teacher claims re-tested around a recipe that has trained enough.

    python -m sur_lib.study.experiments retest --recipe paper|tuned --steps N [--images 8]
        [--extended-images 4] [--max-minutes M] [--quick]

Around a recipe (``paper``: tiny.yaml as it is; ``tuned``: the choice in ``tune.json``, ours),
each variant is trained for the same ``--steps`` with the same code (``recipes.train_recipe``,
step_cache) and judged on the 45 test prompts (``--images``, 8) and the 150 extended held-out
prompts (``--extended-images``, 4: fewer, to fit the CPU budget; the first 4 of the 8 images a
run with 8 would draw):

* ``no_llm`` (lambda_LLM = 0: no teacher), ``no_cp`` (lambda_CP = 0: no alignment);
* ``strong_llm``, ``strong_cp``: the lambda at which that term's gradient is as large as
  L_simple's. It is read off the gradient-share measurement (``sur_lib.study.gradient_share``) of the
  trained recipe on training batches: lambda = ||grad L_simple|| / ||grad L_term|| (rounded to
  two significant digits, never below the recipe's own lambda: then the variant is the recipe
  itself, trained once and marked ``same_as``). The shares of every term, for
  the recipe and for every variant's own trained adapter, are in the results;
* ``path_official``: the authors' detached gradient path (L_simple does not reach the adapter);
* ``teacher_gemma`` (Gemma 3 270M), ``teacher_no_sink`` (SmolLM2 without its first token, an
  attention sink), ``teacher_oracle`` (not in the paper: ``sur_lib.study.oracle``, the prompt's true
  count, colour, shape and arrangement, projected to SmolLM2's width). Deviation: the teacher
  variants use ``strong_llm``'s lambda, so that the teacher is heard whatever share L_LLM has
  at the recipe's lambda (if that share is small, any teacher would give nearly the same
  adapter; if it is already as large as L_simple's, ``strong_llm`` is the recipe itself and
  the teachers run at the recipe's lambda). Each is compared with the recipe and with
  ``strong_llm`` (the same lambda with SmolLM2). How large the shares are is measured, not
  assumed: they are in the results.

Statistics per prompt set, per type and overall: the paired t-test (and Wilcoxon) over prompts
of each variant against the recipe (``statistics.compare``), Holm-corrected across the variants
(``statistics.holm``; the teacher-vs-strong_llm comparisons form a family of their own), and the
share of the simple-to-complex gap each closes (base model with the simple and with the
complex prompts on the same prompts and seeds: from ``convergence.json`` when it matches,
else drawn). Resumable: finished variants are kept in ``retest.partial.json`` and skipped.
Two jobs may run side by side (``jobs.run_units``): each unit (the strong lambdas, a variant's
run folder, a base condition) is claimed, and a job waits on the claim of a unit the other holds.
A variant is a ``runs.variant_unit`` (the loop ``ablations`` uses too).

Budget: 9 variants x (N steps x ~1.6 s + 45 x 8 + 150 x 4 images x ~1 s); at N = 2000 about
9 x 66 min ~ 10 CPU hours (1 thread beside another job). With ``--recipe paper`` at a step the
dose-response run stored (2,000 is one), the ``recipe`` variant is that run's adapter
(``recipes.train_recipe``'s ``reuse``; ``--no-reuse`` trains it again) and its test-prompt
records are convergence's, so only its extended set is drawn: about 8.8 CPU hours in all.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..statistics import compare, holm, summarize
from sur_lib.infra.fileio import clean_json, write_json
from sur_lib.infra.provenance import rel_path
from sur_lib.world import toyworld as tw
from .inputs import record_inputs
from . import common, jobs, recipes, runs, tune
from .convergence import gap_closed

VARIANTS = ("recipe", "no_llm", "no_cp", "strong_llm", "strong_cp", "path_official",
            "teacher_gemma", "teacher_no_sink", "teacher_oracle")
TEACHERS = ("teacher_gemma", "teacher_no_sink", "teacher_oracle")
SETS = ("test", "extended")


@dataclass
class RetestConfig:
    recipe: str = "paper"
    steps: int = 2000
    images: int = 8
    extended_images: int = 4
    measure_batches: int = 4
    seed: int = 0
    quick: bool = False
    max_minutes: float | None = None
    tune_file: str = str(common.RESULTS_DIR / "tune.json")
    out: str = str(common.RESULTS_DIR)
    progress: bool = True
    cache: bool = True
    reuse: str | None = None  # a dose-response run folder (recipes.train_recipe's ``reuse``)
    argv: tuple[str, ...] = ()

    def __post_init__(self):
        if self.recipe not in ("paper", "tuned"):
            raise ValueError(f"recipe must be paper or tuned, got {self.recipe!r}")

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None) -> "RetestConfig":
        ap = argparse.ArgumentParser(prog="python -m sur_lib.study.experiments retest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        ap.add_argument("--recipe", default="paper", choices=("paper", "tuned"))
        ap.add_argument("--steps", type=int, default=None, help="training steps (2000; quick 3)")
        ap.add_argument("--images", type=int, default=None, help="images per test prompt (8)")
        ap.add_argument("--extended-images", type=int, default=None, help="per extended prompt (4)")
        ap.add_argument("--measure-batches", type=int, default=None, help="gradient-share batches (4)")
        ap.add_argument("--tune-file", default=str(common.RESULTS_DIR / "tune.json"))
        ap.add_argument("--no-reuse", action="store_true", help=(
            "train a variant that is the dose-response run at one of its stored steps again "
            "instead of taking that run's adapter (the same weights)"))
        common.add_long_run_options(ap)
        a = common.parse_long_run_args(ap, argv)
        q = a.quick
        return cls(recipe=a.recipe, steps=a.steps or (3 if q else 2000), images=a.images or (2 if q else 8),
                   extended_images=a.extended_images or (2 if q else 4),
                   measure_batches=a.measure_batches or (1 if q else 4), seed=a.seed, quick=q,
                   max_minutes=a.max_minutes, tune_file=a.tune_file, out=a.out,
                   progress=not a.no_progress, cache=not a.no_cache,
                   reuse=common.reuse_dir(q, a.no_reuse),
                   argv=tuple(sys.argv[2:] if argv is None else argv))

    def generation(self) -> common.GenSettings:
        return common.GenSettings(steps=common.QUICK["sampler_steps"]) if self.quick else common.GenSettings()


def result_stem(rc: RetestConfig) -> str:
    """retest.json for the paper's recipe, retest-tuned.json for ours."""
    return "retest" if rc.recipe == "paper" else "retest-tuned"


def runs_dir(rc: RetestConfig) -> Path:
    """Where the variants' loss logs (and the recipe's adapter) are exported for ``verify``:
    data/runs/<retest|retest-tuned> beside data/results (``--out``'s parent)."""
    return Path(rc.out).parent / "runs" / (result_stem(rc) + ("-quick" if rc.quick else ""))


def recipe_knobs(rc: RetestConfig) -> dict:
    """The recipe's knobs (``tune``'s keys) with ``rc.steps``: tiny.yaml's, or tune's choice.

    The choice is read from ``tune.json``, or, before tune's final evaluation on the test
    prompts is done, from ``tune.partial.json``: its ``choice`` is written once, when every
    configuration has been judged on the tuning set, and never changes after."""
    if rc.recipe == "paper":
        return dict(tune.QUICK_PAPER if rc.quick else tune.PAPER, steps=rc.steps)
    path = Path(rc.tune_file)
    part = path.with_name(path.name.removesuffix(".json") + ".partial.json")
    doc = next((d for d in map(jobs.read, (path, part)) if "choice" in d), None)
    if doc is None:
        if not (path.is_file() or part.is_file()):
            raise FileNotFoundError(f"--recipe tuned needs {path} or {part.name} "
                                    "(python -m sur_lib.study.experiments tune)")
        raise ValueError(f"{path.name} has no choice yet: tune has not judged every configuration")
    knobs = {k: doc["choice"]["knobs"][k] for k in tune.PAPER}
    return dict(knobs, steps=rc.steps)


def better_recipe(tune_partial: dict, convergence: dict) -> dict:
    """Which recipe the re-test goes around, read on the TUNING SET only (step 4 of the plan:
    "around the better of the two recipes").

    The tuned choice (its tuning-set records in ``tune_partial["tried"]``) against the paper's
    settings at the dose-response plateau (``convergence["records"]["step-<plateau>/tuning"]``:
    the same 30 prompts and seeds), paired over prompts: ``tuned`` only if the 95% interval of
    the overall difference lies above 0, else ``paper`` (the paper's claims are about its own
    settings, so a tie goes to them)."""
    from ..statistics import compare

    if "choice" not in tune_partial:
        raise ValueError("tune has no choice yet: it has not judged every configuration")
    step = convergence["plateau"]["step"]
    idx = str(tune_partial["choice"]["index"])
    paper = convergence["records"][f"step-{step}/tuning"]
    cmp = compare(paper, tune_partial["tried"][idx]["records"])["overall"]
    lo, hi = cmp["paired"]["t_ci"]
    return {"recipe": "tuned" if lo > 0 else "paper", "tuned_index": int(idx),
            "paper_step": step, "tuned_minus_paper": cmp["diff"], "t_ci": [lo, hi],
            "n_prompts": cmp["n_prompts"],
            "rule": "tuned if its tuning-set overall accuracy beats the paper's settings at the "
                    "plateau (paired 95% CI above 0), else paper"}


def _round_sig(x: float, digits: int = 2) -> float:
    return float(f"{x:.{digits - 1}e}")


def strong_lambda(shares: dict, term: str, recipe_lambda: float) -> tuple[float, str]:
    """(lambda, how it was chosen) for ``strong_llm`` / ``strong_cp``."""
    from ..gradient_share import lambda_to_match

    lam = lambda_to_match(shares, term)
    if lam is None:  # e.g. the official path: L_simple sends no gradient to the adapter
        return (recipe_lambda * 1000 if recipe_lambda else 1.0), "no L_simple gradient: 1000x recipe"
    if _round_sig(lam) <= recipe_lambda:
        return recipe_lambda, ("the recipe's own lambda: at it the term's gradient is already at "
                               "least L_simple's")
    return _round_sig(lam), "||grad L_simple|| / ||grad term|| at the recipe"


def variant_overrides(base: dict, lam_llm: float, lam_cp: float) -> dict[str, tuple[dict, str]]:
    """{variant: (TrainConfig overrides, knowledge source)} around ``base`` overrides."""
    strong = dict(base, lambda_llm=lam_llm)
    return {"recipe": (base, "llm"), "no_llm": (dict(base, lambda_llm=0.0), "llm"),
            "no_cp": (dict(base, lambda_cp=0.0), "llm"), "strong_llm": (strong, "llm"),
            "strong_cp": (dict(base, lambda_cp=lam_cp), "llm"),
            # the official path needs a KL term to train anything (TrainConfig refuses it otherwise)
            "path_official": (dict(base, gradient_path="official", **(
                {} if base["lambda_llm"] or base["lambda_cp"] else {"lambda_llm": lam_llm})), "llm"),
            "teacher_gemma": (dict(strong, llm="gemma3-270m", llm_layer=-1), "llm"),
            "teacher_no_sink": (dict(strong, llm_drop_first=True), "llm"),
            "teacher_oracle": (strong, "oracle")}


def measure_shares(cfg, backbone, adapter, source: str, batches: int) -> dict:
    """Gradient shares of ``adapter`` (trained with ``cfg``) on training batches. Each KL term
    is measured with its lambda set to 1 when ``cfg``'s is 0 (an adapter without W0 gets the
    fixed W0 of ``w0_seed``), then reweighted to ``cfg``'s lambdas."""
    from ..gradient_share import measure, reweight
    from ..step_cache import run_inputs
    from sur_lib.train import build_adapter

    cfg_m = dataclasses.replace(cfg, lambda_llm=cfg.lambda_llm or 1.0, lambda_cp=cfg.lambda_cp or 1.0)
    knowledge = recipes.recipe_knowledge(cfg_m, source, progress=False)
    bb, ds = run_inputs(cfg_m, backbone, knowledge, progress=False)
    torch.manual_seed(cfg.seed)
    probe = build_adapter(cfg_m, backbone.text_dim, next(iter(knowledge.values())).shape[-1])
    missing, unexpected = probe.load_state_dict(adapter.state_dict(), strict=False)
    if unexpected or any(not m.startswith("llm_projection.") for m in missing):
        raise ValueError(f"adapter does not match its config: {missing} {unexpected}")
    raw = measure(cfg_m, bb, ds, probe, knowledge, batches)
    return {**reweight(raw, cfg.lambda_llm, cfg.lambda_cp), "raw_norm": raw["raw_norm"],
            "loss": raw["loss"], "batches": raw["batches"], "batch_size": raw["batch_size"]}


def run_retest(rc: RetestConfig, backbone=None, convergence_file: Path | None = None) -> tuple[dict, bool]:
    from .images import make_pipe

    t0, deadline = time.time(), jobs.Deadline(rc.max_minutes)
    backbone = backbone if backbone is not None else common.load_base()
    minfo, gen = common.model_info(backbone), rc.generation()
    knobs = recipe_knobs(rc)
    base = tune.overrides_of(knobs)
    specs = {s: recipes.prompt_set(s, rc.seed, rc.quick) for s in SETS}
    n_img = {"test": rc.images, "extended": rc.extended_images}
    settings = clean_json({"recipe": rc.recipe, "knobs": knobs, "images": n_img, "seed": rc.seed,
                           "generation": gen.to_dict(), "model_digest": minfo["unet_digest"],
                           "measure_batches": rc.measure_batches,
                           "prompts": {s: [p["id"] for p in v] for s, v in specs.items()}})
    name = result_stem(rc)
    ppath = Path(rc.out) / (f"{name}-quick.partial.json" if rc.quick else f"{name}.partial.json")
    partial = json.loads(ppath.read_text()) if ppath.is_file() else {}
    if partial.get("settings") != settings:
        partial = {"settings": settings, "variants": {}}
    run_root = common.WORK_DIR / ("retest-quick" if rc.quick else "retest")
    cache = common.WORK_DIR / "cache" if rc.cache else None
    pipe = make_pipe(backbone, gen)

    def config(over, source):
        return recipes.recipe_config(over, knobs["rows"], knobs["steps"], run_root, minfo["unet_digest"],
                                     rc.seed, source, batch_size=8 if rc.quick else None,
                                     progress=rc.progress)

    info = {"made_by": "python -m sur_lib.study.experiments retest"}
    reuse = Path(rc.reuse) if rc.reuse else None
    base_units = [f"{u}/{s}" for s in SETS for u in ("base_simple", "base_complex")]
    done = partial["variants"]

    def sync():  # what the other job has written (call under jobs.locked)
        jobs.merge(partial, ppath, ("variants",), ("lambdas", *base_units))

    def lambdas():  # the recipe first: its gradient shares choose the strong lambdas
        cfg = config(base, "llm")
        rr = recipes.train_recipe(cfg, backbone, info=info, progress=rc.progress, reuse=reuse)
        shares = measure_shares(cfg, backbone, rr.adapter, "llm", rc.measure_batches)
        (llm, how_llm), (cp, how_cp) = (strong_lambda(shares, "l_llm", cfg.lambda_llm),
                                        strong_lambda(shares, "l_cp", cfg.lambda_cp))
        return {"strong_llm": llm, "strong_cp": cp, "rule": {"l_llm": how_llm, "l_cp": how_cp},
                "recipe_shares": shares, "predicted_strong_shares": {
                    "strong_llm": _reweighted(shares, llm, cfg.lambda_cp),
                    "strong_cp": _reweighted(shares, cfg.lambda_llm, cp)}}

    def train_and_judge(var, over, source, cfg, run):
        def work():
            tv = time.time()
            rr = recipes.train_recipe(cfg, backbone, source, info=info, progress=rc.progress,
                                      reuse=reuse)
            res = {"overrides": over, "knowledge": source, "config": recipes.config_summary(cfg),
                   "run": run, "digest": rr.digest,  # loss log (and the recipe's adapter) for verify
                   "export": recipes.export_run(rr, runs_dir(rc) / var, with_adapter=var == "recipe"),
                   "shares": measure_shares(cfg, backbone, rr.adapter, source, rc.measure_batches),
                   "records": {}, "records_source": {}}
            for s in SETS:
                res["records"][s], res["records_source"][s] = recipes.recipe_records(
                    backbone, rr, specs[s], s, n_img[s], rc.seed, gen, minfo["unet_digest"],
                    pipe, cache, rc.progress, f"retest/{var}/{s}", convergence_file)
            if rr.copied_from is not None:
                res["copied_from"] = rel_path(rr.copied_from)
            return dict(res, seconds=round(time.time() - tv, 1))
        return work

    def drawn(key):
        s, field = key.split("/")[1], ("text" if key.startswith("base_simple") else "prompt")

        def work():
            recs, src = recipes.base_records(backbone, specs[s], s, field, n_img[s], rc.seed, gen,
                                             minfo["unet_digest"], pipe, cache, rc.progress,
                                             convergence_file)
            return {"source": src, "records": recs}
        return work

    def units():  # listed again on each pass: the strong variants once the lambdas are in
        # the recipe trains first, under its run folder's claim (as the variant recipe)
        yield jobs.Unit("lambdas", lambdas, partial, claim=runs.run_claim(config(base, "llm")))
        lam = partial.get("lambdas") or {}
        for var, (over, source) in variant_overrides(base, lam.get("strong_llm"),
                                                     lam.get("strong_cp")).items():
            if var in done or None in over.values():  # None: needs the strong lambdas
                continue
            cfg = config(over, source)
            run = rel_path(Path(cfg.output_dir))
            yield runs.variant_unit(var, cfg, done, train_and_judge(var, over, source, cfg, run),
                                    run=run, overrides=over)
        yield from (jobs.Unit(key, drawn(key), partial) for key in base_units)

    # two jobs share the variants; a job waits for what the other holds (and takes it over if
    # that job was killed) instead of leaving it
    jobs.run_units(partial, ppath, sync, units, deadline, wait=True)
    lam = partial.get("lambdas")
    complete = all(v in done for v in VARIANTS) and all(
        f"{u}/{s}" in partial for u in ("base_simple", "base_complex") for s in SETS)
    doc = {"experiment": "retest", "command": "python -m sur_lib.study.experiments retest " + " ".join(rc.argv),
           "seed": rc.seed, "quick": rc.quick, "versions": common.versions(), "recipe": rc.recipe,
           "label": "tiny.yaml as it is" if rc.recipe == "paper" else "ours: the tuned recipe (tune.json)",
           "where": "CPU (1 torch thread)", "step_cache": True, "model": minfo,
           "judge": common.judge_info(), "settings": settings, "lambdas": lam, "complete": complete,
           "variants": done, "base": {k: v for k, v in partial.items() if k.startswith("base_")}}
    if complete:
        doc["table"] = {s: table(done, partial[f"base_simple/{s}"]["records"],
                                 partial[f"base_complex/{s}"]["records"], s) for s in SETS}
    with jobs.locked(ppath):
        sync()
        doc["wall_time_s"] = jobs.add_job_time(partial, ppath, time.time() - t0)
        write_json(partial, ppath)
    return doc, complete


def _reweighted(shares: dict, lam_llm: float, lam_cp: float) -> dict:
    from ..gradient_share import reweight

    return reweight(shares, lam_llm, lam_cp)


def table(done: dict, base: list[dict], ceiling: list[dict], set_name: str) -> dict:
    """Per variant: summary, paired comparison with the recipe (Holm across the variants, per
    type and overall) and the share of the gap closed; teachers also against strong_llm."""
    ref = done["recipe"]["records"][set_name]
    sb, sc = summarize(base), summarize(ceiling)
    rows = {}
    for var in VARIANTS:
        recs = done[var]["records"][set_name]
        s = summarize(recs)
        rows[var] = {"summary": s, "gap_closed": {t: gap_closed(sb[t]["acc"], s[t]["acc"], sc[t]["acc"])
                                                 for t in s if t in sb and t in sc}}
        if var != "recipe":
            rows[var]["vs_recipe"] = compare(ref, recs)
        if var in TEACHERS:
            rows[var]["vs_strong_llm"] = compare(done["strong_llm"]["records"][set_name], recs)
    for key, family in (("vs_recipe", [v for v in VARIANTS if v != "recipe"]), ("vs_strong_llm", TEACHERS)):
        for t in list(tw.TEST_TYPES) + ["overall"]:
            for p in ("p_t", "p_wilcoxon"):
                ps = {v: (rows[v][key].get(t) or {}).get("paired", {}) for v in family}
                adj = holm({v: (ps[v] or {}).get(p) for v in family})
                for v in family:
                    if ps[v]:
                        ps[v][f"{p}_holm"] = adj[v]
    return {"base": sb, "ceiling": sc, "variants": rows,
            "holm": "per type and overall, across the 8 variants vs the recipe; across the 3 "
                    "teachers vs strong_llm"}


def preliminary(partial: dict) -> dict:
    """What a re-test that is still running (``retest.partial.json``) can already show, per
    set: each finished variant's summary and its paired difference to the recipe. NOT
    Holm-corrected and no verdict: the correction is across the whole family of ``table``,
    which exists only when every variant is in."""
    done = partial.get("variants", {})
    if "recipe" not in done:
        raise ValueError("the re-test has not finished its recipe yet: nothing to compare with")
    finished = [v for v in VARIANTS if v in done]
    sets = {}
    for s in SETS:
        ref = done["recipe"]["records"][s]
        sets[s] = {v: {"summary": summarize(done[v]["records"][s]),
                       **({} if v == "recipe" else {"vs_recipe": compare(ref, done[v]["records"][s])})}
                   for v in finished}
    return {"finished": finished, "missing": [v for v in VARIANTS if v not in done], "sets": sets}


VERIFY_REPLAY = ("recipe", "teacher_oracle")  # the LLM and the oracle knowledge paths


def verify_retest(doc: dict, backbone, current_digest: str, draws: int | None,
                  progress: bool = False, out: Path | str | None = None) -> list[dict]:
    """``verify`` for the re-test: the first training steps of ``VERIFY_REPLAY`` replayed
    against their stored loss logs, the step after each stored state of a variant copied from
    the dose-response run (``recipes.replay_stored_states``: 251, 501, 1001 of ``recipe``), and ``draws`` random images
    of the recipe's exported adapter re-drawn on the test prompts. The verify hooks' signature
    (``registry``; ``out`` is not used)."""
    from sur_lib.infra.provenance import ROOT
    from .checks import redraw_conditions

    if doc["model"]["unet_digest"] != current_digest:
        return [{"check": "base model", "ok": False, "message": (
            "the re-test was made with another base model: re-run retest")}]
    checks = []
    for var in VERIFY_REPLAY:
        export = ROOT / doc["variants"][var]["export"]["folder"]
        checks += [dict(c, check=f"{var}: {c['check']}") for c in
                   recipes.replay(export, backbone, progress=progress)]
    for var, v in doc["variants"].items():  # variants copied from the dose-response run: its stored states
        if v["export"].get("copied_from"):
            checks += recipes.replay_stored_states(ROOT / v["export"]["folder"], ROOT / v["export"]["copied_from"],
                                                   backbone, var, progress)
    rec = doc["variants"]["recipe"]
    ref = {"dir": str(ROOT / rec["export"]["dir"]), "digest": rec["export"]["digest"]}
    conditions = {"recipe/test": {"records": rec["records"]["test"], "adapter": ref}}
    return checks + redraw_conditions(doc, conditions, backbone, current_digest, draws, progress)


def main(argv: Sequence[str] | None = None) -> int:
    rc = RetestConfig.from_args(argv)
    doc, complete = run_retest(rc)
    if not complete:
        print(f"not complete yet ({len(doc['variants'])} of {len(VARIANTS)} variants): run the same "
              "command again to go on")
        return 0
    stem = result_stem(rc)
    path = write_json(record_inputs(doc), Path(rc.out) / (f"{stem}-quick.json" if rc.quick else f"{stem}.json"))
    print(f"wrote {rel_path(path)} ({doc['wall_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    from sur_lib.infra.cli import run as run_cli
    run_cli(main)
