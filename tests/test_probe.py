"""The leave-one-noun-out probe of what a representation knows about colour and shape."""
import numpy as np

from sur_lib.study.experiments import probe
from sur_lib.world import toyworld as tw


def test_probe_prompts_are_deterministic_distinct_and_cover_every_noun():
    a, b = probe.probe_prompts(8, seed=0), probe.probe_prompts(8, seed=0)
    assert a == b
    assert len(a) == 8 * len(tw.NOUNS)
    for noun in tw.NOUNS:
        texts = [p["text"] for p in a if p["noun"] == noun]
        assert len(set(texts)) == 8
        assert all(tw.NOUNS[noun].plural in t or noun in t for t in texts)
    assert probe.probe_prompts(8, seed=1) != a


def _onehot_features(prompts, target, noise=0.05, seed=0):
    classes = sorted({p[target] for p in prompts})
    rng = np.random.default_rng(seed)
    X = np.array([[float(p[target] == c) for c in classes] for p in prompts])
    return X + noise * rng.standard_normal(X.shape)


def test_a_representation_that_encodes_colour_is_read_on_unseen_nouns():
    prompts = probe.probe_prompts(6)
    per = probe.leave_one_noun_out(_onehot_features(prompts, "color"), prompts, "color")
    for noun, r in per.items():
        if r["feasible"]:
            assert r["acc"] == 1.0 and r["majority_prediction"] == r["truth"], noun
    assert not per["blueberry"]["feasible"]  # the only blue noun: no blue left to learn from
    s = probe._summary(per, "all")
    assert s["n_nouns"] == len(tw.NOUNS) and s["n_feasible"] == len(tw.NOUNS) - 1
    assert s["nouns_right"] == len(tw.NOUNS) - 1
    assert abs(s["uniform_chance"] - 1 / 7) < 1e-12


def test_noise_features_stay_near_chance():
    prompts = probe.probe_prompts(6)
    X = np.random.default_rng(0).standard_normal((len(prompts), 16))
    per = probe.leave_one_noun_out(X, prompts, "shape")
    s = probe._summary(per, "all")
    assert s["prompt_acc"] < 0.75  # 3 shapes, circles are the majority (~0.6 by always guessing it)


def test_verify_probe_passes_on_the_stored_result_and_fails_on_a_changed_one():
    import copy
    import json

    from sur_lib.study.experiments.common import RESULTS_DIR, load_base

    doc = json.loads((RESULTS_DIR / "probe.json").read_text())
    backbone = load_base()
    assert all(c["ok"] for c in probe.verify_probe(doc, backbone, targets=("shape",)))
    bad = copy.deepcopy(doc)
    bad["features"]["minilm"]["shape"]["all"]["prompt_acc"] += 0.1
    assert not probe.verify_probe(bad, backbone, targets=("shape",))[0]["ok"]
    bad = copy.deepcopy(doc)
    bad["prompts"][0]["text"] = "seven cherries"
    assert probe.verify_probe(bad, backbone)[0]["check"] == "probe prompts"
