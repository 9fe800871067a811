"""The checks that ``verify`` and the experiments' own verify hooks share: re-drawn images
compared with their stored verdicts, and replayed training steps compared with their stored
loss logs. This module imports no experiment and not ``verify``: the experiments' hooks
(``verify_compose``, ``verify_convergence``, ...) import it, and ``verify`` finds those hooks
through ``registry``, so nothing here imports round a circle.

* images (``verify_images``, ``redraw_check``, ``image_check``): a condition's images chosen
  uniformly at random (``choose_images``, seeded by the run's draw seed), re-drawn once per
  run (``_memo``: a draw that several results share is made once) and compared image for image
  on the versions that wrote the result (``same_versions``), else within
  ``statistics.agreement``'s tolerance; ``detection_probability`` says how likely the draws
  catch a 5-point edit;
* losses (``loss_checks``, ``replay_from_states``): live losses against stored ones within
  ``VERIFY_LOSS_RTOL``; the first ``VERIFY_TRAIN_STEPS`` steps of a run are replayed from its
  start, and the step after each stored adapter from that adapter.

``draw_session`` sets the draw seed and empties ``_memo`` for one verify process.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from ..statistics import agreement
from sur_lib.infra.provenance import state_digest
from .common import GenSettings
from .images import judge_images
from . import runs
from .runs import load_adapter, replay_inputs

VERIFY_LOSS_RTOL = 1e-3  # relative tolerance of a replayed training step's loss
VERIFY_TRAIN_STEPS = 5  # training steps a replay re-runs from the start of a run (issue 26: a forged step 3 or 5 is caught)


# ----------------------------------------------------------------------------- re-drawn images

_draw_seed: int | None = None  # inside a verify process: the seed that chose this run's subset


def miss_probability(total: int, changed: int, draws: int) -> float:
    """The chance that ``draws`` images drawn uniformly at random without replacement from
    ``total`` miss every one of ``changed`` edited ones: C(total - changed, draws) / C(total, draws)
    (hypergeometric; 0 when the draws cannot avoid them)."""
    import math

    if draws > total - changed:
        return 0.0
    return math.comb(total - changed, draws) / math.comb(total, draws)


def detection_probability(total: int, draws: int, shift: float = 0.05) -> float:
    """The chance that ``draws`` random images of a condition of ``total`` images catch an edit
    that moves its accuracy by ``shift``: such an edit changes at least ceil(shift * total)
    verdicts, whichever it changes."""
    import math

    return 1.0 - miss_probability(total, math.ceil(shift * total - 1e-9), draws)


def images_for_power(shift: float = 0.05, power: float = 0.95, total: int | None = None) -> int:
    """The number of images drawn uniformly at random that catches, with probability at least
    ``power``, an edit that moves a condition's accuracy by ``shift``. For a large condition
    (``total`` None) the smallest s with (1 - shift)^s <= 1 - power: 59 for 5 points and 95%;
    for ``total`` images the exact hypergeometric count (fewer: 57 of 720)."""
    import math

    if total is None:
        return math.ceil(math.log(1 - power) / math.log(1 - shift))
    s = 0
    while detection_probability(total, s, shift) < power:
        s += 1
    return s


def choose_images(records: list[dict], draws: int | None, key: str) -> list[tuple[int, int]]:
    """The images to re-draw, as (record index, image index), sorted: ``draws`` of all the
    condition's images, chosen uniformly at random without replacement and afresh in each run
    (``random.Random`` seeded by the run's draw seed and ``key``: ``verify --seed N`` chooses the
    same again); every image when ``draws`` is None (``verify --full``)."""
    import random

    every = [(i, j) for i, r in enumerate(records) for j in range(r["n"])]
    if draws is None or draws >= len(every):
        return every
    return sorted(random.Random(f"{_draw_seed}/{key}").sample(every, draws))


def draw_key(records: list[dict], seed: int, gen, guidance: dict | None = None, adapter=None) -> str:
    """The key ``choose_images`` draws with: the same for two conditions that hold the same
    draws (the same prompts, seed, sampler, adapter weights and guidance, e.g. the base model's
    simple prompts in ``failure`` and ``sur``), so that they get the same images and each is
    drawn once."""
    import hashlib
    import json

    what = [seed, gen.to_dict(), [[r.get("id"), r.get("text")] for r in records],
            state_digest(adapter) if adapter is not None else None]
    if guidance:
        what.append(repr(sorted(guidance.items())))
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def same_versions(doc: dict) -> bool:
    """Whether this process runs the package versions (and Python) that wrote ``doc``: then the
    seeded draws must give the stored images exactly, verdict for verdict."""
    from .common import versions

    stored = doc.get("versions") or {}
    now = versions()
    keys = [k for k in now if k not in ("platform", "torch_threads")]
    return bool(stored) and all(stored.get(k) == now.get(k) for k in keys)


def image_check(cond: str, live: list[int], records: list[dict], picks: list[tuple[int, int]],
                doc: dict) -> dict:
    """The check of one condition's re-drawn images: ``live`` verdicts of the images ``picks``
    of ``records``. On the code and versions that wrote the result (``same_versions``) every
    re-drawn image must have its stored verdict (the draws are seeded): one image that differs
    fails. Elsewhere (another machine's floating point) the accuracies must agree within
    ``statistics.agreement``'s tolerance. The message states the chance that these draws catch an
    edit moving the condition by 5 points (``detection_probability``)."""
    stored = [int(records[i]["correct"][j]) for i, j in picks]
    res = agreement(sum(live), len(live), sum(stored), len(stored))
    same = sum(int(a == b) for a, b in zip(live, stored))
    total = sum(r["n"] for r in records)
    power = detection_probability(total, len(picks))
    exact = same_versions(doc)
    res.update(check=f"{cond}: {len(picks)} of {total} images", same_images=same,
               compared_images=len(picks), image_for_image=exact, power_5_points=power)
    if exact:
        res["ok"] = same == len(picks)
        res["message"] = (f"image-for-image agreement {same}/{len(picks)} (same versions: every verdict must "
                          f"agree) {'yes' if res['ok'] else 'NO'}")
    else:
        res["message"] = (f"live {res['live']:.3f} vs stored {res['stored']:.3f} (other versions than the "
                          f"result's), |diff| {abs(res['diff']):.3f} <= tol {res['tol']:.3f}? "
                          f"{'yes' if res['ok'] else 'NO'}; image-for-image agreement {same}/{len(picks)}")
    res["message"] += f"; catches a 5-point edit of this condition with probability {power:.2f}"
    return res


_memo: dict = {}  # inside a verify process: verdicts drawn in this run, by (draw key, prompt, image)


def redraw_check(cond: str, records: list[dict], draws: int | None, doc: dict, backbone, gen,
                 adapter=None, guidance: dict | None = None, pipe=None) -> dict:
    """Choose ``draws`` images of one condition (``choose_images``), re-draw the ones not yet
    drawn in this run (``images.judge_images``, in batches of the stored images per prompt)
    and check them (``image_check``)."""
    key = draw_key(records, doc["seed"], gen, guidance, adapter)
    picks = choose_images(records, draws, key)
    todo = [(i, j) for i, j in picks if (key, i, j) not in _memo]
    live = judge_images(backbone, [(records[i], records[i]["text"], j) for i, j in todo], doc["seed"], gen,
                        adapter=adapter, pipe=pipe, guidance=guidance, batch=max(r["n"] for r in records))
    _memo.update({(key, i, j): v for (i, j), v in zip(todo, live)})
    res = image_check(cond, [_memo[(key, i, j)] for i, j in picks], records, picks, doc)
    if len(todo) < len(picks):
        res["message"] += f"; {len(picks) - len(todo)}/{len(picks)} images drawn once in this run"
    return res


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


def replay_start(cfg, backbone, stored: list[dict], knowledge_of=None, progress: bool = False,
                 shared: dict | None = None) -> list[dict]:
    """The first ``VERIFY_TRAIN_STEPS`` rows of a run's stored loss log ``stored`` (all of a
    shorter log; an empty one is replayed in full and fails) recomputed from the seeded start
    (``runs.replay_run``, on the rows and vectors those steps read; ``knowledge_of`` and
    ``shared`` as ``runs.replay_inputs`` takes them) and compared (``loss_checks``)."""
    steps = min(VERIFY_TRAIN_STEPS, len(stored)) or VERIFY_TRAIN_STEPS
    live = runs.replay_run(cfg, backbone, steps, knowledge_of=knowledge_of, progress=progress, shared=shared)
    return loss_checks(live, stored[:steps])


def replay_from_states(cfg, backbone, states: dict, log: list[dict], label: str,
                       knowledge_of=None, shared: dict | None = None) -> list[dict]:
    """Loss replays beyond the start of a run: for every stored adapter ``states`` {step k:
    {"dir", "digest"}} with 0 < k < len(log), the adapter is loaded and log row k + 1 is
    recomputed from it (``sur_lib.study.replay.replay_step``: one forward pass of that step's
    seeded batch, noise and dropout; no optimizer state is needed, the row is computed before
    the step's update) and compared with the stored row (``loss_checks``, within ``VERIFY_LOSS_RTOL``: the
    stored adapters are fp16, which moves the loss by up to 4e-4 relative, measured on the
    dose-response run). A forged loss at a later step is caught here, not only by the file's
    digest. A few seconds each. The data and knowledge vectors are those the replayed steps
    read (``runs.replay_inputs``): ``knowledge_of(rows)`` for a teacher other than ``cfg.llm``'s,
    else ``cfg.llm``'s from the cache; ``shared`` as there."""
    from sur_lib.study.replay import replay_step

    checks, dataset, knowledge = [], None, None
    for k in sorted(int(s) for s in states):
        if k == 0 or k >= len(log):  # step 1 is replayed from the start; no row after the last
            continue
        ref = states[k] if k in states else states[str(k)]
        row = log[k]
        if int(float(row["step"])) != k + 1:
            checks.append({"check": f"{label}: loss at step {k + 1}", "ok": False,
                           "message": f"row {k + 1} of the stored log is step {row['step']}"})
            continue
        try:
            adapter = load_adapter(ref["dir"])
        except (OSError, ValueError) as e:
            checks.append({"check": f"{label}: adapter after step {k}", "ok": False,
                           "message": f"cannot load the stored adapter {ref['dir']}: {e}"})
            continue
        if state_digest(adapter) != ref["digest"]:
            checks.append({"check": f"{label}: adapter after step {k}", "ok": False,
                           "message": f"{ref['dir']} is not the adapter the run stored (digest differs)"})
            continue
        if dataset is None:  # the rows of every step replayed here, opened once
            steps = [int(s) + 1 for s in states if 0 < int(s) < len(log)]
            dataset, knowledge = replay_inputs(cfg, backbone, steps, knowledge_of, shared=shared)
        live = replay_step(cfg, backbone, adapter, k + 1, dataset=dataset, knowledge=knowledge)
        checks += [dict(c, check=f"{label}: {c['check']} (from the stored adapter after step {k})")
                   for c in loss_checks([{"step": k + 1, **live}], [row])]
    return checks


def verify_images(doc: dict, backbone, current_digest: str, draws: int | None, progress: bool = False,
                  out: Path | str | None = None) -> list[dict]:
    """Re-draw ``draws`` random images of every condition of a stored result (every image when
    None) and compare (``redraw_check``). The verify hook of the results that are only images
    (``failure``, ``sur``, ``rewrite``, ``guidance``), with the hooks' signature (``registry``;
    ``progress`` and ``out`` are not used)."""
    if doc["model"]["unet_digest"] != current_digest:
        return [{"check": "base model", "ok": False, "message": (
            f"the result was made with base model step {doc['model'].get('pretrain_step')} "
            f"(UNet digest {doc['model']['unet_digest'][:12]}), but the model now loaded has "
            f"digest {current_digest[:12]}: re-run the experiment")}]
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
        checks.append(redraw_check(cond, block["records"], draws, doc, backbone, gen, adapter=adapter))
    return checks


def redraw_conditions(doc: dict, conditions: dict, backbone, current_digest: str, draws: int | None,
                      progress: bool = False) -> list[dict]:
    """``verify_images`` for ``conditions`` ({name: {"records": ..., "adapter": {"dir", "digest"}}})
    drawn with ``doc``'s package versions, base model, seed and generation settings: the re-draw
    of the experiments that keep their records outside a ``conditions`` block (tune, retest)."""
    sub = {"experiment": doc.get("experiment"), "versions": doc.get("versions"), "model": doc["model"],
           "seed": doc["seed"], "generation": doc["settings"]["generation"], "conditions": conditions}
    return verify_images(sub, backbone, current_digest, draws, progress)


@contextmanager
def draw_session(draw_seed: int | None):
    """Inside: ``choose_images`` draws with ``draw_seed`` and re-drawn verdicts are kept in
    ``_memo`` (a draw that several results share is made once); both are reset on leaving."""
    global _draw_seed
    _memo.clear()
    _draw_seed = draw_seed
    try:
        yield
    finally:
        _memo.clear()
        _draw_seed = None
