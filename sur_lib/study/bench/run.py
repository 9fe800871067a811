"""The run: every configuration in turn, the JSON after each one, and the command line."""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from datetime import datetime, timezone
from typing import Callable

import torch

from sur_lib.infra.fileio import write_json
from .config import BASE_SPECS, BenchConfig, LEVER_CHOICES, PRECISIONS, PROFILE_DEFAULTS, specs_for
from .estimate import paper_shape_flops, rtx3090_estimate
from .flops import MFU_DEFINITION, unet_forward_flops
from .hardware import device_name, device_slug, free_memory, peak_tflops, versions
from .llm import knowledge_throughput
from .report import _fmt, _jsonable, _log_summary, _notes, add_mfu, add_ratios, command_line, default_out, summarize
from .step import _build_state, run_config, usable


def run_bench(cfg: BenchConfig | dict | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Run the benchmark described by ``cfg``; return the results (and write them to ``cfg.out``
    as JSON when it is set). See the module docstring for what is measured."""
    import diffusers

    if cfg is None:
        cfg = BenchConfig()
    elif isinstance(cfg, dict):
        cfg = BenchConfig(**cfg)
    cfg = cfg.resolved()
    log = log or (lambda msg: print(f"[bench] {msg}", flush=True))
    t_start, cpu_start = time.perf_counter(), time.process_time()
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no GPU")
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    elif cfg.profile == "tiny" and device.type == "cpu":
        # tiny ops gain nothing from a second thread, and on a shared 2-core machine the OpenMP
        # barriers of two threads make every step ~10x slower and the timings noise
        torch.set_num_threads(1)
    name = device_name(device)
    peak = peak_tflops(name) if device.type == "cuda" else None

    cap = None
    if cfg.cap_gib:
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            fraction = min(1.0, cfg.cap_gib * 2**30 / total)
            torch.cuda.set_per_process_memory_fraction(fraction, device)
            cap = {"cap_gib": cfg.cap_gib, "fraction": fraction, "device_total_gib": total / 2**30,
                   "method": "torch.cuda.set_per_process_memory_fraction (caching allocator only; "
                             "the CUDA context is not counted)"}
        else:
            cap = {"cap_gib": cfg.cap_gib, "applied": False, "reason": "no GPU: nothing to cap"}

    log(f"profile {cfg.profile} on {name}: batch {cfg.batch}, {cfg.resolution} px, {cfg.precision}, "
        f"{cfg.warmup} warm-up + {cfg.steps} timed steps per configuration"
        + (f", memory capped at {cfg.cap_gib:g} GiB" if cap and cap.get("fraction") else ""))

    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # silence "modules to keep in float32" on every cast
    try:
        state = _build_state(cfg, device, log)
        bb = state.backbone
        text_len, text_dim = bb.max_length, bb.text_dim
        latent = cfg.resolution // bb.vae_scale_factor
        unet_config = dict(bb.unet.config)

        def unet_fwd(b: int) -> int:
            return unet_forward_flops(unet_config, b, latent, text_len, text_dim)

        records: dict[str, dict] = {}
        specs = specs_for(cfg)
        for i, spec in enumerate(specs):
            rec = run_config(state, spec, cfg)
            records[spec.name] = rec
            own = usable(rec)
            mem = own.get("peak_allocated_gib") if own else None
            log(f"[{i + 1}/{len(specs)}] {spec.name}: {rec['status']}"
                + (f", {own['step_time_s']:.4f} s/step at batch {own['batch']}" if own else "")
                + (f", peak {mem:.1f} GiB allocated" if mem is not None else "")
                + f" ({rec.get('wall_s', 0.0):.1f} s)")
            if cfg.out:  # a run stopped half-way (a time limit) still leaves what it measured
                write_json(_jsonable({"partial": True, "command": cfg.command or command_line(cfg),
                                      "device": name, "config": dataclasses.asdict(cfg),
                                      "configs": records}), cfg.out)
        add_mfu(records, unet_fwd, peak)
        add_ratios(records)
        log("configuration                status   step time     samples/s   peak alloc/reserved  achieved"
            "           MFU     vs full")
        for rec in records.values():
            log(_fmt(rec))
        state_allow_compile = state.allow_compile
        del state, bb
        free_memory()

        log("FLOPs of one step at the paper's shape (SD 1.5, batch 16, 512 px), on the meta device")
        t0 = time.perf_counter()
        paper_flops = paper_shape_flops(cfg.llm_dim)
        log(f"  counted in {time.perf_counter() - t0:.1f} s")
        estimate = rtx3090_estimate({k: v["total"] for k, v in paper_flops.items()})
        knowledge = knowledge_throughput(cfg, device, log) if cfg.llm else {}
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
        torch.set_num_threads(threads)
        if cap and cap.get("fraction"):
            torch.cuda.set_per_process_memory_fraction(1.0, device)

    result = {
        "command": cfg.command or command_line(cfg),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "device": {"name": name, "type": device.type, "slug": device_slug(device),
                   "peak_tflops": peak, "memory_cap": cap},
        "config": dataclasses.asdict(cfg),
        "shape": {"batch": cfg.batch, "resolution": cfg.resolution, "latent_size": latent,
                  "text_tokens": text_len, "text_dim": text_dim, "llm_dim": cfg.llm_dim},
        "mfu_definition": MFU_DEFINITION,
        "flops": {
            "method": "torch.utils.flop_counter.FlopCounterMode over one forward + backward "
                      "(uncompiled), 2 FLOPs per multiply-add; optimizer steps not counted",
            "unet_forward_at_batch": unet_fwd(cfg.batch),
            "paper_shape": {"batch": 16, "resolution": 512, "per_step": paper_flops,
                            "unet_forward": paper_flops["official"]["unet"]},
        },
        "notes": _notes(cfg, device, state_allow_compile),
        "configs": records,
        "summary": summarize(records),
        "rtx3090_estimate": estimate,
        "knowledge_throughput": knowledge,
        "wall_time_s": time.perf_counter() - t_start,
        "cpu_time_s": time.process_time() - cpu_start,
    }
    result = _jsonable(result)
    if cfg.out:
        write_json(result, cfg.out)
        log(f"results written to {cfg.out}")
    _log_summary(result, log)
    return result

def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())

def parse_args(argv: list[str] | None = None) -> BenchConfig:
    p = argparse.ArgumentParser(prog="python -m sur_lib.study.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILE_DEFAULTS), default="paper")
    p.add_argument("--pretrained", default=None,
                   help="paper profile: SD 1.x folder or repo id (default: random weights)")
    p.add_argument("--llm-dim", type=int, default=5120,
                   help="knowledge-vector width: 4096, 5120 or 6656 (LLaMA 7/13/33B)")
    p.add_argument("--batch", type=int, default=None, help="default: 16 (paper), 4 (tiny)")
    p.add_argument("--resolution", type=int, default=None, help="pixels; default: 512 (paper), 16 (tiny)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per configuration; default: 10 (paper), 3 (tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first; default: 3 (paper), 1 (tiny)")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default=None, help="default: fp16 (paper), fp32 (tiny)")
    p.add_argument("--cap-gib", type=float, default=None, help="cap GPU memory (24 emulates an RTX 3090)")
    p.add_argument("--levers", type=_csv, default=LEVER_CHOICES,
                   help=f"comma list from {','.join(LEVER_CHOICES)}; each lever is one configuration, "
                        "'all' the combination (default: all of them)")
    p.add_argument("--lever-paths", type=_csv, default=("paper",),
                   help=f"configurations the levers are switched on for, from {','.join(BASE_SPECS)} (default: paper)")
    p.add_argument("--only", type=_csv, default=None,
                   help="run only these configurations, e.g. official,paper,paper+compile (default: all)")
    p.add_argument("--no-search-batch", dest="search_batch", action="store_false",
                   help="on OOM, do not look for the largest batch that fits")
    p.add_argument("--compile-on-cpu", action="store_true", help="run the compile lever on a CPU too (slow)")
    p.add_argument("--no-llm", dest="llm", action="store_false", help="skip the knowledge-vector throughput")
    p.add_argument("--smollm2", action="store_true", help="also time SmolLM2-135M on the CPU (~20 s to load)")
    p.add_argument("--llm-prompts", type=int, default=None, help="prompts timed per LLM (default 256)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: 1 for the tiny profile on a CPU, else torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results JSON (default: data/results/bench_<device>.json)")
    args = p.parse_args(argv)
    cfg = BenchConfig(**vars(args))
    cfg.command = shlex.join(["python", "-m", "sur_lib.study.bench", *(sys.argv[1:] if argv is None else argv)])
    return cfg

def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(argv).resolved()
    if cfg.out is None:
        cfg.out = default_out(cfg, torch.device(cfg.device))
    return run_bench(cfg)
