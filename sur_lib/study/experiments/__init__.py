"""The SUR world's experiments: each one writes ``data/results/NAME.json``.

    python -m sur_lib.study.experiments NAME [--quick] [--seed S] [--out data/results] [options]
    python -m sur_lib.study.experiments --help   # every NAME, with what it does

The experiments, what each does and where its code is: ``registry`` (one table, read by the
command line, ``verify`` and ``inputs``). The command line, and how runs are made
deterministic and cached: ``command``.

Layout: one module per experiment (the modules ``registry`` names), each with its runner (a
config dataclass and ``run_NAME``, or a ``main`` of its own) and its verify hook; ``verify``
(re-checks every stored result, through the hooks), ``checks`` (the image and loss checks the
hooks share), ``registry`` (the table of commands), ``command`` (the command line), ``common``
(paths, sampling defaults, the shared options, result headers), ``images`` (drawing and
judging, the record cache), ``recipes`` (one recipe trained with step_cache and evaluated on a
named prompt set), ``runs`` (adapter training runs, the run hash), ``jobs`` (resumable units
shared by jobs side by side) and ``inputs`` (the committed files a result depends on). The
prompt sets are in ``sur_lib.world.prompts``, the statistics in ``sur_lib.study.statistics``.
"""
from __future__ import annotations

from ..statistics import (VERIFY_Z, agreement, compare, compare_block, hit_rate, quality_tests,
                        same_numbers, summarize)
from sur_lib.infra.fileio import clean_json, write_json
from sur_lib.infra.provenance import state_digest
from .ablations import AblationsConfig, ablation_variants, run_ablations, verify_ablations
from .checks import VERIFY_LOSS_RTOL, VERIFY_TRAIN_STEPS, verify_images
from .command import config_from_args, main, parse_args
from .common import (ABLATION_IMAGES, ABLATION_STEPS, ADAPTER_DIR, GUIDANCE,
                     IMAGES, JUDGE_FILE, QUICK, RESULTS_DIR, SAMPLER_STEPS, SCHEDULER,
                     SURD_MINI_ROWS, TIMESTEP_SPACING, TINY_CONFIG, VAL_IMAGES, VAL_PER_TYPE,
                     VOLATILE_KEYS, ExperimentConfig, GenSettings, TrainingExperimentConfig,
                     header, judge_info, load_base, model_info, prompt_seed, result_path,
                     strip_volatile, versions)
from .failure import FailureConfig, run_failure
from .guidance import GUIDANCE_GRID, GuidanceConfig, run_guidance
from .images import HIT_KEYS, SPEC_KEYS, code_digest, draw_and_judge, evaluate_condition, make_pipe
from sur_lib.world.prompts import select_prompts, train_distribution_prompts
from .rewrite import (FEW_SHOT, SYSTEM_REWRITE, RewriteConfig, few_shot_examples,
                      rewrite_messages, rewrite_prompts, run_rewrite)
from .runs import (PATH_KEYS, knowledge_for_config, knowledge_stats, load_adapter,
                   save_adapter, surd_mini, train_adapter, train_config)
from .registry import COMMANDS, EXPERIMENTS
from .sur import SurConfig, run_sur
from .verify import VERIFY_DRAWS, VerifyConfig, run_verify
