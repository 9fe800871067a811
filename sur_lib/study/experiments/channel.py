"""How does knowledge reach a new noun? The distillation channel, tested with a target it can carry.

    python -m sur_lib.study.experiments channel [--steps 2000] [--images 8] [--max-minutes M] [--quick]

Not in the paper; the book's own test of its central mechanism. L_LLM (Eq. 5) distils a teacher
target softmax(W0 k / T) into the adapter's queries Q. The re-test's oracle could not test the
channel: at SmolLM2's norm its target was one-hot and many attribute combinations shared a
target feature. Here every teacher gets the same, well-posed treatment
(``oracle.calibrate_targets``: centred, each vector scaled so its target has ``entropy`` nats)
and the variants differ only in the teacher, at the re-test's budget (tiny.yaml, ``--steps``
2,000, SURD-mini 3,000 rows):

* ``oracle``   the prompt's true count, colour, shape and named arrangement (``sur_lib.study.oracle``);
* ``permuted`` the same, with the nouns' classes shuffled across nouns (same marginals:
  ``oracle.permuted_classes``): a teacher as loud and as structured, but wrong about nouns;
* ``smollm2``  SmolLM2-135M's vectors (tiny.yaml's LLM) under the same treatment;
* ``none``     lambda_LLM = 0: no teacher.

lambda_LLM is the same for the three teachers, set before training from the gradient shares of
the untrained adapter on the oracle target (``gradient_share``), so that L_LLM's gradient is
``llm_ratio`` (2/3) of L_simple's: about 40% of the three terms' norm.

**Text-only nouns** (``TEXT_ONLY_NOUNS``): nouns disjoint from the training, held-out and test
nouns whose prompts enter training only through L_LLM (``TrainConfig.text_only_prompts``,
``text_only_batch`` per step; no image, so L_simple and L_CP skip them). Every variant trains on
them, so the image training is the same in all four; without a teacher (``none``) they are
inert. This is the one place a training-time teacher can add what images do not.

Evaluation: three noun groups, the same kinds of prompts for each (one colour, one counting,
one action prompt per noun, held-out phrasings, so no evaluated text was trained on):
``seen`` (the 17 training nouns), ``text_only`` (12) and ``unseen`` (the 11 held-out nouns),
``--images`` (8) images per prompt, plus the base model with the simple and the complex texts
(the gap closed). Comparisons (``COMPARISONS``) paired over prompts and over nouns
(``statistics.noun_level``: prompts nested in nouns), Holm within each group's family. Reading:
oracle = permuted on seen nouns: the channel is inert; oracle > permuted on seen but not on
unseen: the limit is at inference (the adapter sees only the text encoder's states); oracle >
permuted on text-only nouns: distillation can inject knowledge without images.

Resumable, two jobs side by side (``jobs.run_units``): each variant and each base condition is a
unit of ``channel.partial.json``. Budget: 4 x (2,000 x ~1.6 s + 120 x 8 images x ~1 s) +
2 x 960 images: about 6.5 CPU hours (1 thread each).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import oracle
from sur_lib.world import toyworld as tw
from ..statistics import compare, holm, minimum_detectable_effect, noun_level, summarize
from sur_lib.infra.fileio import atomic_write_text, clean_json, write_json
from sur_lib.infra.provenance import rel_path
from sur_lib.world import prompts
from . import common, jobs, recipes, runs
from .inputs import record_inputs
from .convergence import gap_closed

VARIANTS = ("oracle", "permuted", "smollm2", "none")
GROUPS = ("seen", "text_only", "unseen")
# (variant, compared with): each is one test per group
COMPARISONS = (("oracle", "permuted"), ("oracle", "none"), ("smollm2", "none"), ("permuted", "none"))
TEXT_ONLY_NOUNS: dict[str, tuple[str, str, str]] = {  # noun: (plural, colour, shape)
    "strawberry": ("strawberries", "red", "circle"),
    "apricot": ("apricots", "orange", "circle"),
    "tortilla chip": ("tortilla chips", "yellow", "triangle"),
    "cheese slice": ("cheese slices", "yellow", "square"),
    "brussels sprout": ("brussels sprouts", "green", "circle"),
    "fir tree": ("fir trees", "green", "triangle"),
    "ping pong ball": ("ping pong balls", "white", "circle"),
    "ice cube": ("ice cubes", "white", "square"),
    "radish": ("radishes", "red", "circle"),
    "nectarine": ("nectarines", "orange", "circle"),
    "gooseberry": ("gooseberries", "green", "circle"),
    "bilberry": ("bilberries", "blue", "circle"),
}
TEXT_ONLY_PER_NOUN = 24  # training prompts per text-only noun
PROMPT_SEED = 20261206
# SHA-256 of the canonical JSON of group_prompts() and text_only_rows(), pinned when the runs
# started (a resumed run must evaluate and train on exactly these)
GROUP_PROMPTS_DIGEST = "694f370a67b27825be7612568e063f9bb6f0b2fbb05e50825d8c3e0345c12dde"
TEXT_ONLY_DIGEST = "70ecb1ce5a33370fa73870d86fe6f40f699da8d7313c77791c101db572991420"


def noun_info(noun: str) -> tuple[str, str, str]:
    """(plural, colour, shape) of a world noun or a text-only noun."""
    if noun in tw.NOUNS:
        i = tw.NOUNS[noun]
        return i.plural, i.color, i.shape
    return TEXT_ONLY_NOUNS[noun]


def text_only_rows(seed: int = PROMPT_SEED, per_noun: int = TEXT_ONLY_PER_NOUN) -> list[dict]:
    """The text-only training prompts as rows (text, count, colour, shape, arrangement, noun),
    drawn as SURD-mini draws its simple prompts (train phrasings), distinct texts."""
    rows = []
    for k, noun in enumerate(TEXT_ONLY_NOUNS):
        rng = np.random.default_rng([seed, k, 1])
        _, color, shape = noun_info(noun)
        seen: set[str] = set()
        for _ in range(10_000):
            if len(seen) >= per_noun:
                break
            count = int(rng.integers(1, tw.MAX_COUNT + 1))
            arr = tw.ARRANGEMENTS[int(rng.integers(4))] if count >= tw.MIN_ARRANGED else None
            key = "single" if count == 1 else ("count" if arr is None or rng.random() < 0.25 else arr)
            options = tw.TEMPLATES["train"][key]
            text = prompts.noun_text(options[int(rng.integers(len(options)))], count, noun,
                                     noun_info(noun)[0])
            if text in seen:
                continue
            seen.add(text)
            rows.append({"text": text, "count": count, "color": color, "shape": shape,
                         "arrangement": arr, "noun": noun})
    return rows


def group_nouns() -> dict[str, tuple[str, ...]]:
    return {"seen": tw.TRAIN_NOUNS, "text_only": tuple(TEXT_ONLY_NOUNS), "unseen": tw.HELDOUT_NOUNS}


def group_prompts(seed: int = PROMPT_SEED) -> dict[str, list[dict]]:
    """{group: specs}: per noun one colour, one counting and one action prompt, held-out
    phrasings (``prompts.noun_prompts``); ``GROUP_PROMPTS_DIGEST`` pins them."""
    streams = {"seen": 2, "text_only": 3, "unseen": 4}
    return {g: [dict(s, group=g) for s in prompts.noun_prompts({n: noun_info(n) for n in nouns}, f"ch-{g}",
                                                              seed, streams[g])]
            for g, nouns in group_nouns().items()}


@dataclass
class ChannelConfig:
    steps: int = 2000
    images: int = 8
    rows: int = common.SURD_MINI_ROWS
    entropy: float = oracle.CHANNEL_ENTROPY
    llm_ratio: float = 2 / 3  # ||grad L_LLM|| / ||grad L_simple|| at the untrained adapter
    text_only_batch: int = 8
    measure_batches: int = 4
    seed: int = 0
    quick: bool = False
    max_minutes: float | None = None
    out: str = str(common.RESULTS_DIR)
    progress: bool = True
    cache: bool = True
    argv: tuple[str, ...] = ()

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None) -> "ChannelConfig":
        ap = argparse.ArgumentParser(prog="python -m sur_lib.study.experiments channel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        ap.add_argument("--steps", type=int, default=None, help="training steps (2000; quick 3)")
        ap.add_argument("--images", type=int, default=None, help="images per prompt (8; quick 2)")
        common.add_long_run_options(ap)
        a = common.parse_long_run_args(ap, argv)
        q = a.quick
        return cls(steps=a.steps or (3 if q else 2000), images=a.images or (2 if q else 8),
                   rows=64 if q else common.SURD_MINI_ROWS, measure_batches=1 if q else 4,
                   seed=a.seed, quick=q, max_minutes=a.max_minutes, out=a.out,
                   progress=not a.no_progress, cache=not a.no_cache,
                   argv=tuple(sys.argv[2:] if argv is None else argv))

    def generation(self) -> common.GenSettings:
        return common.GenSettings(steps=common.QUICK["sampler_steps"]) if self.quick else common.GenSettings()

    def prompts(self) -> dict[str, list[dict]]:
        specs = group_prompts()
        if self.quick:  # one noun per group
            specs = {g: s[:3] for g, s in specs.items()}
        return specs


# ----------------------------------------------------------------------------- the teachers


def training_rows(cfg) -> list[dict]:
    """SURD-mini's rows and the text-only rows: every prompt a teacher is asked about."""
    from sur_lib.data import SURDDataset

    return list(SURDDataset(cfg.data_dir, check_images=False).rows) + text_only_rows()


def teacher_vectors(variant: str, cfg, rows: list[dict], entropy: float, text_dim: int,
                    progress: bool = True) -> dict:
    """{prompt: vector} of ``variant``'s teacher for every prompt of ``rows``, calibrated
    (``oracle.calibrate_targets`` with the adapter's W0: LLM width -> ``text_dim``, the text
    encoder's width)."""
    from sur_lib.adapter import KnowledgeProjection

    if variant == "smollm2":
        raw = runs.knowledge_for_config(cfg, [r["text"] for r in rows], progress)
        width = next(iter(raw.values())).shape[-1]
    elif variant in ("oracle", "permuted"):
        if cfg.llm != "smollm2":
            raise ValueError(f"the channel's oracle is projected to SmolLM2's width; cfg.llm is {cfg.llm!r}")
        width = oracle.SMOLLM2_WIDTH  # the width of tiny.yaml's LLM vectors, so W0 is the same
        raw = oracle.oracle_knowledge(teacher_rows(variant, rows), width=width)
    else:
        raise ValueError(f"variant {variant!r} has no teacher")
    w0 = KnowledgeProjection(width, text_dim, cfg.w0_seed)
    return oracle.calibrate_targets(raw, w0, entropy, cfg.temperature)


def teacher_rows(variant: str, rows: list[dict]) -> list[dict]:
    """The rows the oracle reads for ``variant``: as they are, or with every noun's class
    replaced by its permuted class (``permuted``)."""
    if variant != "permuted":
        return rows
    perm = oracle.permuted_classes({r["noun"]: (r["color"], r["shape"]) for r in rows})
    return [dict(r, color=perm[r["noun"]][0], shape=perm[r["noun"]][1]) for r in rows]


# ----------------------------------------------------------------------------- training


def text_only_file() -> Path:
    """The text-only prompts, one per line, in a file named by its content's hash."""
    text = "\n".join(r["text"] for r in text_only_rows()) + "\n"
    h = hashlib.sha256(text.encode()).hexdigest()[:12]
    path = common.WORK_DIR / "channel" / f"text-only-{h}.txt"
    if not path.is_file():
        atomic_write_text(path, text)
    return path


def variant_config(cc: ChannelConfig, variant: str, lam: float | None, model_digest: str):
    over = {"lambda_llm": 0.0 if variant == "none" else float(lam), "text_only_batch": cc.text_only_batch,
            "text_only_prompts": str(text_only_file()),
            "extra": {"knowledge": f"channel-{variant}", "entropy": cc.entropy}}
    run_root = common.WORK_DIR / ("channel-quick" if cc.quick else "channel")
    return recipes.recipe_config(over, cc.rows, cc.steps, run_root, model_digest, cc.seed, "llm",
                                 batch_size=8 if cc.quick else None, progress=cc.progress)


def shares_of(cfg, backbone, adapter, knowledge: dict, batches: int) -> dict:
    """Gradient shares of ``adapter`` under ``cfg`` (lambda_LLM 0: measured at 1, reweighted)."""
    from ..gradient_share import measure, reweight
    from ..step_cache import run_inputs

    cfg_m = dataclasses.replace(cfg, lambda_llm=cfg.lambda_llm or 1.0)
    bb, ds = run_inputs(cfg_m, backbone, knowledge, progress=False)
    raw = measure(cfg_m, bb, ds, adapter, knowledge, batches)
    return {**reweight(raw, cfg.lambda_llm, cfg.lambda_cp), "raw_norm": raw["raw_norm"],
            "loss": raw["loss"], "batches": raw["batches"]}


def choose_lambda(cc: ChannelConfig, backbone, model_digest: str) -> dict:
    """lambda_LLM at which L_LLM's gradient is ``llm_ratio`` of L_simple's, at the untrained
    adapter (the training seed's init) on the oracle target; the targets' statistics too."""
    from sur_lib.adapter import KnowledgeProjection
    from ..gradient_share import lambda_to_match
    from sur_lib.train import build_adapter

    cfg = variant_config(cc, "oracle", 1.0, model_digest)
    rows = training_rows(cfg)
    groups = oracle.prompt_attributes(rows)  # {prompt: the oracle's attribute combination}
    llm = runs.knowledge_for_config(cfg, [r["text"] for r in rows], cc.progress)
    width = next(iter(llm.values())).shape[-1]
    w0 = KnowledgeProjection(width, backbone.text_dim, cfg.w0_seed)
    targets = {"before": {"smollm2 (as used by the re-test)": oracle.target_stats(llm, w0, cfg.temperature),
                          "oracle (re-test: SmolLM2's mean norm)": oracle.target_stats(
                              oracle.oracle_knowledge(rows, width, norm=oracle.mean_norm(llm)), w0,
                              cfg.temperature, groups)},
               "after": {}}
    knowledge = {}
    for v in ("oracle", "permuted", "smollm2"):
        vec = teacher_vectors(v, cfg, rows, cc.entropy, backbone.text_dim, cc.progress)
        targets["after"][v] = oracle.target_stats(
            vec, w0, cfg.temperature, None if v == "smollm2" else oracle.prompt_attributes(teacher_rows(v, rows)))
        knowledge[v] = vec
    torch.manual_seed(cfg.seed)
    adapter = build_adapter(cfg, backbone.text_dim, width)
    shares = shares_of(cfg, backbone, adapter, knowledge["oracle"], cc.measure_batches)
    lam = lambda_to_match(shares, "l_llm", cc.llm_ratio)
    lam = float(f"{lam:.1e}")
    from ..gradient_share import reweight

    return {"lambda_llm": lam, "rule": f"||grad L_LLM|| = {cc.llm_ratio:.3g} x ||grad L_simple|| at "
                                       "the untrained adapter on the oracle target (2 significant digits)",
            "init_shares_raw": shares, "init_shares": reweight(shares, lam, cfg.lambda_cp),
            "targets": targets}


def train_variant(cc: ChannelConfig, variant: str, lam: float, backbone, model_digest: str):
    """Train one variant (``runs.train_adapter`` on the step cache, resuming a stopped run); its
    fp16 adapter and knowledge."""
    from ..step_cache import run_inputs

    cfg = variant_config(cc, variant, lam, model_digest)
    knowledge = None
    if variant != "none":
        knowledge = teacher_vectors(variant, cfg, training_rows(cfg), cc.entropy, backbone.text_dim, cc.progress)
    folder = recipes.adapter_folder(cfg)
    if (folder / "sur_adapter.json").is_file():
        meta = json.loads((folder / "sur_adapter.json").read_text())
        return cfg, runs.load_adapter(folder), meta["digest"], knowledge
    result = runs.train_adapter(cfg, backbone, knowledge=knowledge, progress=cc.progress,
                                inputs=run_inputs(cfg, backbone, knowledge, cc.progress))
    stored = {k: v for k, v in cfg.to_dict().items() if k not in runs.PATH_KEYS}
    adapter, digest = runs.save_adapter(result.adapter, folder, dict(
        made_by="python -m sur_lib.study.experiments channel", variant=variant, steps=cfg.max_steps,
        train_config=stored))
    shutil.rmtree(Path(cfg.output_dir) / "checkpoints", ignore_errors=True)
    return cfg, adapter, digest, knowledge


def fit_curve(log_rows: list[dict], every: int = 100) -> dict:
    """L_LLM over training: the mean of each ``every``-step window, and last / first."""
    vals = [float(r["l_llm"]) for r in log_rows]
    windows = [float(np.mean(vals[i:i + every])) for i in range(0, len(vals), every)]
    return {"every": every, "l_llm": windows,
            "last_over_first": windows[-1] / windows[0] if windows and windows[0] else None}


# ----------------------------------------------------------------------------- the run


def runs_dir(cc: ChannelConfig) -> Path:
    return Path(cc.out).parent / "runs" / ("channel-quick" if cc.quick else "channel")


def run_channel(cc: ChannelConfig, backbone=None) -> tuple[dict, bool]:
    from sur_lib.infra.run_state import read_log
    from .images import make_pipe

    t0, deadline = time.time(), jobs.Deadline(cc.max_minutes)
    backbone = backbone if backbone is not None else common.load_base()
    minfo, gen = common.model_info(backbone), cc.generation()
    specs = cc.prompts()
    settings = clean_json({"steps": cc.steps, "images": cc.images, "rows": cc.rows, "seed": cc.seed,
                           "entropy": cc.entropy, "llm_ratio": cc.llm_ratio,
                           "text_only_batch": cc.text_only_batch, "generation": gen.to_dict(),
                           "model_digest": minfo["unet_digest"],
                           "text_only_prompts": hashlib.sha256(text_only_file().read_bytes()).hexdigest(),
                           "prompts": {g: [s["id"] for s in v] for g, v in specs.items()}})
    ppath = Path(cc.out) / ("channel-quick.partial.json" if cc.quick else "channel.partial.json")
    partial = jobs.read(ppath)
    if partial.get("settings") != settings:
        partial = {"settings": settings, "variants": {}, "base": {}}
    cache = common.WORK_DIR / "cache" if cc.cache else None
    pipe = make_pipe(backbone, gen)

    def sync():
        jobs.merge(partial, ppath, ("variants", "base"), ("lambda",))

    # the first unit, which the others need: a job waits while another chooses it
    jobs.run_units(partial, ppath, sync, [jobs.Unit(
        "lambda", lambda: choose_lambda(cc, backbone, minfo["unet_digest"]), partial)],
        deadline, wait=True)

    def variant_unit(var):
        def work():
            tv = time.time()
            lam = partial["lambda"]["lambda_llm"]
            cfg, adapter, digest, knowledge = train_variant(cc, var, lam, backbone, minfo["unet_digest"])
            log = read_log(cfg.output_dir)
            export = runs_dir(cc) / var
            export.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(cfg.output_dir) / "log.csv", export / "log.csv")
            res = {"config": recipes.config_summary(cfg), "run": rel_path(Path(cfg.output_dir)),
                   "digest": digest, "log": rel_path(export / "log.csv"),
                   **({"adapter_dir": export_adapter(cfg, export)} if var in VERIFY_ADAPTERS else {}),
                   "shares": shares_of(cfg, backbone, adapter, knowledge or {}, cc.measure_batches)
                   if knowledge else None,
                   "fit": fit_curve(log) if knowledge else None, "records": {}}
            for g in GROUPS:
                res["records"][g] = recipes.evaluate(backbone, adapter, specs[g], cc.images, cc.seed, gen,
                                                     pipe, cache=cache, progress=cc.progress,
                                                     desc=f"channel/{var}/{g}")
            res["seconds"] = round(time.time() - tv, 1)
            res["versions"] = common.versions()
            return res
        return work

    def base_unit(field, g):
        return lambda: recipes.evaluate(backbone, None, specs[g], cc.images, cc.seed, gen, pipe,
                                        field=field, cache=cache, progress=cc.progress,
                                        desc=f"channel/base-{field}/{g}")

    units = [jobs.Unit(v, variant_unit(v), partial["variants"], claim=f"variant/{v}")
             for v in VARIANTS[:2]]
    units += [jobs.Unit(f"{'simple' if f == 'text' else 'complex'}/{g}", base_unit(f, g),
                        partial["base"], claim=f"base/{f}/{g}") for f in ("text", "prompt") for g in GROUPS]
    units += [jobs.Unit(v, variant_unit(v), partial["variants"], claim=f"variant/{v}")
              for v in VARIANTS[2:]]
    if "lambda" in partial:
        jobs.run_units(partial, ppath, sync, units, deadline)
    with jobs.locked(ppath):
        sync()
    done = partial["variants"]
    complete = all(v in done for v in VARIANTS) and all(
        f"{b}/{g}" in partial["base"] for b in ("simple", "complex") for g in GROUPS)
    doc = {"experiment": "channel", "command": "python -m sur_lib.study.experiments channel " + " ".join(cc.argv),
           "seed": cc.seed, "quick": cc.quick, "versions": common.versions(),
           "where": "CPU (1 torch thread per job)", "model": minfo, "judge": common.judge_info(),
           "settings": settings, "lambda": partial.get("lambda"), "complete": complete,
           "text_only_nouns": {n: list(v) for n, v in TEXT_ONLY_NOUNS.items()},
           "variants": done, "base": partial["base"]}
    if complete:
        doc["table"] = table(done, partial["base"])
    with jobs.locked(ppath):
        sync()
        doc["wall_time_s"] = jobs.add_job_time(partial, ppath, time.time() - t0)
        write_json(partial, ppath)
    return doc, complete


def table(done: dict, base: dict) -> dict:
    """Per group: each variant's summary and gap closed; each comparison paired over prompts
    (``compare``) and over nouns (``noun_level``), Holm across the group's comparisons (for the
    prompt-level and the noun-level p each)."""
    out = {}
    for g in GROUPS:
        sb, sc = summarize(base[f"simple/{g}"]), summarize(base[f"complex/{g}"])
        rows = {v: {"summary": (s := summarize(done[v]["records"][g])),
                    "gap_closed": gap_closed(sb["overall"]["acc"], s["overall"]["acc"], sc["overall"]["acc"])}
                for v in VARIANTS}
        tests = {}
        for a, b in COMPARISONS:
            ra, rb = done[b]["records"][g], done[a]["records"][g]
            tests[f"{a}_vs_{b}"] = {"prompts": compare(ra, rb)["overall"], "nouns": noun_level(ra, rb)}
        for level, key in (("prompts", "p_t"), ("nouns", "p_t")):
            ps = {k: (t[level].get("paired") or {}).get(key) if level == "prompts" else t[level].get(key)
                  for k, t in tests.items()}
            for k, p in holm(ps).items():
                tests[k][level]["p_holm"] = p
        out[g] = {"base": sb["overall"], "ceiling": sc["overall"], "variants": rows, "tests": tests}
    return out


UNIT = {"seen": "prompts", "text_only": "nouns", "unseen": "nouns"}  # the unit of each group's test


def verdict(test: dict, group: str, alpha: float = 0.05) -> str:
    """"supported" / "contradicted" / "not detected" for "the first variant beats the second" in
    ``group``, from the Holm-adjusted p at the group's unit (``UNIT``)."""
    level = test[UNIT[group]]
    p = level.get("p_holm")
    if p is None or p >= alpha:
        return "not detected"
    return "supported" if level["diff"] > 0 else "contradicted"


def reading(tab: dict, alpha: float = 0.05) -> dict:
    """The reading of the experiment, from oracle vs permuted in each group (``table``):
    is the channel inert, is the limit at inference, can a teacher inject a noun without images?"""
    v = {g: verdict(tab[g]["tests"]["oracle_vs_permuted"], g, alpha) for g in GROUPS}
    if v["seen"] != "supported":
        channel = ("inert: the true teacher does no better than a wrong one on the nouns the "
                   "adapter trained on")
    elif v["unseen"] != "supported":
        channel = ("live on seen nouns, not on unseen ones: the limit is at inference, where the "
                   "adapter sees only the text encoder's states")
    else:
        channel = "live on seen and on unseen nouns"
    inject = ("yes: the oracle beats the permuted oracle on nouns seen only as text"
              if v["text_only"] == "supported" else
              "not detected: on nouns seen only as text the true teacher did no detectably better than a wrong one")
    return {"verdicts": v, "channel": channel, "text_only": inject}


def preliminary(partial: dict) -> dict:
    """What a channel run that is still going can show: each finished variant's summary per
    group and the comparisons whose two variants are in, paired over prompts and over nouns,
    NOT Holm-corrected and without verdicts (the family is incomplete)."""
    done = partial.get("variants", {})
    out = {"finished": [v for v in VARIANTS if v in done], "missing": [v for v in VARIANTS if v not in done],
           "base": sorted(partial.get("base", {})), "groups": {}}
    for g in GROUPS:
        rows = {v: summarize(done[v]["records"][g])["overall"] for v in out["finished"]}
        tests = {f"{a}_vs_{b}": {"prompts": compare(done[b]["records"][g], done[a]["records"][g])["overall"],
                                 "nouns": noun_level(done[b]["records"][g], done[a]["records"][g])}
                 for a, b in COMPARISONS if a in done and b in done}
        out["groups"][g] = {"variants": rows, "tests": tests}
    return out


def detectable(done: dict, group: str, a: str, b: str) -> float | None:
    """The smallest difference a - b the group's test could detect (80% power, 5% level), from
    the spread of the paired differences at the group's unit (``UNIT``): prompts or nouns."""
    ra, rb = done[b]["records"][group], done[a]["records"][group]
    if UNIT[group] == "nouns":
        return noun_level(ra, rb).get("mde")
    by_id = {r["id"]: r["acc"] for r in ra}
    return minimum_detectable_effect([r["acc"] - by_id[r["id"]] for r in rb if r["id"] in by_id])


def book_rows(tab: dict, done: dict, alpha: float = 0.05) -> tuple[list[dict], list[dict]]:
    """Chapter 08's two channel tables from ``table``: accuracy per variant and group (mean of
    the per-prompt accuracies with its 95% t interval over prompts, and the gap closed), and each
    comparison with its change at the group's unit, p over prompts and over nouns, Holm p, the
    detectable difference and the verdict. Values in percent, formatted."""
    def acc(block):
        lo, hi = (min(1.0, max(0.0, x)) for x in block["prompt_t_ci"])
        return f"{100 * block['prompt_mean']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"

    def gap(x):
        return "–" if x is None else f"{x:.0%}"

    accuracy = [{"variant": v, **{f"{g}: % [CI]": acc(tab[g]["variants"][v]["summary"]["overall"])
                                  for g in GROUPS},
                 **{f"{g}: gap closed": gap(tab[g]["variants"][v]["gap_closed"]) for g in GROUPS}}
                for v in VARIANTS]
    tests = []
    for g in GROUPS:
        unit = UNIT[g]
        for a, b in COMPARISONS:
            t = tab[g]["tests"][f"{a}_vs_{b}"]
            lvl = t[unit]
            ci = lvl["t_ci"] if unit == "nouns" else lvl["paired"]["t_ci"]
            mde = detectable(done, g, a, b)
            tests.append({"group (unit)": f"{g} ({unit})", "comparison": f"{a} − {b}",
                          "change, points [95% CI]": f"{100 * lvl['diff']:+.1f} [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]",
                          "p: prompts / nouns": f"{_p(t['prompts']['paired']['p_t'])} / {_p(t['nouns'].get('p_t'))}",
                          "Holm p": _p(lvl["p_holm"]), "detectable": "–" if mde is None else f"{100 * mde:.1f}",
                          "verdict": verdict(t, g, alpha)})
    return accuracy, tests


def _p(p: float | None) -> str:
    return "–" if p is None else "<0.001" if p < 0.001 else f"{p:.3f}"


# ----------------------------------------------------------------------------- verify

VERIFY_ADAPTERS = ("oracle",)  # whose fp16 adapter is committed (data/runs/channel/<v>/adapter-fp16)


def export_adapter(cfg, export: Path) -> str:
    """Copy a variant's stored fp16 adapter into the committed ``export`` folder; its path."""
    dest = Path(export) / "adapter-fp16"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(recipes.adapter_folder(cfg), dest)
    return rel_path(dest)


def backfill(ppath: Path, out_runs: Path) -> list[str]:
    """For variants finished before their unit exported these (the first session's runs): copy
    the committed adapter of ``VERIFY_ADAPTERS`` from the run folder and record the package
    versions of this environment, marked as recorded after the run. Run it only while no
    channel job is running (the jobs rewrite the partial file from memory)."""
    from sur_lib.infra.provenance import ROOT

    partial = jobs.read(ppath)
    done = []
    for var, d in partial.get("variants", {}).items():
        if var in VERIFY_ADAPTERS and "adapter_dir" not in d:
            src = ROOT / d["run"] / "adapter-fp16"
            dest = Path(out_runs) / var / "adapter-fp16"
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(src, dest)
            d["adapter_dir"] = rel_path(dest)
            done.append(f"{var}: adapter copied to {rel_path(dest)}")
        if "versions" not in d:
            d["versions"] = common.versions()
            d["versions_recorded"] = "after the run, from the environment that ran it"
            done.append(f"{var}: versions recorded")
    with jobs.locked(ppath):
        write_json(partial, ppath)
    return done


def verify_channel(doc: dict, backbone, current_digest: str, draws: int | None,
                   progress: bool = False, out: Path | str | None = None) -> list[dict]:
    """``verify`` for the channel experiment (its final or partial file): every record's counts,
    the table (when complete) recomputed from the records, the first training steps of the
    first finished teacher variant replayed against its loss log, and the committed adapter's
    images re-drawn (``draws`` per group). The verify hooks' signature (``registry``; ``out``
    is not used)."""
    from ..statistics import same_numbers
    from sur_lib.infra.provenance import ROOT
    from .checks import replay_start, verify_images

    if doc["settings"]["model_digest"] != current_digest:
        return [{"check": "channel: base model", "ok": False,
                 "message": "the channel experiment was made with another base model: re-run it"}]
    checks = []
    bad = [(v, g, r["id"]) for v, d in doc["variants"].items() for g, recs in d["records"].items()
           for r in recs if r["k"] != sum(r["correct"]) or r["n"] != len(r["correct"])]
    checks.append({"check": "channel: record counts", "ok": not bad, "message": f"inconsistent: {bad[:3]}"
                   if bad else "every record's k and n follow from its verdicts"})
    if doc.get("table"):
        ok = same_numbers(table(doc["variants"], doc["base"]), doc["table"])
        checks.append({"check": "channel: table", "ok": ok,
                       "message": "recomputed from the records" + ("" if ok else ": DIFFERS")})
    cc = ChannelConfig(steps=doc["settings"]["steps"], images=doc["settings"]["images"],
                       rows=doc["settings"]["rows"], entropy=doc["settings"]["entropy"],
                       llm_ratio=doc["settings"]["llm_ratio"], text_only_batch=doc["settings"]["text_only_batch"],
                       seed=doc["settings"]["seed"], quick=bool(doc.get("quick")), progress=progress)
    var = next((v for v in VARIANTS if v in doc["variants"] and v != "none"), None)
    if var is not None:  # without the step cache, which gives the same losses (tests/test_step_cache.py)
        cfg = variant_config(cc, var, doc["lambda"]["lambda_llm"], current_digest)
        import csv

        with open(ROOT / doc["variants"][var]["log"], newline="") as f:
            stored = list(csv.DictReader(f))
        # the teacher is calibrated over every prompt it is asked about, so it reads every row
        checks += [dict(c, check=f"channel {var}: {c['check']}") for c in replay_start(
            cfg, backbone, stored, lambda rows: teacher_vectors(
                var, cfg, training_rows(cfg), cc.entropy, backbone.text_dim, progress), progress)]
    for v in VERIFY_ADAPTERS:
        d = doc["variants"].get(v)
        if d is None or "adapter_dir" not in d:
            continue
        sub = {"model": {"unet_digest": doc["settings"]["model_digest"]}, "seed": doc["settings"]["seed"],
               "generation": doc["settings"]["generation"], "versions": d.get("versions") or doc.get("versions"),
               "conditions": {f"channel {v}/{g}": {"records": r, "adapter": {"dir": str(ROOT / d["adapter_dir"]),
                                                                             "digest": d["digest"]}}
                              for g, r in d["records"].items()}}
        checks += verify_images(sub, backbone, current_digest, draws, progress)
    return checks


def main(argv: Sequence[str] | None = None) -> int:
    cc = ChannelConfig.from_args(argv)
    doc, complete = run_channel(cc)
    if not complete:
        print(f"not complete yet ({len(doc['variants'])} of {len(VARIANTS)} variants, "
              f"{len(doc['base'])} of {2 * len(GROUPS)} base conditions): run the same command again")
        return 0
    path = write_json(record_inputs(doc), Path(cc.out) / ("channel-quick.json" if cc.quick else "channel.json"))
    print(f"wrote {rel_path(path)} ({doc['wall_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    from sur_lib.infra.cli import run as run_cli
    run_cli(main)
