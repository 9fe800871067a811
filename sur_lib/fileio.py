"""Small shared file mechanisms: atomic writes of files and folders, JSON results.

Every write that replaces a file or a folder goes through here, so a kill at any moment
leaves either the old version or the complete new one, never half of either:

* ``atomic_write_text`` / ``atomic_write_bytes``: a temporary file in the same folder,
  flushed and fsynced, then ``os.replace``d over the target (atomic on POSIX and Windows);
* ``atomic_folder``: a context manager that yields a temporary sibling folder to fill, and
  renames it over the target only when the block ends without an exception;
* ``clean_json`` / ``write_json``: plain JSON (tuples as lists, numpy scalars as Python
  numbers, NaN/inf as null) written atomically.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, mode: int = 0o644) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Fill a temporary sibling of ``path``; on success it replaces ``path`` (any old folder
    is moved aside first and removed after the rename); on an exception it is removed and
    ``path`` is left as it was.

        with atomic_folder("data/models/x") as tmp:
            model.save_pretrained(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def clean_json(obj):
    """Plain JSON: tuples -> lists, numpy scalars -> Python, NaN/inf -> None, paths -> str."""
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(doc, path: str | os.PathLike, indent: int | None = 1) -> Path:
    """Write ``clean_json(doc)`` to ``path`` atomically: a reader never sees half a result."""
    return atomic_write_text(path, json.dumps(clean_json(doc), indent=indent) + "\n")
