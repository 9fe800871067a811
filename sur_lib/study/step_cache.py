"""A cheaper training step: what the frozen parts compute, computed once per run.

In Algorithm 1 the text encoder fEn, the LLM and the UNet are frozen. At every step the
training loop nevertheless re-encodes the batch's simple and complex prompts with fEn and
re-decodes its images from PNG. SURD-mini has 3,000 rows but only ~1,100 distinct simple
prompts, so over 5,000 steps x 32 rows each prompt is encoded about 150 times. This module
does that work once:

* ``PromptStates``: the token states fEn(p) [max_length, text_dim] of every distinct simple
  and complex prompt, encoded in batches once and kept in a safetensors file whose metadata
  holds a digest of the text encoder's weights, the tokenizer settings and the prompt list,
  so a change of model or prompts makes a new file instead of reusing a stale one;
* ``CachedTextBackbone``: a ``models.Backbone`` whose ``encode_prompts`` looks the states up
  (and falls back to the encoder for a prompt that is not cached);
* ``DecodedImages``: the dataset with every image decoded once into memory. The random
  horizontal flip is applied afterwards with the same ``torch.rand(1)`` draw as
  ``SURDDataset.transform``, so the batches are bit-identical to the uncached ones;
* ``cached_inputs(backbone, dataset, path)``: both at once, for ``train.train(cfg,
  backbone=..., dataset=...)``. The knowledge vectors are already cached on disk by
  ``knowledge.cached_knowledge_vectors``;
* ``run_inputs(cfg, backbone, knowledge)``: ``cached_inputs`` for an experiment's run of
  ``cfg`` (``experiments.runs.train_adapter``'s ``inputs``).

What changes: the images are identical; the token states are the same function of the same
prompts, but encoded in batches of another size, so the float sums inside the encoder could
round differently in the last bits. Measured on SURD-mini with the tiny profile's base model
(``data/results/step_cache_bench.json``): the first 10 losses of the cached and the uncached
run were identical, at 0.95 against 1.78 seconds per step (batch 32, 2 threads); the test
(``tests/test_step_cache.py``) allows a relative difference of 1e-5. The experiments that use
the cache say so in their results (``"step_cache": true``).

    python -m sur_lib.study.step_cache bench --batch 32 --threads 2 --steps 8   # s/step before/after
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file

from ..infra.fileio import atomic_write_bytes
from ..models import Backbone

FORMAT = "sur-prompt-states-v1"


def encoder_digest(backbone: Backbone) -> str:
    """SHA-256 (16 hex) of the text encoder's weights and the tokenizer settings that shape
    fEn(p): a different encoder, window or padding mask gives a different digest."""
    h = hashlib.sha256()
    h.update(json.dumps({"max_length": backbone.max_length,
                         "mask": bool(backbone.use_attention_mask),
                         "tokenizer": type(backbone.tokenizer).__name__,
                         "vocab": len(getattr(backbone.tokenizer, "vocab", {}) or {})}).encode())
    for name, t in sorted(backbone.text_encoder.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def prompts_digest(prompts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(sorted(set(prompts))).encode()).hexdigest()[:16]


@dataclasses.dataclass
class PromptStates:
    """fEn(p) for a fixed set of prompts: ``states[prompt]`` is a float32 [max_length, D]."""

    states: dict[str, torch.Tensor]
    meta: dict[str, str]

    @classmethod
    def compute(cls, backbone: Backbone, prompts: Sequence[str], batch_size: int = 64,
                progress: bool = False) -> "PromptStates":
        """Encode every distinct prompt once (sorted, in batches of ``batch_size``)."""
        from tqdm.auto import tqdm

        unique = sorted(set(prompts))
        if not unique:
            raise ValueError("PromptStates.compute: no prompts given")
        states: dict[str, torch.Tensor] = {}
        starts = range(0, len(unique), batch_size)
        for i in tqdm(starts, desc="text-encoder states", disable=not progress):
            chunk = unique[i:i + batch_size]
            out = backbone.encode_prompts(chunk).to("cpu", torch.float32)
            states.update(zip(chunk, out.unbind(0)))
        meta = {"format": FORMAT, "encoder": encoder_digest(backbone),
                "prompts": prompts_digest(unique), "n": str(len(unique)),
                "batch_size": str(batch_size)}
        return cls({p: s.clone() for p, s in states.items()}, meta)

    def save(self, path: str | os.PathLike) -> Path:
        """One safetensors file: tensor i is the i-th prompt (sorted); the prompt list and the
        digests are in the metadata. Written atomically."""
        from safetensors.torch import save as save_bytes

        names = sorted(self.states)
        tensors = {f"s{i}": self.states[p].contiguous() for i, p in enumerate(names)}
        meta = dict(self.meta, prompt_list=json.dumps(names))
        return atomic_write_bytes(path, save_bytes(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PromptStates":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a prompt-states file (format {meta.get('format')!r})")
        names = json.loads(meta.pop("prompt_list"))
        t = load_file(str(path))
        return cls({p: t[f"s{i}"] for i, p in enumerate(names)}, meta)

    @classmethod
    def cached(cls, path: str | os.PathLike, backbone: Backbone, prompts: Sequence[str],
               progress: bool = False) -> "PromptStates":
        """Load ``path`` if it was made by this encoder for exactly these prompts, else compute
        and (re)write it."""
        path = Path(path)
        if path.is_file():
            try:
                found = cls.load(path)
            except Exception:  # a damaged or foreign file is recomputed, not trusted
                found = None
            if (found is not None and found.meta.get("encoder") == encoder_digest(backbone)
                    and found.meta.get("prompts") == prompts_digest(prompts)):
                return found
        made = cls.compute(backbone, prompts, progress=progress)
        made.save(path)
        return made


@dataclasses.dataclass
class CachedTextBackbone(Backbone):
    """A ``Backbone`` whose ``encode_prompts`` returns cached fEn(p) (see ``PromptStates``)."""

    prompt_states: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    misses: int = 0

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str] | str) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        if all(p in self.prompt_states for p in prompts):
            return torch.stack([self.prompt_states[p] for p in prompts]).to(self.text_encoder.device)
        self.misses += 1
        return super().encode_prompts(prompts)


class DecodedImages(torch.utils.data.Dataset):
    """A ``SURDDataset`` with every image decoded (resized, cropped, scaled) once, in memory.

    ``__getitem__`` returns exactly what ``SURDDataset.__getitem__`` returns: the flip is the
    last step of ``SURDDataset.transform`` and draws ``torch.rand(1)`` at the same point, and a
    horizontal flip of the float image equals the float image of the flipped PIL image. Only
    centre crops are cached (a random crop draws more random numbers per item)."""

    def __init__(self, dataset, progress: bool = False):
        from tqdm.auto import tqdm

        if not dataset.center_crop:
            raise ValueError("DecodedImages caches centre-cropped images only (center_crop=True)")
        self.dataset = dataset
        flip = dataset.random_flip
        dataset.random_flip = False
        try:
            self.pixels = [dataset[i]["pixel_values"] for i in
                           tqdm(range(len(dataset)), desc="decode images", disable=not progress)]
        finally:
            dataset.random_flip = flip
        self.knowledge = dataset.knowledge  # train() reads it from the dataset it is given

    def __len__(self) -> int:
        return len(self.dataset)

    def prompts(self) -> list[str]:
        return self.dataset.prompts()

    def __getitem__(self, i: int) -> dict[str, Any]:
        pixels = self.pixels[i]
        if self.dataset.random_flip and bool(torch.rand(1) < 0.5):
            pixels = pixels.flip(-1)
        return self.dataset.item(i, pixels.clone())

    def __getattr__(self, name):  # rows, root, resolution, report ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def cached_inputs(backbone: Backbone, dataset, path: str | os.PathLike,
                  progress: bool = False) -> tuple[CachedTextBackbone, DecodedImages]:
    """(backbone with cached prompt states, dataset with decoded images) for ``train.train``.
    ``path`` is the prompt-states file (reused when encoder and prompts match)."""
    rows = dataset.rows
    prompts = [r["text"] for r in rows] + [r["prompt"] for r in rows]
    states = PromptStates.cached(path, backbone, prompts, progress=progress)
    fields = {f.name: getattr(backbone, f.name) for f in dataclasses.fields(Backbone)}
    cached = CachedTextBackbone(**fields, prompt_states=states.states)
    return cached, DecodedImages(dataset, progress=progress)


def run_inputs(cfg, backbone: Backbone, knowledge: dict | None, progress: bool = False):
    """``cached_inputs`` for an experiment's run of ``cfg`` (``experiments.runs.train_adapter``'s
    ``inputs``, ``gradient_share.measure``'s): SURD-mini of ``cfg.data_dir`` with ``knowledge``,
    the prompt states kept in outputs/experiments/prompt_states/<data>.safetensors (~300 MB for
    SURD-mini's ~4,100 distinct prompts, never committed)."""
    from ..data import SURDDataset
    from .experiments import common

    ds = SURDDataset(cfg.data_dir, resolution=backbone.image_size, knowledge=knowledge)
    states = common.WORK_DIR / "prompt_states" / f"{Path(cfg.data_dir).name}.safetensors"
    return cached_inputs(backbone, ds, states, progress=progress)


# ----------------------------------------------------------------------------- benchmark


def bench(steps: int = 8, batch: int = 32, threads: int = 2, warmup: int = 2,
          rows: int = 3000, seed: int = 0) -> dict:
    """Seconds per training step of ``train.train`` on SURD-mini with the tiny profile's base
    model, without and with the cache (knowledge vectors cached in both; the cache build is
    timed separately). Medians over ``steps`` steps after ``warmup`` steps."""
    import statistics
    import tempfile

    from .experiments import common, runs
    from ..data import SURDDataset
    from ..train import TrainConfig, train
    from ..infra.run_state import read_log

    torch.set_num_threads(threads)
    backbone = common.load_base()
    data_dir = runs.surd_mini(rows, seed, progress=False)
    base = TrainConfig.from_yaml(common.TINY_CONFIG, seed=seed)
    kcfg = runs.knowledge_for_config
    prompts = SURDDataset(data_dir, check_images=False).prompts()
    knowledge = kcfg(base, prompts, progress=False)
    out: dict[str, Any] = {"batch": batch, "threads": threads, "steps": steps, "warmup": warmup}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("uncached", "cached"):
            cfg = dataclasses.replace(base, data_dir=str(data_dir), output_dir=f"{tmp}/{name}",
                                      max_steps=warmup + steps, batch_size=batch, progress=False,
                                      checkpoint_every=10**6, resume=False)
            ds = SURDDataset(data_dir, resolution=backbone.image_size, knowledge=knowledge)
            bb = backbone
            t0 = time.time()
            if name == "cached":
                bb, ds = cached_inputs(backbone, ds, f"{tmp}/states.safetensors")
            build = time.time() - t0
            train(cfg, backbone=bb, dataset=ds, knowledge=knowledge)
            secs = [r["seconds"] for r in read_log(cfg.output_dir)]
            per = [b - a for a, b in zip(secs[warmup - 1:], secs[warmup:])] if warmup else secs
            out[name] = {"median_s_per_step": statistics.median(per), "cache_build_s": build,
                         "losses": [r["loss"] for r in read_log(cfg.output_dir)]}
    out["speedup"] = out["uncached"]["median_s_per_step"] / out["cached"]["median_s_per_step"]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sur_lib.study.step_cache", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="seconds per step without and with the cache")
    b.add_argument("--steps", type=int, default=8)
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--batch", type=int, default=32)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--out", default=None, help="also write the result as JSON here")
    argv_list = list(sys.argv[1:] if argv is None else argv)
    a = p.parse_args(argv_list)
    res = bench(steps=a.steps, batch=a.batch, threads=a.threads, warmup=a.warmup)
    for name in ("uncached", "cached"):
        r = res[name]
        print(f"{name:9s} {r['median_s_per_step']:.3f} s/step (cache build {r['cache_build_s']:.1f} s)")
    print(f"speedup {res['speedup']:.2f}x; max |loss difference| "
          f"{max(abs(a - b) for a, b in zip(res['uncached']['losses'], res['cached']['losses'])):.2e}")
    if a.out:
        from .experiments.common import versions
        from ..infra.fileio import write_json

        write_json({"command": "python -m sur_lib.study.step_cache " + " ".join(argv_list),
                    "versions": versions(), "cpu_count": os.cpu_count(),
                    "load_average_after": os.getloadavg(), **res}, a.out)
    return 0


if __name__ == "__main__":
    from ..infra.cli import run
    run(main)
