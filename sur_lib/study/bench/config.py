"""The benchmark's configuration: profiles, levers and the step specifications."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


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

FULL_FINETUNE = dict(lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8, max_grad_norm=1.0)

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

@dataclass
class BenchConfig:
    """Options of ``python -m sur_lib.study.bench`` (None = the profile's default, see PROFILE_DEFAULTS)."""

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
