"""The three losses of SUR-adapter (paper Sec. 3.3-3.5, Eq. 5, 8, 9, 10).

Both KL terms use one temperature-scaled distillation, as the authors' ``distillation_loss``:
a softmax over the D features of each token, the KL summed over tokens and features and
divided by the batch size (``reduction="batchmean"``), times T^2.

Direction. The authors call ``F.kl_div(log_softmax(teacher / T), softmax(student / T))``, i.e.
they put the *student* (the adapter's tensor) in PyTorch's target slot, which computes

    KL(p_student || p_teacher) = sum p_s (log p_s - log p_t)         direction="authors" (default)

The usual knowledge-distillation direction (Hinton et al.) is the reverse,

    KL(p_teacher || p_student) = sum p_t (log p_t - log p_s)         direction="teacher_target"

Both are minimised when the two distributions agree; they weigh disagreements differently.
``reduction="token_mean"`` divides by B x N instead of B (independent of prompt length).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DIRECTIONS = ("authors", "teacher_target")
REDUCTIONS = ("batchmean", "token_mean")


def kl_distillation(
    teacher: torch.Tensor,
    student: torch.Tensor,
    temperature: float = 1.0,
    direction: str = "authors",
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Temperature-scaled KL between per-token feature softmaxes (used by Eq. 5 and Eq. 9).

    teacher: [B, N, D] or [B, 1, D] (broadcast over the N tokens); student: [B, N, D].
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if student.ndim != 3:
        raise ValueError(f"student must be [B, N, D], got {tuple(student.shape)}")
    teacher = teacher.expand_as(student).float()
    student = student.float()
    t = float(temperature)
    log_p_t = F.log_softmax(teacher / t, dim=-1)
    log_p_s = F.log_softmax(student / t, dim=-1)
    if direction == "authors":  # F.kl_div(input=log p_teacher, target=p_student)
        kl = (log_p_s.exp() * (log_p_s - log_p_t)).sum()
    else:
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    denom = student.shape[0] if reduction == "batchmean" else student.shape[0] * student.shape[1]
    return kl / denom * t * t


def llm_distillation_loss(
    knowledge: torch.Tensor,
    student: torch.Tensor,
    projection,
    temperature: float = 1.0,
    **kw,
) -> torch.Tensor:
    """L_LLM of Eq. 5: KL[W0 fLLM(ps) / T, Q / T].

    knowledge: [B, llm_dim] LLM knowledge vectors; student: [B, N, D] (Q in the paper, h0 in the
    authors' code: ``SURAdapterOutput.student``); projection: the fixed W0 (a module such as
    ``KnowledgeProjection`` or ``SURAdapter.project_knowledge``), mapping llm_dim -> D. The one
    projected vector is the teacher of every token.
    """
    if knowledge.ndim != 2 or knowledge.shape[0] != student.shape[0]:
        raise ValueError(
            f"knowledge must be [B, llm_dim] with B = {student.shape[0]}, got {tuple(knowledge.shape)}"
        )
    teacher = projection(knowledge).unsqueeze(1)  # [B, 1, D]
    return kl_distillation(teacher, student, temperature, **kw)


def prompt_alignment_loss(
    c: torch.Tensor, complex_states: torch.Tensor, temperature: float = 1.0, **kw
) -> torch.Tensor:
    """L_CP of Eq. 9: KL(c / T, fEn(pc) / T), the complex prompt's token states as teacher.

    c: the adapter's mixed output [B, N, D]; complex_states: fEn(complex prompt) [B, N, D]
    (truncated to the text encoder's length, 77 tokens for CLIP, as in the authors' code).
    """
    if complex_states.shape != c.shape:
        raise ValueError(f"shapes differ: c {tuple(c.shape)} vs complex {tuple(complex_states.shape)}")
    return kl_distillation(complex_states, c, temperature, **kw)


def simple_loss(model_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_simple of Eq. 8: mean squared error between the UNet's prediction and the noise."""
    return F.mse_loss(model_pred.float(), target.float(), reduction="mean")


def total_loss(
    l_simple: torch.Tensor,
    l_llm: torch.Tensor,
    l_cp: torch.Tensor,
    lambda_llm: float = 1e-5,
    lambda_cp: float = 1e-5,
) -> torch.Tensor:
    """Eq. 10: L = L_simple + lambda1 L_LLM + lambda2 L_CP (paper: lambda1 = lambda2 = 1e-5)."""
    return l_simple + lambda_llm * l_llm + lambda_cp * l_cp
