"""The file side of ``python -m sur_lib.knowledge extract``: its options, the prompt files it
reads, and the resumable loop that fills a knowledge cache batch by batch.

The vectors come from the method: ``sur_lib.knowledge.extract_knowledge`` passes
``knowledge_vectors`` in as ``vectors_of``, and the command (:func:`command`) gets
``extract_knowledge`` from the method's ``sur_lib.knowledge.main`` (the infrastructure imports
no layer).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .fileio import clean_stale_temps
from .knowledge_files import (KnowledgeError, add_vectors, cache_meta, check_prompts, load_knowledge,
                              load_model_for, read_cache, save_authors_prompt2vec, save_cache)
from .llms import load_llm
from .surd_files import read_surd

#: The ``--dtype`` choices (the LLM's weights).
DTYPES = ("float32", "bfloat16", "float16")


def text_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file, a byte-order mark at its start dropped (as SURDDataset
    does); a file that is not UTF-8 is a KnowledgeError naming it and the line."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise KnowledgeError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start}); save it "
                             "as UTF-8") from None
    return text.splitlines()


def read_prompts(source: str | os.PathLike) -> list[str]:
    """The simple prompts of ``source``, repeats dropped, in order of first appearance:

    * a SURD folder (``metadata.jsonl`` + images): the ``text`` of every row (``read_surd``
      reads and checks the folder, the images' existence but not their pixels);
    * a ``.jsonl`` file: the ``text`` field of every line (a SURD metadata file);
    * any other file: one prompt per non-empty line (UTF-8).

    Files are read as UTF-8; a byte-order mark at the start is dropped (as ``SURDDataset``
    does), and a file that is not UTF-8 is named with its line.
    """
    path = Path(source)
    if path.is_dir():
        prompts = [row["text"] for row in read_surd(path, check_images=False).rows]
    elif path.is_file() and path.suffix == ".jsonl":
        prompts = []
        for lineno, line in enumerate(text_lines(path), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as err:
                raise KnowledgeError(f"{path}:{lineno}: not a JSON object ({err})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"]:
                raise KnowledgeError(f"{path}:{lineno}: expected an object with a non-empty "
                                     '"text" (the simple prompt)')
            prompts.append(row["text"])
    elif path.is_file():
        prompts = [line.strip() for line in text_lines(path) if line.strip()]
    else:
        raise KnowledgeError(f"{path} not found: give a SURD folder, a metadata.jsonl or a text file "
                             "with one prompt per line")
    if not prompts:
        raise KnowledgeError(f"{path} holds no prompts")
    return list(dict.fromkeys(prompts))


def check_save_every(save_every_s) -> float:
    """``save_every_s``: a finite number of seconds >= 0 (0: after every batch)."""
    try:
        value = float(save_every_s)
    except (TypeError, ValueError):
        raise KnowledgeError(f"--save-every-s must be a number of seconds, got {save_every_s!r}") from None
    if not math.isfinite(value) or value < 0:
        raise KnowledgeError(f"--save-every-s must be a finite number of seconds >= 0 (0: after every "
                             f"batch), got {save_every_s!r}: nothing would be saved before the end")
    return value


def parse_args(argv: list[str]):
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m sur_lib.knowledge",
        description="Knowledge vectors of the SUR-adapter (paper Sec. 3.3): per simple prompt, the "
                    "mean over its tokens of one decoder block's output of a causal LM.")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser(
        "extract", help="compute the knowledge vectors of a data set (resumable)",
        description="Compute the knowledge vectors of every simple prompt of SOURCE with a Hugging "
                    "Face causal LM and write them to a safetensors cache (appended to; a rerun "
                    "continues where an interrupted one stopped). The paper: LLaMA (v1) 13B, layer "
                    "39 (its last block), mean over all tokens including BOS.")
    ex.add_argument("source", help="a SURD folder, a metadata.jsonl, or a text file with one prompt per line")
    ex.add_argument("--llm", required=True,
                    help="Hub repo id or local folder of a causal LM (e.g. huggyllama/llama-13b), "
                         "or smollm2 / gemma3-270m (the tiny profile's models)")
    ex.add_argument("--layer", type=int, default=-1,
                    help="0-based decoder block; negative counts from the end (default -1, the last)")
    ex.add_argument("--out", required=True, help="the safetensors cache to write (training's knowledge_file)")
    ex.add_argument("--authors-pt", default=None,
                    help="also write the authors' format: a torch.save'd {prompt: fp16 vector} dict")
    ex.add_argument("--batch-size", type=int, default=1,
                    help="prompts per forward pass (default 1: a vector depends on its prompt alone; "
                         "larger is faster on a GPU but changes the vectors at rounding level)")
    ex.add_argument("--dtype", default="float32", choices=DTYPES,
                    help="LLM weights (LLaMA-13B: bfloat16, 26 GB; float32 needs 52 GB)")
    ex.add_argument("--device", default="cpu",
                    help="cpu, cuda, or auto (device_map='auto': spread over the GPUs and CPU memory)")
    ex.add_argument("--no-bos", action="store_true", help="leave BOS out of the mean (the authors keep it)")
    ex.add_argument("--drop-first", action="store_true",
                    help="not in the paper: also leave the first real token (an attention sink) out")
    ex.add_argument("--save-every-s", type=float, default=300.0,
                    help="rewrite the cache at most this often while computing (0: after every batch)")
    ex.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def extract_in_batches(
    prompts: Iterable[str],
    path: str | os.PathLike,
    model_loader: Callable[[], tuple[nn.Module, Any]],
    vectors_of: Callable[[nn.Module, Any, list[str]], torch.Tensor],
    meta: dict[str, Any],
    batch_size: int = 1,
    save_every_s: float = 300.0,
    progress: bool = True,
    desc: str = "knowledge vectors",
) -> dict[str, torch.Tensor]:
    """``vectors_of(model, tokenizer, batch)`` of many prompts, written to the safetensors cache
    ``path`` (``save_knowledge``; the same file ``cached_knowledge_vectors`` and training read),
    which records ``meta`` (``cache_meta``: LLM, layer, BOS, batch size).

    Resumable: the prompts are put in a fixed order (by token count, so a batch has little
    padding) and cut into batches of ``batch_size``; the cache is rewritten at most every
    ``save_every_s`` seconds (0: after every batch) and at the end, and a rerun skips the
    batches already in it. An interrupted run started again therefore computes the same
    batches and writes the same file as one that never stopped (the same prompts in the same
    order, the same vectors bit for bit; only the order of the metadata keys in the safetensors
    header, which safetensors does not fix, may differ). Vectors already in the cache
    for other prompts are kept (the file is appended to); its ``meta`` must match.
    """
    prompts = list(dict.fromkeys(check_prompts(prompts)))
    if int(batch_size) < 1:
        raise KnowledgeError(f"batch_size must be >= 1, got {batch_size}")
    check_save_every(save_every_s)
    path = Path(path)
    if path.is_dir():
        raise KnowledgeError(f"{path} is a folder: give the knowledge file to write (e.g. "
                             f"{path / 'knowledge.safetensors'})")
    for stale in clean_stale_temps(path.parent, path.name):  # copies left by killed runs
        print(f"removed {stale.name}, a temporary copy of {path.name} left by a killed run", flush=True)
    known = read_cache(path, meta, prompts)
    missing = [p for p in prompts if p not in known]
    if not missing:
        return {p: known[p] for p in prompts}

    model, tokenizer = load_model_for(model_loader, path, missing)
    lengths = {p: len(tokenizer(p)["input_ids"]) for p in prompts}
    order = sorted(prompts, key=lambda p: lengths[p])  # stable: ties keep the source order
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(missing), unit="prompt",
               desc=desc, disable=not progress)
    last_save, unsaved = time.monotonic(), False
    try:
        for batch in batches:
            need = [p for p in batch if p not in known]
            if not need:
                continue
            add_vectors(known, need, vectors_of(model, tokenizer, need), path)
            unsaved = True
            bar.update(len(need))
            if time.monotonic() - last_save >= save_every_s:
                save_cache(path, known, meta)
                last_save, unsaved = time.monotonic(), False
    finally:
        bar.close()
        if unsaved:  # also on Ctrl-C: what was computed is kept (complete batches only)
            save_cache(path, known, meta)
    return {p: known[p] for p in prompts}


def command(argv: list[str], extract_knowledge: Callable[..., dict[str, torch.Tensor]]) -> int:
    """``python -m sur_lib.knowledge extract SOURCE --llm ... --out ...`` (options:
    :func:`parse_args`): the prompts of SOURCE, their vectors computed with
    ``extract_knowledge`` (the method's, ``sur_lib.knowledge.extract_knowledge``) into the cache
    ``--out`` (and, with ``--authors-pt``, the authors' format too), and a one-line report."""
    args = parse_args(argv)
    check_save_every(args.save_every_s)
    out = Path(args.out).expanduser()
    if out.is_dir():
        raise KnowledgeError(f"--out {out} is a folder: give the knowledge file to write (e.g. "
                             f"{out / 'knowledge.safetensors'})")
    prompts = read_prompts(args.source)
    before = len(read_cache(out, cache_meta({"llm": args.llm}, args.layer, not args.no_bos,
                                            args.drop_first, args.batch_size))) if out.exists() else 0
    vectors = extract_knowledge(
        prompts, out, lambda: load_llm(args.llm, getattr(torch, args.dtype), args.device),
        layer=args.layer, include_bos=not args.no_bos, drop_first=args.drop_first,
        batch_size=args.batch_size, meta={"llm": args.llm}, save_every_s=args.save_every_s,
        progress=not args.no_progress)
    width = next(iter(vectors.values())).shape[0]
    print(f"{len(vectors)} knowledge vectors (width {width}, {args.llm} layer {args.layer}) in {out}"
          f" ({len(load_knowledge(out)) - before} computed now)")
    if args.authors_pt:
        save_authors_prompt2vec(args.authors_pt, vectors)
        print(f"authors' format: {args.authors_pt}")
    return 0
