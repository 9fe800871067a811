"""Adapter training runs for the experiments: SURD-mini, knowledge vectors, run folders.

A run folder is named by a hash of everything that determines its result (``train_config``),
so an interrupted run resumes and a changed one starts afresh. ``train.LATER_KEYS`` lists the
``TrainConfig`` options added after results were stored, with their defaults: an option enters
the hash only when it is not at its default, so the runs behind the stored results keep their
folder names (and twins). A new ``TrainConfig`` field goes into ``train.LATER_KEYS``.

``train_adapter`` is the one way an experiment trains an adapter (``sur``, ``ablations``,
``recipes`` for ``tune`` and ``retest``, ``convergence``, ``channel``); whether it trains on the
step cache (``step_cache.run_inputs``) is each experiment's choice. ``variant_unit`` is one variant of
the variant loops of ``ablations`` and ``retest`` (``jobs.run_units``, the ``twin`` rule).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import torch

from sur_lib.world import toyworld as tw
from sur_lib.infra.fileio import atomic_folder, write_json
from sur_lib.infra.provenance import abs_path, state_digest
from . import common

PATH_KEYS = ("data_dir", "output_dir", "knowledge_file", "progress", "resume")  # not results


def surd_mini(rows: int, seed: int, progress: bool = True) -> Path:
    """SURD-mini with ``rows`` examples for ``seed`` under outputs/experiments (built once;
    ``toyworld.build_dataset`` is byte-identical for the same arguments)."""
    folder = common.WORK_DIR / f"surd-mini-n{rows}-s{seed}"
    if not (folder / "metadata.jsonl").is_file():
        with atomic_folder(folder) as tmp:
            tw.build_dataset(tmp, rows, seed=seed, progress=progress)
    return folder


def knowledge_cache(cfg) -> Path:
    """The shared cache of ``cfg.llm``'s vectors at ``cfg``'s layer and BOS setting."""
    return common.WORK_DIR / "knowledge" / (f"{cfg.llm}-layer{cfg.llm_layer}-bos{int(cfg.llm_include_bos)}"
                                            f"{'-nofirst' if cfg.llm_drop_first else ''}.safetensors")


def knowledge_for_config(cfg, prompts: Sequence[str], progress: bool = True) -> dict:
    """``train.knowledge_for`` with one shared cache per LLM, layer and BOS setting:
    outputs/experiments/knowledge/<llm>-layer<L>-bos<0|1>[-nofirst].safetensors."""
    from sur_lib.train import knowledge_for

    return knowledge_for(dataclasses.replace(cfg, knowledge_file=str(knowledge_cache(cfg))), list(prompts), progress)


# A replay's mean norm of the LLM's vectors of every prompt (the oracle teacher's scale) computes the
# vectors missing from the cache this many prompts at a time: on one CPU thread SmolLM2 takes 11 ms
# a prompt in batches of 32 against 93 ms one by one (measured on 96 SURD-mini prompts), and the
# batched vectors move the mean norm by 3e-6 relative, 300 times less than a replay's loss
# tolerance (``checks.VERIFY_LOSS_RTOL``, 1e-3). They are not stored: the cache holds vectors
# computed one prompt at a time (``knowledge.knowledge_vectors``), what training reads.
NORM_BATCH = 32


def replay_mean_norm(cfg, prompts: Sequence[str], progress: bool = False) -> tuple[float, int]:
    """(mean norm, width) of ``cfg.llm``'s knowledge vectors of ``prompts`` (``oracle.mean_norm``),
    for a replay: the vectors in the shared cache as they are, the missing ones computed in
    batches of ``NORM_BATCH`` and not stored."""
    from sur_lib.infra import knowledge_files as kf, llms
    from sur_lib.knowledge import knowledge_vectors

    prompts = list(dict.fromkeys(prompts))
    meta = kf.cache_meta({"llm": cfg.llm}, cfg.llm_layer, cfg.llm_include_bos, cfg.llm_drop_first)
    known = kf.read_cache(knowledge_cache(cfg), meta, prompts)
    vectors = [known[p] for p in prompts if p in known]
    missing = [p for p in prompts if p not in known]
    if missing:
        model, tokenizer = llms.load_llm(cfg.llm, getattr(torch, cfg.llm_dtype), cfg.llm_device)
        new = knowledge_vectors(model, tokenizer, missing, cfg.llm_layer, cfg.llm_include_bos, NORM_BATCH,
                                progress, drop_first=cfg.llm_drop_first)
        vectors += list(new)
    v = torch.stack([x.float() for x in vectors])
    return float(v.norm(dim=1).mean()), int(v.shape[1])


def knowledge_stats(vectors: dict) -> dict:
    """Mean norm and mean pairwise cosine of knowledge vectors (a vector dominated by one
    token, as Gemma's BOS, makes every prompt look alike)."""
    v = torch.stack(list(vectors.values())).float()
    n = v.norm(dim=1)
    u = v / n.clamp_min(1e-12)[:, None]
    m = u[:512]
    cos = (m @ m.T)[~torch.eye(len(m), dtype=torch.bool)]
    return {"n": len(v), "dim": v.shape[1], "mean_norm": float(n.mean()),
            "mean_pairwise_cosine": float(cos.mean()) if len(cos) else None}


def config_key(config: dict, skip: tuple[str, ...] = ()) -> dict:
    """The part of a ``TrainConfig`` dict that decides a result: without ``PATH_KEYS`` and
    ``skip``, and without a ``LATER_KEYS`` option at its default."""
    from sur_lib.train import LATER_KEYS

    return {k: v for k, v in config.items() if k not in PATH_KEYS and k not in skip
            and not (k in LATER_KEYS and v == LATER_KEYS[k])}


def train_config(overrides: dict, data_dir: Path, seed: int, run_root: Path, model_digest: str,
                 progress: bool):
    """``TrainConfig`` = tiny.yaml + overrides, in a run folder named by a hash of everything
    that determines the result (so an interrupted run resumes, and a changed one does not)."""
    from sur_lib.train import TrainConfig

    cfg = TrainConfig.from_yaml(common.TINY_CONFIG, **{"seed": seed, **overrides})
    key = config_key(cfg.to_dict())
    key.update(data=data_dir.name, model=model_digest)
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    cfg.data_dir = str(data_dir)
    cfg.output_dir = str(run_root / h)
    cfg.progress = progress
    cfg.resume = True
    return cfg


def twin(done: dict, run: str, **fields) -> dict | None:
    """The result of a variant trained in run folder ``run`` when a finished variant of ``done``
    was trained there (the same resolved config, e.g. eta = 0.1 when tiny.yaml says 0.1, or a
    strong lambda equal to the recipe's): that variant's result with ``fields`` and ``same_as``
    (the first of the twins); None when no finished variant was. The variant loops of
    ``ablations`` and ``retest`` share this rule through ``variant_unit``."""
    name = next((n for n, r in done.items() if r.get("run") == run), None)
    if name is None:
        return None
    return {**done[name], **fields, "same_as": done[name].get("same_as") or name}


def llm_knowledge(cfg, progress: bool = True) -> dict | None:
    """``cfg.llm``'s knowledge vectors of SURD-mini's simple prompts (``knowledge_for_config``),
    or None when ``cfg.lambda_llm`` is 0: the knowledge a run trains with unless its
    experiment passes other vectors (``recipes.knowledge_vectors``' oracle, channel's teachers)."""
    from sur_lib.data import SURDDataset

    if not cfg.lambda_llm:
        return None
    return knowledge_for_config(cfg, SURDDataset(cfg.data_dir, check_images=False).prompts(), progress)


@dataclasses.dataclass
class Trained:
    """What ``train_adapter`` returns: the adapter (fp32, as trained), the run's per-step log
    (without wall times and learning rates), the knowledge vectors it was trained with (None:
    lambda_LLM = 0) and the checkpoint step training resumed from (0: from scratch)."""

    adapter: torch.nn.Module
    log: list[dict]
    knowledge: dict | None
    resumed_from: int = 0

    @property
    def knowledge_stats(self) -> dict | None:
        return knowledge_stats(self.knowledge) if self.knowledge else None


def train_adapter(cfg, backbone, *, knowledge: dict | None = None, inputs: tuple | None = None,
                  progress: bool = True) -> Trained:
    """Train one adapter of an experiment: the one place an experiment calls
    ``sur_lib.train.train`` (a replay of logged steps for ``verify`` is not a run:
    ``replay_run``, ``ablations.first_step``). Resumes from the run folder's newest checkpoint.

    ``knowledge``: the vectors to train with; None: ``llm_knowledge`` (``cfg.llm``'s, or none
    when lambda_LLM is 0). ``inputs``: the step cache, (backbone, dataset) from
    ``step_cache.run_inputs`` with the same ``knowledge`` (recipes, convergence, channel; the
    same losses as uncached); None: ``train`` reads SURD-mini itself, as the stored ``sur`` and
    ``ablations`` runs were trained (their numbers stay as they are). Whether a run uses the
    step cache is its experiment's choice."""
    from sur_lib.train import train
    from sur_lib.infra.run_state import read_log

    if knowledge is None:
        if inputs is not None and cfg.lambda_llm:
            raise ValueError("pass the knowledge the step-cache inputs were built with")
        knowledge = llm_knowledge(cfg, progress)
    if inputs is not None:
        bb, ds = inputs
        result = train(cfg, backbone=bb, dataset=ds, knowledge=knowledge)
    else:
        result = train(cfg, backbone=backbone, knowledge=knowledge)
    log = [{k: v for k, v in row.items() if k not in ("seconds", "lr")} for row in read_log(cfg.output_dir)]
    for row in log:
        row["step"] = int(row["step"])
    return Trained(result.adapter, log, knowledge, result.resumed_from)


def variant_unit(name: str, cfg, done: dict, work: Callable[[], dict], run: str | None = None,
                 **fields):
    """One variant of a variant loop (``ablations``, ``retest``) as a ``jobs.Unit`` for
    ``jobs.run_units``: stored as ``done[name]``, claimed by its run folder (``run-<hash>``:
    twin variants share a claim, so one job trains a folder at a time, and a job waits for a
    folder another job holds and takes it over if that job was killed). Its work: the ``twin``
    result (with ``fields``) when a finished variant of ``done`` was trained in the same run
    folder, else ``work()``, the experiment's own training and judging. ``run``: the run as the
    results name it (default: the run folder's name)."""
    from . import jobs

    run = Path(cfg.output_dir).name if run is None else run

    def unit_work():
        same = twin(done, run, **fields)
        return same if same is not None else work()

    return jobs.Unit(name, unit_work, done, claim=run_claim(cfg))


def run_claim(cfg) -> str:
    """The ``jobs`` claim of ``cfg``'s run folder, ``run-<hash>``: one job trains it at a time."""
    return f"run-{Path(cfg.output_dir).name}"


def save_adapter(adapter, folder: Path, info: dict):
    """Store the adapter as fp16 safetensors (+ config.json, sur_adapter.json) and return the
    stored copy loaded back in fp32: what is evaluated is exactly what ships."""
    from sur_lib.adapter import SURAdapter

    half = copy.deepcopy(adapter)
    torch.nn.Module.to(half, torch.float16)  # plain cast (ModelMixin.to warns about fp32 modules)
    with atomic_folder(folder) as tmp:
        half.save_pretrained(tmp, safe_serialization=True)
        loaded = SURAdapter.from_pretrained(tmp).float().eval()
        info = dict(info, digest=state_digest(loaded))
        write_json(info, tmp / "sur_adapter.json")
    return loaded, info["digest"]


# ----------------------------------------------------------------------------- replays
# verify replays a few logged steps of a stored run. A step reads one seeded micro-batch per
# micro-step (``infra.micro_batches.batch_indices``: a pure function of the data's length, the
# batch size, the seed and the micro-step), so a replay needs only those rows of SURD-mini and
# the knowledge vectors of their prompts: about 8-32 rows a step, instead of every vector of
# 3,000-6,000 rows and the step cache of every prompt and image.


class ReplayRows(torch.utils.data.Dataset):
    """``dataset`` as a replay of some steps reads it: the same length, the same row at each
    index, but only rows ``indices`` are served (another raises IndexError naming it: the replay
    would not be the run's) and ``prompts()`` are theirs, so only their knowledge vectors are
    needed. ``knowledge`` is None: the vectors come from the dict passed to ``train``."""

    knowledge = None

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, sorted(set(int(i) for i in indices))
        self._served = set(self.indices)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        if int(i) not in self._served:
            raise IndexError(f"row {i} is not one the replayed steps read ({len(self.indices)} rows are)")
        return self.dataset[i]

    def rows(self) -> list[dict]:
        return [self.dataset.rows[i] for i in self.indices]

    def prompts(self) -> list[str]:
        return [r["text"] for r in self.rows()]


def rows_read(cfg, n: int, steps: Sequence[int]) -> list[int]:
    """The indices of the rows that log rows ``steps`` (1-based) of a one-process run of ``cfg``
    on ``n`` rows read: every micro-batch of those steps (``batch_indices``), sorted."""
    from sur_lib.infra.micro_batches import batch_indices

    accum = cfg.gradient_accumulation_steps
    return sorted({i for s in steps for m in range((int(s) - 1) * accum, int(s) * accum)
                   for i in batch_indices(n, cfg.batch_size, m, cfg.seed)})


def replay_inputs(cfg, backbone, steps: Sequence[int], knowledge_of=None, progress: bool = False,
                  shared: dict | None = None):
    """(dataset, knowledge) for replaying log rows ``steps`` of a run of ``cfg``, and no more:
    ``ReplayRows`` of SURD-mini (the rows those steps read) and, when ``cfg.lambda_llm``, the
    vectors of their prompts and of the text-only prompts: ``knowledge_of(rows)`` for a teacher
    other than ``cfg.llm`` (it may read every row of the data, ``rows`` are those the replay
    reads), else ``cfg.llm``'s vectors from the shared cache (``knowledge_for_config``; one
    prompt at a time, so a vector does not depend on which others are computed with it).
    ``shared``: a dict that keeps the opened data for the next replay of the same data."""
    from sur_lib.data import SURDDataset
    from sur_lib.infra.micro_batches import read_text_only_prompts

    res = cfg.resolution or backbone.image_size
    key = (str(cfg.data_dir), res, cfg.center_crop, cfg.random_flip, cfg.max_samples)
    shared = {} if shared is None else shared
    if key not in shared:
        shared[key] = SURDDataset(cfg.data_dir, resolution=res, center_crop=cfg.center_crop,
                                  random_flip=cfg.random_flip, max_samples=cfg.max_samples,
                                  check_images=False)
    full = shared[key]
    ds = ReplayRows(full, rows_read(cfg, len(full), steps))
    knowledge = None
    if cfg.lambda_llm:
        text_only = read_text_only_prompts(cfg.text_only_prompts) if cfg.text_only_batch else []
        knowledge = (knowledge_of(ds.rows()) if knowledge_of is not None
                     else knowledge_for_config(cfg, ds.prompts() + text_only, progress))
    return ds, knowledge


def replay_run(cfg, backbone, steps: int, knowledge_of=None, progress: bool = False,
               shared: dict | None = None) -> list[dict]:
    """The first ``steps`` rows of the loss log of a run of ``cfg``, run again by ``train`` in a
    temporary folder from the seeded initial adapter, on ``replay_inputs`` (the rows and vectors
    those steps read). Returns the log rows (``infra.run_state.read_log``)."""
    import tempfile

    from sur_lib.train import train
    from sur_lib.infra.run_state import read_log

    ds, knowledge = replay_inputs(cfg, backbone, range(1, steps + 1), knowledge_of, progress, shared)
    with tempfile.TemporaryDirectory() as tmp:
        rcfg = dataclasses.replace(cfg, max_steps=steps, checkpoint_every=10**6, output_dir=tmp,
                                   resume=False, progress=progress)
        train(rcfg, backbone=backbone, dataset=ds, knowledge=knowledge)
        return read_log(tmp)


def load_adapter(folder: Path | str):
    from sur_lib.adapter import SURAdapter

    return SURAdapter.from_pretrained(abs_path(folder)).float().eval()
