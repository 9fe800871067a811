"""An adapter folder on disk: checked before it is loaded, with a manifest of what was saved.

``SURAdapter.save_pretrained`` writes diffusers' layout (config.json and the weights in
safetensors) plus ``MANIFEST``, the size and SHA-256 of each of those files
(``write_manifest``). ``SURAdapter.from_pretrained`` checks a local folder first
(``check_adapter_folder``: present, complete and as saved), turns the loader's errors into one
``AdapterError`` that names the folder (``loading_errors``) and refuses weights that are not
finite (``refuse_non_finite``). Every error here is an ``AdapterError``, a ``UsageError``
(exit status 2 with a one-line message on the command line, ``sur_lib.infra.cli``).
"""
from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

import torch

from .checkpoints import sha256
from .cli import UsageError
from .fileio import atomic_write_text

WEIGHTS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
MANIFEST = "sur_manifest.json"  # {"files": {name: {"size", "sha256"}}}, written by save_pretrained


class AdapterError(UsageError):
    """An adapter folder that cannot be trusted or loaded (names the folder and the file)."""


def write_manifest(folder: str | os.PathLike) -> Path:
    """``MANIFEST`` in ``folder``: the size and SHA-256 of its config.json and weights file."""
    folder = Path(folder)
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name in ("config.json", *WEIGHTS_FILES)}
    return atomic_write_text(folder / MANIFEST, json.dumps({"files": files}, indent=1) + "\n")


def check_adapter_folder(folder: str | os.PathLike) -> Path:
    """The adapter folder ``folder``, checked before anything is loaded from it: it exists,
    holds config.json and a weights file, and every file its manifest lists (``MANIFEST``,
    written by ``SURAdapter.save_pretrained``) has the size and SHA-256 it was saved with.
    Folders written before manifests existed are accepted without the digest check."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise AdapterError(f"adapter folder {folder} not found (an adapter is loaded from a local "
                           "folder written by save_pretrained; for a Hub repo id pass "
                           "local_files_only=False)")
    if not folder.is_dir():
        raise AdapterError(f"{folder} is a file: an adapter is a folder (config.json + weights)")
    if not (folder / "config.json").is_file():
        raise AdapterError(f"{folder} holds no config.json: not an adapter folder")
    if not any((folder / w).is_file() for w in WEIGHTS_FILES):
        raise AdapterError(f"{folder} holds no adapter weights ({WEIGHTS_FILES[0]} missing): an "
                           "incomplete copy or export?")
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
            assert isinstance(files, dict)
        except Exception:  # noqa: BLE001 - any failure: the manifest is damaged
            raise AdapterError(f"{manifest} is damaged (expected {{\"files\": {{name: {{size, sha256}}}}}})") from None
        for name, want in files.items():
            p = folder / name
            if not p.is_file():
                raise AdapterError(f"{p} is missing (listed in {MANIFEST})")
            if p.stat().st_size != want.get("size") or sha256(p) != want.get("sha256"):
                raise AdapterError(f"{p} differs from what was saved (size or SHA-256 does not match "
                                   f"{MANIFEST}): a damaged or edited copy; export the adapter again")
    return folder


@contextmanager
def loading_errors(name: str):
    """Around diffusers' loader: its errors become one ``AdapterError`` naming the folder
    ``name`` (weights that do not fit the folder's config.json say which tensor and shapes)."""
    try:
        yield
    except (RuntimeError, ValueError, OSError) as e:
        if isinstance(e, AdapterError):
            raise
        text = str(e)
        if "size mismatch" in text or "ignore_mismatched_sizes" in text or "expected shape" in text:
            m = re.search(r"(\S+) expected shape torch\.Size\((\[[^\]]*\])\), but got "
                          r"torch\.Size\((\[[^\]]*\])\)", text)
            detail = (f"{m.group(1)} is {m.group(3)} in the weights file, {m.group(2)} for its "
                      "config.json" if m else "the tensor shapes differ")
            raise AdapterError(f"{name}: the weights do not fit the folder's config.json ({detail}): "
                               "an adapter of another width? Keep the config.json saved with these "
                               "weights") from None
        raise AdapterError(f"cannot load the adapter {name}: {type(e).__name__}: "
                           f"{text.splitlines()[0][:300] if text else ''}") from e


def refuse_non_finite(model: torch.nn.Module, name: str) -> None:
    """An ``AdapterError`` if a floating-point tensor of ``model``'s state dict holds NaN or inf."""
    bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise AdapterError(f"{name}: the adapter's weights are not finite (NaN or inf in "
                           f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): refused")
