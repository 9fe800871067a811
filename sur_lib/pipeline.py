"""Generation: prompt -> text encoder -> SUR-adapter -> a stock diffusers StableDiffusionPipeline.

No pipeline code is copied: the adapter only changes the ``prompt_embeds`` (and, optionally, the
``negative_prompt_embeds``) that the stock ``StableDiffusionPipeline`` receives.

The unconditional branch of classifier-free guidance
---------------------------------------------------
With guidance, the UNet also sees an unconditional embedding, encode(negative_prompt) (the empty
prompt by default). The authors' inference pipeline sends it through the adapter too, in the
same batch as the conditional one; because their adapter's transformer has ``batch_first=False``
on [B, 77, 768] inputs, the unconditional and conditional embeddings then attend to each other.
Our default (``adapt_unconditional=False``) leaves the unconditional branch exactly as the base
model has it, so guidance pushes away from the base model's "no prompt" prediction.
``adapt_unconditional=True`` reproduces the authors: [uncond; cond] go through the adapter in one
call (with an ``official=True`` adapter the two mix as in their code; with the paper-faithful
adapter each sample is processed on its own, so one call equals two).

Pixel space (``backbone.vae is None``)
--------------------------------------
``StableDiffusionPipeline`` accepts ``vae=None``; it then sets ``vae_scale_factor = 8`` and sizes
its initial noise as ``height // vae_scale_factor``. We therefore pass ``height = H * 8`` for an
image of H pixels, ask for ``output_type="latent"`` (which returns the final latents without
touching the VAE), and turn those latents, which are the images in [-1, 1], into PIL / numpy /
tensor images with the pipeline's own ``image_processor.postprocess``.
"""
from __future__ import annotations

import functools

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .infra.generate_args import check_generate_args, check_steps
from .models import Backbone

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "pndm": PNDMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpm": DPMSolverMultistepScheduler,
}
OUTPUT_TYPES = ("pil", "pt", "np", "latent")


def make_pipeline(
    backbone: Backbone,
    scheduler: str | SchedulerMixin = "ddim",
    scheduler_kwargs: dict | None = None,
    progress_bar: bool = False,
) -> StableDiffusionPipeline:
    """A stock ``StableDiffusionPipeline`` from the backbone's parts (no safety checker).

    scheduler: a name in ``SCHEDULERS`` (built with ``from_config`` of the backbone's training
    scheduler, so betas and steps_offset match; ``scheduler_kwargs`` override config entries,
    e.g. ``{"timestep_spacing": "trailing"}``), or a ready scheduler instance.
    """
    if isinstance(scheduler, str):
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {scheduler!r}")
        scheduler = SCHEDULERS[scheduler].from_config(backbone.scheduler.config, **(scheduler_kwargs or {}))
    parts = backbone.as_pipeline_components()
    parts["scheduler"] = scheduler
    pipe = StableDiffusionPipeline(**parts)
    pipe.set_progress_bar_config(disable=not progress_bar)
    return pipe


@torch.no_grad()
def adapt_embeddings(adapter: torch.nn.Module, embeds: torch.Tensor) -> torch.Tensor:
    """The adapter's mixed output c (Eq. 7) for text-encoder states [B, N, D], in eval mode."""
    adapter.eval()
    param = next(adapter.parameters(), None)
    if param is not None:
        embeds = embeds.to(param.device, param.dtype)
    return adapter(embeds).c


def prompt_embeddings(
    backbone: Backbone,
    prompts: list[str],
    adapter: torch.nn.Module | None = None,
    adapt_unconditional: bool = False,
    negative_prompt: str | list[str] = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, negative_prompt_embeds), both [B, max_length, text_dim], as ``generate``
    hands them to the pipeline (see the module docstring for the unconditional branch)."""
    if isinstance(negative_prompt, str):
        negative_prompt = [negative_prompt] * len(prompts)
    if len(negative_prompt) != len(prompts):
        raise ValueError(f"{len(negative_prompt)} negative prompts for {len(prompts)} prompts")
    cond = backbone.encode_prompts(prompts)
    uncond = backbone.encode_prompts(negative_prompt)
    if adapter is not None:
        if adapt_unconditional:  # the authors: both in one adapter call
            both = adapt_embeddings(adapter, torch.cat([uncond, cond]))
            uncond, cond = both.chunk(2)
        else:
            cond = adapt_embeddings(adapter, cond)
    dtype, device = backbone.unet.dtype, backbone.unet.device
    return cond.to(device, dtype), uncond.to(device, dtype)


@torch.no_grad()
def generate(
    backbone: Backbone,
    prompts: list[str] | str,
    adapter: torch.nn.Module | None = None,
    adapt_unconditional: bool = False,
    negative_prompt: str | list[str] = "",
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    num_images_per_prompt: int = 1,
    output_type: str = "pil",
    pipe: StableDiffusionPipeline | None = None,
    scheduler: str | SchedulerMixin = "ddim",
    scfg=None,
    scfg_trace: list | None = None,
    delay_alpha: float | None = None,
    delay_order: str = "plain_first",
    latents: torch.Tensor | None = None,
):
    """Generate images for ``prompts``, optionally through a SUR-adapter.

    The conditional embeddings are encode(prompts), passed through ``adapter`` if one is given
    (eval mode, no gradients). The unconditional ones are encode(negative_prompt), passed through
    the adapter only if ``adapt_unconditional=True``: the authors' pipeline does that (and, with
    their batch_first bug, lets the two branches attend to each other); our default keeps the
    unconditional branch of classifier-free guidance unchanged. Noise comes from a CPU
    ``torch.Generator`` seeded with ``seed``, so images are the same on any device for a seed.

    height, width: image size in pixels (default: the UNet's sample_size times the VAE factor).
    latents: the initial noise [B, C, h, w] instead of drawing it from ``seed`` (``verify``
    re-draws single images of a batch with ``images.initial_noise``).
    pipe: a pipeline from ``make_pipeline`` to reuse (else one is built with ``scheduler``).
    Returns a list of PIL images ("pil"), a float tensor [B, 3, H, W] in [0, 1] ("pt"), an array
    [B, H, W, 3] in [0, 1] ("np"), or the final latents ("latent"); B = len(prompts) times
    num_images_per_prompt, grouped by prompt.

    Guidance options (``sur_lib.guidance``; all off by default, and off the images are exactly
    those of the plain call):
    scfg: S-CFG instead of plain CFG (True for the defaults, or an ``SCFGConfig`` / dict); the
    pipeline's own CFG is switched off and a UNet wrapper runs both branches and does the
    per-region guidance. scfg_trace: a list that receives every step's maps, regions and gamma.
    delay_alpha: delayed conditioning (needs ``adapter``): the fraction of steps that get the
    first embedding of ``delay_order`` ("plain_first": plain text, then adapted, as FastComposer;
    "adapted_first": the reverse); the unconditional branch is never changed.
    """
    check_generate_args(backbone, prompts, negative_prompt, num_inference_steps, guidance_scale,
                        num_images_per_prompt, height, width, seed)
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if isinstance(prompts, str):
        prompts = [prompts]
    pipe = pipe if pipe is not None else make_pipeline(backbone, scheduler)
    check_steps(pipe.scheduler, num_inference_steps)
    cond, uncond = prompt_embeddings(backbone, prompts, adapter, adapt_unconditional, negative_prompt)
    generator = torch.Generator("cpu").manual_seed(int(seed))

    size = dict(height=height, width=width)
    pipe_output_type = output_type
    if backbone.vae is None:
        # pixel space: the pipeline's latent grid is height // vae_scale_factor (8 without a
        # VAE), so ask for 8x the image size and take the latents, which are the images
        side = backbone.image_size
        size = {k: (v or side) * pipe.vae_scale_factor for k, v in size.items()}
        pipe_output_type = "latent"

    pipe_guidance, extra, call = guidance_scale, {}, pipe
    if delay_alpha is not None:
        from .guidance import ConditioningSwap, conditioning_schedule

        if adapter is None:
            raise ValueError("delay_alpha needs an adapter (it schedules plain vs adapted embeddings)")
        plain, _ = prompt_embeddings(backbone, prompts, None, False, negative_prompt)
        swap = ConditioningSwap(plain, cond, conditioning_schedule(num_inference_steps, delay_alpha, delay_order),
                                num_images_per_prompt)
        cond = cond if swap.initial() else plain
        extra = dict(callback_on_step_end=swap, callback_on_step_end_tensor_inputs=swap.tensor_inputs)
    scfg_cfg = None
    if scfg is not None and scfg is not False:
        from .guidance import SCFGUNet, as_scfg_config

        scfg_cfg = as_scfg_config(scfg)
        if guidance_scale <= 1:
            raise ValueError(f"S-CFG needs guidance_scale > 1, got {guidance_scale}")
        wrapper = SCFGUNet(pipe.unet, uncond.repeat_interleave(num_images_per_prompt, dim=0),
                           guidance_scale, scfg_cfg, trace=scfg_trace)
        scfg_pipe = StableDiffusionPipeline(**{**pipe.components, "unet": wrapper}, requires_safety_checker=False)
        scfg_pipe.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
        call = functools.partial(wrapper.run, scfg_pipe)
        pipe_guidance = 1.0  # the wrapper guides; the pipeline's CFG is off

    images = call(
        prompt_embeds=cond,
        negative_prompt_embeds=uncond,
        num_inference_steps=num_inference_steps,
        guidance_scale=pipe_guidance,
        num_images_per_prompt=num_images_per_prompt,
        generator=generator,
        latents=latents,
        output_type=pipe_output_type,
        **size,
        **extra,
    ).images

    if backbone.vae is None and output_type != "latent":
        images = pipe.image_processor.postprocess(images.float(), output_type=output_type)
    return images
