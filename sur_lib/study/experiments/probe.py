"""What the teacher knows: leave-one-noun-out linear probes of colour and shape.

    python -m sur_lib.study.experiments probe [--per-noun 24] [--llms smollm2,gemma3-270m]

The SUR world's nouns stand for a look that only commonsense gives: a cherry is a red circle,
a sugar cube a white square. L_LLM (Eq. 5) can only pass on what the LLM's knowledge vectors
encode, and at test time the adapter sees nothing but the frozen text encoder's token states
of the prompt: the LLM is consulted only during training. So two questions decide what the
distillation can transfer to held-out nouns:

(a) does the LLM's knowledge vector of a prompt carry the noun's colour and shape, for a
    noun the probe never saw?
(b) do the text encoder's states of the same prompt carry it?

For every noun of the world (``toyworld.NOUNS``: the train nouns and the held-out ones),
``--per-noun`` prompts are written from the world's own simple-prompt templates (train and
held-out phrasings, counts 1-6). For each noun in turn, a multinomial logistic regression
(scikit-learn, standardised features, C = 1, not tuned) is fitted on the prompts of all OTHER
nouns and predicts the colour (7 classes) and the shape (3 classes) of the left-out noun's
prompts. Reported per feature set: prompt accuracy on the left-out nouns (mean over nouns of
the per-noun accuracy, with a t interval over nouns), the number of nouns whose majority
prediction is right (Wilson interval), the same for the held-out nouns alone, and two chance
levels: always predicting the other nouns' majority class, and one over the number of classes. A class with a single noun (blue: only
the blueberry) cannot be predicted when that noun is left out; the feasible counts say so.

Feature sets: the knowledge vectors as the adapter is trained with them (SmolLM2-135M, last
block, mean over tokens; the same without the attention-sink token; Gemma 3 270M if its
packages are installed) and the text encoder (MiniLM token states, mean over the real tokens).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from sur_lib.world import toyworld as tw
from sur_lib.infra.fileio import write_json
from sur_lib.infra.provenance import rel_path
from .inputs import record_inputs
from . import common

PER_NOUN = 24
TARGETS = ("color", "shape")


def probe_prompts(per_noun: int = PER_NOUN, seed: int = 0) -> list[dict]:
    """``per_noun`` distinct simple prompts for every noun, from all train and held-out
    templates (single: 1 object; count: 2-6; arrangements: 3-6), drawn without replacement."""
    out = []
    for k, (noun, info) in enumerate(tw.NOUNS.items()):
        options = []
        for split in ("train", "heldout"):
            for key, templates in tw.TEMPLATES[split].items():
                counts = [1] if key == "single" else range(2 if key == "count" else tw.MIN_ARRANGED,
                                                            tw.MAX_COUNT + 1)
                for t in templates:
                    for c in counts:
                        options.append((t, c))
        rng = np.random.default_rng([seed, k])
        pick = rng.choice(len(options), size=min(per_noun, len(options)), replace=False)
        for i in sorted(pick):
            t, c = options[i]
            a_noun = ("an " if noun[0] in "aeiou" else "a ") + noun
            text = t.format(num=tw.NUMBER_WORDS[c], noun=noun, a_noun=a_noun, nouns=info.plural)
            out.append({"text": text, "noun": noun, "color": info.color, "shape": info.shape,
                        "split": info.split})
    return out


def text_encoder_features(backbone, texts: Sequence[str], batch: int = 64) -> np.ndarray:
    """Mean of the frozen text encoder's token states over each prompt's real tokens."""
    feats = []
    for i in range(0, len(texts), batch):
        chunk = list(texts[i:i + batch])
        states = backbone.encode_prompts(chunk).float()
        mask = backbone.tokenizer(chunk, padding="max_length", max_length=backbone.max_length,
                                  truncation=True, return_tensors="pt").attention_mask
        m = mask[:, :states.shape[1]].unsqueeze(-1).float()
        feats.append(((states * m).sum(1) / m.sum(1)).numpy())
    return np.concatenate(feats)


def llm_features(name: str, texts: Sequence[str], drop_first: bool = False,
                 progress: bool = True) -> np.ndarray:
    """Knowledge vectors as the tiny recipe computes them (last block, mean over tokens)."""
    from sur_lib.infra.llms import load_llm
    from sur_lib.knowledge import knowledge_vectors

    model, tok = load_llm(name)
    return knowledge_vectors(model, tok, list(texts), layer=-1, include_bos=True,
                             progress=progress, drop_first=drop_first).numpy()


def leave_one_noun_out(X: np.ndarray, prompts: Sequence[dict], target: str) -> dict:
    """Fit on every other noun, predict the left-out noun's prompts; per-noun results."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.array([p[target] for p in prompts])
    nouns = np.array([p["noun"] for p in prompts])
    per_noun = {}
    for noun in tw.NOUNS:
        test = nouns == noun
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
        clf.fit(X[~test], y[~test])
        pred = clf.predict(X[test])
        values, counts = np.unique(pred, return_counts=True)
        train_classes, train_counts = np.unique(y[~test], return_counts=True)
        majority_other = train_classes[np.argmax(train_counts)]
        truth = y[test][0]
        per_noun[noun] = {"truth": str(truth), "acc": float(np.mean(pred == truth)),
                          "majority_prediction": str(values[np.argmax(counts)]),
                          "feasible": bool(truth in set(y[~test])),
                          "chance_acc": float(majority_other == truth),
                          "split": tw.NOUNS[noun].split}
    return per_noun


def _summary(per_noun: dict, which: str) -> dict:
    from scipy import stats

    from ..statistics import wilson_interval

    rows = [r for r in per_noun.values() if which == "all" or r["split"] == which]
    accs = np.array([r["acc"] for r in rows])
    k = sum(r["majority_prediction"] == r["truth"] for r in rows)
    n = len(rows)
    half = (float(stats.t.ppf(0.975, n - 1)) * accs.std(ddof=1) / math.sqrt(n)
            if n > 1 and accs.std(ddof=1) > 0 else 0.0)
    lo, hi = wilson_interval(k, n)
    return {"n_nouns": n, "n_feasible": sum(r["feasible"] for r in rows),
            "prompt_acc": float(accs.mean()), "prompt_acc_t_ci": [float(accs.mean() - half),
                                                                   float(accs.mean() + half)],
            "nouns_right": int(k), "nouns_right_ci": [lo, hi],
            "chance": float(np.mean([r["chance_acc"] for r in rows])),
            "uniform_chance": 1.0 / len({r["truth"] for r in per_noun.values()})}


def run(per_noun: int = PER_NOUN, llms: Sequence[str] = ("smollm2", "gemma3-270m"),
        seed: int = 0, progress: bool = True, backbone=None, argv: Sequence[str] = ()) -> dict:
    t0 = time.time()
    prompts = probe_prompts(per_noun, seed)
    texts = [p["text"] for p in prompts]
    backbone = backbone if backbone is not None else common.load_base()
    features: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}
    skipped: dict[str, str] = {}
    features["minilm"] = text_encoder_features(backbone, texts)
    sources["minilm"] = "all-MiniLM-L6-v2 token states (the frozen text encoder), mean over real tokens"
    for name in llms:
        variants = [(name, False)] + ([(f"{name}_no_sink", True)] if name == "smollm2" else [])
        for key, drop in variants:
            try:
                features[key] = llm_features(name, texts, drop_first=drop, progress=progress)
            except ImportError as e:  # Gemma's packages: make setup-gemma
                skipped[key] = str(e).splitlines()[0]
                continue
            sources[key] = (f"{name} knowledge vectors (last block, mean over tokens"
                            f"{', first token left out' if drop else ''}; one prompt per pass)")
    results = {}
    for key, X in features.items():
        results[key] = {"source": sources[key], "dim": int(X.shape[1])}
        for target in TARGETS:
            per = leave_one_noun_out(X, prompts, target)
            results[key][target] = {"all": _summary(per, "all"), "heldout": _summary(per, "heldout"),
                                    "per_noun": per}
    return {"experiment": "probe",
            "command": "python -m sur_lib.study.experiments probe " + " ".join(argv),
            "seed": seed, "versions": common.versions(), "per_noun": per_noun,
            "n_prompts": len(prompts), "classifier": "sklearn LogisticRegression(C=1.0) on "
            "StandardScaler features, leave one noun out, not tuned",
            "features": results, "skipped": skipped, "prompts": prompts,
            "wall_time_s": round(time.time() - t0, 1)}


def verify_probe(doc: dict, backbone, current_digest: str | None = None, draws: int | None = None,
                 progress: bool = False, out=None, targets: Sequence[str] = TARGETS) -> list[dict]:
    """``verify``: recompute the text encoder's features of the stored prompts and its
    leave-one-noun-out probes (seconds; the LLM parts take minutes and are not repeated), and
    compare each noun's majority answer and the mean accuracy with the stored ones. The verify
    hooks' signature (``registry``); only the text encoder is used, so ``current_digest``,
    ``draws``, ``progress`` and ``out`` are not."""
    prompts = probe_prompts(doc["per_noun"], doc["seed"])
    if [p["text"] for p in prompts] != [p["text"] for p in doc["prompts"]]:
        return [{"check": "probe prompts", "ok": False,
                 "message": "the probe's prompts changed since probe.json was made: re-run it"}]
    X = text_encoder_features(backbone, [p["text"] for p in prompts])
    checks = []
    for target in targets:
        stored = doc["features"]["minilm"][target]
        live = leave_one_noun_out(X, prompts, target)
        same = sum(live[n]["majority_prediction"] == stored["per_noun"][n]["majority_prediction"]
                   for n in live)
        acc = float(np.mean([r["acc"] for r in live.values()]))
        ok = same >= len(live) - 1 and abs(acc - stored["all"]["prompt_acc"]) <= 0.02
        checks.append({"check": f"minilm {target}: {len(live)} nouns", "ok": ok, "live": acc,
                       "stored": stored["all"]["prompt_acc"], "same_nouns": same,
                       "message": f"live {acc:.3f} vs stored {stored['all']['prompt_acc']:.3f}, "
                                  f"same majority answer for {same}/{len(live)} nouns"})
    return checks


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sur_lib.study.experiments probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-noun", type=int, default=PER_NOUN)
    ap.add_argument("--llms", default="smollm2,gemma3-270m")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(common.RESULTS_DIR))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-progress", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    a = ap.parse_args(argv)
    if a.per_noun < 2:
        from sur_lib.infra.cli import UsageError
        raise UsageError(f"--per-noun must be >= 2, got {a.per_noun}")
    if a.threads:
        torch.set_num_threads(a.threads)
    doc = run(a.per_noun, [x for x in a.llms.split(",") if x], a.seed, not a.no_progress, argv=argv)
    path = write_json(record_inputs(doc), Path(a.out) / "probe.json")
    for key, r in doc["features"].items():
        print(f"{key:16s} " + "  ".join(
            f"{t}: {r[t]['all']['prompt_acc']:.0%} (held-out nouns {r[t]['heldout']['prompt_acc']:.0%},"
            f" chance {r[t]['all']['chance']:.0%})" for t in TARGETS))
    print(f"wrote {rel_path(path)} ({doc['wall_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    from sur_lib.infra.cli import run as run_cli
    run_cli(main)
