"""Transfer by neighbourhood: does an adapter help an unseen noun when the text encoder puts it
near training nouns of the same class?

    python -m sur_lib.study.experiments neighbours [--k 3]

At inference the SUR-adapter sees only the frozen text encoder's token states of the prompt,
so for a noun it never trained on, it can only treat the noun's states as it learned to treat
similar ones. The hypothesis: an adapter transfers to an unseen noun when the noun's nearest
training nouns in the text encoder's space share its class (colour and shape), whatever the
teacher. Measured on results already stored, no new images:

* **Representation** (what the adapter sees): MiniLM's final token states at the noun's own
  word pieces (``noun_states``), in the context of the prompt, averaged over prompts: for an
  unseen noun over its evaluated prompts (test and extended sets), for a training noun over up
  to ``PER_NOUN`` of its SURD-mini training prompts.
* **Agreement** of an unseen noun: its ``k`` nearest training nouns by cosine similarity, each
  weighted by its similarity; the weighted share that has the noun's class (primary), colour,
  or shape. The crude version (mean state of "a NOUN", one neighbour) is reported beside it.
* **Gain** of a stored adapter on an unseen noun: the mean over the noun's test and extended
  prompts of (adapter accuracy - base accuracy, same prompts and seeds, the base truncated to
  the adapter's images): the dose-response adapters at 2,000 and 5,000 steps and the tuned
  recipe (``convergence.json``, ``retest.json``, ``tune.json``).
* **Test** (nouns as the unit): Spearman's rank correlation between agreement and gain over the
  11 unseen nouns, with a seeded permutation p (20,000 shuffles of the gains, two-sided).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from scipy import stats

from sur_lib.world import toyworld as tw
from sur_lib.infra.fileio import write_json
from sur_lib.infra.provenance import rel_path
from .inputs import record_inputs
from . import common

PER_NOUN = 24
K = 3
N_PERM = 20_000


def noun_token_positions(tokenizer, text: str, words: Sequence[str]) -> list[int]:
    """Positions (in ``tokenizer(text)``'s ids) of the first of ``words`` found as a run of its
    word pieces. Raises ValueError if none is found."""
    ids = tokenizer(text).input_ids
    for w in words:
        sub = tokenizer(w, add_special_tokens=False).input_ids
        for i in range(len(ids) - len(sub) + 1):
            if ids[i:i + len(sub)] == sub:
                return list(range(i, i + len(sub)))
    raise ValueError(f"none of {list(words)} is in the tokens of {text!r}")


@torch.no_grad()
def noun_states(backbone, texts: Sequence[str], noun: str) -> torch.Tensor:
    """Mean over ``texts`` of the mean final token state at the noun's word pieces [D]."""
    info = tw.NOUNS[noun]
    states = backbone.encode_prompts(list(texts))
    vecs = [states[i, noun_token_positions(backbone.tokenizer, t, (info.plural, noun))].mean(0)
            for i, t in enumerate(texts)]
    return torch.stack(vecs).mean(0)


def neighbours(target: torch.Tensor, train: dict[str, torch.Tensor], k: int) -> list[tuple[str, float]]:
    """The ``k`` training nouns most similar (cosine) to ``target``: [(noun, similarity)]."""
    names = sorted(train)
    m = torch.stack([train[n] for n in names])
    sims = torch.nn.functional.cosine_similarity(m, target[None], dim=1)
    order = torch.argsort(sims, descending=True)[:k].tolist()
    return [(names[i], float(sims[i])) for i in order]


def agreement(noun: str, near: list[tuple[str, float]]) -> dict:
    """Similarity-weighted share of the neighbours with the noun's class, colour and shape."""
    info = tw.NOUNS[noun]
    w = np.array([max(s, 0.0) for _, s in near])
    w = w / w.sum() if w.sum() > 0 else np.full(len(near), 1 / len(near))
    same = {"class": [(tw.NOUNS[n].color, tw.NOUNS[n].shape) == (info.color, info.shape) for n, _ in near],
            "color": [tw.NOUNS[n].color == info.color for n, _ in near],
            "shape": [tw.NOUNS[n].shape == info.shape for n, _ in near]}
    return {key: float(np.dot(w, v)) for key, v in same.items()}


def spearman_permutation(x: Sequence[float], y: Sequence[float], n_perm: int = N_PERM,
                         seed: int = 0) -> dict:
    """Spearman's rho of x and y and a two-sided permutation p (y shuffled ``n_perm`` times)."""
    rx, ry = stats.rankdata(x), stats.rankdata(y)  # Spearman's rho: Pearson's r of the ranks
    rho = float(np.corrcoef(rx, ry)[0, 1])
    rng = np.random.default_rng(seed)
    perms = np.argsort(rng.random((n_perm, len(ry))), axis=1)  # n_perm shuffles of the ranks
    py = ry[perms] - ry.mean()
    null = (py @ (rx - rx.mean())) / (np.linalg.norm(rx - rx.mean()) * np.linalg.norm(ry - ry.mean()))
    p = float((np.sum(np.abs(null) >= abs(rho) - 1e-12) + 1) / (n_perm + 1))
    return {"rho": rho, "p_perm": p, "n": len(rx), "n_perm": n_perm}


# ----------------------------------------------------------------------------- stored gains


def _trunc(recs: list[dict], n: int) -> dict[str, float]:
    return {r["id"]: float(np.mean(r["correct"][:n])) for r in recs}


def adapter_records(results: Path) -> dict[str, dict[str, tuple[list[dict], list[dict]]]]:
    """{adapter: {set: (adapter records, base simple records)}} from the stored results."""
    conv = json.loads((results / "convergence.json").read_text())["records"]
    retest = json.loads((results / "retest.json").read_text())
    tune = json.loads((results / "tune.json").read_text())["final_records"]
    base = {"test": conv["base-simple/test"], "extended": conv["base-simple/extended"]}
    return {"step 2,000": {"test": (conv["step-2000/test"], base["test"]),
                           "extended": (retest["variants"]["recipe"]["records"]["extended"], base["extended"])},
            "step 5,000": {s: (conv[f"step-5000/{s}"], base[s]) for s in ("test", "extended")},
            "tuned (ours)": {s: (tune[f"tuned/{s}"]["records"], base[s]) for s in ("test", "extended")}}


def per_noun_gain(pairs: dict[str, tuple[list[dict], list[dict]]], nouns: Sequence[str]) -> dict[str, dict]:
    """{noun: {"gain", "prompts"}}: the mean of adapter - base accuracy over the noun's prompts
    of every set (the base truncated to the adapter's images per prompt)."""
    diffs: dict[str, list[float]] = {n: [] for n in nouns}
    for recs, base in pairs.values():
        n_img = len(recs[0]["correct"])
        b = _trunc(base, n_img)
        for r in recs:
            if r["noun"] in diffs:
                diffs[r["noun"]].append(float(np.mean(r["correct"])) - b[r["id"]])
    return {n: {"gain": float(np.mean(d)), "prompts": len(d)} for n, d in diffs.items() if d}


# ----------------------------------------------------------------------------- the analysis


def unseen_texts() -> dict[str, list[str]]:
    """The evaluated prompts of every unseen noun (test and extended sets)."""
    from sur_lib.world.extended_prompts import extended_prompts

    out: dict[str, list[str]] = {n: [] for n in tw.HELDOUT_NOUNS}
    for p in list(tw.test_prompts()) + list(extended_prompts()):
        if p["noun"] in out:
            out[p["noun"]].append(p["text"])
    return out


def train_texts(rows: int = common.SURD_MINI_ROWS, seed: int = 0, per_noun: int = PER_NOUN) -> dict[str, list[str]]:
    """Up to ``per_noun`` distinct SURD-mini training prompts of every training noun."""
    from .runs import surd_mini
    from sur_lib.data import SURDDataset

    out: dict[str, list[str]] = {n: [] for n in tw.TRAIN_NOUNS}
    for r in SURDDataset(surd_mini(rows, seed, progress=False), check_images=False).rows:
        if r["text"] not in out[r["noun"]] and len(out[r["noun"]]) < per_noun:
            out[r["noun"]].append(r["text"])
    return out


def run_neighbours(k: int = K, results: Path = common.RESULTS_DIR, backbone=None) -> dict:
    t0 = time.time()
    backbone = backbone if backbone is not None else common.load_base()
    train = {n: noun_states(backbone, t, n) for n, t in train_texts().items()}
    crude_train = {n: backbone.encode_prompts([f"a {n}"])[0, 1:-1].mean(0) for n in tw.TRAIN_NOUNS}
    gains = {a: per_noun_gain(pairs, tw.HELDOUT_NOUNS) for a, pairs in adapter_records(results).items()}
    nouns = {}
    for noun, texts in unseen_texts().items():
        near = neighbours(noun_states(backbone, texts, noun), train, k)
        crude = neighbours(backbone.encode_prompts([f"a {noun}"])[0, 1:-1].mean(0), crude_train, 1)
        info = tw.NOUNS[noun]
        nouns[noun] = {"class": [info.color, info.shape], "prompts": len(texts),
                       "neighbours": [{"noun": n, "similarity": s, "class": [tw.NOUNS[n].color, tw.NOUNS[n].shape]}
                                      for n, s in near],
                       "agreement": agreement(noun, near),
                       "crude_nearest": crude[0][0], "crude_agreement": agreement(noun, crude),
                       "gain": {a: g[noun]["gain"] for a, g in gains.items()}}
    order = list(nouns)
    tests = {}
    for a in gains:
        y = [nouns[n]["gain"][a] for n in order]
        tests[a] = {key: spearman_permutation([nouns[n]["agreement"][key] for n in order], y)
                    for key in ("class", "color", "shape")}
        tests[a]["crude_class"] = spearman_permutation([nouns[n]["crude_agreement"]["class"] for n in order], y)
    return {"experiment": "neighbours", "command": "python -m sur_lib.study.experiments neighbours " + f"--k {k}",
            "versions": common.versions(), "k": k, "per_noun_train_prompts": PER_NOUN,
            "representation": "MiniLM final token states at the noun's word pieces, in context, "
                              "mean over the noun's prompts",
            "primary": "class agreement (similarity-weighted share of the k nearest training nouns "
                       "with the noun's colour and shape) vs the per-noun gain: Spearman, permutation p",
            "nouns": nouns, "tests": tests, "wall_time_s": round(time.time() - t0, 1)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sur_lib.study.experiments neighbours", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=K)
    ap.add_argument("--out", default=str(common.RESULTS_DIR))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    doc = run_neighbours(a.k, Path(a.out))
    path = write_json(record_inputs(doc), Path(a.out) / "neighbours.json")
    print(f"wrote {rel_path(path)} ({doc['wall_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    from sur_lib.infra.cli import run as run_cli
    run_cli(main)


def verify_neighbours(doc: dict, backbone, current_digest: str | None = None, draws: int | None = None,
                      progress: bool = False, out: Path | str = common.RESULTS_DIR) -> list[dict]:
    """``verify`` for ``neighbours.json``: everything recomputed live (a few seconds: MiniLM on
    a few hundred prompts, the gains from the stored results in ``out``) and compared to 1e-6.
    The verify hooks' signature (``registry``); nothing is drawn and no adapter trained, so
    ``current_digest``, ``draws`` and ``progress`` are not used."""
    from ..statistics import same_numbers

    live = run_neighbours(doc["k"], Path(out), backbone)
    checks = []
    for key in ("nouns", "tests"):
        ok = same_numbers(live[key], doc[key], rel=1e-6)
        checks.append({"check": f"neighbours: {key}", "ok": ok,
                       "message": "recomputed live" + ("" if ok else ": DIFFERS")})
    return checks
