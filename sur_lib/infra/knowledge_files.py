"""Knowledge files: the knowledge vectors of many prompts on disk, in two formats.

A knowledge file maps simple prompts to their knowledge vectors (``sur_lib.knowledge``, paper
Sec. 3.3). The two formats are told apart by content (:func:`knowledge_file_format`):

* this project's safetensors cache (:func:`save_knowledge`, :func:`load_knowledge`): tensor
  "vectors" [N, D], the prompts and a ``meta`` dict (LLM, layer, BOS, batch size) as JSON
  metadata. It is appended to: the ``cache`` helpers at the end are the file side of
  ``sur_lib.knowledge.cached_knowledge_vectors`` and of ``python -m sur_lib.knowledge extract``;
* the authors' ``prompt2vec/<LLM>/<layer>.pt``, a ``torch.save``d {prompt: fp16 vector}
  (:func:`load_authors_prompt2vec`, :func:`save_authors_prompt2vec`).

Errors are :class:`KnowledgeError` (a UsageError: exit status 2) and name the file or prompt;
a prompt that is missing is shown beside the nearest stored one (:func:`nearest_prompt`).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .cli import UsageError
from .fileio import atomic_write_bytes

CACHE_FORMAT = "sur_lib.knowledge/1"  # the safetensors cache's "format" metadata


class KnowledgeError(UsageError):
    """A knowledge file or mapping that is not what it should be (names the file or prompt)."""


def check_prompts(prompts: Iterable[str]) -> list[str]:
    """``prompts`` as a non-empty list of strings (one string is a list of one)."""
    prompts = list(prompts) if not isinstance(prompts, str) else [prompts]
    if not prompts:
        raise ValueError("prompts is empty: give at least one simple prompt")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings, got {type(bad[0]).__name__}: {bad[0]!r}")
    return prompts


# --- this project's safetensors cache -----------------------------------------------------------


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

    prompts = check_prompts(prompts)
    if len(set(prompts)) != len(prompts):
        raise ValueError("prompts contain duplicates: each prompt may have one vector only")
    if vectors.ndim != 2 or vectors.shape[0] != len(prompts):
        raise ValueError(f"vectors must be [{len(prompts)}, D] (one row per prompt), got {list(vectors.shape)}")
    if vectors.shape[1] == 0:
        raise KnowledgeError(f"vectors of width 0 (shape {list(vectors.shape)}): a knowledge vector needs "
                             f"at least one number; not written to {path}")
    metadata = {
        "format": CACHE_FORMAT,
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


def read_knowledge(path: str | os.PathLike) -> tuple[list[str], torch.Tensor, dict[str, Any]]:
    """(prompts, vectors [N, D], meta) of a safetensors cache, checked; damage names the file."""
    from safetensors import safe_open

    if knowledge_file_format(path) != SAFETENSORS:
        raise KnowledgeError(f"{path} is the authors' .pt format, not a sur_lib safetensors cache; "
                             "read it with read_knowledge_file or load_authors_prompt2vec")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != CACHE_FORMAT:
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
    prompts, vectors, _ = read_knowledge(path)
    return dict(zip(prompts, vectors))


def knowledge_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``meta`` dict stored with a knowledge cache (model name, layer, include_bos, ...)."""
    return read_knowledge(path)[2]


def read_knowledge_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """{prompt: vector} from either format (see :func:`knowledge_file_format`): this project's
    safetensors cache or the authors' ``.pt`` (its fp16 vectors are returned as stored)."""
    if knowledge_file_format(path) == AUTHORS_PT:
        return load_authors_prompt2vec(path)
    return load_knowledge(path)


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


def save_authors_prompt2vec(path: str | os.PathLike, vectors: Mapping[str, torch.Tensor]) -> Path:
    """Write the authors' format: ``torch.save`` of {simple prompt: fp16 tensor [llm_dim]}
    (readable by their training script and by :func:`load_authors_prompt2vec`); atomic."""
    data = {p: v.detach().to(torch.float16).cpu().clone() for p, v in vectors.items()}  # own storage
    buffer = io.BytesIO()
    torch.save(data, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


# --- prompts that look the same -------------------------------------------------------------------


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


# --- the cache, appended to (cached_knowledge_vectors and the extraction command) ------------------


def cache_meta(meta: dict[str, Any] | None, layer: int, include_bos: bool, drop_first: bool,
               batch_size: int = 1) -> dict[str, Any]:
    """What a cache records about how its vectors were made. ``batch_size`` is recorded because
    batched vectors differ from one-prompt ones at rounding level
    (``sur_lib.knowledge.knowledge_vectors``): files made before it was recorded (batches of 16)
    are refused, not silently mixed."""
    return {**(meta or {}), "layer": int(layer), "include_bos": bool(include_bos),
            **({"drop_first": True} if drop_first else {}), "batch_size": int(batch_size)}


def read_cache(path: Path, wanted_meta: dict[str, Any], prompts: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """The vectors already in the cache ``path`` ({} if there is none); its meta must match.

    The batch size may differ when the file already holds every one of ``prompts`` (a file made
    with ``extract --batch-size 16`` on a GPU is read as it is), not when some must be added:
    one file never mixes vectors computed with different batch sizes. A file that does not
    record its batch size (made before it was recorded, with batches of 16) is refused."""
    if not path.exists():
        return {}
    old_prompts, old_vectors, old_meta = read_knowledge(path)
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


def refuse_near_misses(path, missing: list[str], known: Mapping[str, torch.Tensor]) -> None:
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


def load_model_for(model_loader, path, missing: list[str]):
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


def add_vectors(known: dict[str, torch.Tensor], prompts: list[str], new: torch.Tensor, path) -> None:
    """Put the rows of ``new`` into ``known`` under ``prompts``, in the width and dtype of the
    vectors already there (another width: another model, refused)."""
    if known:
        old = next(iter(known.values()))
        if new.shape[1] != old.shape[0]:
            raise ValueError(f"{path} holds vectors of width {old.shape[0]}, "
                             f"the model gives {new.shape[1]}: is it the same model?")
        new = new.to(old.dtype)
    known.update(zip(prompts, new))


def save_cache(path, known: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Rewrite the cache ``path`` with every vector of ``known`` (atomic)."""
    prompts = list(known)
    save_knowledge(path, prompts, torch.stack([known[p] for p in prompts]), meta)
