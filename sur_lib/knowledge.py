"""LLM knowledge vectors (paper Sec. 3.3): the f_LLM(p_s) that W0 of Eq. 5 projects.

W0 itself belongs to the adapter (:class:`sur_lib.adapter.KnowledgeProjection`).

A knowledge vector of a simple prompt is the mean over tokens of one layer's hidden states of
a causal LM (the authors: LLaMA (v1) 13B, layer 39 = the last block, before the final norm,
mean over all tokens including BOS; Llama-2-13B gives other vectors). This module computes
them (:func:`knowledge_vectors`), hands training the vectors of a batch
(:func:`select_knowledge`, :func:`stack_knowledge`) and keeps them in a cache file
(:func:`cached_knowledge_vectors`).

The machinery lives in the infrastructure: loading the LLMs, finding their decoder blocks and
whether their tokenizer adds a BOS token (``sur_lib.infra.llms``), the two knowledge-file
formats (``sur_lib.infra.knowledge_files``: this project's safetensors cache and the authors'
``prompt2vec/<LLM>/<layer>.pt``) and the extraction command (its options, files and resumable
loop: ``sur_lib.infra.extract``). The authors publish no extraction script; this module's
command is one:

    python -m sur_lib.knowledge extract /path/to/SURD --llm huggyllama/llama-13b --layer 39 \
        --dtype bfloat16 --device auto --out runs/sd15/knowledge.safetensors
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .infra import extract
from .infra.fileio import file_lock
from .infra.knowledge_files import (KnowledgeError, add_vectors, cache_meta, check_prompts, load_model_for,
                                    nearest_prompt, read_cache, refuse_near_misses, save_cache)
from .infra.llms import decoder_layers, tokenizer_adds_bos


# --- computing knowledge vectors ---------------------------------------------------------------


@torch.no_grad()
def knowledge_vectors(
    model: nn.Module,
    tokenizer: Any,
    prompts: Iterable[str],
    layer: int,
    include_bos: bool = True,
    batch_size: int = 1,
    progress: bool = True,
    drop_first: bool = False,
) -> torch.Tensor:
    """Knowledge vectors f_LLM(p_s) of Sec. 3.3: per prompt, the mean over its tokens of the hidden
    states output by decoder block ``layer``. Returns a float32 CPU tensor [N, hidden].

    ``layer`` is 0-based; negative values count from the end (-1 = last block, which is what
    the authors used: LLaMA-13B layer 39). The states are taken with a forward hook on the block,
    i.e. BEFORE the model's final norm (``output_hidden_states[-1]`` would be after it).
    ``batch_size`` 1 (the default) runs each prompt through the model on its own, unpadded, so a
    prompt's vector depends on the prompt alone, bit for bit. Larger batches are faster (on a
    GPU, for many prompts): prompts are padded on the right and the pad tokens are left out of
    the mean, but the padded batch runs other kernels, so the vectors change at rounding level
    with their batch companions (SmolLM2, the tiny profile's 1,335 SURD-mini prompts: 124 not
    bit-equal, by up to 9e-3 in entries of up to ~3,800), enough to change an adapter trained at
    a large lambda_LLM. ``include_bos``: keep the BOS token (if the tokenizer
    adds one) in the mean, as the authors did. ``drop_first`` (not in the paper): also leave the
    prompt's first real token out of the mean; in SmolLM2, which adds no BOS, that token is the
    attention sink whose state is about ten times larger than the others' and dominates the mean.
    """
    prompts = check_prompts(prompts)
    layers = decoder_layers(model)
    n = len(layers)
    if not -n <= layer < n:
        raise KnowledgeError(f"layer {layer} is out of range: this model has {n} blocks, use {-n}..{n - 1}")
    adds_bos = tokenizer_adds_bos(tokenizer)
    # positions left out of the mean: BOS (if added and not wanted), the first real token if asked
    dropped = ([0] if adds_bos and not include_bos else []) + ([int(adds_bos)] if drop_first else [])
    device = next(model.parameters()).device

    ids = [tokenizer(p)["input_ids"] for p in prompts]
    for p, t in zip(prompts, ids):
        if len(t) <= len(dropped):
            raise ValueError(f"prompt {p!r} has no token to average")

    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # Shortest prompts first: batches have little padding. The result is put back in order.
    order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
    out = torch.empty(len(prompts), model.config.hidden_size, dtype=torch.float32)
    base = getattr(model, "model", model)  # the decoder without the LM head (no logits needed)
    handle = layers[layer].register_forward_hook(hook)
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=f"knowledge vectors (layer {layer})",
                          disable=not progress):
            batch = order[start : start + batch_size]
            width = max(len(ids[i]) for i in batch)
            input_ids = torch.zeros(len(batch), width, dtype=torch.long)  # pad id: masked anyway
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            captured.clear()
            base(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
            hidden = captured[0].float().cpu()  # [B, T, hidden]
            keep = mask.clone()
            keep[:, dropped] = 0  # leave BOS and/or the first token out of the mean if asked
            keep = keep.unsqueeze(-1).float()
            out[batch] = (hidden * keep).sum(1) / keep.sum(1)
    finally:
        handle.remove()
    return out


# --- the vectors of a batch, and the cache training reads ------------------------------------------


def select_knowledge(
    knowledge: Mapping[str, torch.Tensor], prompts: Iterable[str], source: str = "the knowledge mapping",
    width: int | None = None,
) -> dict[str, torch.Tensor]:
    """{prompt: knowledge[prompt]} for ``prompts`` (repeats dropped), checked: every prompt has a
    1-D vector, all of one width (``width`` if given). Errors name the prompts and ``source``."""
    prompts = list(dict.fromkeys(prompts))
    missing = [p for p in prompts if p not in knowledge]
    if missing:
        shown = ", ".join(repr(p) for p in missing[:3]) + (", ..." if len(missing) > 3 else "")
        near = nearest_prompt(missing[0], knowledge)
        raise KnowledgeError(
            f"{len(missing)} of {len(prompts)} simple prompts have no knowledge vector in {source}: "
            f"{shown} (keys must match the prompts exactly{near}; make the vectors with "
            "`python -m sur_lib.knowledge extract`)")
    out, first = {}, None
    for p in prompts:
        v = knowledge[p]
        if not isinstance(v, torch.Tensor) or v.ndim != 1:
            shape = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise KnowledgeError(f"the knowledge vector of {p!r} in {source} must be 1-D, got {shape}")
        if width is None:
            width, first = int(v.shape[0]), p
        if v.shape[0] == 0:
            raise KnowledgeError(f"the knowledge vector of {p!r} in {source} has width 0")
        if v.shape[0] != width:
            origin = f"that of {first!r}" if first is not None else "the adapter's llm_dim"
            raise KnowledgeError(f"the knowledge vector of {p!r} in {source} has width {v.shape[0]}, "
                                 f"expected {width} ({origin})")
        out[p] = v
    return out


def stack_knowledge(knowledge: Mapping[str, torch.Tensor], prompts: list[str], width: int | None = None,
                    source: str = "the knowledge mapping") -> torch.Tensor:
    """The vectors of ``prompts`` (repeats kept, in order) as one [len(prompts), D] tensor."""
    checked = select_knowledge(knowledge, prompts, source, width)
    return torch.stack([checked[p] for p in prompts])


def cached_knowledge_vectors(
    path: str | os.PathLike,
    model_loader: Callable[[], tuple[nn.Module, Any]],
    prompts: Iterable[str],
    layer: int,
    include_bos: bool = True,
    batch_size: int = 1,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
    drop_first: bool = False,
) -> dict[str, torch.Tensor]:
    """Knowledge vectors for ``prompts``, computed once and kept in the safetensors file ``path``.

    Only prompts missing from the file are computed; ``model_loader()`` (returning
    ``(model, tokenizer)``, e.g. ``sur_lib.infra.llms.load_smollm2``) is called only if some are
    missing. The file records ``layer``, ``include_bos`` and ``meta`` (put the model name there); asking
    for vectors of another layer/model from the same file is an error (use another file).
    ``layer`` is compared as written: -1 and 29 are different keys. ``drop_first`` is recorded
    only when set; ``batch_size`` always (1, the default, makes the file's contents independent
    of which prompts were asked for together). Processes that extend the same file take turns
    (``infra.fileio.file_lock``): the later one reads what the earlier one added. Returns
    {prompt: vector}.
    """
    prompts = list(dict.fromkeys(check_prompts(prompts)))  # drop repeats, keep the order
    wanted_meta = cache_meta(meta, layer, include_bos, drop_first, batch_size)
    known = read_cache(Path(path), wanted_meta, prompts)
    missing = [p for p in prompts if p not in known]
    refuse_near_misses(path, missing, known)
    if missing:
        # one process at a time extends the file: another one computing vectors of it is waited
        # for and its vectors read, not computed again (nor lost by two rewrites of the file)
        with file_lock(path):
            known = read_cache(Path(path), wanted_meta, prompts)
            missing = [p for p in prompts if p not in known]
            if missing:
                model, tokenizer = load_model_for(model_loader, path, missing)
                new = knowledge_vectors(model, tokenizer, missing, layer, include_bos, batch_size,
                                        progress, drop_first=drop_first)
                add_vectors(known, missing, new, path)
                save_cache(path, known, wanted_meta)
    return {p: known[p] for p in prompts}


# --- the extraction command (python -m sur_lib.knowledge extract; its files: sur_lib.infra.extract) --


def extract_knowledge(
    prompts: Iterable[str],
    path: str | os.PathLike,
    model_loader: Callable[[], tuple[nn.Module, Any]],
    layer: int = -1,
    include_bos: bool = True,
    drop_first: bool = False,
    batch_size: int = 1,
    meta: dict[str, Any] | None = None,
    save_every_s: float = 300.0,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """:func:`knowledge_vectors` of many prompts, written to the cache ``path`` batch by batch,
    resumably (``sur_lib.infra.extract.extract_in_batches``: a rerun after an interruption
    writes the same file as a run that never stopped). ``batch_size`` prompts go through the
    LLM together (1: a vector depends on its prompt alone); the file records it."""
    def vectors_of(model, tokenizer, batch):
        return knowledge_vectors(model, tokenizer, batch, layer, include_bos, batch_size=len(batch),
                                 progress=False, drop_first=drop_first)

    return extract.extract_in_batches(
        prompts, path, model_loader, vectors_of, cache_meta(meta, layer, include_bos, drop_first, batch_size),
        batch_size=batch_size, save_every_s=save_every_s, progress=progress,
        desc=f"knowledge vectors (layer {layer})")


def main(argv: list[str] | None = None) -> int:
    """``python -m sur_lib.knowledge extract ...`` (``sur_lib.infra.extract.command``: its
    options, files and report) with :func:`extract_knowledge`."""
    return extract.command(sys.argv[1:] if argv is None else list(argv), extract_knowledge)


if __name__ == "__main__":
    from .infra.cli import run

    run(main)
