"""Dose-response: the SUR-adapter trained to the paper's 5,000 steps, evaluated along the way.

    python -m sur_lib.study.experiments convergence [--steps 5000] [--images 8] [--phase all]

The paper trains the adapter for 5,000 steps (appendix B.1); ``sur`` trains 500. This
experiment trains ``tiny.yaml`` exactly as it is (lambdas 1e-5, eta 0.1, lr 1e-4 constant
after a 25-step warm-up, batch 32) to ``--steps``, keeps the adapter at log-spaced steps
(``EVAL_STEPS``) and evaluates each one with the same seeds on

* the tuning set: fresh training-distribution prompts (train nouns and phrasings,
  ``train_distribution_prompts(VAL_PER_TYPE, seed + 1)``, whose first five per type are the
  tuning set of ``sur``): what any choice of a setting may look at;
* the 45 fixed held-out test prompts;
* at the last step, also the extended held-out set (150 prompts, ``extended_prompts``);

next to the base model with the simple prompts and with their complex counterparts (the
ceiling), on the same prompts and seeds. ``--images`` (8) images per prompt.

Training uses ``step_cache`` (text-encoder states and decoded images computed once; the
results file says ``"step_cache": true``), runs in ``data/runs/convergence/`` and resumes
from its latest checkpoint (every 250 steps), so the run can be spread over several sessions:
``--phase train`` only trains, ``--phase eval`` only evaluates the adapters that exist,
``--max-minutes`` stops either phase cleanly between units of work. Finished evaluations
are kept in ``convergence.partial.json`` and skipped on the next run; several ``--phase eval``
jobs may run side by side (each unit is claimed with a file lock, results are merged under a
lock). The final ``convergence.json`` is written when every step has been evaluated.
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

from sur_lib.world import toyworld as tw
from ..statistics import compare, gap_closed, minimum_detectable_effect, summarize  # noqa: F401
from sur_lib.infra.fileio import write_json
from sur_lib.infra.provenance import ROOT, rel_path
from sur_lib.world import prompts
from . import common, images, jobs, runs
from .inputs import record_inputs

EVAL_STEPS = (0, 250, 500, 1000, 2000, 3500, 5000)
STEPS = 5000
CHECKPOINT_EVERY = 250
VAL_PER_TYPE = 10
IMAGES = 8
RUN_DIR = common.DOSE_RESPONSE_DIR
QUICK = dict(steps=6, eval_steps=(0, 3, 6), images=2, val_per_type=1, prompts_per_type=1,
             rows=64, batch_size=8, checkpoint_every=3)


@dataclass
class ConvergenceConfig:
    """Everything that decides the experiment (``from_args`` builds it from the CLI)."""

    steps: int = STEPS
    eval_steps: tuple[int, ...] = EVAL_STEPS
    images: int = IMAGES
    val_per_type: int = VAL_PER_TYPE
    prompts_per_type: int | None = None  # None: all 15 test prompts per type
    extended: bool = True  # the extended held-out set at the last step
    rows: int = common.SURD_MINI_ROWS
    seed: int = 0
    batch_size: int | None = None  # None: tiny.yaml's
    checkpoint_every: int = CHECKPOINT_EVERY
    phase: str = "all"  # "train", "eval" or "all"
    max_minutes: float | None = None
    run_dir: str = str(RUN_DIR)
    out: str = str(common.RESULTS_DIR)
    quick: bool = False
    progress: bool = True
    cache: bool = True
    argv: tuple[str, ...] = ()

    def __post_init__(self):
        if self.phase not in ("train", "eval", "all"):
            raise ValueError(f"phase must be train, eval or all, got {self.phase!r}")
        steps = sorted(set(int(s) for s in self.eval_steps))
        if not steps or steps[0] < 0 or steps[-1] != self.steps:
            raise ValueError(f"eval_steps must be >= 0 and end at steps={self.steps}, got {steps}")
        self.eval_steps = tuple(steps)

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None) -> "ConvergenceConfig":
        ap = argparse.ArgumentParser(prog="python -m sur_lib.study.experiments convergence",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        ap.add_argument("--steps", type=int, default=None)
        ap.add_argument("--eval-steps", default=None, help="comma-separated, ending at --steps")
        ap.add_argument("--images", type=int, default=None)
        ap.add_argument("--phase", default="all", choices=("train", "eval", "all"))
        ap.add_argument("--run-dir", default=None)
        ap.add_argument("--no-extended", action="store_true")
        common.add_long_run_options(ap)
        a = common.parse_long_run_args(ap, argv)
        q = QUICK if a.quick else {}
        steps = a.steps or q.get("steps", STEPS)
        eval_steps = (tuple(int(s) for s in a.eval_steps.split(",")) if a.eval_steps
                      else q.get("eval_steps", EVAL_STEPS))
        run_dir = a.run_dir or str(common.WORK_DIR / "convergence-quick" if a.quick else RUN_DIR)
        return cls(steps=steps, eval_steps=eval_steps, images=a.images or q.get("images", IMAGES),
                   val_per_type=q.get("val_per_type", VAL_PER_TYPE),
                   prompts_per_type=q.get("prompts_per_type"), extended=not a.no_extended,
                   rows=q.get("rows", common.SURD_MINI_ROWS), seed=a.seed,
                   batch_size=q.get("batch_size"),
                   checkpoint_every=q.get("checkpoint_every", CHECKPOINT_EVERY), phase=a.phase,
                   max_minutes=a.max_minutes, run_dir=run_dir, out=a.out, quick=a.quick,
                   progress=not a.no_progress, cache=not a.no_cache,
                   argv=tuple(sys.argv[2:] if argv is None else argv))


# ----------------------------------------------------------------------------- training


def _train_cfg(cc: ConvergenceConfig, data_dir: Path, digest: str, max_steps: int):
    over = {"max_steps": max_steps, "checkpoint_every": cc.checkpoint_every, "keep_checkpoints": 1}
    if cc.batch_size:
        over["batch_size"] = cc.batch_size
    cfg = runs.train_config(over, data_dir, cc.seed, Path(cc.run_dir), digest, cc.progress)
    cfg.output_dir = str(Path(cc.run_dir) / "train")  # one folder for every max_steps
    return cfg


def _run_key(cfg) -> dict:
    """What must not change between sessions of the same run (the run length may)."""
    return runs.config_key(cfg.to_dict(), skip=("max_steps",))


def adapter_dir(cc: ConvergenceConfig, step: int) -> Path:
    return Path(cc.run_dir) / "adapters" / f"step-{step:05d}"


def run_training(cc: ConvergenceConfig, backbone, minfo: dict, deadline: jobs.Deadline) -> list[int]:
    """Train to every step of ``eval_steps`` in turn (``runs.train_adapter`` on the step cache;
    each call resumes from the last checkpoint) and store the adapter of each as fp16 in ``adapters/step-N``. Returns the
    steps whose adapters exist."""
    from ..step_cache import run_inputs
    from sur_lib.train import build_adapter

    data_dir = runs.surd_mini(cc.rows, cc.seed, cc.progress)
    run = Path(cc.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    cfg0 = _train_cfg(cc, data_dir, minfo["unet_digest"], cc.steps)
    key = {"train": _run_key(cfg0), "data": data_dir.name, "model": minfo["unet_digest"]}
    key_file = run / "run.json"
    if key_file.is_file():
        stored = json.loads(key_file.read_text())
        if stored != key:
            raise ValueError(f"{key_file} was made with other settings; use another --run-dir "
                             f"(differs in {sorted(k for k in key if stored.get(k) != key[k])})")
    else:
        write_json(key, key_file)

    done = [s for s in cc.eval_steps if (adapter_dir(cc, s) / "sur_adapter.json").is_file()]
    todo = [s for s in cc.eval_steps if s not in done]
    if not todo:
        return done
    knowledge = runs.llm_knowledge(cfg0, cc.progress)
    inputs = run_inputs(cfg0, backbone, knowledge, cc.progress)  # built once for every step
    info = {"made_by": "python -m sur_lib.study.experiments convergence", "seed": cc.seed,
            "base_model": minfo, "surd_mini": {"rows": cc.rows, "seed": cc.seed},
            "step_cache": True}
    for step in todo:
        if deadline.passed():
            break
        if step == 0:  # the adapter as train() initialises it, before any update
            torch.manual_seed(cfg0.seed)
            llm_dim = next(iter(knowledge.values())).shape[-1] if knowledge else None
            adapter = build_adapter(cfg0, backbone.text_dim, llm_dim)
        else:
            cfg = _train_cfg(cc, data_dir, minfo["unet_digest"], step)
            adapter = runs.train_adapter(cfg, backbone, knowledge=knowledge, inputs=inputs,
                                         progress=cc.progress).adapter
        runs.save_adapter(adapter, adapter_dir(cc, step),
                        dict(info, step=step, train_config={
                            k: v for k, v in cfg0.to_dict().items() if k not in runs.PATH_KEYS
                            and k != "max_steps"}))
        done.append(step)
    return sorted(done)


# ----------------------------------------------------------------------------- evaluation


def prompt_sets(cc: ConvergenceConfig) -> dict[str, list[dict]]:
    from sur_lib.world.extended_prompts import extended_prompts

    sets = {"tuning": prompts.train_distribution_prompts(cc.val_per_type, cc.seed + 1),
            "test": prompts.select_prompts(tw.test_prompts(), cc.prompts_per_type)}
    if cc.extended:
        ext = extended_prompts()
        sets["extended"] = prompts.select_prompts(ext, cc.prompts_per_type) if cc.quick else ext
    return sets


def _partial_path(cc: ConvergenceConfig) -> Path:
    return Path(cc.out) / ("convergence-quick.partial.json" if cc.quick else "convergence.partial.json")


def _units(cc: ConvergenceConfig) -> list[tuple[str, str, int | None, str]]:
    """(unit name, prompt set, adapter step or None, text field) in the order they run: the
    base model, then the last step (the headline, its long extended unit first, so that two
    jobs side by side do not end with one of them alone on it), then the other steps."""
    sets = ["tuning", "test"] + (["extended"] if cc.extended else [])
    units = [(f"base-simple/{s}", s, None, "text") for s in sets]
    units += [(f"base-complex/{s}", s, None, "prompt") for s in sets]
    last = cc.eval_steps[-1]
    units += [(f"step-{last}/{s}", s, last, "text")
              for s in (["extended"] if cc.extended else []) + ["test", "tuning"]]
    for step in cc.eval_steps[:-1]:
        for s in ("tuning", "test"):
            units.append((f"step-{step}/{s}", s, step, "text"))
    return units


def _merge_into(partial: dict, path: Path) -> dict:
    """Add what other evaluation jobs have written to ``path`` since we read it (and take its
    ``wall_time_s``, the job time summed so far, so a unit's write does not undo another
    job's sum)."""
    return jobs.merge(partial, path, ("records", "seconds", "adapters"))


def run_evaluation(cc: ConvergenceConfig, backbone, deadline: jobs.Deadline, done_steps: list[int],
                   partial: dict) -> dict:
    """Evaluate every unit of ``_units`` whose adapter exists and that is not done yet.

    Several evaluation jobs may run side by side (one torch thread each; ``jobs.run_units``):
    each unit is claimed before it starts and each finished unit is merged into the partial
    file under a lock, so no job overwrites another's results. A unit another job holds is
    left to it, and an adapter that is not stored yet is skipped; both are picked up by a later
    run, and a job picks up adapters that a training job stores while it runs."""
    gen = common.GenSettings()
    pipe = images.make_pipe(backbone, gen)
    sets = prompt_sets(cc)
    cache = common.WORK_DIR / "cache" if cc.cache else None
    ppath = _partial_path(cc)
    records = partial.setdefault("records", {})

    def unit(name: str, set_name: str, step: int | None, field: str) -> jobs.Unit:
        def work():
            adapter = runs.load_adapter(adapter_dir(cc, step)) if step is not None else None
            specs = sets[set_name]
            t0 = time.time()
            recs = images.evaluate_condition(
                backbone, specs, [s[field] for s in specs], cc.images, cc.seed, gen,
                adapter=adapter, pipe=pipe, progress=cc.progress, desc=f"convergence/{name}",
                cache=cache)
            return recs, round(time.time() - t0, 1)

        def put(result):  # the unit's records, its seconds and the adapter it judged
            records[name] = result[0]
            partial.setdefault("seconds", {})[name] = result[1]
            if step is not None:
                partial.setdefault("adapters", {})[str(step)] = {
                    "dir": rel_path(adapter_dir(cc, step)),
                    "digest": json.loads((adapter_dir(cc, step) / "sur_adapter.json")
                                         .read_text())["digest"]}

        return jobs.Unit(name, work, records, put=put)

    def units():  # a unit whose adapter is not stored yet is left for a later run
        for name, set_name, step, field in _units(cc):
            if step is None or (adapter_dir(cc, step) / "sur_adapter.json").is_file():
                yield unit(name, set_name, step, field)

    jobs.run_units(partial, ppath, lambda: _merge_into(partial, ppath), units, deadline)
    return partial


def summarize_curve(cc: ConvergenceConfig, records: dict) -> dict:
    """Per prompt set: the base and ceiling summaries, and per step the summary, the paired
    change against the base model, the share of the gap closed and the minimum detectable
    effect (80% power) of that paired comparison."""
    out = {}
    for set_name in ["tuning", "test"] + (["extended"] if cc.extended else []):
        base = records.get(f"base-simple/{set_name}")
        ceil = records.get(f"base-complex/{set_name}")
        block = {"base": summarize(base) if base else None,
                 "ceiling": summarize(ceil) if ceil else None, "steps": {}}
        for step in cc.eval_steps:
            recs = records.get(f"step-{step}/{set_name}")
            if not recs:
                continue
            s = {"summary": summarize(recs)}
            if base:
                s["change"] = compare(base, recs)
                by = {r["id"]: r["acc"] for r in base}
                s["mde_80"] = {}
                for t in list(tw.TEST_TYPES) + ["overall"]:
                    d = [r["acc"] - by[r["id"]] for r in recs if t == "overall" or r["type"] == t]
                    s["mde_80"][t] = minimum_detectable_effect(d)
                if ceil:
                    s["gap_closed"] = {
                        t: gap_closed(block["base"][t]["acc"], s["summary"][t]["acc"],
                                      block["ceiling"][t]["acc"])
                        for t in s["summary"] if t in block["base"] and t in block["ceiling"]}
            block["steps"][str(step)] = s
        out[set_name] = block
    return out


def plateau(cc: ConvergenceConfig, records: dict, set_name: str = "tuning",
            group: str = "overall") -> dict | None:
    """Where the curve stops rising within noise: each step's paired difference to the last
    step (over the prompts of ``set_name``, t interval), and ``step``, the first step from
    which every later step's interval contains 0. The budget of the re-tests is read off the
    tuning set, never the test prompts. None until the last step is evaluated."""
    last = records.get(f"step-{cc.eval_steps[-1]}/{set_name}")
    if not last:
        return None
    diffs = {}
    for step in cc.eval_steps:
        recs = records.get(f"step-{step}/{set_name}")
        if recs:
            c = compare(last, recs).get(group)
            ci = c["paired"]["t_ci"] if c and c["paired"] else (c["diff"], c["diff"])
            diffs[step] = {"diff": c["diff"], "t_ci": list(ci)}
    flat = [s for s in diffs if all(diffs[t]["t_ci"][0] <= 0 <= diffs[t]["t_ci"][1]
                                    for t in diffs if t >= s)]
    return {"set": set_name, "group": group, "against_step": cc.eval_steps[-1],
            "vs_last": {str(k): v for k, v in diffs.items()}, "step": min(flat) if flat else None}


def run(cc: ConvergenceConfig, backbone=None) -> tuple[dict, bool]:
    """Train and/or evaluate as far as the deadline allows. Returns (document, complete)."""
    t0 = time.time()
    deadline = jobs.Deadline(cc.max_minutes)
    backbone = backbone if backbone is not None else common.load_base()
    minfo = common.model_info(backbone)
    ppath = _partial_path(cc)
    partial = json.loads(ppath.read_text()) if ppath.is_file() else {}
    if partial and partial.get("model", {}).get("unet_digest") != minfo["unet_digest"]:
        raise ValueError(f"{ppath} was made with another base model; move it away first")
    partial.setdefault("model", minfo)
    done = sorted(s for s in cc.eval_steps if (adapter_dir(cc, s) / "sur_adapter.json").is_file())
    if cc.phase in ("train", "all"):
        done = run_training(cc, backbone, minfo, deadline)
    if cc.phase in ("eval", "all"):
        partial = run_evaluation(cc, backbone, deadline, done, partial)
    done = sorted(s for s in cc.eval_steps if (adapter_dir(cc, s) / "sur_adapter.json").is_file())
    if cc.phase != "train":  # job seconds, summed over every job that ran (some side by side)
        with jobs.locked(ppath):
            _merge_into(partial, ppath)  # takes the file's sum so far
    partial["wall_time_s"] = round(partial.get("wall_time_s", 0.0) + time.time() - t0, 1)
    records = partial.get("records", {})
    complete = all(u[0] in records for u in _units(cc))
    doc = {"experiment": "convergence",
           "command": "python -m sur_lib.study.experiments convergence " + " ".join(cc.argv),
           "seed": cc.seed, "quick": cc.quick, "versions": common.versions(),
           "settings": {k: v for k, v in dataclasses.asdict(cc).items()
                        if k not in ("argv", "out", "run_dir", "progress", "cache", "phase",
                                     "max_minutes")},
           "where": "CPU (2-core project machine, 1 torch thread per job)",
           "step_cache": True, "model": minfo, "judge": common.judge_info(),
           "generation": common.GenSettings().to_dict(), "images_per_prompt": cc.images,
           "adapters": partial.get("adapters", {}), "adapter_steps_trained": done,
           "train_log": rel_path(Path(cc.run_dir) / "train" / "log.csv"),
           "prompt_sets": {k: [p["id"] for p in v] for k, v in prompt_sets(cc).items()},
           "curve": summarize_curve(cc, records), "plateau": plateau(cc, records),
           "records": records,
           "seconds": partial.get("seconds", {}), "complete": complete,
           "wall_time_s": partial["wall_time_s"]}
    if cc.phase != "train":  # only evaluation jobs write the partial file (a training job
        with jobs.locked(ppath):  # may run beside them)
            _merge_into(partial, ppath)
            partial.update({k: doc[k] for k in ("command", "versions", "wall_time_s")})
            write_json(partial, ppath)
    return doc, complete


VERIFY_UNITS = ("base-simple/test", f"step-{STEPS}/test")  # and re-draws a few of these images


def verify_convergence(doc: dict, backbone, current_digest: str, draws: int | None,
                       progress: bool = False, out: Path | str | None = None) -> list[dict]:
    """``verify`` for the dose-response: replay the first ``checks.VERIFY_TRAIN_STEPS`` training
    steps without the step cache and compare them with the stored loss log (the cached path
    gives the same losses, ``tests/test_step_cache.py``), and the step after each stored
    adapter (``checks.replay_from_states``: steps 251, 501, 1001, 2001, 3501), then re-draw
    ``draws`` random images of the base model and of the last adapter on the test prompts. The
    verify hooks' signature (``registry``; ``out`` is not used)."""
    import csv

    from .checks import VERIFY_TRAIN_STEPS, replay_from_states, replay_start, verify_images

    if doc["model"]["unet_digest"] != current_digest:
        return [{"check": "base model", "ok": False, "message": (
            "the dose-response was made with another base model: re-run it")}]
    cc = ConvergenceConfig(**{k: (tuple(v) if k == "eval_steps" else v)
                              for k, v in doc["settings"].items()
                              if k in {f.name for f in dataclasses.fields(ConvergenceConfig)}})
    with open(ROOT / doc["train_log"], newline="") as f:
        full_log = list(csv.DictReader(f))
    data_dir = runs.surd_mini(cc.rows, cc.seed, progress)
    cfg = _train_cfg(cc, data_dir, current_digest, VERIFY_TRAIN_STEPS)
    opened = {}  # the data, opened once for both kinds of replay
    checks = replay_start(cfg, backbone, full_log, progress=progress, shared=opened)
    # and the step after every stored adapter (250, 500, ...), from that adapter
    checks += replay_from_states(cfg, backbone, doc["adapters"], full_log, "convergence", shared=opened)
    last = str(max(int(s) for s in doc["adapters"]))
    conditions = {}
    for name in VERIFY_UNITS:
        name = name.replace(f"step-{STEPS}", f"step-{last}")
        block = {"records": doc["records"][name]}
        if name.startswith("step-"):
            block["adapter"] = doc["adapters"][last]
        conditions[name] = block
    sub = {"experiment": "convergence", "versions": doc.get("versions"),
           "model": doc["model"], "seed": doc["seed"], "generation": doc["generation"],
           "conditions": conditions}
    return checks + verify_images(sub, backbone, current_digest, draws, progress)


def main(argv: Sequence[str] | None = None) -> int:
    cc = ConvergenceConfig.from_args(argv)
    doc, complete = run(cc)
    n = f"{len(doc['records'])} of {len(_units(cc))} evaluations"
    if not complete:
        print(f"not complete yet ({n}; adapters at steps {doc['adapter_steps_trained']}): "
              f"progress is in {rel_path(_partial_path(cc))}; run the same command again to go on")
        return 0
    path = write_json(record_inputs(doc), Path(cc.out) / ("convergence-quick.json" if cc.quick else "convergence.json"))
    print(f"wrote {rel_path(path)} ({n}, {doc['wall_time_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    from sur_lib.infra.cli import run as run_cli
    run_cli(main)
