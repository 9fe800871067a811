"""What training the SUR-adapter costs at paper scale, measured.

    python -m sur_lib.study.bench --profile paper --cap-gib 24     # one GPU: SD 1.5, batch 16, 512 px
    python -m sur_lib.study.bench --profile tiny                   # CPU, tiny random shapes, < 1 minute

One *step* is one optimizer step on one batch, data loading left out (a synthetic batch sits on
the device). The configurations timed in one run, each after ``--warmup`` untimed steps:

    official       Algorithm 1 as the authors' code runs it: L_simple detached, so the UNet
                   runs forward only, under no_grad (``gradient_path="official"``)
    paper          Algorithm 1 as the paper writes it: L_simple back-propagates through the
                   frozen UNet into the adapter (``gradient_path="paper"``)
    paper+ckpt     the same with the UNet's gradient checkpointing
    full           what users would otherwise run: a full UNet fine-tune step as diffusers'
                   ``train_text_to_image`` does it (fp32 master weights of the UNet, trainable;
                   VAE and text encoder cast to the 16-bit precision; autocast; AdamW lr 1e-4;
                   grad clip 1; VAE encode and text encode inside the step)
    full+ckpt      the same with gradient checkpointing
    <path>+<lever> one lever switched on (``--levers``, on the paths of ``--lever-paths``):
                   cache_latents  latents encoded once per dataset (both flip orientations, so
                                  the random flip survives): the step skips the VAE encoder
                   channels_last  NHWC memory format for the UNet and VAE convolutions
                   compile        ``torch.compile`` of the UNet (skipped on a CPU unless
                                  ``--compile-on-cpu``: inductor needs a C++ toolchain there
                                  and a minute or more per graph, longer than the whole bench)
                   bf16           bf16 weights and autocast instead of fp16 (no loss scaling)
                   fused_adamw    ``torch.optim.AdamW(fused=True)``
                   all            all of them together

The adapter paths reuse ``sur_lib.train.compute_losses`` (the training loop's own forward) and
the optimizer settings of ``TrainConfig`` (AdamW lr 1e-5, weight decay 1e-2, clip 1.0), with
fp16 loss scaling as ``accelerate`` does it. Weights are only used for timing: the backbone is
cast back and forth between precisions between configurations, which is lossy for real weights.

Per configuration the results hold the median step time, samples/s, peak memory
(``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``, reset between configurations;
null on a CPU), the FLOPs each step executes (``torch.utils.flop_counter.FlopCounterMode`` over
one step, split into UNet, text encoder, adapter and the rest, i.e. the VAE encoder), the
achieved TFLOP/s, the model FLOPs utilisation (MFU, see ``MFU_DEFINITION``) and ratios against ``full``.

``--cap-gib 24`` caps the caching allocator with ``torch.cuda.set_per_process_memory_fraction``
to emulate the RTX 3090. A configuration that runs out of memory is reported with
``"status": "oom"``, never dropped; the batch is then halved until a step fits, and the largest
batch that fits and the gradient accumulation that restores the requested batch are reported.
(The cap counts what PyTorch's allocator holds, not the CUDA context of ~0.5 GiB: a real 24 GB
card is slightly tighter.)

Also measured: knowledge-vector throughput (prompts/s of ``sur_lib.knowledge.knowledge_vectors``)
for a LlamaForCausalLM of LLaMA-7B shape with random weights (bf16, batch 32, GPU only), a tiny
random Llama (tiny profile) and, with ``--smollm2``, the real SmolLM2-135M on the CPU; and an
estimate of the paper's 5000 steps on an RTX 3090 (``rtx3090_estimate``).

On a GPU machine whose Python has torch and transformers but no diffusers, install the two
pure-Python wheels it lacks without their dependencies (``diffusers`` and ``open_clip_torch``,
which only supplies the CLIP vocabulary file) and run from the repository root, e.g.::

    pip install --no-deps diffusers==0.42.1 open_clip_torch==3.3.0
    PYTHONUNBUFFERED=1 python3 -m sur_lib.study.bench --profile paper               # ratios at batch 16
    PYTHONUNBUFFERED=1 python3 -m sur_lib.study.bench --profile paper --cap-gib 24  # what fits a 3090

Each run writes its JSON after every configuration (``"partial": true`` until the end), so a
run stopped by a time limit keeps what it measured; ``--only`` runs a subset of configurations.

Layout: ``config`` (profiles, levers, step specifications), ``hardware`` (device names, peaks,
memory, OOM), ``flops`` (FLOP counting), ``estimate`` (the paper-shape FLOPs and the RTX 3090
estimate), ``step`` (the timed training step and the batch search), ``llm`` (knowledge-vector
throughput), ``report`` (ratios, MFU, summary, log) and ``run`` (``run_bench`` and the
command line).
"""

from __future__ import annotations

from .config import (  # noqa: F401
    LEVERS, LEVER_CHOICES, BASE_SPECS, PRECISIONS, PRECISION_NAMES, PROFILE_DEFAULTS,
    FULL_FINETUNE, SIMPLE_WORDS, COMPLEX_TAGS, BenchConfig, StepSpec, specs_for,
)
from .hardware import (  # noqa: F401
    PEAK_TFLOPS, RTX3090, RTX3090_UTILISATION, _sync, free_memory, is_oom, device_name,
    device_slug, peak_tflops, versions,
)
from .flops import (  # noqa: F401
    MFU_DEFINITION, _cpu_flash_attention_flops, _cpu_flash_attention_backward_flops,
    _flop_counter, count_flops, unet_forward_flops,
)
from .estimate import (  # noqa: F401
    PAPER_STEPS, RTX3090_METHOD, rtx3090_estimate, PAPER_SHAPE_SPECS, paper_shape_flops,
    _paper_shape_flops,
)
from .step import (  # noqa: F401
    synthetic_prompts, synthetic_batch, slice_batch, _StepBackbone, BenchState,
    TrainingStep, _full_finetune_loss, time_steps, _measure, find_largest_batch, usable,
    run_config, _build_state,
)
from .llm import (  # noqa: F401
    WordTokenizer, llama_config, tiny_llama_config, random_llm, llm_throughput,
    knowledge_throughput,
)
from .report import (  # noqa: F401
    add_ratios, add_mfu, _fmt, summarize, _notes, default_out, command_line, _jsonable,
    _log_summary,
)
from .run import (  # noqa: F401
    run_bench, _csv, parse_args, main,
)
