"""What every experiment shares: paths, sampling defaults, the typed options, result headers.

The options of ``python -m sur_lib.study.experiments NAME ...`` become an ``ExperimentConfig``
(or the subclass of one experiment, which adds its own fields); runners take that dataclass.
``WORK_DIR`` is read at call time (``common.WORK_DIR``), so a test can point it elsewhere.
"""
from __future__ import annotations

import dataclasses
import json
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sur_lib.world import evaluate
from sur_lib.world import toyworld as tw
from sur_lib.world.paths import ADAPTER_DIR, CONVERGENCE_RUN_DIR, RESULTS_DIR, TINY_MODEL_DIR
from sur_lib.infra.provenance import ROOT, rel_path, state_digest
from sur_lib.infra.provenance import versions as _versions

WORK_DIR = ROOT / "outputs" / "experiments"  # datasets, runs, knowledge caches (not committed)
TINY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
JUDGE_FILE = RESULTS_DIR / "judge.json"

# Sampling. Scouting runs on this base model found CFG 1.5-2 best (3 costs 5-10 count points,
# 4.5+ collapses) and 50 DDIM steps no better than 25; `guidance` re-checks the scale on
# training-distribution prompts (data/results/guidance.json).
GUIDANCE = 2.0
SAMPLER_STEPS = 25
SCHEDULER = "ddim"
TIMESTEP_SPACING = "trailing"  # the first step starts at t = 999 (pure noise), as in scouting
IMAGES = 16  # images per prompt (Table 1 analogue; the paper judged 130, its Table 2 used 10)

# SURD-mini and the adapter budget (tiny.yaml holds the training recipe itself)
SURD_MINI_ROWS = 3000
ABLATION_STEPS = 150  # training steps per ablation variant (tiny.yaml's max_steps for `sur`)
ABLATION_IMAGES = 4  # images per held-out prompt per variant
VAL_PER_TYPE = 5  # training-distribution prompts per type (tuning set)
VAL_IMAGES = 8

# --quick: for tests and smoke runs only
QUICK = dict(prompts_per_type=1, images=2, sampler_steps=5, rows=64, train_steps=3,
             batch_size=8, val_per_type=1, val_images=2)

VOLATILE_KEYS = frozenset({"command", "versions", "wall_time_s", "seconds", "timings"})

VERSION_PACKAGES = ("numpy", "scipy", "pillow", "torch", "sur_lib", "diffusers", "transformers",
                    "accelerate", "safetensors", "brisque")


@dataclass(frozen=True)
class GenSettings:
    """How images are sampled: DDIM steps, CFG scale, scheduler and its timestep spacing."""

    steps: int = SAMPLER_STEPS
    guidance: float = GUIDANCE
    scheduler: str = SCHEDULER
    timestep_spacing: str = TIMESTEP_SPACING

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ExperimentConfig:
    """The options every experiment reads (``python -m sur_lib.study.experiments NAME --help``).

    ``None`` means the experiment's default (``--quick``: the ``QUICK`` sizes). ``argv`` is the
    command line after NAME, stored in the result's ``command``.
    """

    quick: bool = False
    seed: int = 0
    out: str = str(RESULTS_DIR)
    model_dir: str | None = None
    images: int | None = None
    guidance: float = GUIDANCE
    sampler_steps: int | None = None
    prompts_per_type: int | None = None
    threads: int = 1
    cache: bool = True
    progress: bool = True
    argv: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        from sur_lib.infra.config import check_seed

        check_seed("--seed", self.seed)

    @classmethod
    def from_args(cls, args) -> "ExperimentConfig":
        """From the argparse namespace: the fields this class has (``--no-cache`` and
        ``--no-progress`` become ``cache`` and ``progress``)."""
        given = vars(args)
        names = {f.name for f in dataclasses.fields(cls)} - {"cache", "progress", "argv"}
        kw = {k: v for k, v in given.items() if k in names}
        kw.update(cache=not given.get("no_cache", False),
                  progress=not given.get("no_progress", False),
                  argv=tuple(given.get("argv") or ()))
        return cls(**kw)

    def generation(self) -> GenSettings:
        steps = self.sampler_steps or (QUICK["sampler_steps"] if self.quick else SAMPLER_STEPS)
        return GenSettings(steps=int(steps), guidance=float(self.guidance))

    def n_images(self, default: int) -> int:
        return int(self.images or (QUICK["images"] if self.quick else default))

    def test_specs(self) -> list[dict]:
        from sur_lib.world.prompts import select_prompts

        per_type = self.prompts_per_type or (QUICK["prompts_per_type"] if self.quick else None)
        return select_prompts(tw.test_prompts(), per_type)

    def cache_dir(self) -> Path | None:
        """The record cache (outputs/experiments/cache) unless --no-cache."""
        return WORK_DIR / "cache" if self.cache else None


@dataclass
class TrainingExperimentConfig(ExperimentConfig):
    """Options of the experiments that train adapters (``sur``, ``ablations``)."""

    rows: int | None = None  # SURD-mini rows (default SURD_MINI_ROWS)
    train_steps: int | None = None
    fresh: bool = False  # ignore partial results and old runs


def prompt_seed(seed: int, key: str) -> int:
    """Seed of one prompt's images: a stable function of the run seed and the prompt id."""
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode("utf-8"))) % (2**31 - 1)


def strip_volatile(obj):
    """The JSON without ``VOLATILE_KEYS`` (wall times, command, versions): what must be equal
    between two runs with the same seed on the same machine."""
    if isinstance(obj, dict):
        return {k: strip_volatile(v) for k, v in obj.items() if k not in VOLATILE_KEYS}
    if isinstance(obj, list):
        return [strip_volatile(v) for v in obj]
    return obj


def versions() -> dict:
    return {**_versions(VERSION_PACKAGES), "torch_threads": torch.get_num_threads()}


def result_path(out: Path | str, name: str, quick: bool) -> Path:
    return Path(out) / (f"{name}-quick.json" if quick else f"{name}.json")


def header(name: str, exp: ExperimentConfig) -> dict:
    """The first keys of every result: experiment, the command that made it, seed, versions."""
    cmd = "python -m sur_lib.study.experiments " + " ".join([name] + list(exp.argv))
    return {"experiment": name, "command": cmd, "seed": int(exp.seed), "quick": bool(exp.quick),
            "versions": versions()}


def load_base(model_dir: str | Path | None = None, retries: int = 1):
    """The base model (``models.load_tiny_backbone``; ``model_dir`` None: the world's,
    ``TINY_MODEL_DIR``). The pretraining job replaces its export folder by a rename every 100
    steps; a load that hits the swap is retried once."""
    from sur_lib.models import load_tiny_backbone

    for attempt in range(retries + 1):
        try:
            return load_tiny_backbone(model_dir if model_dir is not None else TINY_MODEL_DIR)
        except Exception:  # noqa: BLE001 - half-swapped folder: missing file, bad header ...
            if attempt == retries:
                raise
            time.sleep(3.0)


def model_info(backbone, model_dir: str | Path | None = None) -> dict:
    """Which base model made a result: folder, pretraining step (pretrain.json) and the exact
    weights (``state_digest`` of the UNet)."""
    folder = Path(model_dir) if model_dir is not None else TINY_MODEL_DIR
    info = {"dir": rel_path(folder), "unet_digest": state_digest(backbone.unet),
            "unet_parameters": sum(p.numel() for p in backbone.unet.parameters()),
            "pretrain_step": None}
    meta = folder / "pretrain.json"
    if meta.is_file():
        try:
            info["pretrain_step"] = json.loads(meta.read_text()).get("step")
        except (OSError, json.JSONDecodeError):
            pass
    return info


def judge_info(path: Path = JUDGE_FILE) -> dict | None:
    """The judge's accuracy on held-out ground-truth renders, clean and degraded (judge.json)."""
    if not Path(path).is_file():
        return None
    doc = json.loads(Path(path).read_text())
    out = {"file": rel_path(path), "n_scenes": doc.get("n_scenes"), "seed": doc.get("seed")}
    for quality in ("clean", "degraded"):
        res = doc["results"][quality]
        out[quality] = {a: {k: res[a][k] for k in ("acc", "lo", "hi")}
                        for a in evaluate.ATTRIBUTES if a in res}
    return out


DOSE_RESPONSE_DIR = CONVERGENCE_RUN_DIR  # convergence's committed run


def reuse_dir(quick: bool, no_reuse: bool) -> str | None:
    """The dose-response run folder whose stored adapters ``tune`` and ``retest`` may reuse
    (``recipes.train_recipe``'s ``reuse``): data/runs/convergence, except with --quick (whose
    recipes are not that run's) or --no-reuse."""
    if quick or no_reuse:
        return None
    return str(DOSE_RESPONSE_DIR)


def add_long_run_options(ap) -> None:
    """The options every resumable long experiment (``convergence``, ``tune``, ``retest``)
    shares: --seed, --max-minutes, --out, --quick, --threads, --no-cache, --no-progress."""
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes", type=float, default=None)
    ap.add_argument("--out", default=str(RESULTS_DIR))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--no-progress", action="store_true")


def parse_long_run_args(ap, argv):
    """``ap.parse_args(argv)`` and the torch thread count of ``--threads``."""
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    return a
