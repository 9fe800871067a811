"""How much of the adapter's gradient each loss term of Eq. 10 contributes.

    L = L_simple + lambda_llm L_LLM + lambda_cp L_CP              (Eq. 10, ``train.compute_losses``)

For one adapter and one batch, ``gradient_shares`` back-propagates each weighted term on its
own and returns the Euclidean norm of its gradient with respect to the adapter's trainable
parameters, its share of the three norms' sum, and the raw (unweighted) norm of the KL terms'
gradients: at a fixed adapter the weighted norm is exactly lambda times the raw one, which
is what lets ``lambda_to_match`` pick a lambda that makes a term's gradient as large as
L_simple's. With the paper's lambdas (1e-5) the KL terms' shares are tiny; under
``gradient_path: official`` L_simple's is 0 (the authors' code detaches c before the UNet).

``measure`` averages the norms over a few training batches drawn as ``train.train`` draws
them (``infra.micro_batches``: ``batch_indices`` slices of a seeded permutation, each batch
seeded by ``micro_step_seed``; a separate seed stream, so they are not the first training
batches).
The adapter is put in train mode (dropout on), as in training.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..data import collate
from ..infra.micro_batches import batch_indices, micro_step_seed
from ..train import compute_losses

TERMS = ("l_simple", "l_llm", "l_cp")
MEASURE_SEED_OFFSET = 7_777  # the measurement's batches: not the training run's own


def _grads(term: torch.Tensor, params: Sequence[torch.nn.Parameter]) -> list[torch.Tensor]:
    if not term.requires_grad:
        return [torch.zeros_like(p) for p in params]
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]


def _norm(grads: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))


def gradient_shares(cfg, backbone, adapter, batch: dict, knowledge: dict | None = None,
                    weight_dtype=torch.float32) -> dict:
    """{"norm": {term: ||d(weighted term)/d theta||}, "raw_norm": {term: ||d term / d theta||},
    "share": {term: norm / sum of norms}, "total_norm": ||dL/d theta||, "loss": {term: value}}
    for one batch (``compute_losses``'s forward pass; theta = the adapter's trainable
    parameters). ``l_simple``'s weight is 1; dL/d theta is the weighted sum of the three
    gradients (one backward pass per term, none for L)."""
    params = [p for p in adapter.parameters() if p.requires_grad]
    losses = compute_losses(cfg, backbone, adapter, batch, weight_dtype, knowledge)
    weights = {"l_simple": 1.0, "l_llm": float(cfg.lambda_llm), "l_cp": float(cfg.lambda_cp)}
    grads = {k: _grads(losses[k], params) for k in TERMS}
    raw = {k: _norm(grads[k]) for k in TERMS}
    norm = {k: weights[k] * raw[k] for k in TERMS}
    total = _norm([sum(weights[k] * grads[k][i].double() for k in TERMS) for i in range(len(params))])
    s = sum(norm.values())
    return {"norm": norm, "raw_norm": raw, "share": {k: (v / s if s else 0.0) for k, v in norm.items()},
            "total_norm": total, "loss": {k: float(losses[k].detach()) for k in TERMS}}


def measure(cfg, backbone, dataset, adapter, knowledge: dict | None = None, batches: int = 4,
            batch_size: int | None = None) -> dict:
    """``gradient_shares`` averaged over ``batches`` training batches of ``dataset`` (the mean
    of the per-batch norms; shares recomputed from the mean norms), with the per-batch values."""
    if batches < 1:
        raise ValueError(f"batches must be >= 1, got {batches}")
    bs = int(batch_size or cfg.batch_size)
    seed = int(cfg.seed) + MEASURE_SEED_OFFSET
    was_training = adapter.training
    adapter.train()
    per = []
    try:
        for m in range(batches):
            torch.manual_seed(micro_step_seed(seed, m))
            batch = collate([dataset[i] for i in batch_indices(len(dataset), bs, m, seed)])
            per.append(gradient_shares(cfg, backbone, adapter, batch, knowledge))
    finally:
        adapter.train(was_training)
    mean = {key: {k: sum(p[key][k] for p in per) / len(per) for k in TERMS}
            for key in ("norm", "raw_norm", "loss")}
    s = sum(mean["norm"].values())
    return {**mean, "share": {k: (v / s if s else 0.0) for k, v in mean["norm"].items()},
            "total_norm": sum(p["total_norm"] for p in per) / len(per), "batches": len(per),
            "batch_size": bs, "per_batch": per}


def lambda_to_match(shares: dict, term: str, ratio: float = 1.0) -> float | None:
    """The lambda at which ``term``'s gradient norm is ``ratio`` times L_simple's, at the
    adapter ``shares`` were measured on: ratio * ||grad L_simple|| / ||grad term|| (raw).
    None when either norm is 0 (e.g. L_simple under the official path)."""
    if term not in ("l_llm", "l_cp"):
        raise ValueError(f"term must be l_llm or l_cp, got {term!r}")
    simple, raw = shares["raw_norm"]["l_simple"], shares["raw_norm"][term]
    return None if not simple or not raw else float(ratio * simple / raw)


def reweight(shares: dict, lambda_llm: float, lambda_cp: float) -> dict:
    """The weighted norms and shares for other lambdas, from the raw norms of ``shares``
    (exact at the measured adapter: a term's gradient is linear in its weight)."""
    w = {"l_simple": 1.0, "l_llm": float(lambda_llm), "l_cp": float(lambda_cp)}
    norm = {k: w[k] * shares["raw_norm"][k] for k in TERMS}
    s = sum(norm.values())
    return {"lambda_llm": float(lambda_llm), "lambda_cp": float(lambda_cp), "norm": norm,
            "share": {k: (v / s if s else 0.0) for k, v in norm.items()}}
