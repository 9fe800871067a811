"""The command line: ``python -m sur_lib.study.experiments NAME [options]`` (the command stored in
every results file). The options are parsed once and turned into the experiment's config
dataclass (``CONFIGS``); the runner (``RUNNERS``) takes that dataclass."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

import torch

from sur_lib.infra.fileio import write_json
from sur_lib.infra.provenance import rel_path
from .inputs import record_inputs
from .ablations import AblationsConfig, run_ablations
from .common import GUIDANCE, RESULTS_DIR, SAMPLER_STEPS, SURD_MINI_ROWS, result_path
from .compose import ComposeConfig, run_compose
from .failure import FailureConfig, run_failure
from .guidance import GuidanceConfig, run_guidance
from .rewrite import RewriteConfig, run_rewrite
from .sur import SurConfig, run_sur
from .verify import VerifyConfig, run_verify

# experiments with command lines of their own: ``python -m sur_lib.study.experiments NAME --help``
OWN_COMMAND_LINE = {"convergence": "sur_lib.study.experiments.convergence",
                    "probe": "sur_lib.study.experiments.probe",
                    "tune": "sur_lib.study.experiments.tune", "retest": "sur_lib.study.experiments.retest",
                    "channel": "sur_lib.study.experiments.channel",
                    "neighbours": "sur_lib.study.experiments.neighbours",
                    "quality": "sur_lib.study.experiments.quality",
                    "inputs": "sur_lib.study.experiments.inputs"}  # not an experiment: records a result's input digests

RUNNERS = {"failure": run_failure, "sur": run_sur, "ablations": run_ablations,
           "rewrite": run_rewrite, "guidance": run_guidance, "compose": run_compose}
CONFIGS = {"failure": FailureConfig, "sur": SurConfig, "ablations": AblationsConfig,
           "rewrite": RewriteConfig, "guidance": GuidanceConfig, "compose": ComposeConfig,
           "verify": VerifyConfig}


def parse_args(argv: Sequence[str] | None = None):
    """The argparse namespace (every option is accepted by every experiment, as before; each
    config takes the fields it has), with ``argv``: the command line after NAME."""
    import sur_lib.study.experiments as package

    ap = argparse.ArgumentParser(prog="python -m sur_lib.study.experiments",
                                 description=package.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=list(RUNNERS) + ["verify"] + list(OWN_COMMAND_LINE))
    ap.add_argument("--quick", action="store_true", help="tiny run for tests (writes NAME-quick.json)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS_DIR), help="results folder (data/results)")
    ap.add_argument("--model-dir", default=None, help="base model folder (data/models/tiny-sur-world)")
    ap.add_argument("--images", type=int, default=None, help="images per prompt")
    ap.add_argument("--guidance", type=float, default=GUIDANCE, help=f"CFG scale (default {GUIDANCE})")
    ap.add_argument("--sampler-steps", type=int, default=None, help=f"DDIM steps (default {SAMPLER_STEPS})")
    ap.add_argument("--prompts-per-type", type=int, default=None,
                    help="use the first N test prompts of each type")
    ap.add_argument("--rows", type=int, default=None, help=f"SURD-mini rows (default {SURD_MINI_ROWS})")
    ap.add_argument("--train-steps", type=int, default=None, help="override training steps")
    ap.add_argument("--adapter-dir", default=None, help="where `sur` stores its adapter")
    ap.add_argument("--only", default=None, help="ablations: variants to run; verify: experiments")
    ap.add_argument("--jobs", type=int, default=2, help=(
        "verify: processes side by side, each with --threads torch threads (default 2)"))
    ap.add_argument("--fresh", action="store_true", help="ignore partial results and old runs")
    ap.add_argument("--threads", type=int, default=1, help=(
        "torch threads (default 1: fixed for reproducible numbers; with another job on a 2-core "
        "machine, 2 OpenMP threads spin and run ~30x slower; 0 leaves torch's default)"))
    ap.add_argument("--no-cache", action="store_true",
                    help="do not reuse finished (prompt, condition) records from outputs/experiments/cache")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--full", action="store_true",
                    help="verify: re-draw every image of every checked condition (slow)")
    ap.add_argument("--power", type=float, default=None, help=(
        "verify: re-draw enough random images per condition to catch an edit that moves it by 5 "
        "points with this probability (0.95: 59 images per condition; default: 12, see verify's docstring)"))
    ap.add_argument("--scales", default=None, help="compose: CFG scales, e.g. 2,3,4.5")
    ap.add_argument("--alphas", default=None, help="compose: delayed-conditioning alphas, e.g. 0.3,0.5,0.7")
    ap.add_argument("--complex-scales", default=None, help="compose: scales for the complex prompts")
    ap.add_argument("--no-overhead", action="store_true", help="compose: skip the S-CFG timing")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[2:] if argv is None else list(argv)[1:])
    return args


def config_from_args(args):
    """The config dataclass of ``args.name`` built from the parsed options."""
    return CONFIGS[args.name].from_args(args)


def main(argv: Sequence[str] | None = None, backbone=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in OWN_COMMAND_LINE:
        import importlib

        return importlib.import_module(OWN_COMMAND_LINE[argv[0]]).main(argv[1:])
    args = parse_args(argv)
    exp = config_from_args(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    threads = torch.get_num_threads()
    if exp.threads:
        torch.set_num_threads(exp.threads)
    try:
        if args.name == "verify":
            res = run_verify(exp, backbone=backbone)
            if res["failed"]:
                print(f"verify FAILED for: {', '.join(res['failed'])}\ntolerance: {res['tolerance']}",
                      file=sys.stderr)
                return 1
            print(f"verify passed ({res['wall_time_s']:.0f} s)")
            return 0
        if (args.name == "ablations" and exp.only
                and Path(exp.out).resolve() == RESULTS_DIR.resolve() and not exp.quick):
            print("ablations --only writes a partial result: pass --out DIR so that it does not "
                  f"replace {rel_path(RESULTS_DIR / 'ablations.json')}", file=sys.stderr)
            return 2
        doc = RUNNERS[args.name](exp, backbone=backbone)
        path = write_json(record_inputs(doc), result_path(exp.out, args.name, exp.quick))
        print(f"wrote {rel_path(path)} ({doc['wall_time_s']:.0f} s)")
        return 0
    finally:
        torch.set_num_threads(threads)
