"""One recipe trained and evaluated: what ``tune`` and ``retest`` share.

A *recipe* is ``tiny.yaml`` plus a dict of ``TrainConfig`` overrides, trained for ``steps``
steps on SURD-mini with ``rows`` rows (``runs.surd_mini``), with the frozen inputs cached
(``step_cache.cached_inputs``: text-encoder states and decoded images; the same losses as
uncached). ``train_recipe`` trains it in a run folder named by the hash of everything that
decides the result (``runs.train_config``), resumes an interrupted run from its newest
checkpoint, and stores the final adapter as fp16 (``runs.save_adapter``) in
``<run>/adapter-fp16``; a recipe whose adapter is stored is loaded, not retrained. The
optimizer checkpoints (~50 MB each) are deleted once the adapter is stored, unless
``keep_checkpoints``.

Knowledge source (``knowledge``): ``"llm"`` (the default: ``cfg.llm``'s vectors, cached by
``runs.knowledge_for_config``) or ``"oracle"`` (not in the paper: ``sur_lib.oracle``, the
prompt's true attributes projected to the width of tiny.yaml's LLM vectors and matched to
their mean norm). The source enters the run hash through ``TrainConfig.extra``.

``prompt_set`` gives the prompt sets of ``convergence`` (imported, not copied: the tuning set
``train_distribution_prompts(10, seed + 1)``, the 45 test prompts, the 150 extended prompts)
and ``evaluate`` draws and judges an adapter on one of them with ``images.evaluate_condition``
(seeds ``prompt_seed(seed, id)``, so every recipe sees the same noise). ``truncate`` keeps the
first n images of stored records: they are the images a run with n images draws.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .. import analysis
from ..fileio import write_json
from . import common, images, runs

KNOWLEDGE_SOURCES = ("llm", "oracle")
PROMPT_SETS = ("tuning", "test", "extended")


@dataclass
class RecipeRun:
    """A trained recipe: the stored (fp16, loaded back in fp32) adapter and where it lives."""

    adapter: torch.nn.Module
    folder: Path
    digest: str
    cfg: object  # the TrainConfig
    knowledge: dict | None  # the knowledge vectors it was trained with (None: lambda_llm = 0)
    trained: bool  # False when the stored adapter was loaded
    resumed_from: int = 0  # the checkpoint step training resumed from
    source: str = "llm"  # the knowledge source (KNOWLEDGE_SOURCES)


def recipe_config(overrides: dict, rows: int, steps: int, run_root: Path, model_digest: str,
                  seed: int = 0, knowledge: str = "llm", batch_size: int | None = None,
                  checkpoint_every: int | None = None, progress: bool = True):
    """The ``TrainConfig`` of a recipe in its hashed run folder (builds SURD-mini if needed)."""
    if knowledge not in KNOWLEDGE_SOURCES:
        raise ValueError(f"knowledge must be one of {KNOWLEDGE_SOURCES}, got {knowledge!r}")
    over = dict(overrides)
    over.update(max_steps=int(steps), keep_checkpoints=2,
                checkpoint_every=int(checkpoint_every or max(1, min(500, int(steps)))))
    if batch_size:
        over["batch_size"] = int(batch_size)
    if knowledge != "llm":
        over["extra"] = {**over.get("extra", {}), "knowledge": knowledge}
    data_dir = runs.surd_mini(int(rows), seed, progress)
    return runs.train_config(over, data_dir, seed, Path(run_root), model_digest, progress)


def knowledge_vectors(cfg, rows: Sequence[dict], source: str = "llm", progress: bool = True) -> dict:
    """The knowledge vectors of every simple prompt of ``rows`` from ``source``."""
    llm = runs.knowledge_for_config(cfg, [r["text"] for r in rows], progress)
    if source == "llm":
        return llm
    from ..oracle import mean_norm, oracle_knowledge

    width = next(iter(llm.values())).shape[-1]
    return oracle_knowledge(rows, width=width, norm=mean_norm(llm))


def training_inputs(cfg, backbone, source: str = "llm", progress: bool = True):
    """(cached backbone, cached dataset, knowledge or None) of a recipe, as ``train`` takes them."""
    from ..data import SURDDataset
    from ..step_cache import cached_inputs

    knowledge = None
    if cfg.lambda_llm:
        rows = SURDDataset(cfg.data_dir, check_images=False).rows
        knowledge = knowledge_vectors(cfg, rows, source, progress)
    ds = SURDDataset(cfg.data_dir, resolution=backbone.image_size, knowledge=knowledge)
    states = common.WORK_DIR / "prompt_states" / f"{Path(cfg.data_dir).name}.safetensors"
    cached_bb, cached_ds = cached_inputs(backbone, ds, states, progress=progress)
    return cached_bb, cached_ds, knowledge


def adapter_folder(cfg) -> Path:
    return Path(cfg.output_dir) / "adapter-fp16"


def train_recipe(cfg, backbone, source: str = "llm", info: dict | None = None,
                 keep_checkpoints: bool = False, progress: bool = True) -> RecipeRun:
    """Train ``cfg`` (from ``recipe_config``) unless its fp16 adapter is stored; resume an
    interrupted run from its newest checkpoint; store and return the fp16 adapter."""
    import json

    from ..train import train

    folder = adapter_folder(cfg)
    meta = folder / "sur_adapter.json"
    if meta.is_file():
        knowledge = None
        if cfg.lambda_llm:
            from ..data import SURDDataset

            knowledge = knowledge_vectors(cfg, SURDDataset(cfg.data_dir, check_images=False).rows,
                                          source, progress)
        return RecipeRun(runs.load_adapter(folder), folder, json.loads(meta.read_text())["digest"],
                         cfg, knowledge, trained=False, source=source)
    bb, ds, knowledge = training_inputs(cfg, backbone, source, progress)
    result = train(cfg, backbone=bb, dataset=ds, knowledge=knowledge)
    adapter = result.adapter
    stored = {k: v for k, v in cfg.to_dict().items() if k not in runs.PATH_KEYS}
    loaded, digest = runs.save_adapter(adapter, folder, dict(
        info or {}, knowledge=source, step_cache=True, steps=cfg.max_steps,
        surd_mini={"rows": len(ds), "dir": Path(cfg.data_dir).name}, train_config=stored))
    if not keep_checkpoints:
        shutil.rmtree(Path(cfg.output_dir) / "checkpoints", ignore_errors=True)
    return RecipeRun(loaded, folder, digest, cfg, knowledge, trained=True,
                     resumed_from=result.resumed_from, source=source)


# ----------------------------------------------------------------------------- for verify

VERIFY_TRAIN_STEPS = 2  # training steps ``replay`` re-runs


def export_run(rr: RecipeRun, dest: Path, with_adapter: bool = True) -> dict:
    """Copy what ``verify`` needs of a trained recipe into ``dest``, a folder that is committed
    (``data/runs/<experiment>/<name>``): its loss log, ``run.json`` (the training config
    without paths, SURD-mini's rows and seed, the knowledge source) and, ``with_adapter``, the
    fp16 adapter. Returns where they are (paths relative to the repository)."""
    from ..fileio import atomic_folder
    from ..provenance import rel_path

    log = Path(rr.cfg.output_dir) / "log.csv"
    if not log.is_file():
        raise FileNotFoundError(f"{log} is missing: the run's loss log is needed for verify")
    dest = Path(dest)
    data = Path(rr.cfg.data_dir).name  # surd-mini-n<rows>-s<seed>
    rows, seed = (int(p[1:]) for p in data.removeprefix("surd-mini-").split("-"))
    with atomic_folder(dest) as tmp:
        shutil.copy2(log, tmp / "log.csv")
        write_json({"train_config": {k: v for k, v in rr.cfg.to_dict().items() if k not in runs.PATH_KEYS},
                    "rows": rows, "data_seed": seed, "knowledge": rr.source, "digest": rr.digest},
                   tmp / "run.json")
        if with_adapter:
            shutil.copytree(rr.folder, tmp / "adapter-fp16")
    out = {"folder": rel_path(dest), "log": rel_path(dest / "log.csv"), "digest": rr.digest}
    if with_adapter:
        out["dir"] = rel_path(dest / "adapter-fp16")
    return out


def replay(export: Path, backbone, steps: int = VERIFY_TRAIN_STEPS, progress: bool = False) -> list[dict]:
    """Re-run the first ``steps`` training steps of an exported recipe (``export_run``'s folder)
    from its ``run.json`` in a temporary folder, and compare each step's loss with its stored
    log (``verify.loss_checks``)."""
    import csv
    import json
    import tempfile

    from ..train import TrainConfig, read_log, train
    from .verify import loss_checks

    export = Path(export)
    meta = json.loads((export / "run.json").read_text())
    with open(export / "log.csv", newline="") as f:
        stored = [r for r in csv.DictReader(f)][:steps]
    data_dir = runs.surd_mini(meta["rows"], meta["data_seed"], progress)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig.from_dict(dict(meta["train_config"], max_steps=steps, checkpoint_every=10**6,
                                         data_dir=str(data_dir), output_dir=tmp, resume=False,
                                         progress=progress))
        bb, ds, knowledge = training_inputs(cfg, backbone, meta["knowledge"], progress)
        train(cfg, backbone=bb, dataset=ds, knowledge=knowledge)
        live = read_log(tmp)
    return loss_checks(live, stored)


# ----------------------------------------------------------------------------- evaluation


def prompt_set(name: str, seed: int = 0, quick: bool = False,
               prompts_per_type: int | None = None) -> list[dict]:
    """The prompts of ``convergence.prompt_sets`` named ``name`` (tuning, test, extended);
    ``quick`` (or ``prompts_per_type``) keeps the first prompts of each type."""
    from . import convergence as conv
    from .prompts import select_prompts

    if name not in PROMPT_SETS:
        raise ValueError(f"prompt set must be one of {PROMPT_SETS}, got {name!r}")
    specs = conv.prompt_sets(conv.ConvergenceConfig(seed=seed, extended=True))[name]
    return select_prompts(specs, prompts_per_type or (1 if quick else None))


def evaluate(backbone, adapter, specs: Sequence[dict], n_images: int, seed: int,
             gen: common.GenSettings, pipe=None, field: str = "text", cache: Path | None = None,
             progress: bool = True, desc: str = "") -> list[dict]:
    """Per-prompt records of ``adapter`` (None: the base model) on ``specs``: their ``field``
    ("text": the simple prompt; "prompt": the complex counterpart, the ceiling)."""
    return images.evaluate_condition(backbone, specs, [s[field] for s in specs], n_images, seed,
                                     gen, adapter=adapter, pipe=pipe, progress=progress,
                                     desc=desc or "recipe", cache=cache)


def truncate(records: Sequence[dict], n: int) -> list[dict]:
    """Records with only their first ``n`` images (accuracy and interval recomputed; the
    per-attribute hits, which are not stored per image, are dropped). Raises ValueError when
    a record has fewer than ``n`` images."""
    out = []
    for r in records:
        if len(r["correct"]) < n:
            raise ValueError(f"record {r['id']} has {len(r['correct'])} images, fewer than {n}")
        if len(r["correct"]) == n:
            out.append(dict(r))
            continue
        rec = {k: v for k, v in r.items() if k not in ("hits", "brisque", "clean_render_distance")}
        rec.update(analysis.accuracy_with_ci(r["correct"][:n]), correct=list(r["correct"][:n]))
        out.append(rec)
    return out


def config_summary(cfg) -> dict:
    """The recipe knobs of a TrainConfig, for results files."""
    keys = ("max_steps", "learning_rate", "eta", "lambda_llm", "lambda_cp", "temperature",
            "gradient_path", "llm", "llm_layer", "llm_drop_first", "batch_size", "lr_warmup_steps")
    return {k: getattr(cfg, k) for k in keys} | {"extra": dict(cfg.extra)}



def base_records(backbone, specs: Sequence[dict], set_name: str, field: str, n_images: int,
                 seed: int, gen: common.GenSettings, model_digest: str, pipe=None,
                 cache: Path | None = None, progress: bool = True,
                 convergence_file: Path | None = None) -> tuple[list[dict], str]:
    """The base model's records on ``specs`` with the simple (``field="text"``) or complex
    (``"prompt"``) texts: taken from ``convergence.json`` (its ``base-simple/<set>`` or
    ``base-complex/<set>``, first ``n_images`` images) when it was made with the same base
    model, seed, sampler and prompts and has at least ``n_images`` images per prompt, else
    drawn. Returns (records, where they came from)."""
    import json

    path = Path(convergence_file) if convergence_file else common.RESULTS_DIR / "convergence.json"
    unit = f"base-{'simple' if field == 'text' else 'complex'}/{set_name}"
    if path.is_file():
        doc = json.loads(path.read_text())
        recs = doc.get("records", {}).get(unit)
        ok = (recs and doc.get("seed") == seed and doc.get("generation") == gen.to_dict()
              and doc.get("model", {}).get("unet_digest") == model_digest
              and all(len(r["correct"]) >= n_images for r in recs))
        if ok:
            by = {r["id"]: r for r in recs}
            if all(s["id"] in by for s in specs):
                return truncate([by[s["id"]] for s in specs], n_images), f"{path.name}:{unit}"
    return (evaluate(backbone, None, specs, n_images, seed, gen, pipe, field, cache, progress,
                     desc=unit), "drawn")
