"""What the book's chapters share: one setup call and the small formatting helpers.

Every chapter starts with the Colab install lines and::

    from sur_lib.study.book import glue, setup
    env = setup(seed=0, threads=1)

``setup`` seeds Python, numpy and torch, fixes the torch thread count (the experiments ran with
one thread: same numbers, image for image), silences the progress bars and info logs of
transformers and diffusers, and finds the paths a chapter reads: the results folder
(``SUR_BOOK_RESULTS`` or ``data/results``) and the base model (``SUR_BOOK_MODEL`` or the shipped
``data/models/tiny-sur-world``). In a book build it also records which of those files the
chapter reads (``record_reads``), so that a rebuild executes the chapter again when one changes
(book/_ext/sur_book_deps.py). ``glue`` is myst-nb's (numbers from cells into the prose) or,
outside a book build (Colab), a stand-in that shows the value.

The formatting helpers turn the numbers of ``sur_lib.analysis`` into the text of tables:
``pct`` (a share in percent), ``pct_ci`` (with its interval), ``fmt_p`` (a p-value),
``md_table`` / ``md_escape`` (Markdown tables) and ``smooth`` (a trailing moving average of a
loss curve).
"""
from __future__ import annotations

import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..infra.provenance import ROOT

try:
    from myst_nb import glue  # puts numbers from cells into the book's prose
except ImportError:  # outside the book build (e.g. Colab): show the value instead
    def glue(name, value, display=True):
        if display:
            print(f"{name} = {value}")
        return value


@dataclass(frozen=True)
class Chapter:
    """What ``setup`` found: the seed, the paths, the device and the profile of a chapter."""

    seed: int
    threads: int
    root: Path  # the repository
    results: Path  # data/results, or SUR_BOOK_RESULTS
    model_dir: str | None  # SUR_BOOK_MODEL; None: the shipped data/models/tiny-sur-world
    device: str  # "cuda" when a GPU is there, else "cpu"
    profile: str  # SUR_PROFILE: "tiny" (default) or "paper" (needs a GPU and the Hub)
    t0: float  # time.perf_counter() at setup

    def elapsed(self) -> float:
        """Seconds since ``setup``: what a chapter states as its run time."""
        return time.perf_counter() - self.t0


def quiet_logs() -> None:
    """No progress bars or info logs from transformers and diffusers (warnings and errors stay)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no notes about optional packages
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        from diffusers.utils import logging as diffusers_logging
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return
    diffusers_logging.set_verbosity_error()


def setup(seed: int = 0, threads: int | None = 1, quiet: bool = True) -> Chapter:
    """Seeds, torch threads (``threads``, at most the CPU count; None leaves torch's default),
    quiet logs, the tiny profile offline, and the paths of results and base model."""
    import torch

    t0 = time.perf_counter()
    profile = os.environ.get("SUR_PROFILE", "tiny")
    if profile == "tiny":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tiny profile never downloads
    if quiet:
        quiet_logs()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(min(threads, os.cpu_count() or 1))
    chapter = Chapter(seed=seed, threads=torch.get_num_threads(), root=ROOT,
                      results=Path(os.environ.get("SUR_BOOK_RESULTS", ROOT / "data" / "results")),
                      model_dir=os.environ.get("SUR_BOOK_MODEL"),
                      device="cuda" if torch.cuda.is_available() else "cpu", profile=profile, t0=t0)
    if os.environ.get(READS_LOG):  # set by the book build for the chapter it executes
        record_reads(os.environ[READS_LOG],
                     [ROOT / "data", chapter.results] + ([Path(chapter.model_dir)] if chapter.model_dir else []))
    return chapter


#: the environment variable naming the file where ``setup`` records what a chapter reads
READS_LOG = "SUR_BOOK_READS_LOG"
_recording: set[str] = set()


def record_reads(log: str | Path, under: Sequence[str | Path]) -> None:
    """From now on, append to ``log`` (one absolute path a line) every file this process opens
    for reading (Python's ``open`` audit event: ``open``, ``Path.read_text``, ``json.load`` of a
    file, torch's loader...) that lies under one of the folders ``under``. Once per log and
    process; files read by native code (safetensors) are not seen."""
    log = str(Path(log).resolve())
    if log in _recording:
        return
    _recording.add(log)
    roots = tuple(str(Path(u).resolve()) + os.sep for u in under)
    busy = [False]

    def hook(event, args):
        if event != "open" or busy[0]:
            return
        path, mode, flags = args
        if not isinstance(path, (str, bytes, os.PathLike)):
            return  # a file descriptor
        reading = (flags & 3) == os.O_RDONLY if mode is None else not set("wax+") & set(mode)
        if not reading:
            return
        busy[0] = True
        try:
            full = os.path.realpath(os.fsdecode(path))
            if full.startswith(roots) and os.path.isfile(full):
                with open(log, "a", encoding="utf-8") as f:
                    f.write(full + "\n")
        finally:
            busy[0] = False

    sys.addaudithook(hook)


# =============================================================================== formatting


def pct(x: float | None, digits: int = 1, suffix: str = "") -> str:
    """A share in percent: ``pct(0.8347)`` -> "83.5", ``pct(0.8347, suffix=" %")`` -> "83.5 %";
    None -> "–"."""
    return "–" if x is None else f"{100 * x:.{digits}f}{suffix}"


def pct_ci(block: Mapping, digits: int = 1, ci_digits: int | None = None, suffix: str = "%",
           brackets: str = "[]", sep: str = ", ") -> str:
    """A summary block's ``acc`` with its interval ``lo``-``hi``, in percent:
    "83.5% [80.6, 86.0]" by default; ``ci_digits`` (default ``digits``) for the bounds,
    ``brackets`` and ``sep`` for other styles ("83.5 (80.6–86.0)")."""
    ci_digits = digits if ci_digits is None else ci_digits
    lo, hi = (f"{100 * block[k]:.{ci_digits}f}" for k in ("lo", "hi"))
    return f"{pct(block['acc'], digits, suffix)} {brackets[0]}{lo}{sep}{hi}{brackets[1]}"


def prompt_ci(block: Mapping) -> dict:
    """A summary block (``analysis.summarize``) re-read at the prompt level: ``acc`` is the mean
    of the per-prompt accuracies and ``lo``-``hi`` its 95% t interval over prompts, clipped to
    [0, 1]; ``pct_ci(prompt_ci(block))`` prints it. This interval carries the spread between
    prompts, which the Wilson interval over images (``block["lo"]``, ``block["hi"]``) ignores."""
    lo, hi = block["prompt_t_ci"]
    return {"acc": block["prompt_mean"], "lo": max(0.0, lo), "hi": min(1.0, hi)}


def fmt_p(p: float | None, space: bool = True, prefix: bool = False) -> str:
    """A p-value to three decimals, "< 0.001" below that (``space=False``: "<0.001"), "–" for
    None; ``prefix`` writes "p = 0.012" / "p < 0.001"."""
    if p is None:
        return "–"
    if p < 0.001:
        return ("p < 0.001" if prefix else "< 0.001") if space or prefix else "<0.001"
    return f"p = {p:.3f}" if prefix else f"{p:.3f}"


def md_escape(text) -> str:
    """Text (a prompt, an LLM's rewrite) as literal text inside a Markdown table cell."""
    return re.sub(r"([\\`*_|<>\[\]])", r"\\\1", str(text))


def md_table(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
    """A list of dicts -> a Markdown table (pipes inside cells escaped, newlines as spaces)."""
    def cell(v):
        return str(v).replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "\n".join("| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows)


def smooth(y, k: int = 8) -> np.ndarray:
    """Trailing moving average over ``k`` steps (over fewer at the start): entry i is the mean
    of ``y[max(0, i + 1 - k) : i + 1]``."""
    c = np.cumsum(np.insert(np.asarray(y, dtype=np.float64), 0, 0.0))
    i = np.arange(1, len(c))
    lo = np.maximum(0, i - k)
    return (c[i] - c[lo]) / (i - lo)


# =============================================================================== equations

#: Every equation of the paper that the book implements, and Algorithm 1: (label of its target
#: in the book, name, what it computes, chapter, the functions that implement it).
EQUATIONS = (
    ("eq-4", "Eq. 4", "queries, keys, values: $Q = W_q h_0$, $K = W_k x$, $V = x$", "04_adapter",
     ("sur_lib.adapter:SURAdapter.forward", "sur_lib.adapter:_Attention.forward")),
    ("eq-5", "Eq. 5", "$L_{LLM}$: KL from the projected knowledge vector to $Q$", "05_losses_knowledge",
     ("sur_lib.losses:llm_distillation_loss", "sur_lib.losses:kl_distillation",
      "sur_lib.adapter:SURAdapter.project_knowledge")),
    ("eq-6", "Eq. 6", "attention over the tokens: $V' = \\mathrm{softmax}(QK^\\top/\\sqrt{D})\\,V$",
     "04_adapter", ("sur_lib.adapter:_Attention.forward",)),
    ("eq-7", "Eq. 7", "the mixed conditioning $c = \\eta\\,\\mathrm{out} + (1-\\eta)\\,x$", "04_adapter",
     ("sur_lib.adapter:SURAdapter.forward",)),
    ("eq-8", "Eq. 8", "$L_{simple}$: the diffusion loss through the frozen UNet", "05_losses_knowledge",
     ("sur_lib.losses:simple_loss", "sur_lib.train:diffusion_inputs")),
    ("eq-9", "Eq. 9", "$L_{CP}$: KL from $c$ to the complex prompt's token states", "05_losses_knowledge",
     ("sur_lib.losses:prompt_alignment_loss", "sur_lib.losses:kl_distillation")),
    ("eq-10", "Eq. 10", "the total loss $L_{simple} + \\lambda_1 L_{LLM} + \\lambda_2 L_{CP}$",
     "05_losses_knowledge", ("sur_lib.losses:total_loss",)),
    ("algorithm-1", "Algorithm 1", "one training step, and the loop", "06_training",
     ("sur_lib.train:compute_losses", "sur_lib.train:train")),
)


def _resolve(target: str):
    import importlib

    module, qualname = target.split(":")
    obj, owner = importlib.import_module(module), None
    for part in qualname.split("."):
        owner, obj = obj, getattr(obj, part)
    return obj, owner


def names_equation(doc: str | None, name: str) -> bool:
    """Does a docstring name ``name`` ("Eq. 5", "Algorithm 1"), also inside a range ("Eq. 4-7")
    or a list ("Eq. 5, 8, 9, 10", "Eq. 5 and Eq. 9")?"""
    doc = doc or ""
    if not name.startswith("Eq. "):
        return name in doc
    n = int(name.split()[1])
    for m in re.finditer(r"Eq\. ?(\d+)((?:\s*(?:-|,|and)\s*(?:Eq\. ?)?\d+)*)", doc):
        nums = [int(m.group(1))] + [int(x) for x in re.findall(r"\d+", m.group(2))]
        if n in nums or (re.search(r"\d\s*-\s*(?:Eq\. ?)?\d", m.group(0)) and nums[0] <= n <= nums[-1]):
            return True
    return False


def equation_table() -> str:
    """The Markdown table of ``EQUATIONS``: each equation (a link to where the book states it),
    what it computes, and its functions with their file and source lines. Fails if a function is missing
    or its docstring (or its class's) does not name the equation."""
    import inspect

    rows = []
    for label, name, what, chapter, targets in EQUATIONS:
        cells = []
        for target in targets:
            obj, owner = _resolve(target)
            docs = [inspect.getdoc(obj)] + ([inspect.getdoc(owner)] if inspect.isclass(owner) else [])
            if not any(names_equation(d, name) for d in docs):
                raise ValueError(f"{target}: its docstring does not name {name}")
            lines, start = inspect.getsourcelines(obj)
            path = Path(inspect.getsourcefile(obj)).relative_to(ROOT)
            # the name in code, the file in plain text (it wraps: the table fits the page)
            cells.append(f"`{target.split(':')[1]}` ({path}, lines {start}-{start + len(lines) - 1})")
        rows.append({"equation": f"{{ref}}`{name} <{label}>`", "what": what,
                     "chapter": f"{{doc}}`{chapter}`", "implemented by": "<br>".join(cells)})
    return md_table(rows, ["equation", "what", "chapter", "implemented by"])
