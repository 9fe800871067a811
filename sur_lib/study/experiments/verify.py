"""``verify``: checks every stored result against its own records and against live re-draws.

Per result, in this order:

1. **records against their verdicts** (``record_problems``): each record's k, n, acc, lo and
   hi are what its per-image verdicts give, exactly;
2. **summaries recomputed from the records** (``expected_summaries``), compared exactly (as
   stored: NaN as null): the experiment's own summaries for ``failure``, ``sur``,
   ``rewrite`` and ``guidance`` (with ``failure``'s claim and ``guidance``'s pick), and in
   every result each ``summary`` that sits beside its ``records``. An edited headline fails
   here without drawing anything;
3. **re-drawn images** (``checks``: ``verify_images``, ``redraw_check``; the experiments' hooks):
   ``VERIFY_DRAWS`` images of every checked condition, chosen uniformly at random among all its
   images (every prompt, every image index) afresh in each run (``choose_images``: the seed is
   printed, and ``verify --seed N`` chooses the same again); ``verify --power P`` draws enough
   for probability P (below), ``verify --full`` every image. Image j of a prompt is drawn alone
   from its own initial noise (``images.initial_noise``: row j of the seeded draw), so it costs
   one image, not the j before it. On the package versions that wrote the result
   (``same_versions``) the seeded draws must give every stored verdict again, image for image
   (``image_check``); on other versions the accuracies must agree within
   ``statistics.agreement``'s tolerance;
4. **loss replays** from scratch (``checks.VERIFY_TRAIN_STEPS`` = 5 steps): ``ablations``
   (``ablations.ablation_replays``: the first 5 steps of the variant the result names and the first step
   of every other variant with the reference's teacher, 11 of the 15 distinct variants; the
   four others need SmolLM2 at another layer or Gemma, a minute or more of knowledge vectors
   each from a cold cache; ``verify --full`` replays them and every step of every variant;
   the ablations store no adapter states, so a later step can only be reached from scratch)
   and ``convergence``; ``tune`` and ``retest`` replay their
   own logs; and beyond the start from every stored state (``checks.replay_from_states``: the step
   after each stored adapter, recomputed from it; ``convergence`` 251, 501, 1001, 2001, 3501;
   ``retest``'s recipe, copied from that run, 251, 501, 1001 of its own log; ``tune`` stores
   only its final adapter, after its last step). A single step edited elsewhere is not
   replayed; where the log is a file, its SHA-256 (5) catches the edit unless the recorded
   digest is rewritten too;
5. **inputs** (``inputs.input_check``): every committed file the result depends on (loss logs,
   adapters, the base model, prompt sets) still has the SHA-256 the result recorded.

How likely is an edit caught? An edit that moves a condition of N images by 5 points changes
at least f = ceil(0.05 N) verdicts, whichever they are. s images drawn uniformly at random
without replacement miss all of them with probability C(N - f, s) / C(N, s) (hypergeometric,
``miss_probability``), which is below (1 - 0.05)^s. 95% needs s = 59 for a large N
(``images_for_power``; 57 for the usual N = 45 x 16 = 720). Measured cost (2026-12-06,
1 torch thread, CPU seconds per image of the tiny model at 25 DDIM steps, so that the busy
machine's other jobs do not enter): 0.66 s for an image drawn alone, 0.62 / 0.59 / 0.52 /
0.61 s in batches of 4 / 12 / 16 / 32 (``images.judge_images`` draws a condition's chosen
images up to 16 at a time, prompts mixed, each from its own initial noise and with its own
conditioning; the verdicts agree image for image with the stored ones at every batch size).
Batching saves at most about 1.3x: the tiny UNet's work grows with the batch, little of an
image's cost is per call. 59 per condition are 520 and 582 images in verify's two processes
(draws that results share counted once), 270 s and 303 s of drawing alone at 0.52 s an image,
beyond the 3-minute budget of the default before any replay or load; about 28 per condition
would fit (detection 0.77 for N = 720; an estimate, not measured on an idle machine). So the default draws ``VERIFY_DRAWS`` = 12 per condition, and says in each condition's line
what that achieves: 1 - C(684, 12) / C(720, 12) = 0.46 for N = 720 (0.49 for the 30 x 2
images of a ``compose`` condition; each line prints its own). Before, the default drew the
first 4 images of 3 prompts, so an edit of images 5-16 was never caught (probability 0).
``verify --power 0.95`` reaches 95% per condition (about 5 minutes warm on two cores, estimated);
``verify --full`` checks every image (probability 1 on the same versions; hours). The
consistency checks (1, 2) catch every edit that leaves records, verdicts and summaries out
of step, at any size, and the input digests (5) every edit of a file the result names.
Within one run, a draw that several results share (the base model's images of the same
simple prompts, with the same seed and sampler) is made live once and compared with each.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..statistics import agreement
from sur_lib.infra.provenance import rel_path, state_digest
from . import checks as shared, registry
from .checks import (VERIFY_LOSS_RTOL, VERIFY_TRAIN_STEPS, choose_images,  # noqa: F401 (verify's names)
                     detection_probability, draw_key, image_check, images_for_power, loss_checks,
                     miss_probability, redraw_check, replay_from_states, same_versions, verify_images)
from .common import ExperimentConfig, load_base, result_path
from .inputs import input_check

VERIFY_DRAWS = 12  # random images re-drawn per condition by default (the 3-minute budget)
VERIFY_QUICK_DRAWS = 4


@dataclass
class VerifyConfig(ExperimentConfig):
    """``python -m sur_lib.study.experiments verify``: plus ``only`` (experiments to verify) and
    ``jobs`` (processes side by side, see ``run_verify``)."""

    only: str | None = None
    jobs: int = 2
    full: bool = False  # re-draw every image of every condition verify checks
    power: float | None = None  # re-draw enough images per condition to catch a 5-point edit this often
    draw_seed: int | None = None  # chooses the re-drawn subset (None: a fresh one each run)

    @classmethod
    def from_args(cls, args) -> "VerifyConfig":
        """``--seed N`` given on the command line chooses the re-drawn subset (the same N, the
        same subset); without it a fresh subset is chosen in each run (and printed)."""
        exp = super().from_args(args)
        argv = list(getattr(args, "argv", None) or ())
        if any(a == "--seed" or a.startswith("--seed=") for a in argv):
            exp.draw_seed = exp.seed
        return exp


def verify_path(out: Path | str, name: str) -> Path:
    """The file ``verify`` checks for ``name``: its result, or for a result that lands over
    sessions (``registry``'s ``partial``) its partial file while the result does not exist."""
    final = result_path(out, name, False)
    partial = Path(out) / f"{name}.partial.json"
    return partial if registry.get(name).partial and not final.is_file() and partial.is_file() else final


def read_result(path: Path, name: str) -> dict:
    """The stored result ``name`` at ``path``, or a UsageError naming the file when it is not
    readable JSON (damaged, nested too deeply) or lacks what verify reads."""
    from sur_lib.infra.cli import UsageError
    from sur_lib.infra.fileio import read_json

    doc = read_json(path, "result file")
    if not isinstance(doc, dict):
        raise UsageError(f"result file {rel_path(path)} is not a JSON object: not a result of `{name}`")
    keys = registry.get(name).keys if name in registry.COMMANDS else registry.IMAGE_RESULT_KEYS
    lacking = [k for k in keys if k not in doc]  # what verify reads (``registry``)
    if lacking:
        raise UsageError(f"result file {rel_path(path)} is not a result of `{name}`: it lacks "
                         f"{', '.join(map(repr, lacking))} (restore it with git, or re-run "
                         f"python -m sur_lib.study.experiments {name})")
    return doc


# ----------------------------------------------------------------------------- consistency


def _is_record(r) -> bool:
    return isinstance(r, dict) and isinstance(r.get("correct"), list) and "k" in r and "n" in r


def _is_records(x) -> bool:
    return isinstance(x, list) and bool(x) and all(_is_record(r) for r in x)


def first_difference(stored, live, path: str = "") -> str | None:
    """The first place where ``stored`` and ``live`` (plain JSON, ``fileio.clean_json``) differ,
    as 'path: stored X, recomputed Y'; None if they are exactly equal."""
    if isinstance(stored, dict) and isinstance(live, dict):
        for k in sorted(set(stored) | set(live), key=str):
            if k not in stored or k not in live:
                return f"{path}/{k}: {'missing in the result' if k not in stored else 'not recomputed'}"
            d = first_difference(stored[k], live[k], f"{path}/{k}")
            if d:
                return d
        return None
    if isinstance(stored, list) and isinstance(live, list):
        if len(stored) != len(live):
            return f"{path}: {len(stored)} entries stored, {len(live)} recomputed"
        for i, (a, b) in enumerate(zip(stored, live)):
            d = first_difference(a, b, f"{path}[{i}]")
            if d:
                return d
        return None
    if stored == live and type(stored) is type(live) or (
            isinstance(stored, (int, float)) and isinstance(live, (int, float))
            and not isinstance(stored, bool) and not isinstance(live, bool) and stored == live):
        return None
    return f"{path}: stored {stored!r}, recomputed {live!r}"


def _containers(x, path: str = "", enter=lambda parent, key: True):
    """Every dict and list of a JSON document, depth first, with its path ("/a/b[2]"); the
    children of ``parent`` under ``key`` are visited when ``enter(parent, key)``."""
    yield path, x
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ()
    for k, v in items:
        if isinstance(v, (dict, list)) and enter(x, k):
            yield from _containers(v, f"{path}/{k}" if isinstance(x, dict) else f"{path}[{k}]", enter)


def record_problems(doc) -> list[str]:
    """Every record of ``doc`` (a dict with ``correct``, ``k``, ``n``) checked against its own
    verdicts: k = sum(correct), n = len(correct), acc = k / n and the Wilson interval (lo, hi),
    exactly; the per-attribute ``hits`` cannot exceed n. Returns one line per problem."""
    from ..statistics import wilson_interval

    problems = []

    def check(x, path):
        c = x["correct"]
        want = {"k": sum(int(v) for v in c), "n": len(c)}
        if want["n"]:
            want["acc"] = want["k"] / want["n"]
            want["lo"], want["hi"] = wilson_interval(want["k"], want["n"])
        for key, v in want.items():
            if key in x and first_difference(x[key], v) is not None:
                problems.append(f"{path} ({x.get('id', '?')}): {key} is {x[key]!r}, its verdicts "
                                f"give {v!r}")
                return
        if any(int(v) not in (0, 1) for v in c):
            problems.append(f"{path} ({x.get('id', '?')}): verdicts must be 0 or 1")

    for path, x in _containers(doc, enter=lambda parent, key: not _is_record(parent)):
        if _is_record(x):
            check(x, path)
    return problems


def _block(base, other, names):
    from ..statistics import compare_block

    b = compare_block(base, other)
    return {names[0]: b["base"], names[1]: b["other"], names[2]: b["change"], "quality": b["quality"]}


def expected_summaries(name: str, doc: dict) -> list[tuple[str, object, object]]:
    """[(where, stored, recomputed)] for every summary of ``doc`` that verify recomputes from
    the records: the experiment's own summaries (``failure``, ``sur``, ``rewrite``,
    ``guidance``) and, in every result, each ``summary`` that sits beside its ``records``."""
    from ..statistics import compare, quality_tests, summarize

    out = []
    conds = doc.get("conditions") or {}
    name = doc.get("experiment", name)  # what the file says it is (a copy may stand in for another)

    def recs(c):
        return conds[c]["records"]
    if name == "failure":
        s, c = recs("simple"), recs("complex")
        live = {"simple": summarize(s), "complex": summarize(c), "complex_minus_simple": compare(s, c),
                "quality": quality_tests(s, c)}
        out.append(("summary", doc.get("summary"), live))
        acc_s, acc_c = live["simple"]["overall"]["acc"], live["complex"]["overall"]["acc"]
        claim = dict(doc.get("claim") or {}, complex=acc_c, simple=acc_s, gap=acc_c - acc_s,
                     met=bool(acc_c >= 0.80 and acc_c - acc_s >= 0.25))
        out.append(("claim", doc.get("claim"), claim))
    elif name in ("sur", "rewrite"):
        other = "adapter" if name == "sur" else "rewrite"
        out.append(("summary", doc.get("summary"),
                    _block(recs("base"), recs(other), ("base", other, f"{other}_minus_base"))))
        td = doc.get("train_distribution")
        if td and isinstance(td.get("records"), dict):
            vb, va = td["records"]["base"], td["records"]["adapter"]
            for key, live in (("base", summarize(vb)), ("adapter", summarize(va)),
                              ("adapter_minus_base", compare(vb, va))):
                out.append((f"train_distribution/{key}", td.get(key), live))
    elif name == "guidance":
        table = {}
        for g in doc.get("grid") or []:
            for cond in ("simple", "complex"):
                c = f"{cond}@cfg{g:g}"
                if c in conds:
                    table.setdefault(f"{g:g}", {})[cond] = summarize(recs(c))
        out.append(("summary", doc.get("summary"), table))
        if table:
            grid = doc["grid"]
            best = max(grid, key=lambda g: (round(table[f"{g:g}"]["complex"]["overall"]["acc"], 12), -g))
            out.append(("pick/guidance", (doc.get("pick") or {}).get("guidance"), best))

    for path, x in _containers(doc, enter=lambda parent, key: key != "records"):
        if isinstance(x, dict) and _is_records(x.get("records")) and isinstance(x.get("summary"), dict):
            out.append((f"{path}/summary", x["summary"], summarize(x["records"])))
    return out


def consistency_checks(name: str, doc: dict) -> list[dict]:
    """Two checks that need no drawing: the records agree with their own verdicts
    (``record_problems``), and every summary equals the one recomputed from the records
    (``expected_summaries``), exactly (as stored: NaN as null)."""
    from sur_lib.infra.fileio import clean_json

    probs = record_problems(doc)
    checks = [{"check": "records agree with their verdicts", "ok": not probs,
               "message": "every record's k, n, acc, lo, hi as its verdicts give" if not probs
               else f"{len(probs)} record(s) disagree: {probs[0]}"}]
    diffs, n = [], 0
    for where, stored, live in expected_summaries(name, doc):
        n += 1
        d = first_difference(stored, clean_json(live), where)
        if d:
            diffs.append(d)
    checks.append({"check": "summaries recomputed from the records", "ok": not diffs,
                   "message": (f"{n} summaries, each exactly as recomputed" if not diffs else
                               f"{len(diffs)} of {n} differ from their records: {diffs[0]}")})
    return checks


# Two groups of results that run side by side; the first holds every result that shares the base
# model's simple-prompt draws, so that they are still made once. Measured warm on 2 idle cores
# (2026-12-06, a fresh clone after `make test`): 201 s and 162 s of results, 208 s in all, with
# probe in the first; probe (17 s) then moved to the second to even them out.
# Each result's part is its ``part`` in ``registry``.
PARTS = tuple(tuple(n for n in registry.EXPERIMENTS if registry.get(n).part == i) for i in (0, 1))


def parts_of(names: list[str], jobs: int) -> list[list[str]]:
    """``names`` split into at most ``jobs`` groups that run side by side (``PARTS``; a name in
    no part joins the last), each in the order given; one group when ``jobs`` is 1."""
    if jobs <= 1:
        return [list(names)]
    groups = [[n for n in names if n in part] for part in PARTS]
    groups[-1] += [n for n in names if not any(n in part for part in PARTS)]
    groups = [g for g in groups if g]
    while len(groups) > jobs:  # fewer processes than parts: merge the last two
        groups[-2:] = [groups[-2] + groups[-1]]
    return groups


def run_verify(exp: VerifyConfig, backbone=None) -> dict:
    """Verify every stored result in ``--out`` (missing ones are skipped, with a message).

    With ``exp.jobs`` > 1 and no ``backbone`` passed in, the results are verified in that many
    processes side by side (``PARTS``), each with ``exp.threads`` torch threads: the tiny
    profile's UNet does not run faster on a second thread (measured: 243 s for every result at
    1 thread, 245 s at 2), so two processes use two cores where one cannot. Each process loads
    the base model itself; its lines are printed when it finishes a result."""
    t0 = time.time()
    if exp.draw_seed is None:
        import secrets

        exp = replace(exp, draw_seed=secrets.randbits(31))
    print(f"verify: {'every image re-drawn (--full)' if exp.full else 'a random subset re-drawn'}; "
          f"subset seed {exp.draw_seed} (verify --seed {exp.draw_seed} chooses the same again)", flush=True)
    known = list(registry.EXPERIMENTS)
    names = [n for n in (exp.only or "").split(",") if n] or known
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"verify --only: unknown result(s) {unknown}; known: {known}")
    present = [n for n in names if verify_path(exp.out, n).is_file()]
    for n in names:
        if n not in present:
            print(f"SKIP {n}: {rel_path(result_path(exp.out, n, False))} does not exist yet", flush=True)
        elif verify_path(exp.out, n) != result_path(exp.out, n, False):
            print(f"{n}: checking {rel_path(verify_path(exp.out, n))} (the run is not complete)", flush=True)
    groups = parts_of(present, exp.jobs if backbone is None else 1)
    if len(groups) <= 1:
        done = [_verify_part(exp, g, backbone) for g in groups]
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        print(f"verify: {len(groups)} processes side by side, {exp.threads} torch thread(s) each: "
              + " | ".join(", ".join(g) for g in groups), flush=True)
        with ProcessPoolExecutor(len(groups), mp_context=mp.get_context("spawn")) as pool:
            done = list(pool.map(_verify_part, [replace(exp, progress=False)] * len(groups), groups))
    by_name = {k: v for d in done for k, v in d.items()}
    report = {n: by_name.get(n, {"status": "skipped"}) for n in names}
    return {"experiment": "verify", "draw_seed": exp.draw_seed, "full": exp.full,
            "failed": [n for n in names if report[n]["status"] == "FAILED"],
            "report": report, "tolerance": agreement.__doc__.split("\n\n")[1].strip(),
            "wall_time_s": round(time.time() - t0, 1)}


def _verify_part(exp: VerifyConfig, names: list[str], backbone=None) -> dict:
    """Verify ``names`` (results that exist) one after the other in this process; a draw two
    of them share is made once (``checks.draw_session``, one for each part). Returns the report of each."""
    import torch

    threads = torch.get_num_threads()
    if exp.threads:
        torch.set_num_threads(exp.threads)
    try:
        with shared.draw_session(exp.draw_seed):
            return _verify_names(exp, names, backbone)
    finally:
        torch.set_num_threads(threads)


def draws_per_condition(exp: VerifyConfig) -> int | None:
    """Images re-drawn per condition: every one (None) with ``--full``, enough for ``--power P``
    (``images_for_power``: 59 for 0.95), else ``VERIFY_DRAWS`` (``VERIFY_QUICK_DRAWS`` with
    ``--quick``)."""
    if exp.full:
        return None
    if exp.power is not None:
        if not 0 < exp.power < 1:
            from sur_lib.infra.cli import UsageError

            raise UsageError(f"verify --power must be between 0 and 1, got {exp.power}")
        return images_for_power(0.05, exp.power)
    return VERIFY_QUICK_DRAWS if exp.quick else VERIFY_DRAWS


def _verify_names(exp: VerifyConfig, names: list[str], backbone=None) -> dict:
    draws = draws_per_condition(exp)
    report = {}
    for name in names:
        doc = read_result(verify_path(exp.out, name), name)
        if backbone is None:
            backbone = load_base(exp.model_dir)
        digest = state_digest(backbone.unet)
        te = time.time()
        hook = registry.get(name).verify_hook()  # the experiment's own (registry)
        checks = hook(doc, backbone, digest, draws, exp.progress, Path(exp.out))
        partial = verify_path(exp.out, name) != result_path(exp.out, name, False)
        checks = consistency_checks(name, doc) + [input_check(doc, partial)] + checks
        ok = all(c["ok"] for c in checks)
        report[name] = {"status": "ok" if ok else "FAILED", "checks": checks,
                        "seconds": round(time.time() - te, 1)}
        lines = [f"{'OK  ' if ok else 'FAIL'} {name} ({time.time() - te:.0f} s)"]
        lines += [f"     {'ok  ' if c['ok'] else 'FAIL'} {c['check']}: {c['message']}" for c in checks]
        print("\n".join(lines), flush=True)  # one write: a result's lines stay together
    return report
