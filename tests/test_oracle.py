"""The oracle teacher's vectors, the gradient share of each loss term, Holm's adjustment."""
import dataclasses

import pytest
import torch

from sur_lib.study import gradient_share as gs
from sur_lib.study import oracle
from sur_lib.study.statistics import holm
from sur_lib.models import tiny_random_backbone
from sur_lib.train import build_adapter
from tests.helpers import LLM_DIM, cfg_for, one_batch

ROWS = [
    {"text": "four tomatoes in a row", "count": 4, "color": "red", "shape": "circle", "arrangement": "row"},
    {"text": "four tomatoes on a table", "count": 4, "color": "red", "shape": "circle", "arrangement": "ring"},
    {"text": "four tomatoes on a table", "count": 4, "color": "red", "shape": "circle", "arrangement": "stack"},
    {"text": "a lemon", "count": 1, "color": "yellow", "shape": "circle", "arrangement": None},
    {"text": "a stack of three dice", "count": 3, "color": "white", "shape": "square", "arrangement": "stack"},
    {"text": "three dice", "count": 3, "color": "white", "shape": "square", "arrangement": "stack"},
]


def test_attributes_follow_what_the_text_says():
    a = oracle.prompt_attributes(ROWS)
    assert a["four tomatoes in a row"] == (4, "red", "circle", "row")
    assert a["four tomatoes on a table"] == (4, "red", "circle", None)  # not named in the text
    assert a["three dice"] == (3, "white", "square", None)
    assert a["a stack of three dice"] == (3, "white", "square", "stack")
    with pytest.raises(ValueError, match="disagree"):
        oracle.prompt_attributes(ROWS + [dict(ROWS[0], color="green")])
    with pytest.raises(ValueError, match="ground truth"):
        oracle.prompt_attributes([{"text": "x", "count": 1}])


def test_code_is_one_hot_per_attribute():
    c = oracle.attribute_code(4, "red", "circle", None)
    assert c.shape == (oracle.CODE_DIM,) and c.sum() == 4 and set(c.tolist()) == {0.0, 1.0}
    assert c[len(oracle.COUNTS) + len(oracle.tw.COLORS) + len(oracle.tw.SHAPES) + 4] == 1  # "unstated"
    with pytest.raises(ValueError, match="colour|color"):
        oracle.attribute_code(4, "mauve", "circle", None)


def test_vectors_deterministic_distinct_and_of_the_llm_width():
    k1 = oracle.oracle_knowledge(ROWS, width=576)
    k2 = oracle.oracle_knowledge(list(reversed(ROWS)), width=576)
    assert sorted(k1) == sorted(oracle.prompt_attributes(ROWS))
    for p in k1:
        assert k1[p].shape == (576,) and torch.equal(k1[p], k2[p])
    # same attributes -> same vector; different attributes -> different vectors
    same = oracle.oracle_knowledge([ROWS[1], dict(ROWS[1], text="there are four tomatoes")], width=576)
    assert torch.equal(same["four tomatoes on a table"], same["there are four tomatoes"])
    vecs = torch.stack([k1[p] for p in sorted(k1) if p != "three dice"])
    assert torch.linalg.matrix_rank(vecs) == len(vecs)
    assert not torch.equal(k1["three dice"], k1["a stack of three dice"])
    assert not torch.equal(oracle.oracle_knowledge(ROWS, 576, seed=1)["a lemon"], k1["a lemon"])
    normed = oracle.oracle_knowledge(ROWS, width=64, norm=3.0)
    assert oracle.mean_norm(normed) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="width"):
        oracle.projection(oracle.CODE_DIM - 1)


def test_oracle_reads_surd_mini_metadata(tmp_path):
    from sur_lib.world import toyworld as tw
    from sur_lib.data import SURDDataset

    tw.build_dataset(tmp_path, 40, seed=3, progress=False)
    rows = SURDDataset(tmp_path, check_images=False).rows
    k = oracle.oracle_knowledge(rows, width=32)
    assert set(k) == {r["text"] for r in rows}


# ----------------------------------------------------------------------------- gradient shares


def _shares(surd, tmp_path, **kw):
    cfg = cfg_for(surd, tmp_path, **kw)
    backbone = tiny_random_backbone(seed=0)
    torch.manual_seed(0)
    adapter = build_adapter(cfg, backbone.text_dim, LLM_DIM)
    batch = one_batch(surd, cfg)
    torch.manual_seed(1)
    return gs.gradient_shares(cfg, backbone, adapter, batch), cfg, backbone, adapter, batch


def test_lambda_zero_gives_share_zero_and_shares_sum_to_one(surd, tmp_path):
    s, *_ = _shares(surd, tmp_path, lambda_llm=0.0, lambda_cp=0.5)
    assert s["norm"]["l_llm"] == 0.0 and s["share"]["l_llm"] == 0.0
    assert s["norm"]["l_simple"] > 0 and s["norm"]["l_cp"] > 0
    assert sum(s["share"].values()) == pytest.approx(1.0)
    assert s["total_norm"] <= sum(s["norm"].values()) * (1 + 1e-9)  # triangle inequality


def test_scaling_lambda_scales_that_terms_gradient(surd, tmp_path):
    a, *_ = _shares(surd, tmp_path, lambda_llm=0.1, lambda_cp=0.2)
    b, *_ = _shares(surd, tmp_path, lambda_llm=0.1, lambda_cp=0.2 * 7)
    assert b["norm"]["l_cp"] == pytest.approx(7 * a["norm"]["l_cp"], rel=1e-6)
    assert b["norm"]["l_simple"] == pytest.approx(a["norm"]["l_simple"], rel=1e-9)
    assert b["raw_norm"]["l_cp"] == pytest.approx(a["raw_norm"]["l_cp"], rel=1e-9)


def test_norm_is_the_hand_computed_gradient_norm(surd, tmp_path):
    from sur_lib.train import compute_losses

    s, cfg, backbone, adapter, batch = _shares(surd, tmp_path, lambda_llm=0.3, lambda_cp=0.2)
    torch.manual_seed(1)
    loss = compute_losses(cfg, backbone, adapter, batch, torch.float32)["l_llm"] * 0.3
    adapter.zero_grad()
    loss.backward()
    by_hand = sum(float(p.grad.pow(2).sum()) for p in adapter.parameters() if p.grad is not None) ** 0.5
    assert s["norm"]["l_llm"] == pytest.approx(by_hand, rel=1e-5)
    torch.manual_seed(1)
    adapter.zero_grad()
    compute_losses(cfg, backbone, adapter, batch, torch.float32)["loss"].backward()
    total = sum(float(p.grad.pow(2).sum()) for p in adapter.parameters() if p.grad is not None) ** 0.5
    assert s["total_norm"] == pytest.approx(total, rel=1e-5)


def test_official_path_has_no_l_simple_gradient(surd, tmp_path):
    s, *_ = _shares(surd, tmp_path, gradient_path="official", lambda_llm=0.1, lambda_cp=0.1)
    assert s["norm"]["l_simple"] == 0.0 and s["share"]["l_cp"] > 0
    assert gs.lambda_to_match(s, "l_cp") is None


def test_lambda_to_match_equalises_the_norms(surd, tmp_path):
    s, *_ = _shares(surd, tmp_path, lambda_llm=1e-5, lambda_cp=1e-5)
    lam = gs.lambda_to_match(s, "l_cp")
    r = gs.reweight(s, 1e-5, lam)
    assert r["norm"]["l_cp"] == pytest.approx(r["norm"]["l_simple"])
    assert r["share"]["l_cp"] == pytest.approx(r["share"]["l_simple"])
    with pytest.raises(ValueError, match="term"):
        gs.lambda_to_match(s, "l_simple")


def test_measure_is_deterministic_and_restores_the_mode(surd, tmp_path):
    from sur_lib.data import SURDDataset
    from sur_lib.infra.knowledge_files import load_knowledge

    cfg = cfg_for(surd, tmp_path, lambda_llm=0.1, lambda_cp=0.1)
    backbone = tiny_random_backbone(seed=0)
    ds = SURDDataset(surd, resolution=32, knowledge=load_knowledge(surd / "knowledge.safetensors"))
    torch.manual_seed(0)
    adapter = build_adapter(cfg, backbone.text_dim, LLM_DIM).eval()
    m1 = gs.measure(cfg, backbone, ds, adapter, batches=1)
    m2 = gs.measure(dataclasses.replace(cfg), backbone, ds, adapter, batches=1)
    assert m1["norm"] == m2["norm"] and m1["batches"] == 1 and not adapter.training
    with pytest.raises(ValueError, match="batches"):
        gs.measure(cfg, backbone, ds, adapter, batches=0)


# ----------------------------------------------------------------------------- Holm


def test_holm_by_hand():
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
    # step-down monotone and capped at 1; None is not a test
    out = holm({"a": 0.5, "b": 0.001, "c": None, "d": 0.6})
    assert out["c"] is None and out["b"] == pytest.approx(0.003)
    assert out["a"] == pytest.approx(1.0) and out["d"] == pytest.approx(1.0)
