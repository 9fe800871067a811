"""A training run's bookkeeping: its processes and trackers, its folder's lock, its checkpoints
(saved, verified, resumed), its CSV log and the record of its processes. ``sur_lib.train`` calls
these around Algorithm 1; nothing here knows the method: the run's config comes as a dict, the
trained module as any ``torch.nn.Module`` with ``save_pretrained``, the log's columns as a list.

A checkpoint ``<output_dir>/checkpoints/step-NNNNNN`` holds no pickle (the format of the base
model's pretraining state, ``sur_lib.world.pretrain``, too)::

    adapter/                 the trained module's save_pretrained (config.json + safetensors)
    optimizer.safetensors    the tensors of {"opt": AdamW, "lr_sched": LR schedule, "scaler":
    optimizer.json           fp16 loss scaler} state dicts, and the rest of them as JSON
                             (``checkpoints.save_state_dict``)
    state.json               step, config, ``finite``, the manifest (size, SHA-256 of each file)

It is written atomically (``fileio.atomic_folder``), verified before it is trusted and pruned
without losing the newest intact one (``sur_lib.infra.checkpoints``). No RNG state is stored:
every micro-step of a run seeds torch itself (``sur_lib.train.seed_micro_step``), so a resumed
run needs no generator of the run that saved (tests/test_train.py compares resumed and straight
runs bit for bit).

Checkpoints of the earlier format, accelerate's ``save_state`` (an ``accelerate/`` folder with
model.safetensors, optimizer.bin, scheduler.bin and random_states_0.pkl) still resume, because
that is cheap and safe: the weights come from safetensors, the optimizer and LR-schedule states
from ``torch.load(weights_only=True)`` (torch's restricted unpickler: tensors and plain
containers, never arbitrary code); random_states_0.pkl is not read. A note says so, and the
next checkpoint is written in the format above.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from . import checkpoints
from .cli import UsageError
from .fileio import atomic_folder, atomic_write_text, naming_file, write_json

CHECKPOINTS = "checkpoints"
MODEL_DIR = "adapter"
OPTIMIZER = "optimizer"  # optimizer.safetensors + optimizer.json
CHECKPOINT_FILES = (f"{MODEL_DIR}/diffusion_pytorch_model.safetensors", f"{OPTIMIZER}.safetensors",
                    f"{OPTIMIZER}.json")
ACCELERATE_FILES = ("accelerate/model.safetensors", "accelerate/optimizer.bin")  # the old format
FORMATS = (CHECKPOINT_FILES, ACCELERATE_FILES)  # a checkpoint is complete in one of them
CONFIG_CHANGES = "config_changes.json"
REPORT_TO = ("none", "tensorboard", "wandb")


# ----------------------------------------------------------------------------- processes, trackers


def log_with(report_to: str):
    """accelerate's ``log_with`` for ``report_to`` (None: only log.csv), checked up front."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    if report_to not in REPORT_TO:
        raise ValueError(f"report_to must be one of {REPORT_TO}, got {report_to!r}")
    if report_to == "none":
        return None
    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[report_to]
    if not available():
        raise ImportError(f"report_to={report_to!r} needs the {report_to} package, which is "
                          f"not installed: pip install {report_to} (or report_to: none; the "
                          "CSV log needs nothing)")
    return report_to


def make_accelerator(out_dir: Path, mixed_precision: str, gradient_accumulation_steps: int,
                     report_to: str = "none"):
    """The Accelerator of a run (CPU, one GPU or several processes). Two things accelerate does
    not do by itself:

    * under ``torchrun`` on a machine without CUDA, accelerate runs every process as its own
      single-process job unless it is told ``cpu=True``; it then joins them with gloo
      (``accelerate launch --cpu --num_processes N`` starts one process unless MPI is used);
    * accelerate keeps one mixed precision per process (its state is process-wide): a run with
      another mixed precision than an earlier one in the same process (a notebook) is refused
      with a UsageError that says to use a new process, instead of accelerate's ValueError.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, is_initialized
    from accelerate.utils import ProjectConfiguration

    if is_initialized() and AcceleratorState().mixed_precision != mixed_precision:
        raise UsageError(f"mixed_precision={mixed_precision!r}: this process already trained with "
                         f"mixed_precision={AcceleratorState().mixed_precision!r}, and accelerate keeps "
                         "one per process; train this config in a new process (python -m sur_lib.train "
                         "..., or restart the notebook's kernel)")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        cpu=distributed and not torch.cuda.is_available(),
        log_with=log_with(report_to),
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs")),
    )


def tracker_config(config: dict) -> dict:
    """The config as trackers accept it (numbers, strings, booleans)."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.items()}


def digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes): equal iff identical."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def record_processes(accelerator, model, out_dir: Path) -> None:
    """``processes.json``: how many processes trained, and the digest of each one's final
    model (data-parallel processes must end with identical weights)."""
    import socket

    from accelerate.utils import gather_object

    mine = {"process_index": accelerator.process_index, "pid": os.getpid(),
            "host": socket.gethostname(), "adapter_sha256": digest(model)}
    everyone = gather_object([mine]) if accelerator.num_processes > 1 else [mine]
    if accelerator.is_main_process:
        write_json({"num_processes": accelerator.num_processes, "processes": everyone},
                   out_dir / "processes.json")


class NonFiniteLossError(RuntimeError):
    """A loss term (or, without fp16 loss scaling, the gradient norm) became NaN or inf."""


def stop_on_non_finite(values: torch.Tensor, names, step: int, micro: int, accum: int,
                       output_dir: str | os.PathLike, grad_norm: float | None = None,
                       hint: str = "") -> None:
    """Raise :class:`NonFiniteLossError` if a loss term of any process (``values``: gathered,
    [processes, terms], the terms called ``names``) or the gradient norm is NaN or inf. Every
    process sees the same gathered values (and the same all-reduced gradients), so all of them
    stop together. The message names the step, the process, every loss term and the last
    checkpoint of ``output_dir``, which stays as it was; ``hint`` is appended."""
    bad_rows = (~torch.isfinite(values)).any(1).nonzero().flatten().tolist()
    if not bad_rows and (grad_norm is None or math.isfinite(grad_norm)):
        return
    proc = bad_rows[0] if bad_rows else 0
    terms = ", ".join(f"{k}={v:.6g}" for k, v in zip(names, values[proc].tolist()))
    what = (f"loss at step {step + 1} (micro-step {micro + 1} of {accum}, process {proc}): {terms}"
            if bad_rows else f"gradient norm ({grad_norm}) at step {step + 1}: {terms}")
    ckpt = latest_checkpoint(output_dir)
    where = (f"the last checkpoint, {ckpt[1]} (step {ckpt[0]}), is intact and the same command "
             "resumes from it" if ckpt else "no checkpoint was written yet")
    raise NonFiniteLossError(
        f"non-finite {what}. Training stopped before this step's update; {where} (after lowering "
        f"learning_rate or removing a bad row, for example).{hint}")


# ----------------------------------------------------------------------------- the folder


def run_lock(out_dir: Path):
    """The lock of ``out_dir`` (``fileio.folder_lock``), refused with a UsageError naming the
    folder and the process that holds it. Only the main process (RANK 0) takes it; the others
    get a context that does nothing."""
    from .fileio import FolderLocked, folder_lock

    if int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def lock():
        try:
            held = folder_lock(out_dir)
            held.__enter__()
        except FolderLocked as e:
            who = f"process {e.pid}" if e.pid else "another process"
            raise UsageError(f"output_dir {out_dir} is in use by another training run ({who}): wait "
                             "for it to finish, or choose another output_dir") from None
        try:
            yield
        finally:
            held.__exit__(None, None, None)
    return lock()


def clear_temporaries(ckpt_root: Path) -> None:
    """Remove half-written checkpoints (``.step-N.*.tmp``) and moved-aside old ones of earlier,
    dead runs. Called only by the process that holds output_dir's lock: no other run can be
    writing them."""
    for stale in [*ckpt_root.glob(".tmp-*"), *ckpt_root.glob(".*.tmp"), *ckpt_root.glob(".*.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)


# ----------------------------------------------------------------------------- checkpoints


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """[(step, folder)] of every checkpoint under output_dir/checkpoints (not verified)."""
    return checkpoints.scan(Path(output_dir) / CHECKPOINTS)[0]


def latest_checkpoint(output_dir: str | os.PathLike) -> tuple[int, Path] | None:
    """The newest checkpoint (step, folder), or None; ``resume_checkpoint`` also verifies."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def resume_checkpoint(output_dir: str | os.PathLike) -> tuple[tuple[int, Path] | None, list[str]]:
    """The newest *intact* checkpoint (``checkpoints.verify``: every file as it was saved)
    and notes saying which entries were skipped or damaged, and why."""
    return checkpoints.newest_intact(Path(output_dir) / CHECKPOINTS, FORMATS)


def training_states(accelerator, optimizer, lr_scheduler) -> dict:
    """{"opt", "lr_sched"[, "scaler"]}: the state dicts a checkpoint stores besides the weights
    (the loss scaler's only under fp16, where accelerate made one)."""
    states = {"opt": optimizer.state_dict(), "lr_sched": lr_scheduler.state_dict()}
    if accelerator.scaler is not None:
        states["scaler"] = accelerator.scaler.state_dict()
    return states


def save_checkpoint(out_dir: Path, step: int, model, states: dict, config: dict, keep: int) -> Path:
    """Write checkpoints/step-N atomically (``fileio.atomic_folder``: a kill at any moment
    leaves either the old set or a complete new checkpoint): ``model``'s save_pretrained,
    ``states`` (``training_states``) without pickle, and state.json with a manifest (size and
    SHA-256 of every file), ``finite`` and the config (plus config_changes.json's record, if
    any); then prune to ``keep``, never deleting the newest intact checkpoint with finite
    weights."""
    out_dir = Path(out_dir)
    root = out_dir / CHECKPOINTS
    final = root / f"{checkpoints.PREFIX}{step:06d}"
    with atomic_folder(final) as tmp:
        model.save_pretrained(tmp / MODEL_DIR)
        checkpoints.save_state_dict(states, tmp, OPTIMIZER)
        state = {"step": step, "config": config, "finite": checkpoints.all_finite(model),
                 "files": checkpoints.manifest(tmp)}
        changes = out_dir / CONFIG_CHANGES
        if changes.exists():
            state["config_changes"] = json.loads(changes.read_text())
        write_json(state, tmp / checkpoints.STATE_FILE)
    checkpoints.prune(root, keep, FORMATS, trusted=final if state["finite"] else None)
    return final


def read_checkpoint(path: Path) -> tuple[dict, dict, str | None]:
    """(weights, states, note) of the checkpoint ``path``: its model's tensors, the state dicts
    ``save_checkpoint`` stored, and a note if it is in accelerate's old format (None if not)."""
    from safetensors.torch import load_file

    if (path / f"{OPTIMIZER}.json").is_file():
        return load_file(path / CHECKPOINT_FILES[0]), checkpoints.load_state_dict(path, OPTIMIZER), None
    old = path / "accelerate"
    weights = load_file(old / "model.safetensors")
    if weights and all(k.startswith("module.") for k in weights):  # saved from a DDP wrapper
        weights = {k[len("module."):]: v for k, v in weights.items()}

    def unpickle(name):  # torch's restricted unpickler: tensors and plain containers only
        return torch.load(old / name, map_location="cpu", weights_only=True)

    states = {"opt": unpickle("optimizer.bin"), "lr_sched": unpickle("scheduler.bin")}
    if (old / "scaler.pt").is_file():
        states["scaler"] = unpickle("scaler.pt")
    note = (f"{path.name} is in accelerate's older checkpoint format: read its model.safetensors, "
            "and its optimizer.bin and scheduler.bin with torch.load(weights_only=True) (no "
            "arbitrary pickle); the next checkpoint is written without pickle")
    return weights, states, note


def with_optimizer_settings(states: dict, lr_lambdas, lr: float, **group_settings) -> dict:
    """``states`` (``training_states``) with a new base learning rate ``lr`` and AdamW settings
    (``betas``, ``eps``, ``weight_decay``): each parameter group's lr is ``lr`` times the LR
    schedule's factor (``lr_lambdas``, the LambdaLR's) at the saved step, in the optimizer's
    and the schedule's state dicts alike. What ``load_state_dict`` then restores is the new
    setting."""
    opt, sched = states["opt"], states["lr_sched"]
    groups = opt["param_groups"]
    lrs = [lr * fn(sched["last_epoch"]) for fn in lr_lambdas]
    for g, now in zip(groups, lrs):
        g.update(group_settings, initial_lr=lr, lr=now)
    sched["base_lrs"] = [lr] * len(groups)
    sched["_last_lr"] = lrs  # a key of LambdaLR's state dict: what get_last_lr() returns
    return states


def config_differences(now: dict, saved: dict, defaults: dict, free_keys) -> dict[str, tuple]:
    """{key: (checkpoint's value, this config's value)} for every key outside ``free_keys``
    that differs (a key the checkpoint lacks counts at its default, ``defaults[key]``)."""
    return {k: (saved.get(k, defaults[k]), v) for k, v in now.items()
            if k not in free_keys and saved.get(k, defaults[k]) != v}


def resume(out_dir: Path, accelerator, model, optimizer, lr_scheduler, *, config: dict,
           defaults: dict, free_keys, max_steps: int, resume: bool, allow_change: bool,
           optimizer_settings: dict) -> int:
    """Load the newest intact checkpoint of ``out_dir`` into ``model`` (unwrapped), the optimizer,
    the LR schedule and accelerate's loss scaler, saying which checkpoints were skipped and why,
    and return its step; 0 if there is none. Refuses (UsageError) a checkpoint beyond
    ``max_steps`` and one whose config differs from ``config`` outside ``free_keys`` unless
    ``allow_change``: then ``optimizer_settings`` (``lr`` and AdamW's settings) replace the
    saved ones and the change is recorded in config_changes.json and in every later
    checkpoint's state.json. ``resume`` false: the checkpoints of an earlier run are removed
    (with a note), so that a later default run cannot resume from them; returns 0."""
    changes_file = out_dir / CONFIG_CHANGES
    if not resume:
        changes_file.unlink(missing_ok=True)
        old = [p for _, p in list_checkpoints(out_dir)]
        if old and accelerator.is_main_process:  # else the next default run would resume from them
            accelerator.print(f"resume false: removing the {len(old)} checkpoint(s) of the earlier run "
                              f"in {out_dir / CHECKPOINTS} ({', '.join(p.name for p in old)}); "
                              "this run starts at step 0", flush=True)
            for p in old:
                shutil.rmtree(p)
        accelerator.wait_for_everyone()
        return 0
    found, notes = resume_checkpoint(out_dir)
    for note in notes:
        accelerator.print(note, flush=True)
    if found is None:
        if list_checkpoints(out_dir):
            raise UsageError(f"no intact checkpoint in {out_dir / CHECKPOINTS} ({'; '.join(notes)}): "
                             "remove the damaged ones, or set resume false to start over")
        changes_file.unlink(missing_ok=True)
        return 0
    start, path = found
    if start > max_steps:
        raise UsageError(f"{path} is at step {start}, beyond max_steps={max_steps}: the adapter "
                         f"cannot be brought back to step {max_steps}. Set max_steps >= {start} to "
                         "continue, or resume false (or another output_dir) to train from scratch")
    diff = config_differences(config, checkpoints.read_state(path).get("config") or {}, defaults,
                              free_keys)
    if diff and not allow_change:
        listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise UsageError(f"{path.name} was trained with another config ({listed}); resume with the "
                         "same values, set resume false (or another output_dir) to start over, or "
                         "pass allow_config_change (--allow_config_change true) to continue with "
                         "the new values (recorded in the checkpoint)")
    try:
        weights, states, note = read_checkpoint(path)
        if diff:
            lambdas = getattr(lr_scheduler, "scheduler", lr_scheduler).lr_lambdas
            states = with_optimizer_settings(states, lambdas, **optimizer_settings)
        model.load_state_dict(weights)
        optimizer.load_state_dict(states["opt"])
        lr_scheduler.load_state_dict(states["lr_sched"])
        if accelerator.scaler is not None and states.get("scaler"):
            accelerator.scaler.load_state_dict(states["scaler"])
    except Exception as e:
        raise RuntimeError(f"could not load the checkpoint {path}: {type(e).__name__}: {e}") from e
    if note:
        accelerator.print(note, flush=True)
    if diff:
        if accelerator.is_main_process:
            record = json.loads(changes_file.read_text()) if changes_file.exists() else []
            record.append({"at_step": start, "from_checkpoint": path.name,
                           "changed": {k: {"checkpoint": a, "now": b} for k, (a, b) in diff.items()}})
            write_json(record, changes_file)
        accelerator.print("config changed on resume (allow_config_change): "
                          + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items()), flush=True)
    accelerator.print(f"resuming from {path} (step {start})")
    return start


# ----------------------------------------------------------------------------- the log


def read_log_rows(path: Path, fields: list[str], upto: int) -> list[list[str]]:
    """The complete rows of a CSV log with step <= ``upto`` (a half-written last line from a
    kill is dropped), as lists of the strings written; none if its header is not ``fields``."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        if next(reader, None) != list(fields):
            return []
        rows = []
        for r in reader:
            try:
                if len(r) == len(fields) and int(r[0]) <= upto:
                    rows.append(r)
            except ValueError:
                continue
        return rows


def open_log(path: Path, fields: list[str], resume_step: int):
    """(file, csv.DictWriter) of a CSV log with the columns ``fields`` (the first: the step); on
    resume, rows after the checkpoint (written before a kill) are dropped. The kept rows are
    written to a new file that replaces the log atomically (a kill at that moment leaves the
    old log whole); new rows are then appended."""
    rows = read_log_rows(path, fields, resume_step) if path.exists() and resume_step > 0 else []
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(fields)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())
    f = open(path, "a", newline="")
    return f, csv.DictWriter(f, fieldnames=list(fields))


def read_log(output_dir: str | os.PathLike) -> list[dict]:
    """The CSV log of a run (``<output_dir>/log.csv``) as a list of dicts of floats."""
    with open(Path(output_dir) / "log.csv", newline="") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


# ----------------------------------------------------------------------------- a run's record


class RunRecord:
    """A run's bookkeeping besides the method. On creation (after the resume): the
    temporaries of killed runs removed and config.yaml written (main process), log.csv opened
    with the columns ``log_fields`` (rows after the checkpoint dropped), the trackers started.
    Then the progress bar, the loss terms ``loss_terms`` of every process gathered, checked
    (a NaN or inf stops the run before the update) and the gradients clipped, one log row per
    step (log.csv, trackers, bar), a checkpoint every ``checkpoint_every`` steps and at
    ``max_steps``, keeping ``keep`` of them, and at the end the final model recorded and saved.
    ``accum``: micro-steps per step; ``fp16``: the run's loss scaler skips steps with inf
    gradients, so a non-finite gradient norm does not stop it."""

    def __init__(self, out_dir: Path, accelerator, config: dict, start: int, t0: float, *,
                 max_steps: int, checkpoint_every: int, keep: int, progress: bool,
                 log_fields: list[str], name: str = "SUR-adapter", loss_terms=("loss",),
                 accum: int = 1, fp16: bool = False):
        self.out_dir, self.accelerator, self.config, self.start, self.t0 = out_dir, accelerator, config, start, t0
        self.max_steps, self.every, self.keep, self.name = max_steps, checkpoint_every, keep, name
        self.terms, self.accum, self.fp16 = tuple(loss_terms), int(accum), bool(fp16)
        self.shown = progress and accelerator.is_local_main_process
        main = accelerator.is_main_process
        if main:
            clear_temporaries(out_dir / CHECKPOINTS)
            atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        self.log_file, self.writer = open_log(out_dir / "log.csv", log_fields, start) if main else (None, None)
        if accelerator.log_with:
            accelerator.init_trackers(name.lower(), config=tracker_config(config))
        self.bar = None

    def progress_bar(self):
        """The steps still to run, start .. max_steps - 1, behind a tqdm bar (the main process
        of each machine draws it, if ``progress``)."""
        self.bar = tqdm(range(self.start, self.max_steps), initial=self.start, total=self.max_steps,
                        desc=self.name, disable=not self.shown)
        return self.bar

    def gather(self, losses: dict) -> torch.Tensor:
        """The loss terms (``loss_terms``) of every process, [processes, terms], float64 on the CPU."""
        values = torch.stack([losses[k].detach().float() for k in self.terms])
        n = self.accelerator.num_processes
        return self.accelerator.gather(values).reshape(n, len(self.terms)).cpu().double()

    def stop_on_non_finite(self, values: torch.Tensor, step: int, micro: int,
                           grad_norm: float | None = None) -> None:
        """:class:`NonFiniteLossError` if a loss term (``values``: gathered, [processes, terms])
        or the gradient norm is NaN or inf (:func:`stop_on_non_finite`)."""
        hint = " An fp16 overflow? bf16 has the range of fp32." if self.fp16 else ""
        stop_on_non_finite(values, self.terms, step, micro, self.accum, self.out_dir, grad_norm, hint)

    def clip_gradients(self, model, max_norm: float, values: torch.Tensor, step: int, micro: int):
        """At the last micro-step of an accumulation: clip the gradient norm of ``model`` to
        ``max_norm`` and return it (else None). A non-finite norm stops the run
        (:meth:`stop_on_non_finite`) except under fp16, whose loss scaler skips a step with inf
        gradients by design; otherwise it would write NaN into the weights."""
        if not self.accelerator.sync_gradients:
            return None
        grad_norm = self.accelerator.clip_grad_norm_(model.parameters(), max_norm)
        if not self.fp16:
            self.stop_on_non_finite(values, step, micro, float(grad_norm))
        return grad_norm

    def log(self, step: int, terms: dict[str, float], grad_norm, lr: float) -> None:
        """One row: the step, ``terms`` (the loss terms, the first shown on the bar), the
        gradient norm (NaN if None), the learning rate and the seconds since the start."""
        row = {"step": step, **terms, "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
               "lr": lr, "seconds": time.time() - self.t0}
        if self.writer is not None:
            with naming_file(self.out_dir / "log.csv"):
                self.writer.writerow(row)
                self.log_file.flush()
        self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
        first = next(iter(terms))
        self.bar.set_postfix({first: f"{terms[first]:.4f}"})

    def checkpoint_if_due(self, step: int, model, optimizer, lr_scheduler) -> None:
        """After ``step``: a checkpoint (main process) if it is due, every process waiting."""
        if step % self.every == 0 or step == self.max_steps:
            self.accelerator.wait_for_everyone()
            if self.accelerator.is_main_process:
                path = save_checkpoint(self.out_dir, step, self.accelerator.unwrap_model(model),
                                       training_states(self.accelerator, optimizer, lr_scheduler),
                                       self.config, self.keep)
                self.accelerator.print(f"checkpoint saved: {path.name}", flush=True)

    def close(self) -> None:
        if self.log_file is not None:
            self.log_file.close()
        for tracker in self.accelerator.trackers:
            tracker.finish()

    def finish(self, model):
        """The final model unwrapped (no autocast left in its forward), every process's digest
        recorded (processes.json), saved by the main process in ``<out_dir>/adapter``
        (``MODEL_DIR``) once every process is done; returns it."""
        final = self.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        record_processes(self.accelerator, final, self.out_dir)
        if self.accelerator.is_main_process:
            final.save_pretrained(self.out_dir / MODEL_DIR)
        self.accelerator.wait_for_everyone()
        return final
