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

The formatting helpers turn the numbers of ``sur_lib.study.statistics`` into the text of tables:
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
from ..world.paths import DATA, RESULTS_DIR, TINY_MODEL_DIR

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
    """Seeds, torch threads (``threads``, at most the CPU count, or ``$OMP_NUM_THREADS`` when it
    is set: the book build sets it when it runs chapters side by side; None leaves torch's
    default), quiet logs, the tiny profile offline, and the paths of results and base model."""
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
        limit = int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1
        torch.set_num_threads(min(threads, limit))
    chapter = Chapter(seed=seed, threads=torch.get_num_threads(), root=ROOT,
                      results=Path(os.environ.get("SUR_BOOK_RESULTS", RESULTS_DIR)),
                      model_dir=os.environ.get("SUR_BOOK_MODEL"),
                      device="cuda" if torch.cuda.is_available() else "cpu", profile=profile, t0=t0)
    if os.environ.get(READS_LOG):  # set by the book build for the chapter it executes
        record_reads(os.environ[READS_LOG],
                     [DATA, chapter.results] + ([Path(chapter.model_dir)] if chapter.model_dir else []))
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
    """A summary block (``statistics.summarize``) re-read at the prompt level: ``acc`` is the mean
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


def code_value(value, width: int = 24) -> str:
    """A value as inline code for a table cell; a path or Hub id longer than ``width`` is split
    after each "/" onto lines of its own (inline code does not wrap inside a word, and one long
    piece would widen its column past the page): "`runs/`<br>`sd15`"."""
    text = str(value)
    if len(text) <= width or "/" not in text:
        return f"`{text}`"
    pieces = text.split("/")
    lines = [p + "/" for p in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])
    if lines[0] == "/":  # an absolute path: its first line is "/tmp/", not "/"
        lines[:2] = ["/" + lines[1]]
    return "<br>".join(f"`{line}`" for line in lines)


def md_escape(text) -> str:
    """Text (a prompt, an LLM's rewrite) as literal text inside a Markdown table cell."""
    return re.sub(r"([\\`*_|<>\[\]])", r"\\\1", str(text))


def md_table(rows: Sequence[Mapping], columns: Sequence[str],
             labels: Sequence[str] | None = None) -> str:
    """A list of dicts -> a Markdown table (pipes inside cells escaped, newlines as spaces);
    ``labels``: the header's words for ``columns`` (default: the keys themselves)."""
    def cell(v):
        return str(v).replace("|", "\\|").replace("\n", " ")

    labels = columns if labels is None else labels
    if len(labels) != len(columns):
        raise ValueError(f"{len(labels)} labels for {len(columns)} columns")
    head = "| " + " | ".join(labels) + " |\n|" + "---|" * len(columns) + "\n"
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


# =============================================================================== limitations tables
# The tables of the limitations chapter (book/09_limitations.md), assembled from the code and the
# configs here so that the page shows the tables and the prose, and tests check them
# (tests/test_book_helpers.py).


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def _short_float(x: float) -> str:
    """1e-05 -> "1e-5", 0.1 -> "0.1" (the configs' small numbers as the table writes them)."""
    if x and abs(x) < 1e-2:
        mantissa, exponent = f"{x:.0e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{x:g}"


def parameter_counts() -> dict[str, int]:
    """Parameters of SD 1.5's UNet and CLIP text model and of the tiny profile's UNet and MiniLM,
    built from their configs on PyTorch's ``meta`` device (shapes only: no weights, no memory)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import AutoConfig, AutoModel, CLIPTextConfig, CLIPTextModel

    from sur_lib.infra.backbone_files import SD15_CONFIGS
    from sur_lib.infra.text_encoders import minilm_folder

    def n(model):
        return sum(p.numel() for p in model.parameters())

    with torch.device("meta"):
        return {
            "sd_unet": n(UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIGS / "unet"))),
            "tiny_unet": n(UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(TINY_MODEL_DIR / "unet"))),
            "clip_text": n(CLIPTextModel(CLIPTextConfig.from_pretrained(SD15_CONFIGS / "text_encoder"))),
            "minilm": n(AutoModel.from_config(AutoConfig.from_pretrained(minilm_folder()))),
        }


def sd15_vs_sur_world(counts: Mapping[str, int] | None = None) -> list[dict]:
    """The limitations chapter's table "what a toy world can and cannot say": each part of the
    paper's setting (SD 1.5) beside its stand-in in the tiny profile, as rows with the keys
    ``what``, ``sd``, ``toy``. ``counts``: ``parameter_counts()`` (computed when None)."""
    from . import experiments as ex
    from sur_lib.infra import llms
    from sur_lib.world import toyworld as tw
    from sur_lib.world.pretrain import MAX_LENGTH

    c = parameter_counts() if counts is None else counts
    M = _millions
    per_type = {t: sum(p["type"] == t for p in tw.test_prompts()) for t in tw.TEST_TYPES}
    return [
        dict(what="objects", sd="any noun (pies, balloons, bottles, cars, ...)",
             toy=f"{len(tw.NOUNS)} everyday nouns ({len(tw.TRAIN_NOUNS)} for training, "
                 f"{len(tw.HELDOUT_NOUNS)} held out), each drawn as one of {len(tw.COLORS)} colours "
                 f"x {len(tw.SHAPES)} shapes"),
        dict(what="counting", sd="any count (Table 1 asks for four, six, seven)",
             toy=f"1 to {tw.MAX_COUNT} objects"),
        dict(what="colour", sd="attributes of several objects ('a blue glass with red juice')",
             toy="one colour per scene, implied by the noun"),
        dict(what="action", sd="verbs between agents and objects ('a giraffe eating leaves')",
             toy="an arrangement verb: " + ", ".join(tw.ARRANGEMENTS)),
        dict(what="text encoder", sd=f"CLIP ViT-L/14 text model, {M(c['clip_text'])} parameters, 77 x 768",
             toy=f"all-MiniLM-L6-v2, {M(c['minilm'])} parameters, {MAX_LENGTH} x 384"),
        dict(what="LLM", sd=f"LLaMA 7B-33B, width {llms.LLM_WIDTHS['llama-7b']}-{llms.LLM_WIDTHS['llama-33b']}",
             toy=f"SmolLM2-135M-Instruct, width {llms.LLM_WIDTHS['smollm2-135m']}, "
                 f"{llms.LLM_NUM_LAYERS['smollm2-135m']} blocks"),
        dict(what="diffusion model", sd=f"UNet, {M(c['sd_unet'])} parameters, latents 4 x 64 x 64 (VAE)",
             toy=f"UNet, {M(c['tiny_unet'])} parameters, pixels 3 x {tw.SIZE} x {tw.SIZE}, no VAE"),
        dict(what="adapter training data", sd="SURD, 57,603 triples (26,121 on the Hub)",
             toy=f"SURD-mini, {ex.SURD_MINI_ROWS:,} triples"),
        dict(what="test prompts", sd="15 per type, 10 images each (not published)",
             toy=f"{per_type['counting']} per type, {ex.IMAGES} images each, held-out nouns"),
        dict(what="semantic judge", sd="people (Table 1), CLIP softmax score",
             toy="rule-based judge, accuracy measured"),
    ]


#: The paper's Table 1 (SD 1.5) and Table 7 (SD 1.5 + SUR-adapter): (semantic type, simple
#: prompt, % correct without, % correct with the adapter), of 130 images judged by hand per prompt.
PAPER_TABLE1 = (
    ("counting", "Four freshly baked pies", 63.08, 73.85),
    ("counting", "Six colorful hot air balloons over a picturesque landscape", 8.46, 41.54),
    ("counting", "Seven vintage glass bottles", 0.00, 36.92),
    ("color", "A vivid red sports car speeding down a winding road", 86.15, 93.85),
    ("color", "A blue glass with red juice", 17.69, 20.00),
    ("color", "A couple wearing blue and yellow solid-color clothes", 0.00, 6.92),
    ("action", "Someone shooting a basketball on a playground", 41.54, 56.92),
    ("action", "A giraffe eating leaves from a tree", 25.38, 50.77),
    ("action", "A chef tossing pizza dough in a kitchen", 15.38, 32.31),
)
PAPER_IMAGES_JUDGED = 130


def paper_prompt_tests(alpha: float = 0.05) -> dict:
    """Each Table 1 prompt's change with the adapter (Table 7) as counts out of 130 (every
    percentage of both tables is a whole number of images out of 130) and Fisher's exact test.
    Returns ``rows`` (prompt, base "k/130", adapter "k/130", p), ``n_sig`` (p < alpha),
    ``n_holm`` (significant after Holm's correction, ``statistics.holm``) and the two means in %."""
    from scipy import stats

    from .statistics import holm

    n = PAPER_IMAGES_JUDGED
    rows = []
    for _, prompt, p1, p7 in PAPER_TABLE1:
        k1, k7 = round(p1 * n / 100), round(p7 * n / 100)
        if abs(100 * k1 / n - p1) >= 0.01 or abs(100 * k7 / n - p7) >= 0.01:
            raise ValueError(f"{prompt}: {p1} % or {p7} % is not a whole number of images out of {n}")
        p = float(stats.fisher_exact([[k7, n - k7], [k1, n - k1]]).pvalue)
        rows.append(dict(prompt=prompt, base=f"{k1}/{n}", adapter=f"{k7}/{n}", p=p))
    adjusted = holm({r["prompt"]: r["p"] for r in rows})
    return {"rows": rows, "n_sig": sum(r["p"] < alpha for r in rows),
            "n_holm": sum(a < alpha for a in adjusted.values()),
            "mean_table1": float(np.mean([r[2] for r in PAPER_TABLE1])),
            "mean_table7": float(np.mean([r[3] for r in PAPER_TABLE1]))}


def deviation_rows() -> list[dict]:
    """The limitations chapter's table of every deviation: where the paper, the authors' code
    and ``sur_lib`` differ (keys ``topic``, ``paper``, ``authors``, ``sur_lib``, ``why``). The
    ``sur_lib`` column is filled from the library's defaults and configs; a test checks the rest
    against the code."""
    import dataclasses
    import inspect

    from . import experiments as ex
    from sur_lib import models as sm
    from sur_lib import pipeline as sp
    from sur_lib.world import toyworld as tw
    from sur_lib.adapter import count_parameters
    from sur_lib.world.pretrain import MAX_LENGTH
    from sur_lib.train import TrainConfig, build_adapter

    configs = ROOT / "sur_lib" / "configs"
    cfg = TrainConfig()                                          # the library's defaults
    tiny = TrainConfig.from_yaml(configs / "tiny.yaml")
    paper_cfg = TrainConfig.from_yaml(configs / "rtx3090.yaml")
    n768 = {o: count_parameters(build_adapter(dataclasses.replace(paper_cfg, official_adapter=o), 768, None))
            for o in (False, True)}
    adapt_uncond = inspect.signature(sp.generate).parameters["adapt_unconditional"].default
    M, E = _millions, _short_float
    rows = [
        dict(topic="encoder attention axis", paper="a transformer encoder over the prompt's tokens",
             authors="`nn.TransformerEncoder`, `batch_first=False` on [B, 77, 768]: attends across "
                     "the prompts of a batch",
             sur_lib="`batch_first=True` (`official=True` reproduces the bug)",
             why="the paper's intent; the bug makes a prompt's conditioning depend on its batch-mates"),
        dict(topic="init of g", paper="zero-initialised (Fig. 6 compares inits)",
             authors="zero weight, `nn.Linear`'s random bias: untrained c = (1-η)x + ηb",
             sur_lib=f"`g_init={cfg.g_init!r}`, weight and bias: untrained c = (1-η)x exactly",
             why="Eq. 7 with g = 0 means 'start as the base model'"),
        dict(topic="parameters", paper="not stated",
             authors="~20.1M stored, ~14.0M used (template encoder layer, value projection unused)",
             sur_lib=f"{M(n768[False]['used'])} at SD 1.5 width, all used; `official=True` stores "
                     f"{M(n768[True]['stored'])}",
             why="no dead weights; the official variant keeps them so `adapter.pt` loads"),
        dict(topic="input of L_LLM", paper="Q (Eq. 5)", authors="h0, the encoder output before W_q",
             sur_lib="Q (`official=True`: h0)", why="follow the equation"),
        dict(topic="KL direction", paper="KL[W0 f_LLM / T, Q / T], KL(c / T, f_En(p_c) / T)",
             authors="`F.kl_div(log_softmax(teacher), softmax(student))` = KL(p_student ‖ "
                     "p_teacher): the student in the target slot",
             sur_lib=f"`kl_direction={cfg.kl_direction!r}` (the usual one: `'teacher_target'`)",
             why="reproduce the signal they trained with; the usual direction is an option"),
        dict(topic="KL reduction", paper="not stated",
             authors="softmax over the D features of each token, summed over tokens, / B, x T²",
             sur_lib="the same (`reduction='batchmean'`; `'token_mean'` divides by B x N)",
             why="as the authors; the losses chapter shows the N-dependence"),
        dict(topic="temperature T", paper="1", authors="1", sur_lib=E(cfg.temperature),
             why="as the paper"),
        dict(topic="W0", paper="fixed random (Kaiming)",
             authors="`nn.Linear(llm_dim, 768)`, default init with bias, frozen, never seeded, "
                     "never saved",
             sur_lib=f"seeded (`w0_seed={cfg.w0_seed}`) Kaiming-uniform, no bias, a buffer saved "
                     "with the adapter",
             why="a checkpoint is useless without the W0 it was trained against"),
        dict(topic="gradient of L_simple", paper="Eq. 10: L_simple trains the adapter",
             authors="`torch.tensor(...)` re-wrap detaches c: only the two KL terms (x 1e-5) "
                     "train the adapter",
             sur_lib=f"`gradient_path={cfg.gradient_path!r}` (`'official'` = `c.detach()`)",
             why="the paper's method; an H100 run quoted in the training chapter (not reproduced) "
                 "puts it within 24 GB at batch 16"),
        dict(topic="η (Eq. 7)", paper="a mixing weight",
             authors="0.1 in the run script, 0.01 class default, 1e-4 argparse default",
             sur_lib=f"{E(cfg.eta)} (default and both configs)", why="the value the authors ran"),
        dict(topic="λ1, λ2", paper="1e-5, 1e-5 (appendix B.1)", authors="1e-5, 1e-5",
             sur_lib=f"{E(cfg.lambda_llm)}, {E(cfg.lambda_cp)}", why="as the paper"),
        dict(topic="batch", paper="16", authors="1 x gradient accumulation 4",
             sur_lib=f"{paper_cfg.batch_size} (rtx3090.yaml), {tiny.batch_size} (tiny.yaml)",
             why="the paper's recipe; no GPU run in this repository measures its memory yet"),
        dict(topic="learning rate", paper="1e-5", authors="1e-5 constant, AdamW (wd 1e-2), clip 1",
             sur_lib=f"{E(paper_cfg.learning_rate)} (rtx3090.yaml); {E(tiny.learning_rate)} with "
                     f"{tiny.lr_warmup_steps} warm-up steps (tiny.yaml)",
             why="tiny: 10x fewer steps from scratch on a CPU budget"),
        dict(topic="steps", paper="5000", authors="5000",
             sur_lib=f"{paper_cfg.max_steps} (rtx3090.yaml), {tiny.max_steps} (tiny.yaml)",
             why="tiny: CPU minutes, not GPU hours"),
        dict(topic="mixed precision", paper="yes", authors="fp16",
             sur_lib=f"{paper_cfg.mixed_precision} (rtx3090.yaml), none (tiny.yaml)",
             why="16-bit does not pay on 2 CPU cores"),
        dict(topic="gradient checkpointing", paper="not stated",
             authors="flag parsed, never applied",
             sur_lib="applied when `gradient_checkpointing=True`",
             why="a flag that does nothing is a trap"),
        dict(topic="resume", paper="not stated", authors="resume code is dead",
             sur_lib="atomic checkpoints, exact resume (seeded per micro-step)",
             why="CPU runs get interrupted"),
        dict(topic="EMA of the adapter", paper="not stated", authors="none", sur_lib="none",
             why="as the authors (the tiny base model, not the adapter, uses EMA)"),
        dict(topic="augmentation", paper="centre crop, horizontal flip",
             authors="the same (diffusers train_text_to_image)", sur_lib="the same (`sur_lib.data`)",
             why="as the paper"),
        dict(topic="complex prompt in L_CP", paper="f_En(p_c)",
             authors="CLIP states of p_c truncated to 77 tokens",
             sur_lib=f"truncated to the encoder's length (77; tiny: {MAX_LENGTH})",
             why="the encoder's limit; long SURD prompts lose their tails"),
        dict(topic="padding mask", paper="not stated", authors="none: the adapter attends to padding",
             sur_lib="none (as the authors)",
             why="keep their behaviour; the adapter chapter's exercise 1 measures it"),
        dict(topic="unconditional branch at inference", paper="not discussed",
             authors="[uncond; cond] through the adapter in one batch (with the bug, they mix)",
             sur_lib=f"`adapt_unconditional={adapt_uncond}`: the base model's null embedding",
             why="guidance should push away from the base model's 'no prompt'; True reproduces them"),
        dict(topic="LLM and layer", paper="LLaMA 7B / 13B / 33B, layer ablation (Table 4)",
             authors="LLaMA-13B, layer 39 (last block, before the final norm)",
             sur_lib=f"paper profile: `{paper_cfg.llm}` layer {paper_cfg.llm_layer}; tiny: SmolLM2-135M, "
                     f"layer {tiny.llm_layer} (the last block)",
             why="any causal LM on the Hub works; SmolLM2 ships on PyPI and fits a CPU"),
        dict(topic="BOS in the knowledge vector", paper="mean over tokens",
             authors="the mean includes LLaMA's BOS token",
             sur_lib=f"`llm_include_bos={cfg.llm_include_bos}`; SmolLM2 adds no BOS, so its first "
                     "word is the attention sink",
             why="same rule; its effect differs per tokenizer (losses chapter)"),
        dict(topic="knowledge extraction", paper="Sec. 3.3",
             authors="no script published, only `prompt2vec/*.pt` files",
             sur_lib="`knowledge_vectors` (forward hook, pre-norm), cached as safetensors",
             why="needed to rebuild the vectors for any LLM"),
        dict(topic="base model", paper="SD 1.5",
             authors="the public checkpoint targets Realistic_Vision_V2.0",
             # the Hub id on two lines (one piece of code too long for the table's column)
             sur_lib="`" + sm.SD15_REPO.replace("/", "/`<br>`") + "`; tiny: the SUR world's UNet",
             why="runwayml/stable-diffusion-v1-5 left the Hub in 2024; this is its mirror"),
        dict(topic="image space", paper="VAE latents, 4 x 64 x 64 at 512 px", authors="the same",
             sur_lib=f"paper profile: the same; tiny: pixel space, {tw.SIZE} x {tw.SIZE}",
             why="no VAE ships on PyPI; at 32 px a VAE buys nothing"),
        dict(topic="text encoder", paper="CLIP ViT-L/14 (SD 1.5's)", authors="the same",
             sur_lib=f"paper profile: the same; tiny: all-MiniLM-L6-v2 ({MAX_LENGTH} tokens)",
             why="pip-installable and CPU-sized"),
        dict(topic="dataset", paper="SURD, 57,603 triples",
             authors="Hub: 26,121 NSFW-filtered triples (gated)",
             sur_lib=f"the Hub's SURD (paper profile); SURD-mini, {ex.SURD_MINI_ROWS:,} (tiny)",
             why="the full SURD is not available; SURD-mini is generated offline"),
        dict(topic="evaluation", paper="15 prompts x 3 types, 10 images each; CLIP softmax score; "
                                       "BRISQUE, CLIP-IQA, MUSIQ with t-tests; user study",
             authors="no evaluation code, no prompt lists published",
             sur_lib=f"45 held-out prompts, {ex.IMAGES} images each; absolute judge with measured "
                     "accuracy; clean-render distance and BRISQUE; paired tests with intervals",
             why="nothing to rerun; this chapter shows why a relative score and p > 0.05 mislead"),
    ]
    return rows


#: Published numbers of SUR-adapter's peers, quoted from their papers (not rerun in this book).
PEER_NUMBERS = {
    "geneval_sd15": dict(overall=0.43, counting=0.35, colors=0.76, position=0.04, attribution=0.06),
    "t2i_sd15": dict(color=0.3750, spatial=0.1204),
    "t2i_ella": dict(color=0.6911, spatial=0.1867),
    "ella_dpg": dict(clip=63.18, tinyllama=70.27, llama2_13b=72.05, t5_xl=71.70, ella=74.91),
    "lmd": dict(before=36.8, after=76.5, numeracy_before=39, numeracy_after=62),
    "tokencompose": dict(before=29.86, after=52.15),
}


def peer_rows() -> list[dict]:
    """The limitations chapter's table of peers (keys ``method``, ``changes``, ``evidence``):
    each method's published evidence, written from ``PEER_NUMBERS`` and ``PAPER_TABLE1``."""
    P = PEER_NUMBERS
    g, t_sd, t_el, dpg, lmd, tc = (P[k] for k in ("geneval_sd15", "t2i_sd15", "t2i_ella", "ella_dpg", "lmd",
                                                  "tokencompose"))
    t1 = paper_prompt_tests()
    return [
        dict(method="SUR-adapter (paper)", changes="adapter on CLIP states, LLM distilled by KL",
             evidence=f"its {len(PAPER_TABLE1)} Table 1 prompts, judged by hand: mean "
                      f"{t1['mean_table1']:.1f}% -> {t1['mean_table7']:.1f}%"),
        dict(method="ELLA", changes="frozen T5-XL + timestep-aware connector (0.07B trainable, "
                                    "34M pairs, 8 A100 x 7 days)",
             evidence=f"DPG-Bench {dpg['clip']:.2f} -> {dpg['ella']:.2f}; T2I-CompBench colour "
                      f"{t_sd['color']:.4f} -> {t_el['color']:.4f}, spatial "
                      f"{t_sd['spatial']:.4f} -> {t_el['spatial']:.4f}; text encoder "
                      f"ablation: CLIP {dpg['clip']:.2f}, TinyLlama {dpg['tinyllama']:.2f}, "
                      f"LLaMA-2-13B {dpg['llama2_13b']:.2f}, T5-XL {dpg['t5_xl']:.2f}"),
        dict(method="LMD", changes="an LLM writes a layout; attention control draws it (no training)",
             evidence=f"its 400 prompts: {lmd['before']}% -> {lmd['after']}% (GPT-3.5); numeracy "
                      f"{lmd['numeracy_before']} -> {lmd['numeracy_after']}"),
        dict(method="TokenCompose", changes="token-level grounding loss while fine-tuning the UNet",
             evidence=f"object accuracy {tc['before']} -> {tc['after']} (SD 1.4), FID unchanged"),
        dict(method="prompt rewriting (Promptist, BeautifulPrompt, MagicPrompt)",
             changes="the prompt, not the model",
             evidence="the baseline a user would try first; our rewrite experiment"),
        dict(method="SD 1.5 on GenEval (reference point)", changes="-",
             evidence=f"overall {g['overall']}; counting {g['counting']}, colours {g['colors']}, "
                      f"position {g['position']}, colour attribution {g['attribution']}"),
    ]


# =============================================================================== benchmark tables


def bench_table(res: Mapping) -> tuple[str, list[str]]:
    """A ``python -m sur_lib.bench`` result (``data/results/bench_*.json``) as the training
    chapter shows it: a Markdown table of the configurations that were measured, and a list of
    sentences for those that were not (skipped or failed: no blank rows). The memory columns
    appear only when the file has memory numbers (a GPU run); an ``oom`` configuration is shown
    at its largest fitting batch, with the accumulation that restores the asked batch."""
    from .bench import usable

    measured, not_run = [], []
    for name, rec in res["configs"].items():
        own = usable(rec)
        if own is None:
            why = " ".join((rec.get("reason") or rec.get("error") or "no reason given").split())
            why = re.sub(r"(--[\w-]+)", r"`\1`", why)  # command-line options as code
            not_run.append(f"`{name}` was {rec.get('status', 'not run')}: {why}")
            continue
        measured.append((name, rec, own))
    memory = any(own.get("peak_allocated_gib") is not None for _, _, own in measured)
    columns = ["configuration", "batch", "precision", "s / step", "samples / s", "vs full fine-tune"]
    if memory:
        columns[5:5] = ["peak allocated GiB", "peak reserved GiB"]
    rows = []
    for name, rec, own in measured:
        ratio = (rec.get("vs_full") or {}).get("samples_per_s")
        batch = str(own["batch"])
        if rec.get("status") == "oom":
            batch += f" (out of memory at {rec['batch']}; × {rec['gradient_accumulation']} accumulation)"
        row = {"configuration": f"`{name}`", "batch": batch, "precision": own["precision"],
               "s / step": f"{own['step_time_s']:.3f}", "samples / s": f"{own['samples_per_s']:.1f}",
               "vs full fine-tune": "–" if ratio is None else f"{ratio:.2f}"}
        if memory:
            for key, col in (("peak_allocated_gib", "peak allocated GiB"),
                             ("peak_reserved_gib", "peak reserved GiB")):
                v = own.get(key)
                row[col] = "–" if v is None else f"{v:.1f}"
        rows.append(row)
    return md_table(rows, columns), not_run


def deviation_table(rows: Sequence[Mapping]) -> str:
    """``deviation_rows()`` as a Markdown table of three columns that fits the page: the
    topic; what the paper and the authors' code do; what ``sur_lib`` does by default, and why."""
    return md_table([{"topic": r["topic"],
                      "theirs": f"**paper:** {r['paper']}<br>**authors' code:** {r['authors']}",
                      "ours": f"{r['sur_lib']}<br>**why:** {r['why']}"} for r in rows],
                    ["topic", "theirs", "ours"],
                    ["topic", "the paper and the authors' code", "`sur_lib` default, and why"])
