"""``verify``: re-runs a small subset of every stored result live and compares.

3 prompts x 4 images per condition (the stored adapter is loaded, not retrained; for
``ablations`` the first training steps of one variant are replayed); it fails if a number
disagrees beyond the stated noise (``analysis.agreement``). Experiments without a JSON are
skipped, with a message. Within one run, a draw that several results share (the base model's
images of the same simple prompts, with the same seed and sampler, appear in ``failure``,
``sur``, ``rewrite`` and ``convergence``) is made live once and compared with each of them.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..analysis import agreement
from ..provenance import rel_path, state_digest
from .ablations import VERIFY_TRAIN_STEPS
from .common import EXPERIMENTS, ExperimentConfig, GenSettings, load_base, result_path
from .images import evaluate_condition
from .prompts import select_prompts
from .runs import load_adapter, surd_mini, train_adapter, train_config

VERIFY_PROMPTS_PER_TYPE = 1  # -> 3 prompts, one per type
VERIFY_IMAGES = 4
VERIFY_LOSS_RTOL = 1e-3


@dataclass
class VerifyConfig(ExperimentConfig):
    """``python -m sur_lib.experiments verify``: plus ``only`` (experiments to verify) and
    ``jobs`` (processes side by side, see ``run_verify``)."""

    only: str | None = None
    jobs: int = 2


# the keys verify reads from each result (a file without them is not that result)
RESULT_KEYS = {"probe": ("experiment", "seed", "features", "prompts"),
               "ablations": ("experiment", "model", "seed", "variants", "surd_mini", "settings"),
               "convergence": ("experiment", "model", "seed", "settings"),
               "tune": ("experiment", "model", "seed", "settings"),
               "retest": ("experiment", "model", "seed", "settings")}
IMAGE_RESULT_KEYS = ("experiment", "model", "seed", "generation", "conditions")


def read_result(path: Path, name: str) -> dict:
    """The stored result ``name`` at ``path``, or a UsageError naming the file when it is not
    readable JSON (damaged, nested too deeply) or lacks what verify reads."""
    from ..cli import UsageError
    from ..fileio import read_json

    doc = read_json(path, "result file")
    if not isinstance(doc, dict):
        raise UsageError(f"result file {rel_path(path)} is not a JSON object: not a result of `{name}`")
    lacking = [k for k in RESULT_KEYS.get(name, IMAGE_RESULT_KEYS) if k not in doc]
    if lacking:
        raise UsageError(f"result file {rel_path(path)} is not a result of `{name}`: it lacks "
                         f"{', '.join(map(repr, lacking))} (restore it with git, or re-run "
                         f"python -m sur_lib.experiments {name})")
    return doc


_shared: Path | None = None  # inside a verify process: a fresh folder for this run's draws


def loss_checks(live: list[dict], stored: list[dict]) -> list[dict]:
    """One check per replayed training step: the live loss against the stored one, within
    ``VERIFY_LOSS_RTOL`` (relative); a stored log shorter than the replay is a failure."""
    if len(stored) < len(live):
        return [{"check": "training: stored log", "ok": False,
                 "message": f"the stored log has {len(stored)} steps, {len(live)} were replayed"}]
    checks = []
    for row_live, row in zip(live, stored):
        a, b = float(row_live["loss"]), float(row["loss"])
        tol = VERIFY_LOSS_RTOL * abs(b) + 1e-6
        checks.append({"check": f"training: loss at step {int(float(row['step']))}", "ok": abs(a - b) <= tol,
                       "live": a, "stored": b, "tol": tol,
                       "message": f"live {a:.6f} vs stored {b:.6f} (tol {tol:.2e})"})
    return checks


def verify_images(doc: dict, backbone, current_digest: str, per_type: int, n_images: int,
                   progress: bool) -> list[dict]:
    """Re-generate a subset of every condition of a stored result and compare."""
    if doc["model"]["unet_digest"] != current_digest:
        return [{"check": "base model", "ok": False, "message": (
            f"the result was made with base model step {doc['model'].get('pretrain_step')} "
            f"(UNet digest {doc['model']['unet_digest'][:12]}), but the model now loaded has "
            f"digest {current_digest[:12]}: re-run the experiment")}]
    seed = doc["seed"]
    checks = []
    for cond, block in doc["conditions"].items():
        if block.get("generation") not in (None, doc["generation"]):
            continue  # `guidance`: only the conditions sampled with the main settings
        gen = GenSettings(**doc["generation"])
        adapter = None
        if block.get("adapter"):
            ref = block["adapter"]
            try:
                adapter = load_adapter(ref["dir"])
            except (OSError, ValueError) as e:
                checks.append({"check": f"{cond}: adapter", "ok": False,
                               "message": f"cannot load the stored adapter {ref['dir']}: {e}"})
                continue
            if state_digest(adapter) != ref["digest"]:
                checks.append({"check": f"{cond}: adapter", "ok": False, "message": (
                    f"{ref['dir']} is not the adapter the result was made with (digest differs)")})
                continue
        stored = select_prompts(block["records"], per_type)
        m = min(n_images, min(r["n"] for r in stored))
        shared = []  # ids of the prompts drawn earlier in this run (images.evaluate_condition's cache)
        live = evaluate_condition(backbone, stored, [r["text"] for r in stored], m, seed, gen,
                                  adapter=adapter, progress=progress, desc=f"verify/{cond}",
                                  cache=_shared, hits=shared)
        res = agreement(sum(r["k"] for r in live), sum(r["n"] for r in live),
                        sum(r["k"] for r in stored), sum(r["n"] for r in stored))
        same = sum(int(x == y) for lr, sr in zip(live, stored)
                   for x, y in zip(lr["correct"], sr["correct"][:m]))
        res.update(check=f"{cond}: {len(stored)} prompts x {m} images", same_images=same,
                   compared_images=len(stored) * m)
        res["message"] = (f"live {res['live']:.3f} vs stored {res['stored']:.3f} (same prompts, all "
                          f"stored images), |diff| {abs(res['diff']):.3f} <= tol {res['tol']:.3f}? "
                          f"{'yes' if res['ok'] else 'NO'}; image-for-image agreement "
                          f"{same}/{len(stored) * m}"
                          + (f"; {len(shared)}/{len(stored)} prompts drawn once in this run" if shared else ""))
        checks.append(res)
    return checks


def verify_ablations(doc: dict, backbone, current_digest: str, progress: bool) -> list[dict]:
    """Replay the first training steps of one variant and compare the per-step loss log."""
    if doc["model"]["unet_digest"] != current_digest:
        return [{"check": "base model", "ok": False, "message": (
            "the ablations were made with another base model: re-run them")}]
    spec = doc.get("verify") or {"variant": "reference", "steps": VERIFY_TRAIN_STEPS}
    var = doc["variants"][spec["variant"]]
    steps = int(min(spec["steps"], len(var["log"])))
    rows, seed = doc["surd_mini"]["rows"], doc["seed"]
    data_dir = surd_mini(rows, seed, progress)
    over = {**doc["settings"]["budget"]["overrides"], **var["overrides"],
            "max_steps": steps, "checkpoint_every": 10**6}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = train_config(over, data_dir, seed, Path(tmp), current_digest, progress)
        _, log, _ = train_adapter(cfg, backbone, progress)
    checks = []
    for live, stored in zip(log[:steps], var["log"][:steps]):
        a, b = float(live["loss"]), float(stored["loss"])
        tol = VERIFY_LOSS_RTOL * abs(b) + 1e-6
        checks.append({"check": f"{spec['variant']}: loss at step {int(stored['step'])}",
                       "ok": abs(a - b) <= tol, "live": a, "stored": b, "tol": tol,
                       "message": f"live {a:.6f} vs stored {b:.6f} (tol {tol:.2e})"})
    return checks


# Two groups of results that take about as long to verify (their results' times in one run on
# 2 cores: 98 s and 128 s); the first holds every result that shares the base model's simple-prompt draws, so that
# they are still made once.
PARTS = (("failure", "sur", "rewrite", "convergence", "ablations", "probe"),
         ("guidance", "compose", "tune", "retest"))


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
    names = [n for n in (exp.only or "").split(",") if n] or list(EXPERIMENTS)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise ValueError(f"verify --only: unknown result(s) {unknown}; known: {list(EXPERIMENTS)}")
    present = [n for n in names if result_path(exp.out, n, False).is_file()]
    for n in names:
        if n not in present:
            print(f"SKIP {n}: {rel_path(result_path(exp.out, n, False))} does not exist yet", flush=True)
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
    return {"experiment": "verify", "failed": [n for n in names if report[n]["status"] == "FAILED"],
            "report": report, "tolerance": agreement.__doc__.split("\n\n")[1].strip(),
            "wall_time_s": round(time.time() - t0, 1)}


def _verify_part(exp: VerifyConfig, names: list[str], backbone=None) -> dict:
    """Verify ``names`` (results that exist) one after the other in this process; a draw two
    of them share is made once (a fresh ``images.evaluate_condition`` cache folder). Returns
    the report of each."""
    global _shared
    import torch

    threads = torch.get_num_threads()
    if exp.threads:
        torch.set_num_threads(exp.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="verify-draws-") as tmp:
            _shared = Path(tmp)
            return _verify_names(exp, names, backbone)
    finally:
        _shared = None
        torch.set_num_threads(threads)


def _verify_names(exp: VerifyConfig, names: list[str], backbone=None) -> dict:
    per_type = 1 if exp.quick else VERIFY_PROMPTS_PER_TYPE
    n_images = 2 if exp.quick else VERIFY_IMAGES
    report = {}
    for name in names:
        doc = read_result(result_path(exp.out, name, False), name)
        if backbone is None:
            backbone = load_base(exp.model_dir)
        digest = state_digest(backbone.unet)
        te = time.time()
        if name == "ablations":
            checks = verify_ablations(doc, backbone, digest, exp.progress)
        elif name == "compose":  # S-CFG and delayed conditioning (experiments/compose.py)
            from .compose import verify_compose

            checks = verify_compose(doc, backbone, digest, per_type, n_images, exp.progress)
        elif name == "convergence":  # the dose-response (experiments/convergence.py)
            from .convergence import verify_convergence

            checks = verify_convergence(doc, backbone, digest, per_type, n_images, exp.progress)
        elif name == "tune":  # the tuned recipe (experiments/tune.py)
            from .tune import verify_tune

            checks = verify_tune(doc, backbone, digest, per_type, n_images, exp.progress)
        elif name == "retest":  # the claims re-tested at the plateau (experiments/retest.py)
            from .retest import verify_retest

            checks = verify_retest(doc, backbone, digest, per_type, n_images, exp.progress)
        elif name == "probe":  # the text encoder's part of the probe (experiments/probe.py)
            from .probe import verify_probe

            checks = verify_probe(doc, backbone)
        else:
            checks = verify_images(doc, backbone, digest, per_type, n_images, exp.progress)
        ok = all(c["ok"] for c in checks)
        report[name] = {"status": "ok" if ok else "FAILED", "checks": checks,
                        "seconds": round(time.time() - te, 1)}
        lines = [f"{'OK  ' if ok else 'FAIL'} {name} ({time.time() - te:.0f} s)"]
        lines += [f"     {'ok  ' if c['ok'] else 'FAIL'} {c['check']}: {c['message']}" for c in checks]
        print("\n".join(lines), flush=True)  # one write: a result's lines stay together
    return report
