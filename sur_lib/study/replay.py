"""A stored training run's loss log, recomputed one row at a time, without the run.

``verify`` checks the loss logs behind stored results by replaying some of their rows:
:func:`replay_step` recomputes log row N from the adapter after step N - 1 with the training
code's own seeded micro-batches, noise, timesteps and dropout (``sur_lib.train.seed_micro_step``
and ``compute_losses``), so a row forged after the run, or a change in the training code, shows.
"""
from __future__ import annotations

import torch

from sur_lib import train
from sur_lib.data import collate
from sur_lib.infra.micro_batches import micro_batch_loader


def replay_step(cfg: train.TrainConfig, backbone, adapter, step: int, dataset=None,
                knowledge: dict | None = None) -> dict:
    """The loss terms that log row ``step`` (1-based) of a one-process run of ``cfg`` holds, given
    ``adapter``: the weights after step ``step - 1`` (e.g. a stored ``adapters/step-N`` for row
    N + 1). No optimizer is needed: row ``step``'s losses are computed before that step's update,
    from the weights and from its micro-batches, noise, timesteps and dropout, which are seeded by
    the micro-step index alone (``batch_indices``, ``train.seed_micro_step``), whatever came before.
    The learning rate does not enter. ``dataset``/``knowledge`` as ``train`` takes them (built
    from ``cfg`` when None). Returns {term: value} for ``train.LOSS_TERMS``, averaged over the
    gradient-accumulation micro-steps as the log is. Torch's global generator is restored."""
    if step < 1:
        raise ValueError(f"replay_step: step must be >= 1 (a log row), got {step}")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
    dataset, knowledge, text_only = train.data_and_knowledge(cfg, backbone, dataset, knowledge)
    accum = cfg.gradient_accumulation_steps
    micro_steps = [(step - 1) * accum + micro for micro in range(accum)]
    loader = micro_batch_loader(dataset, micro_steps, batch_size=cfg.batch_size, seed=cfg.seed,
                                collate=collate)
    rng, mode = torch.get_rng_state(), adapter.training
    terms = [0.0] * len(train.LOSS_TERMS)
    adapter.train()  # dropout as in training
    try:
        with torch.no_grad():
            for micro_step, batch in zip(micro_steps, loader):
                train.seed_micro_step(cfg, batch, micro_step, text_only)
                with torch.autocast("cpu", dtype=weight_dtype, enabled=weight_dtype != torch.float32):
                    losses = train.compute_losses(cfg, backbone, adapter, batch, weight_dtype, knowledge)
                for j, k in enumerate(train.LOSS_TERMS):
                    terms[j] += float(losses[k].detach().double()) / accum
    finally:
        torch.set_rng_state(rng)
        adapter.train(mode)
    return dict(zip(train.LOSS_TERMS, terms))
