"""The timed step: synthetic batches, one training step per configuration, timing, the
largest batch that fits."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from sur_lib.train import TrainConfig, build_adapter, compute_losses, diffusion_inputs
from .config import BenchConfig, COMPLEX_TAGS, FULL_FINETUNE, PRECISIONS, PRECISION_NAMES, SIMPLE_WORDS, StepSpec
from .flops import count_flops
from .hardware import _sync, free_memory, is_oom


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

def _build_state(cfg: BenchConfig, device: torch.device, log: Callable[[str], None]) -> BenchState:
    from sur_lib import models

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
