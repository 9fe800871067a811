"""The paper's cost on an RTX 3090, estimated from FLOPs counted on the SD 1.5 architecture
(meta tensors)."""
from __future__ import annotations

import json

import torch

from sur_lib.train import TrainConfig, build_adapter
from .config import StepSpec
from .hardware import RTX3090, RTX3090_UTILISATION
from .step import BenchState, TrainingStep, synthetic_batch


PAPER_STEPS = 5000

RTX3090_METHOD = (
    "seconds = steps * F_step / (peak * utilisation), with F_step the FLOPs one training step "
    "executes at batch 16 and 512 px (forward + backward of the chosen gradient path, VAE and "
    "text encoders included unless latents are cached), counted with FlopCounterMode on the "
    "SD 1.5 architecture (meta tensors, so identical on every machine); peak = the 3090's "
    "dense fp16 tensor throughput with fp32 accumulation (71 TFLOP/s, what autocast uses); "
    "utilisation an assumption (central, low, high). Memory is not modelled: see the measured "
    "peak memory under --cap-gib 24 for what fits."
)

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

def paper_shape_flops(llm_dim: int = 5120, batch: int = 16, resolution: int = 512,
                      specs: tuple[str, ...] = PAPER_SHAPE_SPECS) -> dict[str, dict]:
    """FLOPs of one step of each configuration at the paper's shape (SD 1.5 architecture from the
    bundled configs, the authors' adapter size), counted on the meta device: no weights are
    allocated and nothing is computed, so it takes seconds on any machine (cached per process)."""
    key = (llm_dim, batch, resolution, tuple(specs))
    if key not in _PAPER_FLOPS_CACHE:
        _PAPER_FLOPS_CACHE[key] = _paper_shape_flops(llm_dim, batch, resolution, specs)
    return json.loads(json.dumps(_PAPER_FLOPS_CACHE[key]))  # a copy

_PAPER_FLOPS_CACHE: dict[tuple, dict] = {}

def _paper_shape_flops(llm_dim: int, batch: int, resolution: int, specs: tuple[str, ...]) -> dict[str, dict]:
    from sur_lib.models import paper_backbone

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
