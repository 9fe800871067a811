"""Algorithm 1 of the paper: train the SUR-adapter with everything else frozen.

    for each step:
        x   = fEn(simple prompt)            frozen text encoder
        out = adapter(x)                    Eq. 4-7  -> c, Q (or h0), ...
        L_LLM = KL(W0 fLLM(simple), Q)      Eq. 5    fLLM precomputed (knowledge vectors)
        L_CP  = KL(c, fEn(complex prompt))  Eq. 9
        L_simple = ||eps - eps_theta(z_t, t, c)||^2   Eq. 8, frozen UNet (and VAE)
        L = L_simple + l1 L_LLM + l2 L_CP   Eq. 10; only the adapter's parameters are updated

Two gradient paths (``gradient_path``):
  * ``paper``: L_simple back-propagates through the frozen UNet into the adapter (what the
    paper's Eq. 10 implies);
  * ``official``: the authors' code re-wraps c with ``torch.tensor(...)`` before the UNet,
    which detaches it: L_simple then sends no gradient to the adapter and only the two KL
    terms (scaled by 1e-5) train it. We reproduce that with ``c.detach()``.

Runs on `accelerate` (CPU, one GPU, or several processes), with mixed precision (fp16/bf16),
gradient accumulation, gradient clipping, checkpoints every N steps written atomically,
resume from the newest intact checkpoint, a tqdm bar, a CSV log of every loss term (averaged
over the processes) and, optionally, TensorBoard or Weights & Biases through accelerate's
trackers. A NaN or inf loss stops the run before it reaches the weights. That bookkeeping
(processes, the folder's lock, checkpoints without pickle, the log) is in
``sur_lib.infra.run_state``; this module is the method: config, data, losses, Algorithm 1.

Determinism and exact resume: every micro-step seeds torch from (seed, step, micro-step,
process) and draws its batch from a seeded per-epoch permutation (processes take interleaved
slices), so a run that is killed and resumed from a checkpoint follows the same path as a run
that never stopped. Images are decoded by a DataLoader (``dataloader_num_workers`` worker
processes) that hands each micro-batch over with the generator state after its random flips,
so the batches, the noise and the losses do not depend on the number of workers
(``sur_lib.infra.micro_batches``). ``TrainConfig``'s fields are typed and checked by the
generic ``sur_lib.infra.config.TypedConfig`` with its table of rules (``RULES``).

    python -m sur_lib.train sur_lib/configs/tiny.yaml --max_steps 200 --output_dir runs/x
    torchrun --nproc_per_node 2 -m sur_lib.train sur_lib/configs/rtx3090.yaml ...   # 2 GPUs (or CPU, gloo)
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import G_INITS, SURAdapter
from .data import SURDDataset, collate
from .infra import config, run_state
from .infra.micro_batches import (micro_batch_loader, micro_step_seed, read_text_only_prompts,
                                  text_only_draw)
from .infra.cli import UsageError
from .infra.run_state import NonFiniteLossError  # noqa: F401  (what train raises on a NaN or inf loss)
from .knowledge import stack_knowledge
from .losses import DIRECTIONS, llm_distillation_loss, prompt_alignment_loss, simple_loss, total_loss

GRADIENT_PATHS = ("paper", "official")
LOG_FIELDS = ["step", "loss", "l_simple", "l_llm", "l_cp", "grad_norm", "lr", "seconds"]
LLM_DTYPES = ("float32", "float16", "bfloat16")
# a resume may change only these (the run's length, its bookkeeping and where things are);
# any other difference from the checkpoint's config is refused unless allow_config_change
RESUME_FREE_KEYS = ("max_steps", "checkpoint_every", "keep_checkpoints", "progress", "resume",
                    "output_dir", "data_dir", "knowledge_file")
# options added after results were stored, with their defaults: a run's identity (the study's
# run hash, sur_lib.study.experiments.runs.config_key) leaves an option out while it is at
# its default, so the runs behind stored results keep their names. A new field goes here.
LATER_KEYS = {"llm_drop_first": False, "dataloader_num_workers": 0, "report_to": "none",
              "text_only_prompts": None, "text_only_batch": 0}
MAX_MICRO_STEPS = 100_000_000  # max_steps x gradient_accumulation_steps
Rule = config.Rule
PATH, NAME, SEED = Rule(path=True), Rule(text=True, path=True), Rule(seed=True)  # recurring rules


@dataclass
class TrainConfig(config.TypedConfig):
    """The method's settings, with the paper's references; ``RULES`` below says what each may
    be (``sur_lib.infra.config.TypedConfig``: typed and checked on creation, read from YAML)."""
    # what to train on
    profile: str = "tiny"  # "tiny", "paper", "tiny-random" (tests), or a backbone folder
    pretrained: str | None = None  # paper profile: SD 1.x repo id or folder
    data_dir: str = "data/surd-mini"
    max_samples: int | None = None
    resolution: int | None = None  # None: the UNet's sample size x the VAE factor
    center_crop: bool = True
    random_flip: bool = True
    # LLM knowledge (Sec. 3.3): a safetensors cache {simple prompt -> vector}
    knowledge_file: str | None = None  # None: <output_dir>/knowledge.safetensors
    llm: str = "smollm2"  # "smollm2" or a causal-LM repo id / folder (paper: a LLaMA)
    llm_layer: int = -1
    llm_include_bos: bool = True
    llm_drop_first: bool = False  # not in the paper: leave the first token (an attention sink) out
    llm_dtype: str = "float32"  # paper: "bfloat16" (LLaMA-13B in fp32 needs 52 GB)
    llm_device: str = "cpu"  # "cuda", or "auto" to spread a large LLM over GPU and CPU memory
    # adapter (Eq. 4-7)
    eta: float = 0.1
    num_layers: int = 2
    num_heads: int = 8
    ffn_dim: int = 2048
    dropout: float = 0.1
    g_init: str = "zeros"
    official_adapter: bool = False
    w0_seed: int = 0
    # losses (Eq. 5, 8, 9, 10)
    gradient_path: str = "paper"
    lambda_llm: float = 1e-5
    lambda_cp: float = 1e-5
    temperature: float = 1.0
    kl_direction: str = "authors"
    # optimisation (appendix B.1 and the authors' script)
    max_steps: int = 5000
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-5
    lr_warmup_steps: int = 0
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # "no", "fp16", "bf16"
    gradient_checkpointing: bool = False
    seed: int = 0
    # bookkeeping
    output_dir: str = "runs/sur-adapter"
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = True
    progress: bool = True
    extra: dict = field(default_factory=dict)
    # added later (each is in LATER_KEYS with its default, so run hashes stay)
    dataloader_num_workers: int = 0  # processes that decode images (0: the training process)
    report_to: str = "none"  # "none" (log.csv only), "tensorboard" or "wandb" (accelerate's trackers)
    # not in the paper: text-only prompts (a file, one per line) that reach the adapter only
    # through L_LLM, text_only_batch of them per micro-step (no image: L_simple and L_CP skip them)
    text_only_prompts: str | None = None
    text_only_batch: int = 0

    # What each field may be (sur_lib.infra.config.check_fields, in this order; an error names
    # the key and the value; None passes): a range, choices, text that must not be empty, a path
    # (a leading ~ is the home folder), a seed. An upper bound with its reason is far above any
    # real run (the paper: 5000 steps of batch 16 at 512 pixels), low enough that a typo (1e12
    # steps, a batch of 1e9) is refused instead of hanging or exhausting memory.
    RULES = {
        "profile": NAME, "pretrained": PATH, "data_dir": NAME, "max_samples": Rule(ge=1),
        "resolution": Rule(ge=1, le=8192, why="image side in pixels; SD 1.5 uses 512"),
        "knowledge_file": PATH, "llm": NAME, "llm_dtype": Rule(choices=LLM_DTYPES),
        "llm_device": Rule(text=True),
        "eta": Rule(ge=0, le=1), "num_layers": Rule(ge=1, le=1024, why="the paper's adapter has 2"),
        "num_heads": Rule(ge=1, le=4096, why="the paper's adapter has 8"),
        "ffn_dim": Rule(ge=1, le=1_048_576, why="the paper's adapter has 2048"),
        "dropout": Rule(ge=0, lt=1), "g_init": Rule(choices=G_INITS), "w0_seed": SEED,
        "gradient_path": Rule(choices=GRADIENT_PATHS), "lambda_llm": Rule(ge=0), "lambda_cp": Rule(ge=0),
        "temperature": Rule(gt=0),  # the KL terms divide by it (Eq. 5, 9)
        "kl_direction": Rule(choices=DIRECTIONS),
        "max_steps": Rule(ge=1, le=10_000_000, why="the paper trains 5,000"),
        "batch_size": Rule(ge=1, le=65_536, why="the paper's is 16"),
        "gradient_accumulation_steps": Rule(ge=1, le=65_536, why="far beyond any real run"),
        "learning_rate": Rule(gt=0), "lr_warmup_steps": Rule(ge=0), "weight_decay": Rule(ge=0),
        "adam_beta1": Rule(ge=0, lt=1), "adam_beta2": Rule(ge=0, lt=1), "adam_epsilon": Rule(gt=0),
        "max_grad_norm": Rule(gt=0),
        "mixed_precision": Rule(choices=("no", "fp16", "bf16"), shown="no/fp16/bf16"), "seed": SEED,
        "output_dir": NAME, "checkpoint_every": Rule(ge=1), "keep_checkpoints": Rule(ge=1),
        "dataloader_num_workers": Rule(ge=0, le=64,
                                       why="worker processes; a few per CPU core is plenty"),
        "text_only_prompts": PATH, "text_only_batch": Rule(ge=0, le=65_536, why="prompts per micro-step"),
    }

    def check(self):
        """The rules between fields (after ``RULES``)."""
        if self.max_steps * self.gradient_accumulation_steps > MAX_MICRO_STEPS:
            raise UsageError(f"max_steps x gradient_accumulation_steps must be <= {MAX_MICRO_STEPS:,}, "
                             f"got {self.max_steps:,} x {self.gradient_accumulation_steps:,}")
        if self.text_only_batch and not self.text_only_prompts:
            raise UsageError("text_only_batch > 0 needs text_only_prompts (a file, one prompt per line)")
        if self.gradient_path == "official" and not (self.lambda_llm or self.lambda_cp):
            raise UsageError("gradient_path='official' detaches L_simple, so lambda_llm or lambda_cp "
                             "must be > 0 or nothing trains the adapter")


# ----------------------------------------------------------------------------- building blocks


def build_adapter(cfg: TrainConfig, text_dim: int, llm_dim: int | None) -> SURAdapter:
    return SURAdapter(
        text_dim=text_dim, num_layers=cfg.num_layers, num_heads=cfg.num_heads, ffn_dim=cfg.ffn_dim,
        dropout=cfg.dropout, eta=cfg.eta, g_init=cfg.g_init, official=cfg.official_adapter,
        llm_dim=llm_dim, w0_seed=cfg.w0_seed,
    )


def load_backbone_for(cfg: TrainConfig):
    from . import models

    if cfg.profile == "tiny-random":
        return models.tiny_random_backbone(seed=cfg.seed)
    if cfg.profile == "paper":
        return models.paper_backbone(cfg.pretrained or models.SD15_REPO)
    if cfg.profile == "tiny":  # the SUR world's base model, where data_dir's default also points
        from .infra.provenance import abs_path

        return models.load_tiny_backbone(abs_path("data/models/tiny-sur-world"))
    return models.load_backbone(cfg.profile)


def knowledge_for(cfg: TrainConfig, prompts: list[str], progress: bool = True) -> dict[str, torch.Tensor]:
    """Knowledge vectors of every simple prompt from ``cfg.knowledge_file`` (default
    ``<output_dir>/knowledge.safetensors``), in either format, told apart by content:

    * this project's safetensors cache: prompts missing from it are computed with ``cfg.llm``
      (layer ``cfg.llm_layer``) and appended; the file must have been made with the same LLM,
      layer and BOS setting;
    * the authors' ``prompt2vec/<LLM>/<layer>.pt``: read as it is; it must hold every prompt
      (it cannot be extended: make a cache with ``python -m sur_lib.knowledge extract``).
    """
    from . import knowledge
    from .infra import knowledge_files as kf, llms

    path = cfg.knowledge_file or str(Path(cfg.output_dir) / "knowledge.safetensors")
    if Path(path).exists() and kf.knowledge_file_format(path) == kf.AUTHORS_PT:
        return knowledge.select_knowledge(kf.load_authors_prompt2vec(path), prompts,
                                          source=f"{path} (the authors' format, read only)")

    def load():  # called only when some vectors are missing (a cold cache loads the LLM)
        print(f"knowledge: loading {cfg.llm} to compute missing vectors for {path}", flush=True)
        return llms.load_llm(cfg.llm, getattr(torch, cfg.llm_dtype), cfg.llm_device)

    return knowledge.cached_knowledge_vectors(
        path, load, sorted(set(prompts)), layer=cfg.llm_layer, include_bos=cfg.llm_include_bos,
        progress=progress, meta={"llm": cfg.llm}, drop_first=cfg.llm_drop_first,
    )


def diffusion_inputs(scheduler, latents: torch.Tensor):
    """The inputs of Eq. 8: noise eps ~ N(0, I), timesteps t, z_t = alpha_t z + sigma_t eps, and
    the regression target (eps, or the velocity for v-prediction schedulers)."""
    noise = torch.randn_like(latents)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    if scheduler.config.prediction_type == "epsilon":
        return noisy, t, noise
    if scheduler.config.prediction_type == "v_prediction":
        return noisy, t, scheduler.get_velocity(latents, noise, t)
    raise ValueError(f"unsupported prediction_type {scheduler.config.prediction_type!r}")


def seed_micro_step(cfg: TrainConfig, batch: dict, micro_step: int, text_only: list[str]) -> None:
    """Everything random of micro-step ``micro_step`` before its forward pass (``compute_losses``):
    torch's generators seeded by (seed, micro-step), the CPU one continued after the rows'
    crops and flips, and the text-only prompts drawn. The training loop and the study's
    ``sur_lib.study.replay.replay_step`` both call it, so a replayed step sees the noise,
    timesteps and dropout the run saw."""
    torch.manual_seed(micro_step_seed(cfg.seed, micro_step))  # every device's generator
    torch.set_rng_state(batch["rng_state"])  # CPU: continue after the rows' crops/flips
    if text_only and cfg.lambda_llm:  # not in the paper: prompts seen only by L_LLM
        batch["text_only"] = text_only_draw(text_only, cfg.text_only_batch, cfg.seed, micro_step)


def compute_losses(cfg: TrainConfig, backbone, adapter, batch: dict, weight_dtype,
                   knowledge: dict | None = None) -> dict:
    """One forward pass of Algorithm 1; returns every loss term (tensors).

    ``adapter`` may be wrapped by accelerate (DDP); W0 is read from the unwrapped module.
    Knowledge vectors come from ``batch["knowledge"]`` or else from the ``knowledge`` dict.
    ``batch["text_only"]`` (not in the paper): prompts without images; L_LLM is then the mean
    over the B image prompts and the B_t text-only ones, (B L_img + B_t L_text) / (B + B_t).
    """
    device = next(adapter.parameters()).device
    core = getattr(adapter, "module", adapter)
    pixels = batch["pixel_values"].to(device, dtype=weight_dtype)
    with torch.no_grad():
        latents = backbone.encode_images(pixels)
        x = backbone.encode_prompts(batch["simple"]).to(device)
        x_complex = backbone.encode_prompts(batch["complex"]).to(device)
    noisy, t, target = diffusion_inputs(backbone.scheduler, latents)

    out = adapter(x.float())
    if cfg.lambda_llm:
        k = batch.get("knowledge")
        if k is None:
            k = stack_knowledge(knowledge, batch["simple"], width=core.llm_projection.weight.shape[1])
        l_llm = llm_distillation_loss(k.float().to(device), out.student, core.project_knowledge,
                                      cfg.temperature, direction=cfg.kl_direction)
        text_only = batch.get("text_only") or []
        if text_only:  # teacher only: the adapter's student on prompts that have no image
            with torch.no_grad():
                xt = backbone.encode_prompts(list(text_only)).to(device)
            kt = stack_knowledge(knowledge, list(text_only), width=core.llm_projection.weight.shape[1])
            l_text = llm_distillation_loss(kt.float().to(device), adapter(xt.float()).student,
                                           core.project_knowledge, cfg.temperature,
                                           direction=cfg.kl_direction)
            b, bt = out.student.shape[0], len(text_only)
            l_llm = (b * l_llm + bt * l_text) / (b + bt)
    else:
        l_llm = torch.zeros((), device=device)
    l_cp = prompt_alignment_loss(out.c, x_complex.float(), cfg.temperature, direction=cfg.kl_direction)
    paper_path = cfg.gradient_path == "paper"
    cond = out.c if paper_path else out.c.detach()  # the authors' torch.tensor(c) detaches
    with torch.set_grad_enabled(paper_path and torch.is_grad_enabled()):  # official: no graph
        pred = backbone.unet(noisy, t, cond.to(weight_dtype)).sample
    l_simple = simple_loss(pred, target)
    loss = total_loss(l_simple, l_llm, l_cp, cfg.lambda_llm, cfg.lambda_cp)
    return {"loss": loss, "l_simple": l_simple, "l_llm": l_llm, "l_cp": l_cp}


# ----------------------------------------------------------------------------- the loop

LOSS_TERMS = ("loss", "l_simple", "l_llm", "l_cp")


@dataclass
class TrainResult:
    adapter: SURAdapter
    output_dir: Path
    steps: int
    resumed_from: int
    seconds: float
    num_processes: int = 1
    is_main_process: bool = True


def train(cfg: TrainConfig | dict, backbone=None, dataset: SURDDataset | None = None,
          knowledge: dict | None = None, allow_config_change: bool = False) -> TrainResult:
    """Train a SUR-adapter: the paper's Algorithm 1, read top to bottom (the bookkeeping is in
    the helpers below). ``backbone``/``dataset``/``knowledge`` may be passed in (notebooks,
    tests); otherwise they are built from the config. Resuming from a checkpoint whose config
    differs in more than the run length is refused unless ``allow_config_change``
    (``run_state.resume``).

    With several processes (``torchrun --nproc_per_node N -m sur_lib.train ...`` or
    ``accelerate launch``) the knowledge vectors are computed by the main process while the
    others wait (then read its cache), losses are averaged over the processes before they are
    logged, and only the main process writes log.csv, checkpoints and the adapter. A NaN or inf
    loss stops every process with :class:`NonFiniteLossError` before the step's update.

    One run per ``output_dir``: a second run started on the same folder while the first runs is
    refused (``fileio.folder_lock``); only the run that holds the lock removes the temporary
    folders of killed runs. ``resume: false`` removes the checkpoints of an earlier run (with a
    note), so that a later default run cannot resume from them. Checkpoints, the log and the
    record of the processes: ``sur_lib.infra.run_state``.
    """
    cfg = TrainConfig.from_dict(cfg) if isinstance(cfg, dict) else cfg
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with run_state.run_lock(out_dir):  # the main process holds output_dir's lock until the end
        t0 = time.time()
        accelerator = run_state.make_accelerator(  # CPU, one GPU or several processes; precision
            out_dir, cfg.mixed_precision, cfg.gradient_accumulation_steps, cfg.report_to)
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
        # frozen: the text encoder fEn, the UNet and the VAE; precomputed: fLLM(p_s) (Sec. 3.3)
        backbone = _frozen_backbone(cfg, backbone, accelerator.device, weight_dtype)
        dataset, knowledge, text_only = data_and_knowledge(cfg, backbone, dataset, knowledge, accelerator)
        # trained: the adapter only (Eq. 4-7), with AdamW; then continue from a checkpoint if any
        adapter, optimizer, lr_scheduler = _adapter_and_optimizer(cfg, backbone, knowledge, accelerator)
        start = _resume(cfg, out_dir, accelerator, adapter, optimizer, lr_scheduler, allow_config_change)
        run = _run_record(cfg, out_dir, accelerator, start, t0)  # log.csv, trackers, checkpoints
        accum, n_proc = cfg.gradient_accumulation_steps, accelerator.num_processes
        rank = accelerator.process_index  # micro-step m = (step * accum + micro) * n_proc + rank
        batches = _micro_batches(cfg, dataset, start, accelerator)
        try:
            for step in run.progress_bar():
                terms = [0.0] * len(LOSS_TERMS)
                for micro in range(accum):
                    # draw a batch (images, simple and complex prompt) and seed its noise
                    batch = _next_batch(batches, cfg, (step * accum + micro) * n_proc + rank, text_only)
                    with accelerator.accumulate(adapter), accelerator.autocast():
                        # encode, add noise, adapter, L = L_simple + l1 L_LLM + l2 L_CP (Eq. 5-10)
                        losses = compute_losses(cfg, backbone, adapter, batch, weight_dtype, knowledge)
                        values = run.gather(losses)  # [processes, terms]
                        run.stop_on_non_finite(values, step, micro)  # before any update
                        accelerator.backward(losses["loss"])
                        grad_norm = run.clip_gradients(adapter, cfg.max_grad_norm, values, step, micro)
                        optimizer.step()
                        lr_scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                    for j, v in enumerate(values.mean(0).tolist()):  # the mean over the processes
                        terms[j] += v / accum
                run.log(step + 1, dict(zip(LOSS_TERMS, terms)), grad_norm, lr_scheduler.get_last_lr()[0])
                run.checkpoint_if_due(step + 1, adapter, optimizer, lr_scheduler)
        finally:
            del batches  # stops the loader's workers
            run.close()
        final = run.finish(adapter)  # unwrapped, recorded in processes.json, saved in out_dir/adapter
        return TrainResult(final, out_dir, cfg.max_steps, start, time.time() - t0,
                           num_processes=accelerator.num_processes, is_main_process=accelerator.is_main_process)


# ----------------------------------------------------------------------------- train's helpers


def _frozen_backbone(cfg: TrainConfig, backbone, device, weight_dtype):
    """The frozen text encoder, UNet and VAE (built from the config unless passed in), on
    ``device`` in the run's precision; gradient checkpointing in the UNet if asked."""
    if backbone is None:
        backbone = load_backbone_for(cfg)
    backbone.freeze()
    backbone.to(device, dtype=None if weight_dtype == torch.float32 else weight_dtype)
    if cfg.gradient_checkpointing:
        backbone.unet.enable_gradient_checkpointing()
    return backbone


def data_and_knowledge(cfg: TrainConfig, backbone, dataset, knowledge, accelerator=None):
    """(dataset, knowledge vectors, text-only prompts): each built from the config unless passed
    in. Every prompt of the data (and every text-only prompt) must have a knowledge vector, all
    of one width; errors name them. With several processes (``accelerator``) one computes the
    vectors and the others read its cache."""
    one_first = accelerator.main_process_first if accelerator else contextlib.nullcontext
    progress = accelerator is not None and cfg.progress and accelerator.is_local_main_process
    text_only = read_text_only_prompts(cfg.text_only_prompts) if cfg.text_only_batch else []
    if dataset is None:
        kw = dict(resolution=cfg.resolution or backbone.image_size, center_crop=cfg.center_crop,
                  random_flip=cfg.random_flip, max_samples=cfg.max_samples)
        if cfg.lambda_llm and knowledge is None:  # a quick pass (no image decoding) for the prompts
            prompts = SURDDataset(cfg.data_dir, check_images=False, **kw).prompts()
            with one_first():  # one process computes, the others read its cache
                knowledge = knowledge_for(cfg, prompts + text_only, progress)
        # validation names the row of every problem, missing knowledge vectors included
        dataset = SURDDataset(cfg.data_dir, knowledge=knowledge if cfg.lambda_llm else None, **kw)
    if cfg.lambda_llm and knowledge is None:
        knowledge = dataset.knowledge
        if knowledge is None:
            with one_first():
                knowledge = knowledge_for(cfg, dataset.prompts() + text_only, progress)
    if cfg.lambda_llm:  # every prompt of the data has a vector, all of one width (errors name them)
        from .knowledge import select_knowledge

        select_knowledge(knowledge, dataset.prompts(), source="the knowledge vectors")
        if text_only:  # the text-only prompts need vectors too
            select_knowledge(knowledge, text_only, source="the knowledge vectors (text-only prompts)")
    return dataset, knowledge, text_only


def _adapter_and_optimizer(cfg: TrainConfig, backbone, knowledge, accelerator):
    """The adapter (initialised after seeding torch with ``cfg.seed``), AdamW over its
    parameters and the constant-with-warmup LR schedule, prepared by accelerate.

    DistributedDataParallel runs without ``find_unused_parameters``: it waits for a gradient of
    every trainable parameter, and each gets one in every step (tests/test_train.py checks it
    for both adapters and gradient paths): L_CP is built even when lambda_cp = 0 (its zero
    gradient still reaches every parameter behind c), and the official adapter's never-used
    modules are frozen (``SURAdapter``)."""
    from diffusers.optimization import get_scheduler

    llm_dim = next(iter(knowledge.values())).shape[-1] if cfg.lambda_llm else None
    torch.manual_seed(cfg.seed)  # adapter init
    adapter = build_adapter(cfg, backbone.text_dim, llm_dim).to(accelerator.device)
    adapter.train()
    optimizer = torch.optim.AdamW(
        adapter.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon,
    )
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer,
                                 num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes)
    return accelerator.prepare(adapter, optimizer, lr_scheduler)


def _resume(cfg: TrainConfig, out_dir: Path, accelerator, adapter, optimizer, lr_scheduler,
            allow_config_change: bool) -> int:
    """The step to start from: 0, or that of the newest intact checkpoint, loaded into the
    adapter, AdamW and the LR schedule (``run_state.resume``: refused if the config differs
    outside ``RESUME_FREE_KEYS`` unless ``allow_config_change``; then this config's AdamW
    settings and learning rate replace the saved ones)."""
    settings = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                    weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon)
    return run_state.resume(out_dir, accelerator, accelerator.unwrap_model(adapter), optimizer,
                            lr_scheduler, config=cfg.to_dict(), defaults=TrainConfig.defaults(),
                            free_keys=RESUME_FREE_KEYS, max_steps=cfg.max_steps, resume=cfg.resume,
                            allow_change=allow_config_change, optimizer_settings=settings)


def _run_record(cfg: TrainConfig, out_dir: Path, accelerator, start: int, t0: float):
    """The run's record (``run_state.RunRecord``): config.yaml, log.csv with ``LOG_FIELDS``,
    the trackers, the progress bar, the gathered and checked loss terms (``LOSS_TERMS``), the
    gradient clipping, the checkpoints and the final adapter."""
    return run_state.RunRecord(out_dir, accelerator, cfg.to_dict(), start, t0, max_steps=cfg.max_steps,
                               checkpoint_every=cfg.checkpoint_every, keep=cfg.keep_checkpoints,
                               progress=cfg.progress, log_fields=LOG_FIELDS, loss_terms=LOSS_TERMS,
                               accum=cfg.gradient_accumulation_steps, fp16=cfg.mixed_precision == "fp16")


def _micro_batches(cfg: TrainConfig, dataset, start: int, accelerator):
    """This process's micro-batches from step ``start`` on (an iterator over
    ``infra.micro_batches.micro_batch_loader``). Micro-step m of this process fixes its batch
    (``batch_indices``) and its seed (``micro_step_seed``); process p of P takes m = (step * accum + micro) * P + p, so
    no two share a batch or a seed."""
    accum, n_proc = cfg.gradient_accumulation_steps, accelerator.num_processes
    micro_steps = [(step * accum + micro) * n_proc + accelerator.process_index
                   for step in range(start, cfg.max_steps) for micro in range(accum)]
    loader = micro_batch_loader(dataset, micro_steps, batch_size=cfg.batch_size, seed=cfg.seed,
                                collate=collate, num_workers=cfg.dataloader_num_workers,
                                pin_memory=accelerator.device.type == "cuda")
    return iter(loader)


def _next_batch(batches, cfg: TrainConfig, micro_step: int, text_only: list[str]) -> dict:
    """The next micro-batch, with torch's generators where a run that never stopped has them:
    every device's seeded by (seed, micro-step), the CPU's continued after the rows' random
    crops and flips. With text-only prompts (not in the paper), this micro-step's draw of them."""
    batch = next(batches)
    assert batch["micro_step"] == micro_step, (batch["micro_step"], micro_step)
    seed_micro_step(cfg, batch, micro_step, text_only)  # the same as study.replay's
    return batch


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m sur_lib.train CONFIG.yaml [--key value ...] [--allow_config_change true]``
    (the command line: ``sur_lib.infra.config.command_line``)."""
    parsed = config.command_line(TrainConfig, sys.argv[1:] if argv is None else list(argv), __doc__, flags={
        "allow_config_change": "resume even if the checkpoint's config differs (the change is recorded)"})
    if parsed is None:  # the help
        return 0
    cfg, flags = parsed
    result = train(cfg, allow_config_change=flags["allow_config_change"])
    if result.is_main_process:
        print(f"done: {result.steps} steps in {result.seconds:.1f} s -> {result.output_dir / 'adapter'}")
    return 0


if __name__ == "__main__":
    from .infra.cli import run

    run(main)
