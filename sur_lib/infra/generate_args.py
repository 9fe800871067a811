"""``sur_lib.pipeline.generate``'s arguments, checked before any work, and the most sampling
steps each diffusers scheduler supports.

Errors are ValueErrors that name the argument; prompts longer than the text encoder's window are
not an error but a warning (they are cut to its first ``max_length`` tokens).
"""
from __future__ import annotations

import math
import numbers
import warnings

from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       PNDMScheduler)

from .config import MAX_SEED

# schedulers that break at num_inference_steps == num_train_timesteps (measured on diffusers
# 0.3x with SD's steps_offset=1: DDIM, DDPM and PNDM index alphas_cumprod[1000], an IndexError;
# DPM-Solver++ returns NaN images); Euler works up to num_train_timesteps
STEP_MARGIN = {DDIMScheduler: 1, DDPMScheduler: 1, PNDMScheduler: 1, DPMSolverMultistepScheduler: 1,
               EulerDiscreteScheduler: 0}


def max_inference_steps(scheduler) -> int:
    """The most sampling steps ``scheduler`` supports (see ``STEP_MARGIN``)."""
    n = int(scheduler.config.num_train_timesteps)
    margin = next((m for cls, m in STEP_MARGIN.items() if isinstance(scheduler, cls)), 1)
    return n - margin


def check_steps(scheduler, num_inference_steps: int) -> None:
    """A ValueError naming the scheduler unless it supports ``num_inference_steps``."""
    most = max_inference_steps(scheduler)
    if num_inference_steps > most:
        raise ValueError(f"num_inference_steps must be <= {most} for {type(scheduler).__name__} (the "
                         f"model was trained with {scheduler.config.num_train_timesteps} timesteps), "
                         f"got {num_inference_steps}")


def _whole(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")


def _prompt_list(name: str, prompts) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"{name} must be a string or a list of strings, got {type(prompts).__name__}")
    bad = [(i, p) for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        i, p = bad[0]
        raise ValueError(f"{name}[{i}] must be a string, got {type(p).__name__} {p!r}")
    return list(prompts)


def check_generate_args(backbone, prompts, negative_prompt="", num_inference_steps=25,
                        guidance_scale=7.5, num_images_per_prompt=1, height=None, width=None,
                        seed=0) -> None:
    """Check ``generate``'s arguments before any work, with errors that name the argument
    (ValueError), and warn (``UserWarning``, once per call, naming them) about prompts longer
    than the text encoder's window (``backbone.truncated_prompts``), which are cut to its first
    ``max_length`` tokens.

    guidance_scale must be a finite number >= 0: diffusers switches guidance off for any value
    <= 1, so a negative or NaN scale would silently give unguided images."""
    plist = _prompt_list("prompts", prompts)
    if not plist:
        raise ValueError("prompts is empty: give at least one prompt")
    negs = _prompt_list("negative_prompt", negative_prompt)
    if not isinstance(negative_prompt, str) and len(negs) != len(plist):
        raise ValueError(f"{len(negs)} negative prompts for {len(plist)} prompts")
    _whole("num_inference_steps", num_inference_steps, 1)
    _whole("num_images_per_prompt", num_images_per_prompt, 1)
    _whole("seed", seed, 0)
    if seed > MAX_SEED:
        raise ValueError(f"seed must be a whole number from 0 to 2**63 - 1, got {seed!r}")
    if (isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real)
            or not math.isfinite(guidance_scale) or guidance_scale < 0):
        raise ValueError(f"guidance_scale must be a finite number >= 0 (<= 1: no guidance), "
                         f"got {guidance_scale!r}")
    for name, value in (("height", height), ("width", width)):
        if value is not None:
            _whole(name, value, 1)
    long = backbone.truncated_prompts(list(dict.fromkeys(plist + (negs if negs != [""] else []))))
    if long:
        listed = "; ".join(f"{p[:60]!r}{'...' if len(p) > 60 else ''} ({n} tokens)" for p, n in long)
        warnings.warn(f"{len(long)} prompt(s) longer than the text encoder's {backbone.max_length} "
                      f"tokens are cut to the first {backbone.max_length}: {listed}", stacklevel=3)
