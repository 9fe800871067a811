"""Adapter training runs for the experiments: SURD-mini, knowledge vectors, run folders.

A run folder is named by a hash of everything that determines its result (``train_config``),
so an interrupted run resumes and a changed one starts afresh. ``train.LATER_KEYS`` lists the
``TrainConfig`` options added after results were stored, with their defaults: an option enters
the hash only when it is not at its default, so the runs behind the stored results keep their
folder names (and twins). A new ``TrainConfig`` field goes into ``train.LATER_KEYS``.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Sequence

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


def knowledge_for_config(cfg, prompts: Sequence[str], progress: bool = True) -> dict:
    """``train.knowledge_for`` with one shared cache per LLM, layer and BOS setting:
    outputs/experiments/knowledge/<llm>-layer<L>-bos<0|1>[-nofirst].safetensors."""
    from sur_lib.train import knowledge_for

    name = (f"{cfg.llm}-layer{cfg.llm_layer}-bos{int(cfg.llm_include_bos)}"
            f"{'-nofirst' if cfg.llm_drop_first else ''}.safetensors")
    cfg = dataclasses.replace(cfg, knowledge_file=str(common.WORK_DIR / "knowledge" / name))
    return knowledge_for(cfg, list(prompts), progress)


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
    ``ablations`` and ``retest`` share this rule."""
    name = next((n for n, r in done.items() if r.get("run") == run), None)
    if name is None:
        return None
    return {**done[name], **fields, "same_as": done[name].get("same_as") or name}


def train_adapter(cfg, backbone, progress: bool = True):
    """Train one adapter with ``sur_lib.train.train`` (knowledge vectors from the cache).
    Returns (adapter, per-step log without wall times, knowledge statistics or None)."""
    from sur_lib.data import SURDDataset
    from sur_lib.train import train
    from sur_lib.infra.run_state import read_log

    knowledge = None
    if cfg.lambda_llm:
        prompts = SURDDataset(cfg.data_dir, check_images=False).prompts()
        knowledge = knowledge_for_config(cfg, prompts, progress)
    result = train(cfg, backbone=backbone, knowledge=knowledge)
    log = [{k: v for k, v in row.items() if k not in ("seconds", "lr")} for row in read_log(cfg.output_dir)]
    for row in log:
        row["step"] = int(row["step"])
    return result.adapter, log, (knowledge_stats(knowledge) if knowledge else None)


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


def load_adapter(folder: Path | str):
    from sur_lib.adapter import SURAdapter

    return SURAdapter.from_pretrained(abs_path(folder)).float().eval()
