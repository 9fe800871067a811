"""FLOP counting: the FLOPs a step executes, split by part, and one UNet forward (MFU)."""
from __future__ import annotations

import json
from typing import Any, Callable

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode


MFU_DEFINITION = (
    "mfu = 2 * F_unet_fwd(batch) / median step time / dense bf16 peak of the device "
    "(model FLOPs utilisation). F_unet_fwd is the FLOP count of one UNet forward at the step's batch and "
    "resolution (torch.utils.flop_counter.FlopCounterMode, 2 FLOPs per multiply-add); "
    "2 x F_unet_fwd is the useful work of a paper-path step (UNet forward + backward to the "
    "conditioning; the frozen weights need no gradient). The numerator is the same for every "
    "configuration, so mfu ranks configurations as samples/s does; achieved_tflops instead "
    "divides the FLOPs each step really executes (VAE encoder, text encoder, adapter, "
    "recomputation under checkpointing, the weight gradients of a full fine-tune) by its time."
)

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
