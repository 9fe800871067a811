"""Which rows and which seed each micro-step of a training run gets, and the DataLoader that
decodes them: the bookkeeping behind a run that is killed and resumed following the same path
as one that never stopped, whatever the number of decoding processes.

Micro-step ``m`` (a pure function of it, the seed and the data's size) takes consecutive
slices of seeded per-epoch permutations (:func:`batch_indices`: every row once per epoch) and
seeds torch with :func:`micro_step_seed`. The DataLoader (:func:`micro_batch_loader`) decodes
a micro-batch in a worker process after seeding torch there, so the rows' random crops and
flips are those of the training process, and hands the batch over with the generator's state
after them: the training process continues from that state (its noise, timesteps, dropout).
The text-only prompts (not in the paper) are read here too (:func:`read_text_only_prompts`),
and each micro-step's draw of them is seeded by it (:func:`text_only_draw`). Nothing here knows
the method: the dataset and its ``collate`` are passed in.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from .cli import UsageError


def batch_indices(n: int, batch_size: int, micro_step: int, seed: int) -> list[int]:
    """Indices of micro-batch number ``micro_step``: consecutive slices of seeded per-epoch
    permutations (every sample once per epoch), a pure function of its arguments."""
    out = []
    start = micro_step * batch_size
    for pos in range(start, start + batch_size):
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[offset]))
    return out


def micro_step_seed(seed: int, micro_step: int) -> int:
    return (seed * 1_000_003 + micro_step * 7_919 + 12_345) % (2**63 - 1)


def read_text_only_prompts(path: str | os.PathLike) -> list[str]:
    """The text-only prompts of ``path`` (UTF-8, one per line, blank lines skipped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"text_only_prompts: cannot read {path}: {e}") from None
    prompts = [ln.strip() for ln in lines if ln.strip()]
    if not prompts:
        raise UsageError(f"text_only_prompts: {path} holds no prompt")
    return prompts


def text_only_draw(prompts: list[str], n: int, seed: int, micro_step: int) -> list[str]:
    """The ``n`` text-only prompts of one micro-step: drawn with replacement by a generator
    seeded by (seed, micro-step), so a resumed run draws what an uninterrupted one drew."""
    g = torch.Generator().manual_seed(micro_step_seed(seed, micro_step) + 1)
    return [prompts[i] for i in torch.randint(len(prompts), (int(n),), generator=g).tolist()]


class MicroStepSampler(torch.utils.data.Sampler):
    """Batch sampler of the training DataLoader: for each micro-step ``m`` (in the order given),
    the list ``[(m, position, row index), ...]`` of its micro-batch (:func:`batch_indices`)."""

    def __init__(self, n: int, batch_size: int, seed: int, micro_steps: list[int]):
        self.n, self.batch_size, self.seed, self.micro_steps = n, batch_size, seed, list(micro_steps)

    def __iter__(self):
        for m in self.micro_steps:
            yield [(m, pos, i) for pos, i in enumerate(batch_indices(self.n, self.batch_size, m, self.seed))]

    def __len__(self) -> int:
        return len(self.micro_steps)


class SeededRows(torch.utils.data.Dataset):
    """Rows of a dataset, keyed ``(micro_step, position, index)``: the first row of a
    micro-batch seeds torch's global generator with :func:`micro_step_seed`, so its random
    crops and flips (drawn from that generator) are the same in whichever process decodes it."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        micro_step, position, index = key
        if position == 0:
            torch.manual_seed(micro_step_seed(self.seed, micro_step))
        return micro_step, self.dataset[index]


def collate_micro_batch(rows: list, collate) -> dict:
    """``collate`` of one micro-batch's rows, plus its micro-step and the state of torch's CPU
    generator after its rows were decoded: the training process continues from that state, so
    its noise, timesteps and dropout are those of a run that decoded the rows itself."""
    batch = collate([row for _, row in rows])
    batch["micro_step"] = rows[0][0]
    batch["rng_state"] = torch.get_rng_state()
    return batch


def micro_batch_loader(dataset, micro_steps: list[int], *, batch_size: int, seed: int, collate,
                       num_workers: int = 0, pin_memory: bool = False):
    """The training DataLoader: micro-batches ``micro_steps`` (this process's, in order) of
    ``dataset``, decoded by ``num_workers`` worker processes (0: in this process) and collated
    by :func:`collate_micro_batch` with ``collate``. The batches do not depend on the number of
    workers, and a resumed run asks for the micro-steps after its checkpoint: it sees the same
    data."""
    workers = int(num_workers)
    return torch.utils.data.DataLoader(
        SeededRows(dataset, seed),
        batch_sampler=MicroStepSampler(len(dataset), batch_size, seed, micro_steps),
        collate_fn=functools.partial(collate_micro_batch, collate=collate), num_workers=workers,
        pin_memory=pin_memory, prefetch_factor=2 if workers else None,
    )
