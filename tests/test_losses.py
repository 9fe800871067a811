"""Eq. 5, 8, 9, 10 against values computed by hand."""
import math

import pytest
import torch

from sur_lib.adapter import KnowledgeProjection
from sur_lib.losses import (
    kl_distillation,
    llm_distillation_loss,
    prompt_alignment_loss,
    simple_loss,
    total_loss,
)

# Two features. Teacher logits (0, 0): p_t = (1/2, 1/2). Student logits (ln 3, 0): p_s = (3/4, 1/4).
# KL(p_s || p_t) = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.1308120   (authors' direction)
# KL(p_t || p_s) = 1/2 ln(2/3) + 1/2 ln(2)   = 0.1438410   (teacher as target)
KL_S_T = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
KL_T_S = 0.5 * math.log(2 / 3) + 0.5 * math.log(2.0)


def _pair(b=1, n=1):
    teacher = torch.zeros(b, n, 2)
    student = torch.tensor([math.log(3.0), 0.0]).expand(b, n, 2).clone()
    return teacher, student


def test_hand_values_are_what_we_think():
    assert KL_S_T == pytest.approx(0.1308120, abs=1e-6)
    assert KL_T_S == pytest.approx(0.1438410, abs=1e-6)


def test_kl_authors_direction_single_token():
    t, s = _pair()
    assert kl_distillation(t, s).item() == pytest.approx(KL_S_T, rel=1e-6)


def test_kl_authors_direction_matches_torch_kl_div_call_as_the_authors_wrote_it():
    torch.manual_seed(0)
    t, s = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    ref = torch.nn.functional.kl_div(
        torch.log_softmax(t, -1), torch.softmax(s, -1), reduction="batchmean"
    )
    assert kl_distillation(t, s).item() == pytest.approx(ref.item(), rel=1e-5)


def test_kl_teacher_target_direction():
    t, s = _pair()
    assert kl_distillation(t, s, direction="teacher_target").item() == pytest.approx(KL_T_S, rel=1e-6)


def test_kl_sums_over_tokens_and_divides_by_batch():
    t, s = _pair(b=2, n=3)  # 6 identical tokens, divided by B = 2
    assert kl_distillation(t, s).item() == pytest.approx(3 * KL_S_T, rel=1e-6)
    assert kl_distillation(t, s, reduction="token_mean").item() == pytest.approx(KL_S_T, rel=1e-6)


def test_kl_temperature():
    # T = 2: p_s = softmax(ln3/2, 0) = (sqrt3, 1)/(sqrt3 + 1); KL(p_s || uniform) * T^2
    t, s = _pair()
    a = math.sqrt(3) / (math.sqrt(3) + 1)
    expected = 4 * (a * math.log(2 * a) + (1 - a) * math.log(2 * (1 - a)))
    assert expected == pytest.approx(0.145363, abs=1e-6)
    assert kl_distillation(t, s, temperature=2.0).item() == pytest.approx(expected, rel=1e-6)


def test_kl_zero_when_equal_and_positive_otherwise():
    x = torch.randn(2, 4, 8)
    assert kl_distillation(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_distillation(x, x + torch.randn_like(x)).item() > 0


def test_kl_bad_options():
    t, s = _pair()
    with pytest.raises(ValueError, match="direction"):
        kl_distillation(t, s, direction="forward")
    with pytest.raises(ValueError, match="reduction"):
        kl_distillation(t, s, reduction="mean")


def test_llm_distillation_broadcasts_one_teacher_vector_over_tokens():
    # W0 = identity-like: the projected knowledge (0, 0) is the teacher of all 4 tokens.
    knowledge = torch.zeros(2, 2)
    student = torch.tensor([math.log(3.0), 0.0]).expand(2, 4, 2).clone()
    loss = llm_distillation_loss(knowledge, student, projection=lambda k: k)
    assert loss.item() == pytest.approx(4 * KL_S_T, rel=1e-6)  # 8 tokens / B=2


def test_llm_distillation_through_w0():
    w0 = KnowledgeProjection(llm_dim=6, text_dim=2, seed=3)
    k = torch.randn(1, 6)
    proj = (k @ w0.weight.T)[0]  # hand: the teacher logits
    student = torch.zeros(1, 1, 2)
    p_t = torch.softmax(proj, -1)
    expected = (0.5 * (math.log(0.5) - torch.log(p_t))).sum().item()  # KL(uniform || p_t)
    assert llm_distillation_loss(k, student, w0).item() == pytest.approx(expected, rel=1e-5)


def test_llm_distillation_shape_errors():
    with pytest.raises(ValueError, match="knowledge"):
        llm_distillation_loss(torch.zeros(3, 2), torch.zeros(2, 4, 2), lambda k: k)
    w0 = KnowledgeProjection(llm_dim=6, text_dim=2)
    with pytest.raises(ValueError, match="width 5"):
        llm_distillation_loss(torch.zeros(2, 5), torch.zeros(2, 4, 2), w0)


def test_prompt_alignment_is_kl_with_complex_prompt_as_teacher():
    t, s = _pair(b=1, n=2)
    assert prompt_alignment_loss(s, t).item() == pytest.approx(2 * KL_S_T, rel=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        prompt_alignment_loss(s, torch.zeros(1, 3, 2))


def test_simple_loss_is_mse():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[0.0, 2.0], [3.0, 2.0]])
    assert simple_loss(pred, target).item() == pytest.approx((1 + 0 + 0 + 4) / 4)


def test_total_loss_default_lambdas_are_the_papers():
    out = total_loss(torch.tensor(1.0), torch.tensor(100.0), torch.tensor(1000.0))
    assert out.item() == pytest.approx(1.0 + 1e-5 * 100 + 1e-5 * 1000)
    out = total_loss(torch.tensor(1.0), torch.tensor(100.0), torch.tensor(1000.0), 0.5, 0.0)
    assert out.item() == pytest.approx(51.0)
