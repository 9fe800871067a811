"""The distillation-channel experiment's parts: text-only prompts in Algorithm 1, the calibrated
teacher target, the permuted oracle, the noun groups and nouns as the unit of a test."""
import math

import numpy as np
import pytest
import torch

from sur_lib.study import oracle
from sur_lib.world import toyworld as tw
from sur_lib.study.statistics import minimum_detectable_effect, noun_level, sign_flip_p
from sur_lib.infra.cli import UsageError
from sur_lib.study.experiments import channel
from sur_lib.adapter import KnowledgeProjection
from sur_lib.infra.knowledge_files import load_knowledge
from sur_lib.losses import llm_distillation_loss
from sur_lib.models import tiny_random_backbone
from sur_lib.infra.micro_batches import text_only_draw
from sur_lib.train import build_adapter, compute_losses, train
from sur_lib.infra.run_state import read_log
from tests.helpers import LLM_DIM, cfg_for, one_batch

TEXT_ONLY = ["two strawberries", "one apricot on a plate", "a row of three ice cubes"]


@pytest.fixture(scope="module")
def knowledge(surd):
    """The fixture's knowledge vectors plus vectors of the text-only prompts."""
    k = dict(load_knowledge(surd / "knowledge.safetensors"))
    g = torch.Generator().manual_seed(1)
    k.update({p: torch.randn(LLM_DIM, generator=g) for p in TEXT_ONLY})
    return k


def _text_only_cfg(surd, out, tmp_path, **kw):
    f = tmp_path / "text_only.txt"
    f.write_text("\n".join(TEXT_ONLY) + "\n\n")
    return cfg_for(surd, out, **{"lambda_llm": 1.0, "lambda_cp": 1.0, "text_only_prompts": str(f),
                                 "text_only_batch": 2, **kw})


def test_text_only_prompts_enter_l_llm_as_a_batch_mean(surd, knowledge, tmp_path):
    cfg = _text_only_cfg(surd, tmp_path / "o", tmp_path)
    backbone = tiny_random_backbone(seed=0)
    torch.manual_seed(0)
    adapter = build_adapter(cfg, backbone.text_dim, LLM_DIM)
    adapter.eval()  # no dropout: the pieces below must see the same forward passes
    batch = one_batch(surd, cfg)
    torch.manual_seed(3)
    plain = compute_losses(cfg, backbone, adapter, batch, torch.float32, knowledge)
    torch.manual_seed(3)
    mixed = compute_losses(cfg, backbone, adapter, dict(batch, text_only=TEXT_ONLY[:2]), torch.float32,
                           knowledge)
    # by hand: L_LLM of the two text-only prompts alone, then (4 L_img + 2 L_text) / 6
    xt = backbone.encode_prompts(TEXT_ONLY[:2])
    kt = torch.stack([knowledge[p] for p in TEXT_ONLY[:2]])
    l_text = llm_distillation_loss(kt, adapter(xt).student, adapter.project_knowledge)
    assert mixed["l_llm"].item() == pytest.approx((4 * plain["l_llm"].item() + 2 * l_text.item()) / 6, rel=1e-5)
    for k in ("l_simple", "l_cp"):  # no image: the other terms skip them
        assert mixed[k].item() == pytest.approx(plain[k].item(), rel=1e-6)


def test_text_only_draw_is_a_function_of_the_micro_step():
    a = text_only_draw(TEXT_ONLY, 5, seed=0, micro_step=7)
    assert a == text_only_draw(TEXT_ONLY, 5, seed=0, micro_step=7) and len(a) == 5
    assert set(a) <= set(TEXT_ONLY)
    assert any(text_only_draw(TEXT_ONLY, 5, 0, m) != a for m in range(8, 12))


def test_training_with_text_only_prompts_resumes_exactly_and_is_inert_without_a_teacher(
        surd, knowledge, tmp_path):
    straight = train(_text_only_cfg(surd, tmp_path / "s", tmp_path, max_steps=4), knowledge=knowledge)
    train(_text_only_cfg(surd, tmp_path / "r", tmp_path, max_steps=2), knowledge=knowledge)
    resumed = train(_text_only_cfg(surd, tmp_path / "r", tmp_path, max_steps=4), knowledge=knowledge)
    assert resumed.resumed_from == 2
    a, b = straight.adapter.state_dict(), resumed.adapter.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["l_llm"] for r in read_log(tmp_path / "s")] == [r["l_llm"] for r in read_log(tmp_path / "r")]
    without = train(cfg_for(surd, tmp_path / "n", lambda_llm=1.0, lambda_cp=1.0, max_steps=4),
                    knowledge=knowledge).adapter.state_dict()
    assert not all(torch.equal(a[k], without[k]) for k in a)  # the text-only prompts changed it
    # lambda_LLM = 0: the text-only prompts reach nothing, the adapter is the one without them
    zero = train(_text_only_cfg(surd, tmp_path / "z", tmp_path, max_steps=3, lambda_llm=0.0)).adapter.state_dict()
    ref = train(cfg_for(surd, tmp_path / "zr", max_steps=3, lambda_llm=0.0, lambda_cp=1.0)).adapter.state_dict()
    assert all(torch.equal(zero[k], ref[k]) for k in ref)


def test_text_only_errors_name_the_problem(surd, knowledge, tmp_path):
    with pytest.raises(UsageError, match="text_only_prompts"):
        cfg_for(surd, tmp_path, text_only_batch=2)
    with pytest.raises(UsageError, match="text_only_batch"):
        cfg_for(surd, tmp_path, text_only_batch=-1)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(UsageError, match="no prompt"):
        train(cfg_for(surd, tmp_path / "e", lambda_llm=1.0, text_only_prompts=str(empty), text_only_batch=1),
              knowledge=knowledge)
    cfg = _text_only_cfg(surd, tmp_path / "m", tmp_path)
    missing = {k: v for k, v in knowledge.items() if k != TEXT_ONLY[1]}
    with pytest.raises(Exception, match="one apricot on a plate"):
        train(cfg, knowledge=missing)


# ----------------------------------------------------------------------------- the target


def test_calibrated_targets_have_the_stated_entropy_and_stay_distinct():
    w0 = KnowledgeProjection(32, 16, seed=0)
    g = torch.Generator().manual_seed(0)
    vecs = {f"p{i}": 1000 * torch.randn(32, generator=g) + 500 for i in range(6)}  # loud and shared
    before = oracle.target_stats(vecs, w0)
    assert before["entropy"]["median"] < 0.1  # one-hot
    out = oracle.calibrate_targets(vecs, w0, entropy=1.5)
    st = oracle.target_stats(out, w0)
    assert st["entropy"]["min"] == pytest.approx(1.5, abs=1e-4) and st["entropy"]["max"] == pytest.approx(1.5, abs=1e-4)
    assert st["colliding_pairs"] == 0 and st["min_l1_between_targets"] > 0.05
    centred = torch.stack([out[k] / out[k].norm() for k in sorted(out)])
    raw = torch.stack([vecs[k] for k in sorted(vecs)])
    raw = raw - raw.mean(0)
    assert torch.allclose(centred, raw / raw.norm(dim=1, keepdim=True), atol=1e-5)  # centred, then scaled
    with pytest.raises(ValueError, match="entropy"):
        oracle.calibrate_targets(vecs, w0, entropy=math.log(16) + 0.1)
    with pytest.raises(ValueError, match="equal to the mean"):
        oracle.calibrate_targets({"a": torch.ones(32), "b": torch.ones(32)}, w0)


def test_target_stats_counts_collisions_by_combination():
    eye = lambda i: 50 * torch.eye(4)[i]  # noqa: E731 - one-hot logits through an identity W0
    vecs = {"a": eye(0), "b": eye(0), "c": eye(1)}
    st = oracle.target_stats(vecs, lambda v: v, groups={"a": 1, "b": 2, "c": 3})
    assert st["combinations"] == 3 and st["colliding_pairs"] == 1 and st["min_l1_between_targets"] < 1e-6
    assert st["distinct_top_features"] == 2 and st["top_prob"]["median"] > 0.99


def test_permuted_classes_keep_the_marginals_and_move_every_noun_they_can():
    classes = {"tomato": ("red", "circle"), "lime": ("green", "circle"), "die": ("white", "square"),
               "pea": ("green", "circle"), "brick": ("red", "square")}
    perm = oracle.permuted_classes(classes)
    assert sorted(perm.values()) == sorted(classes.values()) and perm.keys() == classes.keys()
    assert sum(perm[n] == classes[n] for n in classes) == 0
    assert perm == oracle.permuted_classes(classes)  # seeded


# ----------------------------------------------------------------------------- nouns as the unit


def test_noun_level_by_hand():
    a = [{"id": "1", "noun": "x", "acc": 0.5}, {"id": "2", "noun": "x", "acc": 0.5},
         {"id": "3", "noun": "y", "acc": 0.0}, {"id": "4", "noun": "z", "acc": 0.25}]
    b = [{"id": "1", "noun": "x", "acc": 1.0}, {"id": "2", "noun": "x", "acc": 0.5},
         {"id": "3", "noun": "y", "acc": 0.5}, {"id": "4", "noun": "z", "acc": 0.25}]
    r = noun_level(a, b)
    assert r["per_noun"] == {"x": 0.25, "y": 0.5, "z": 0.0} and r["n_nouns"] == 3
    assert r["diff"] == pytest.approx(0.25)
    # t over the 3 noun means: sd 0.25, t = 0.25 / (0.25 / sqrt 3) = sqrt 3, df 2 -> p 0.2254
    assert r["p_t"] == pytest.approx(0.22540, abs=1e-4)
    assert r["p_signflip"] == pytest.approx(0.5)  # 4 of the 8 sign patterns reach |mean| >= 0.25
    assert sign_flip_p([1, 1, 1, 1]) == pytest.approx(2 / 16)
    # MDE over the 3 nouns: (t_0.975,2 + t_0.8,2) sd / sqrt 3 = (4.3027 + 1.0607) 0.25 / 1.7321
    assert r["mde"] == pytest.approx((4.3027 + 1.0607) * 0.25 / 3 ** 0.5, rel=1e-3)


def test_noun_groups_are_disjoint_and_no_evaluated_text_was_trained_on():
    groups = channel.group_nouns()
    seen, text, unseen = (set(groups[g]) for g in channel.GROUPS)
    assert not (seen & text) and not (seen & unseen) and not (text & unseen)
    assert not set(channel.TEXT_ONLY_NOUNS) & set(tw.NOUNS)
    test_nouns = {p["noun"] for p in tw.test_prompts()}
    assert not text & test_nouns
    specs = channel.group_prompts()
    train_texts = {r["text"] for r in channel.text_only_rows()}
    assert len(train_texts) == len(channel.TEXT_ONLY_NOUNS) * channel.TEXT_ONLY_PER_NOUN
    rng = np.random.default_rng(0)
    surd_texts = {tw.simple_prompt(tw.sample_scene(rng), rng) for _ in range(3000)}
    for g, ss in specs.items():
        assert len(ss) == 3 * len(groups[g]) and len({s["id"] for s in ss}) == len(ss)
        for s in ss:
            assert s["text"] not in train_texts and s["text"] not in surd_texts, s
            plural, color, shape = channel.noun_info(s["noun"])
            assert (s["color"], s["shape"]) == (color, shape) and s["group"] == g
            tw.Scene(s["count"], color, shape, s["arrangement"])  # a valid scene
    for r in channel.text_only_rows():  # what the oracle reads of a text-only prompt
        assert channel.noun_info(r["noun"])[1:] == (r["color"], r["shape"])


# ----------------------------------------------------------------------------- neighbourhood


def test_neighbour_agreement_and_rank_test_by_hand():
    from sur_lib.study.experiments import neighbours as nb

    # christmas tree (green triangle): pine tree agrees in class, lime in colour only, die in neither
    near = [("pine tree", 0.6), ("lime", 0.3), ("die", 0.1)]
    a = nb.agreement("christmas tree", near)
    assert a == pytest.approx({"class": 0.6, "color": 0.9, "shape": 0.6})
    assert nb.agreement("christmas tree", [("die", -0.2)])["class"] == 0.0  # weights never negative
    t = nb.spearman_permutation([1, 2, 3, 4, 5], [2, 4, 6, 8, 10], n_perm=2000)
    assert t["rho"] == pytest.approx(1.0)
    assert t["p_perm"] == pytest.approx(2 / 120, abs=0.012)  # 2 of the 120 orders are as extreme
    g = nb.per_noun_gain({"s": ([{"id": "a", "noun": "plum", "correct": [1, 1]},
                                 {"id": "b", "noun": "plum", "correct": [0, 1]}],
                                [{"id": "a", "correct": [0, 1, 1, 1]}, {"id": "b", "correct": [0, 0, 1, 1]}])},
                         ["plum", "pearl"])
    assert g == {"plum": {"gain": pytest.approx((0.5 + 0.5) / 2), "prompts": 2}}  # base cut to 2 images


def test_noun_token_positions_find_the_word_pieces():
    from transformers import AutoTokenizer

    from sur_lib.study.experiments import neighbours as nb
    from sur_lib.infra.text_encoders import minilm_folder

    tok = AutoTokenizer.from_pretrained(minilm_folder())
    pos = nb.noun_token_positions(tok, "five christmas trees in a row", ("christmas trees", "christmas tree"))
    ids = tok("five christmas trees in a row").input_ids
    assert tok.decode([ids[i] for i in pos]) == "christmas trees"
    with pytest.raises(ValueError, match="plums"):
        nb.noun_token_positions(tok, "a photo of a lemon", ("plums", "plum"))


def test_channel_prompts_are_pinned_and_the_validation_nouns_are_new():
    import hashlib
    import json

    from sur_lib.world import prompts

    digest = lambda x: hashlib.sha256(json.dumps(x, sort_keys=True).encode()).hexdigest()  # noqa: E731
    assert digest(channel.group_prompts()) == channel.GROUP_PROMPTS_DIGEST
    assert digest(channel.text_only_rows()) == channel.TEXT_ONLY_DIGEST
    val = set(prompts.VALIDATION_NOUNS)
    assert not val & set(tw.NOUNS) and not val & set(channel.TEXT_ONLY_NOUNS)
    specs = prompts.validation_prompts()
    assert len(specs) == 3 * len(val) and {s["noun"] for s in specs} == val
    classes = {(c, s) for c in tw.COLORS for s in tw.SHAPES}  # pretraining draws every class
    assert all((s["color"], s["shape"]) in classes for s in specs)


def _tab(seen, text_only, unseen):
    """A channel table whose oracle_vs_permuted has these (diff, Holm p) per group."""
    out = {}
    for g, (d, p) in zip(channel.GROUPS, (seen, text_only, unseen)):
        level = {"diff": d, "p_holm": p}
        out[g] = {"tests": {"oracle_vs_permuted": {"prompts": level, "nouns": level}}}
    return out


def test_reading_follows_the_issue_s_rules():
    r = channel.reading(_tab((0.01, 0.6), (0.0, 1.0), (0.0, 1.0)))
    assert r["verdicts"]["seen"] == "not detected" and r["channel"].startswith("inert")
    r = channel.reading(_tab((0.2, 0.001), (0.0, 1.0), (0.02, 0.4)))
    assert "limit is at inference" in r["channel"] and r["text_only"].startswith("not detected")
    r = channel.reading(_tab((0.2, 0.001), (0.3, 0.01), (0.1, 0.02)))
    assert r["channel"] == "live on seen and on unseen nouns" and r["text_only"].startswith("yes")
    assert channel.verdict({"nouns": {"diff": -0.2, "p_holm": 0.01}}, "unseen") == "contradicted"


def test_preliminary_compares_only_finished_pairs():
    recs = lambda accs: {g: [{"id": f"{g}{i}", "type": "color", "noun": f"n{i}", "k": int(4 * a), "n": 4,  # noqa: E731
                              "acc": a} for i, a in enumerate(accs)] for g in channel.GROUPS}
    part = {"variants": {"oracle": {"records": recs([0.5, 0.75, 1.0])},
                         "permuted": {"records": recs([0.25, 0.5, 0.5])}}, "base": {}}
    pre = channel.preliminary(part)
    assert pre["finished"] == ["oracle", "permuted"] and pre["missing"] == ["smollm2", "none"]
    t = pre["groups"]["unseen"]["tests"]
    assert list(t) == ["oracle_vs_permuted"]
    assert t["oracle_vs_permuted"]["nouns"]["diff"] == pytest.approx((0.25 + 0.25 + 0.5) / 3)
    assert "p_holm" not in t["oracle_vs_permuted"]["nouns"]


def test_book_rows_show_every_variant_and_comparison_with_its_detectable_difference():
    def recs(accs):
        return {g: [{"id": f"{g}{i}", "type": "color", "noun": f"n{i // 2}", "k": int(4 * a), "n": 4, "acc": a}
                    for i, a in enumerate(accs)] for g in channel.GROUPS}

    done = {v: {"records": recs([0.25 + 0.25 * ((i + j) % 3) for j in range(6)])}
            for i, v in enumerate(channel.VARIANTS)}
    base = {f"{k}/{g}": recs([0.25] * 6)[g] for k in ("simple", "complex") for g in channel.GROUPS}
    base.update({f"complex/{g}": recs([1.0] * 6)[g] for g in channel.GROUPS})
    tab = channel.table(done, base)
    accuracy, tests = channel.book_rows(tab, done)
    assert [r["variant"] for r in accuracy] == list(channel.VARIANTS)
    assert len(tests) == len(channel.GROUPS) * len(channel.COMPARISONS)
    # oracle (i = 0): accuracies 0.25, 0.5, 0.75, 0.25, 0.5, 0.75 -> mean 50.0; gap (0.5 - 0.25) / 0.75
    assert accuracy[0]["seen: % [CI]"].startswith("50.0 [") and accuracy[0]["seen: gap closed"] == "33%"
    # seen is tested over prompts, its detectable difference from the 6 paired differences
    ra, rb = done["permuted"]["records"]["seen"], done["oracle"]["records"]["seen"]
    mde = minimum_detectable_effect([b["acc"] - a["acc"] for a, b in zip(ra, rb)])
    row = next(r for r in tests if r["group (unit)"] == "seen (prompts)" and r["comparison"] == "oracle − permuted")
    assert row["detectable"] == f"{100 * mde:.1f}"
    nrow = next(r for r in tests if r["group (unit)"] == "unseen (nouns)" and r["comparison"] == "oracle − permuted")
    assert nrow["detectable"] == f"{100 * noun_level(ra, rb)['mde']:.1f}"
    assert nrow["verdict"] in ("supported", "contradicted", "not detected")
