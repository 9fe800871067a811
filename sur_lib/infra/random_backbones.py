"""Backbones with seeded random weights: SD 1.5's architecture for cost measurements and tiny
ones for tests, offline.

Like ``sur_lib.infra.backbone_files``, each builder returns the keyword arguments of
``sur_lib.models.Backbone(...)``; ``sur_lib.models.paper_backbone(random_weights=True)`` and
``sur_lib.models.tiny_random_backbone`` wrap them.
"""
from __future__ import annotations

import contextlib
from functools import lru_cache

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .backbone_files import sd15_configs
from .text_encoders import CLIP_VOCAB_SIZE, clip_tokenizer, load_minilm


@contextlib.contextmanager
def seeded(seed: int, device: str | torch.device | None = None):
    """Seed torch's RNG for a block without disturbing the caller's RNG state; modules created
    inside are allocated (and randomly initialised) on ``device``."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.device(device):
        torch.manual_seed(seed)
        yield


def random_sd15_parts(seed: int = 0, device: str | torch.device | None = None) -> dict:
    """The SD 1.5 architecture from the bundled configs with seeded random weights and the
    offline CLIP tokenizer: 859.5M (UNet) + 83.7M (VAE) + 123.1M (CLIP text) parameters.
    ``device`` builds it there directly ("cuda" is far faster than initialising 1B parameters
    on a CPU; "meta" allocates nothing)."""
    cfg = sd15_configs()
    with seeded(seed, device):
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        vae = AutoencoderKL.from_config(cfg["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(cfg["text_encoder"]))
    return dict(tokenizer=clip_tokenizer(77), text_encoder=text_encoder, unet=unet,
                scheduler=DDPMScheduler.from_config(cfg["scheduler"]), vae=vae,
                max_length=77, use_attention_mask=False)


def tiny_random_parts(
    text_dim: int | None = None,
    sample_size: int = 16,
    with_vae: bool = True,
    seed: int = 0,
    text_encoder: str = "clip",
    max_length: int | None = None,
) -> dict:
    """The paper's classes with tiny random weights, for tests (seeded, builds in about a second).

    text_encoder="clip": a 2-layer CLIPTextModel of width ``text_dim`` (default 32) with the
    real CLIP tokenizer and vocabulary, max_length 77 by default.
    text_encoder="minilm": the real, frozen all-MiniLM-L6-v2 (text_dim is 384), max_length 16
    by default.
    unet: UNet2DConditionModel (32, 64) channels, 1 layer per block, cross-attention at the top
    level and in the middle, ``sample_size`` x ``sample_size`` latents, about 0.8M parameters.
    with_vae: a 2-level AutoencoderKL (latents = images / 2, 4 channels); without it, pixel
    space (3-channel UNet, images of ``sample_size`` pixels).
    """
    if text_encoder not in ("clip", "minilm"):
        raise ValueError(f"text_encoder must be 'clip' or 'minilm', got {text_encoder!r}")
    with seeded(seed):
        if text_encoder == "clip":
            text_dim = 32 if text_dim is None else int(text_dim)
            tokenizer = _cached_clip_tokenizer()
            encoder = CLIPTextModel(CLIPTextConfig(
                vocab_size=CLIP_VOCAB_SIZE, hidden_size=text_dim, intermediate_size=2 * text_dim,
                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
            ))
            max_length = 77 if max_length is None else max_length
        else:
            tokenizer, encoder = load_minilm()
            if text_dim not in (None, encoder.config.hidden_size):
                raise ValueError(f"MiniLM's tokens are {encoder.config.hidden_size}-d, not {text_dim}")
            text_dim = encoder.config.hidden_size
            max_length = 16 if max_length is None else max_length
        channels = 4 if with_vae else 3
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=channels, out_channels=channels,
            block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=text_dim, attention_head_dim=8, norm_num_groups=32,
        )
        vae = None
        if with_vae:
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, latent_channels=4,
                block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
                down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, sample_size=sample_size * 2,
            )
    scheduler = DDPMScheduler.from_config(sd15_configs()["scheduler"])
    return dict(tokenizer=tokenizer, text_encoder=encoder, unet=unet, scheduler=scheduler, vae=vae,
                max_length=int(max_length), use_attention_mask=False)


@lru_cache(maxsize=1)
def _cached_clip_tokenizer() -> CLIPTokenizer:
    # tiny backbones are built many times in tests; the tokenizer is immutable in practice
    return clip_tokenizer(77)
