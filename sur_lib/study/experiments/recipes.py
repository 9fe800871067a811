"""One recipe trained and evaluated: what ``tune`` and ``retest`` share.

A *recipe* is ``tiny.yaml`` plus a dict of ``TrainConfig`` overrides, trained for ``steps``
steps on SURD-mini with ``rows`` rows (``runs.surd_mini``), with the frozen inputs cached
(``step_cache.run_inputs``: text-encoder states and decoded images; the same losses as
uncached). ``train_recipe`` trains it (``runs.train_adapter`` on those inputs) in a run
folder named by the hash of everything that decides the result (``runs.train_config``), resumes an interrupted run from its newest
checkpoint, and stores the final adapter as fp16 (``runs.save_adapter``) in
``<run>/adapter-fp16``; a recipe whose adapter is stored is loaded, not retrained. The
optimizer checkpoints (~50 MB each) are deleted once the adapter is stored, unless
``keep_checkpoints``.

Reuse of the dose-response run (``reuse``: a ``convergence`` run folder). A recipe that is
the dose-response run's training config (all but its length and bookkeeping:
``train.RESUME_FREE_KEYS``), on the same SURD-mini, base model and knowledge source, and
whose ``steps`` is one of that run's stored steps, is not trained again: its adapter *is*
the stored ``adapters/step-N`` (copied, with ``copied_from`` in its ``sur_adapter.json``),
and its loss log is the first N rows of that run's log. This holds because a training step
depends on its index, not on ``max_steps``: the learning rate is constant after warm-up,
and the batch and noise of every step are seeded by the step
(``infra.micro_batches.micro_batch_loader``, ``micro_step_seed``); ``tests/test_recipes.py``
trains both ways and compares the weights. The paper's settings at 2,000 steps (``tune``'s ``paper_settings`` and
``retest``'s ``recipe``) save about 55 CPU minutes each this way. ``recipe_records`` takes
that step's records from ``convergence.json`` likewise, when the adapter digests match.

Knowledge source (``knowledge``): ``"llm"`` (the default: ``cfg.llm``'s vectors, cached by
``runs.knowledge_for_config``) or ``"oracle"`` (not in the paper: ``sur_lib.study.oracle``, the
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

from ..statistics import accuracy_with_ci
from sur_lib.infra.fileio import write_json
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
    copied_from: Path | None = None  # the dose-response adapter it is (see ``reuse``)


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


def recipe_knowledge(cfg, source: str = "llm", progress: bool = True) -> dict | None:
    """The knowledge vectors a recipe trains with: ``knowledge_vectors`` of every row of its
    SURD-mini, or None when ``cfg.lambda_llm`` is 0."""
    from sur_lib.data import SURDDataset

    if not cfg.lambda_llm:
        return None
    return knowledge_vectors(cfg, SURDDataset(cfg.data_dir, check_images=False).rows, source, progress)


def knowledge_vectors(cfg, rows: Sequence[dict], source: str = "llm", progress: bool = True) -> dict:
    """The knowledge vectors of every simple prompt of ``rows`` from ``source``."""
    llm = runs.knowledge_for_config(cfg, [r["text"] for r in rows], progress)
    if source == "llm":
        return llm
    from ..oracle import mean_norm, oracle_knowledge

    width = next(iter(llm.values())).shape[-1]
    return oracle_knowledge(rows, width=width, norm=mean_norm(llm))


def adapter_folder(cfg) -> Path:
    return Path(cfg.output_dir) / "adapter-fp16"


def _surd_mini_of(cfg) -> tuple[int, int]:
    """(rows, seed) of a recipe's SURD-mini, from its folder name surd-mini-n<rows>-s<seed>."""
    data = Path(cfg.data_dir).name
    rows, seed = (int(p[1:]) for p in data.removeprefix("surd-mini-").split("-"))
    return rows, seed


def stored_step(cfg, reuse: Path | None, model_digest: str, source: str = "llm") -> Path | None:
    """The adapter folder ``<reuse>/adapters/step-N`` of a dose-response run that is ``cfg``
    trained to N = ``cfg.max_steps`` steps (same training key, SURD-mini rows and seed, base
    model, knowledge source), or None."""
    import json

    if reuse is None:
        return None
    folder = Path(reuse) / "adapters" / f"step-{int(cfg.max_steps):05d}"
    meta_file = folder / "sur_adapter.json"
    if not meta_file.is_file() or not (Path(reuse) / "train" / "log.csv").is_file():
        return None
    meta = json.loads(meta_file.read_text())
    from sur_lib.train import RESUME_FREE_KEYS

    rows, seed = _surd_mini_of(cfg)
    same = (source == meta.get("knowledge", "llm") and meta.get("step") == cfg.max_steps
            and meta.get("surd_mini") == {"rows": rows, "seed": seed}
            and meta.get("base_model", {}).get("unet_digest") == model_digest
            # what decides the weights at a step: all but the run length and bookkeeping
            and runs.config_key(meta.get("train_config", {}), RESUME_FREE_KEYS)
            == runs.config_key(cfg.to_dict(), RESUME_FREE_KEYS))
    return folder if same else None


def _copy_stored(cfg, source_folder: Path, folder: Path) -> None:
    """Copy a dose-response adapter into the recipe's folder, and the first ``max_steps``
    rows of that run's loss log into the recipe's run folder."""
    import json

    from sur_lib.infra.fileio import atomic_folder, atomic_write_bytes
    from sur_lib.infra.provenance import rel_path

    log = (Path(source_folder).parent.parent / "train" / "log.csv").read_bytes().splitlines(keepends=True)
    atomic_write_bytes(Path(cfg.output_dir) / "log.csv", b"".join(log[:int(cfg.max_steps) + 1]))
    with atomic_folder(folder) as tmp:
        for f in Path(source_folder).iterdir():
            shutil.copy2(f, tmp / f.name)
        meta = json.loads((tmp / "sur_adapter.json").read_text())
        meta["copied_from"] = rel_path(source_folder)
        write_json(meta, tmp / "sur_adapter.json")


def train_recipe(cfg, backbone, source: str = "llm", info: dict | None = None,
                 keep_checkpoints: bool = False, progress: bool = True,
                 reuse: Path | None = None) -> RecipeRun:
    """Train ``cfg`` (from ``recipe_config``) unless its fp16 adapter is stored; resume an
    interrupted run from its newest checkpoint; store and return the fp16 adapter. With
    ``reuse`` (a dose-response run folder), a recipe that is that run at one of its stored
    steps is copied from it instead of trained (see the module docstring)."""
    import json

    folder = adapter_folder(cfg)
    meta = folder / "sur_adapter.json"
    if not meta.is_file() and reuse is not None and (step_folder := stored_step(
            cfg, reuse, common.state_digest(backbone.unet), source)) is not None:
        _copy_stored(cfg, step_folder, folder)
    if meta.is_file():
        stored = json.loads(meta.read_text())
        copied = stored.get("copied_from")
        return RecipeRun(runs.load_adapter(folder), folder, stored["digest"], cfg,
                         recipe_knowledge(cfg, source, progress),
                         trained=False, source=source,
                         copied_from=None if copied is None else Path(copied))
    from ..step_cache import run_inputs

    knowledge = recipe_knowledge(cfg, source, progress)
    inputs = run_inputs(cfg, backbone, knowledge, progress)  # (cached backbone, cached dataset)
    result = runs.train_adapter(cfg, backbone, knowledge=knowledge, inputs=inputs, progress=progress)
    stored = {k: v for k, v in cfg.to_dict().items() if k not in runs.PATH_KEYS}
    loaded, digest = runs.save_adapter(result.adapter, folder, dict(
        info or {}, knowledge=source, step_cache=True, steps=cfg.max_steps,
        surd_mini={"rows": len(inputs[1]), "dir": Path(cfg.data_dir).name}, train_config=stored))
    if not keep_checkpoints:
        shutil.rmtree(Path(cfg.output_dir) / "checkpoints", ignore_errors=True)
    return RecipeRun(loaded, folder, digest, cfg, result.knowledge, trained=True,
                     resumed_from=result.resumed_from, source=source)


# ----------------------------------------------------------------------------- for verify



def export_run(rr: RecipeRun, dest: Path, with_adapter: bool = True) -> dict:
    """Copy what ``verify`` needs of a trained recipe into ``dest``, a folder that is committed
    (``data/runs/<experiment>/<name>``): its loss log, ``run.json`` (the training config
    without paths, SURD-mini's rows and seed, the knowledge source) and, ``with_adapter``, the
    fp16 adapter (for a recipe copied from the dose-response run, ``dir`` names that run's
    committed adapter instead of a second copy). Returns where they are (paths relative to the
    repository)."""
    from sur_lib.infra.fileio import atomic_folder
    from sur_lib.infra.provenance import rel_path

    log = Path(rr.cfg.output_dir) / "log.csv"
    if not log.is_file():
        raise FileNotFoundError(f"{log} is missing: the run's loss log is needed for verify")
    dest = Path(dest)
    rows, seed = _surd_mini_of(rr.cfg)
    with atomic_folder(dest) as tmp:
        shutil.copy2(log, tmp / "log.csv")
        write_json({"train_config": {k: v for k, v in rr.cfg.to_dict().items() if k not in runs.PATH_KEYS},
                    "rows": rows, "data_seed": seed, "knowledge": rr.source, "digest": rr.digest},
                   tmp / "run.json")
        if with_adapter and rr.copied_from is None:
            shutil.copytree(rr.folder, tmp / "adapter-fp16")
    out = {"folder": rel_path(dest), "log": rel_path(dest / "log.csv"), "digest": rr.digest}
    if rr.copied_from is not None:  # the committed dose-response adapter, not a second copy
        out["copied_from"] = rel_path(rr.copied_from)
    if with_adapter:
        out["dir"] = rel_path(rr.copied_from if rr.copied_from is not None else dest / "adapter-fp16")
    return out


def replay(export: Path, backbone, progress: bool = False) -> list[dict]:
    """The first training steps of an exported recipe (``export_run``'s folder) re-run from its
    ``run.json`` and compared with its stored log (``checks.replay_start``: the rows and
    knowledge vectors those steps read, without the step cache, which gives the same losses:
    ``tests/test_step_cache.py``)."""
    import csv
    import json

    from sur_lib.train import TrainConfig
    from .checks import replay_start

    export = Path(export)
    meta = json.loads((export / "run.json").read_text())
    with open(export / "log.csv", newline="") as f:
        stored = list(csv.DictReader(f))
    data_dir = runs.surd_mini(meta["rows"], meta["data_seed"], progress)
    cfg = TrainConfig.from_dict(dict(meta["train_config"], data_dir=str(data_dir), output_dir=str(export),
                                     resume=False, progress=progress))
    return replay_start(cfg, backbone, stored, teacher(cfg, meta["knowledge"], progress), progress)


def teacher(cfg, source: str, progress: bool = False):
    """``runs.replay_inputs``' ``knowledge_of`` for a recipe's knowledge ``source``: None for
    ``cfg.llm``'s own vectors (those of the replayed rows alone), else the oracle's vectors of
    the replayed rows (``oracle.oracle_knowledge``, as ``knowledge_vectors`` makes them for
    training), scaled to the mean norm of the LLM's vectors of every row of the data
    (``runs.replay_mean_norm``: the vectors missing from the cache are computed in batches, as
    a replay needs only their mean norm)."""
    if source == "llm":
        return None
    if source != "oracle":
        raise ValueError(f"unknown knowledge source {source!r}: 'llm' or 'oracle'")
    from sur_lib.data import SURDDataset
    from ..oracle import oracle_knowledge

    every = SURDDataset(cfg.data_dir, check_images=False).rows
    norm, width = runs.replay_mean_norm(cfg, [r["text"] for r in every], progress)
    return lambda rows: oracle_knowledge(rows, width=width, norm=norm)


def replay_stored_states(export: Path, copied_from: Path | None, backbone, label: str,
                         progress: bool = False) -> list[dict]:
    """For a recipe copied from the dose-response run (``copied_from``: its ``adapters/step-N``),
    whose loss log is that run's first N rows: the step after each earlier stored adapter of
    that run (``adapters/step-K``, K < N) recomputed from it and compared with the recipe's own
    log (``checks.replay_from_states``). A recipe trained by itself stores only its final
    adapter, after its last logged step: nothing to replay beyond the start (``replay``)."""
    import csv
    import json

    from sur_lib.train import TrainConfig
    from .checks import replay_from_states

    if copied_from is None:
        return []
    export, source = Path(export), Path(copied_from)
    last = int(source.name.split("-")[-1])
    meta = json.loads((export / "run.json").read_text())
    with open(export / "log.csv", newline="") as f:
        log = list(csv.DictReader(f))
    states = {}
    for folder in sorted(source.parent.glob("step-*")):
        k = int(folder.name.split("-")[-1])
        if k < last and (folder / "sur_adapter.json").is_file():
            states[k] = {"dir": str(folder), "digest": json.loads((folder / "sur_adapter.json").read_text())["digest"]}
    data_dir = runs.surd_mini(meta["rows"], meta["data_seed"], progress)
    cfg = TrainConfig.from_dict(dict(meta["train_config"], data_dir=str(data_dir), output_dir=str(export),
                                     resume=False, progress=progress))
    return replay_from_states(cfg, backbone, states, log, label, knowledge_of=teacher(cfg, meta["knowledge"], progress))


# ----------------------------------------------------------------------------- evaluation


def prompt_set(name: str, seed: int = 0, quick: bool = False,
               prompts_per_type: int | None = None) -> list[dict]:
    """The prompts of ``convergence.prompt_sets`` named ``name`` (tuning, test, extended);
    ``quick`` (or ``prompts_per_type``) keeps the first prompts of each type."""
    from . import convergence as conv
    from sur_lib.world.prompts import select_prompts

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
        rec.update(accuracy_with_ci(r["correct"][:n]), correct=list(r["correct"][:n]))
        out.append(rec)
    return out


def config_summary(cfg) -> dict:
    """The recipe knobs of a TrainConfig, for results files."""
    keys = ("max_steps", "learning_rate", "eta", "lambda_llm", "lambda_cp", "temperature",
            "gradient_path", "llm", "llm_layer", "llm_drop_first", "batch_size", "lr_warmup_steps")
    return {k: getattr(cfg, k) for k in keys} | {"extra": dict(cfg.extra)}



def _convergence_records(path: Path, unit: str, specs: Sequence[dict], n_images: int, seed: int,
                         gen: common.GenSettings, model_digest: str,
                         adapter: tuple[int, str] | None = None) -> list[dict] | None:
    """The records of ``unit`` in ``convergence.json`` for ``specs`` (first ``n_images``), if
    it was made with the same base model, seed, sampler and prompts, has at least ``n_images``
    images per prompt and, for ``adapter`` = (step, digest), that step's adapter has that digest."""
    import json

    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    recs = doc.get("records", {}).get(unit)
    ok = (recs and doc.get("seed") == seed and doc.get("generation") == gen.to_dict()
          and doc.get("model", {}).get("unet_digest") == model_digest
          and all(len(r["correct"]) >= n_images for r in recs))
    if ok and adapter is not None:
        ok = doc.get("adapters", {}).get(str(adapter[0]), {}).get("digest") == adapter[1]
    if not ok:
        return None
    by = {r["id"]: r for r in recs}
    if not all(s["id"] in by for s in specs):
        return None
    return truncate([by[s["id"]] for s in specs], n_images)


def _convergence_file(convergence_file: Path | None) -> Path:
    return Path(convergence_file) if convergence_file else common.RESULTS_DIR / "convergence.json"


def base_records(backbone, specs: Sequence[dict], set_name: str, field: str, n_images: int,
                 seed: int, gen: common.GenSettings, model_digest: str, pipe=None,
                 cache: Path | None = None, progress: bool = True,
                 convergence_file: Path | None = None) -> tuple[list[dict], str]:
    """The base model's records on ``specs`` with the simple (``field="text"``) or complex
    (``"prompt"``) texts: taken from ``convergence.json`` (its ``base-simple/<set>`` or
    ``base-complex/<set>``, first ``n_images`` images) when it was made with the same base
    model, seed, sampler and prompts and has at least ``n_images`` images per prompt, else
    drawn. Returns (records, where they came from)."""
    path = _convergence_file(convergence_file)
    unit = f"base-{'simple' if field == 'text' else 'complex'}/{set_name}"
    recs = _convergence_records(path, unit, specs, n_images, seed, gen, model_digest)
    if recs is not None:
        return recs, f"{path.name}:{unit}"
    return (evaluate(backbone, None, specs, n_images, seed, gen, pipe, field, cache, progress,
                     desc=unit), "drawn")


def recipe_records(backbone, rr: RecipeRun, specs: Sequence[dict], set_name: str, n_images: int,
                   seed: int, gen: common.GenSettings, model_digest: str, pipe=None,
                   cache: Path | None = None, progress: bool = True, desc: str = "",
                   convergence_file: Path | None = None) -> tuple[list[dict], str]:
    """A recipe's records on ``specs``: for a recipe copied from the dose-response run
    (``rr.copied_from``), that step's records in ``convergence.json`` when they match as in
    ``base_records`` and the adapter digests agree (the same adapter on the same seeds draws
    the same images), else drawn (``evaluate``). Returns (records, where they came from)."""
    if rr.copied_from is not None:
        step = int(Path(rr.copied_from).name.removeprefix("step-"))
        path = _convergence_file(convergence_file)
        unit = f"step-{step}/{set_name}"
        recs = _convergence_records(path, unit, specs, n_images, seed, gen, model_digest,
                                    adapter=(step, rr.digest))
        if recs is not None:
            return recs, f"{path.name}:{unit}"
    return (evaluate(backbone, rr.adapter, specs, n_images, seed, gen, pipe, cache=cache,
                     progress=progress, desc=desc), "drawn")
