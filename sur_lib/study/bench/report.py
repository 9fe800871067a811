"""Reporting: ratios against the full fine-tune, the summary, notes, output paths, the log."""
from __future__ import annotations

import math
import shlex
from typing import Any, Callable

import torch

from .config import BenchConfig
from .hardware import device_slug
from .step import usable


def add_ratios(records: dict[str, dict], reference: str = "full") -> None:
    """Ratios of every configuration against ``reference`` (diffusers' full fine-tune), in place:
    samples/s (speedup), step time and peak memory (the last two only at equal batch)."""
    ref = usable(records.get(reference, {}))
    for rec in records.values():
        own = usable(rec)
        if ref is None or own is None:
            rec["vs_full"] = None
            continue
        same = own["batch"] == ref["batch"]
        mem = own.get("peak_allocated_gib"), ref.get("peak_allocated_gib")
        rec["vs_full"] = {
            "reference_batch": ref["batch"],
            "samples_per_s": own["samples_per_s"] / ref["samples_per_s"],
            "step_time": own["step_time_s"] / ref["step_time_s"] if same else None,
            "peak_allocated": mem[0] / mem[1] if same and None not in mem and mem[1] else None,
        }

def add_mfu(records: dict[str, dict], unet_fwd: Callable[[int], int], peak: dict | None) -> None:
    """Model FLOPs (2 x UNet forward) and MFU against the dense bf16 peak (MFU_DEFINITION)."""
    for rec in records.values():
        own = usable(rec)
        if own is None:
            continue
        fwd = unet_fwd(own["batch"])
        own["unet_forward_flops"] = fwd
        own["model_flops_per_step"] = 2 * fwd
        own["model_tflops"] = 2 * fwd / own["step_time_s"] / 1e12
        own["mfu"] = own["model_tflops"] / peak["bf16"] if peak else None

def _fmt(rec: dict) -> str:
    own = usable(rec)
    status = rec.get("status", "?")
    if own is None:
        why = rec.get("reason") or rec.get("error") or ""
        return f"{rec['name']:<28} {status}  {why}".rstrip()
    mem = own.get("peak_allocated_gib")
    mem_s = f"{mem:5.1f}/{own['peak_reserved_gib']:5.1f} GiB" if mem is not None else "    -/-    GiB"
    mfu = own.get("mfu")
    ratio = (rec.get("vs_full") or {}).get("samples_per_s")
    extra = ""
    if status == "oom":
        extra = (f"  OOM at batch {rec['batch']}: fits at {rec['largest_fitting_batch']} "
                 f"x accumulation {rec['gradient_accumulation']}")
    return (f"{rec['name']:<28} {status:<4} {own['step_time_s']:8.4f} s/step {own['samples_per_s']:8.1f} samples/s"
            f"  {mem_s}  {own['achieved_tflops']:8.3f} TFLOP/s"
            f"  MFU {'  -  ' if mfu is None else f'{100 * mfu:5.1f}%'}"
            f"  x{'  -  ' if ratio is None else f'{ratio:5.2f}'} vs full{extra}")

def summarize(records: dict[str, dict]) -> dict:
    """The headline numbers: speedups against the full fine-tune, each lever's effect against the
    configuration it was switched on for, the best adapter configuration, the targets (x2.0 the full fine-tune's samples/s, 30% MFU)."""
    speed = {n: (r.get("vs_full") or {}).get("samples_per_s") for n, r in records.items()}
    lever_effect = {}
    for name, rec in records.items():
        base = rec["name"].split("+")[0] + ("+ckpt" if rec.get("gradient_checkpointing") else "")
        own, ref = usable(rec), usable(records.get(base, {}))
        if rec.get("levers") and own is not None and ref is not None and base != name:
            lever_effect[name] = own["samples_per_s"] / ref["samples_per_s"]
    adapter = {n: r for n, r in records.items() if r.get("path") in ("official", "paper") and usable(r)}
    best = max(adapter, key=lambda n: usable(adapter[n])["samples_per_s"], default=None)
    best_paper = max((n for n in adapter if adapter[n]["path"] == "paper"),
                     key=lambda n: usable(adapter[n])["samples_per_s"], default=None)

    def fit(name):
        rec = records.get(name, {})
        return {k: rec.get(k) for k in ("status", "batch", "largest_fitting_batch", "gradient_accumulation")
                if k in rec}

    out = {"speedup_vs_full": speed, "lever_effect_vs_base": lever_effect,
           "fits": {n: fit(n) for n in records}, "best_adapter_config": best, "best_paper_config": best_paper}
    if best_paper:
        own = usable(records[best_paper])
        out["targets"] = {"speedup_vs_full": 2.0, "mfu": 0.30}
        out["best_paper_speedup_vs_full"] = speed.get(best_paper)
        out["best_paper_mfu"] = own.get("mfu")
        out["targets_met"] = {
            "speedup_vs_full": None if speed.get(best_paper) is None else speed[best_paper] >= 2.0,
            "mfu": None if own.get("mfu") is None else own["mfu"] >= 0.30,
        }
    return out

def _notes(cfg: BenchConfig, device: torch.device, allow_compile: bool) -> list[str]:
    notes = ["A step is one optimizer step on one synthetic batch already on the device: data "
             "loading and augmentation are not timed.",
             "Weights are used for timing only; the backbone is cast between precisions between "
             "configurations.",
             "Prompts are tokenized inside the step (as sur_lib.train does; a few ms for a batch of "
             "16 simple + 16 complex prompts), in every configuration."]
    if cfg.profile == "tiny":
        notes.append("Tiny profile: tiny random shapes that exercise the code; its times say nothing "
                     "about the paper's cost (see rtx3090_estimate and a GPU run for that).")
    if device.type != "cuda":
        notes.append("No GPU: peak memory, MFU and the memory cap do not apply (null).")
    if not allow_compile:
        notes.append("torch.compile skipped on the CPU (pass --compile-on-cpu to run it).")
    return notes

def default_out(cfg: BenchConfig, device: torch.device) -> str:
    slug = device_slug(device) + ("-tiny" if cfg.profile == "tiny" else "")
    if cfg.cap_gib:
        slug += f"-cap{cfg.cap_gib:g}gib"
    return f"data/results/bench_{slug}.json"

def command_line(cfg: BenchConfig) -> str:
    """The CLI command that reproduces ``cfg``."""
    args = ["python", "-m", "sur_lib.study.bench", "--profile", cfg.profile]
    for name in ("pretrained", "llm_dim", "batch", "resolution", "steps", "warmup", "precision", "cap_gib",
                 "device", "threads", "seed", "llm_prompts", "out"):
        value = getattr(cfg, name)
        if value is not None:
            args += [f"--{name.replace('_', '-')}", str(value)]
    args += ["--levers", ",".join(cfg.levers), "--lever-paths", ",".join(cfg.lever_paths)]
    if cfg.only is not None:
        args += ["--only", ",".join(cfg.only)]
    for flag, on in (("--no-search-batch", not cfg.search_batch), ("--compile-on-cpu", cfg.compile_on_cpu),
                     ("--no-llm", not cfg.llm), ("--smollm2", cfg.smollm2)):
        if on:
            args.append(flag)
    return shlex.join(args)

def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, torch.dtype):
        return str(x).replace("torch.", "")
    return x

def _log_summary(result: dict, log: Callable[[str], None]) -> None:
    s = result["summary"]
    effects = ", ".join(f"{k} x{v:.2f}" for k, v in s["lever_effect_vs_base"].items())
    if effects:
        log(f"lever effects (samples/s vs the same path without it): {effects}")
    if s.get("best_paper_config"):
        sp, mfu = s.get("best_paper_speedup_vs_full"), s.get("best_paper_mfu")
        log(f"best paper-path configuration: {s['best_paper_config']}: "
            f"x{sp:.2f} the samples/s of the full fine-tune" if sp is not None else
            f"best paper-path configuration: {s['best_paper_config']}")
        if mfu is not None:
            log(f"  MFU {100 * mfu:.1f}% (targets: x2.0 and 30%)")
    est = result["rtx3090_estimate"]
    parts = ", ".join(f"{k} {v['hours']:.1f} h" for k, v in est["per_config"].items())
    log(f"RTX 3090, {est['steps']} steps at batch 16 / 512 px, {100 * est['assumed_utilisation']:.0f}% of "
        f"{est['peak_tflops']:g} TFLOP/s: {parts}")
    for key, rec in result["knowledge_throughput"].items():
        if isinstance(rec, dict) and rec.get("status") == "ok":
            log(f"knowledge vectors, {key}: {rec['prompts_per_s']:.1f} prompts/s "
                f"(batch {rec['batch']}, {rec['tokens_per_prompt']:.1f} tokens/prompt)")
        else:
            log(f"knowledge vectors, {key}: {rec if isinstance(rec, str) else rec.get('status')}")
    log(f"total {result['wall_time_s']:.1f} s ({result['cpu_time_s']:.1f} s of CPU time)")
