"""Small shared file mechanisms: atomic writes of files and folders, JSON results.

Every write that replaces a file or a folder goes through here, so a kill at any moment
leaves either the old version or the complete new one, never half of either:

* ``atomic_write_text`` / ``atomic_write_bytes``: a temporary file in the same folder,
  flushed and fsynced, then ``os.replace``d over the target (atomic on POSIX and Windows);
* ``atomic_folder``: a context manager that yields a temporary sibling folder to fill, and
  renames it over the target only when the block ends without an exception;
* ``clean_json`` / ``write_json``: plain JSON (tuples as lists, numpy scalars as Python
  numbers, NaN/inf as null) written atomically;
* ``folder_lock``: an exclusive lock on a folder (a run's output_dir) held while a process
  works in it; the operating system releases it when the process ends, however it ends;
* ``clean_stale_temps``: remove the temporary copies (``.NAME.XXXX.tmp``) that a killed
  process left, only those whose writer is gone;
* a full disk (or quota) names the file being written (``naming_file``);
* ``sur_cache_dir``: the root of sur_lib's caches of derived files (``$SUR_CACHE``).
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np


NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG)


def sur_cache_dir() -> Path:
    """Root folder of sur_lib's caches (the rebuilt CLIP tokenizer, an LLM's fp32 copy, the
    web demo's images): ``$SUR_CACHE`` if set, else ``~/.cache/sur_lib``."""
    root = os.environ.get("SUR_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "sur_lib"


@contextlib.contextmanager
def naming_file(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise an OSError of a full disk (ENOSPC, EDQUOT, EFBIG) that names no file (a write
    through an open file, a library's own message) as one that names ``path``."""
    try:
        yield
    except OSError as e:
        if e.errno in NO_SPACE and not e.filename:
            raise OSError(e.errno, f"{os.strerror(e.errno)} while writing {path} "
                                   "(free some space, or write elsewhere)", str(path)) from e
        raise
    except Exception as e:  # torch and safetensors wrap write errors in their own types
        text = str(e)
        if any(s in text for s in ("No space left", "StorageFull", "file write failed", "unexpected pos")):
            raise OSError(errno.ENOSPC, f"could not write {path} (the disk is full?): "
                                        f"{text.splitlines()[0][:200]}", str(path)) from e
        raise


def _tmp_name(path: Path) -> str:
    """The prefix of a temporary sibling of ``path``: ``.NAME.<pid>-`` (the pid says whether
    the writer still lives, see ``clean_stale_temps``)."""
    return f".{path.name}.{os.getpid()}-"


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + rename)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"{path} is a folder: expected a file name to write",
                                str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_name(path), suffix=".tmp", dir=path.parent)
    try:
        with naming_file(path), os.fdopen(fd, "wb") as f:
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
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_name(path), suffix=".tmp", dir=path.parent))
    try:
        with naming_file(path):
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


def read_json(path: str | os.PathLike, what: str = "JSON file"):
    """The JSON document in ``path``; a file that is not readable JSON (damaged, not UTF-8,
    nested too deeply for Python to read) is a ``cli.UsageError`` that names it."""
    from .cli import UsageError

    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{what} {path} is damaged or unreadable ({type(e).__name__}: "
                         f"{str(e)[:200]})") from None
    except RecursionError:
        raise UsageError(f"{what} {path} is damaged (nested too deeply to be read)") from None


def write_json(doc, path: str | os.PathLike, indent: int | None = 1) -> Path:
    """Write ``clean_json(doc)`` to ``path`` atomically: a reader never sees half a result."""
    return atomic_write_text(path, json.dumps(clean_json(doc), indent=indent) + "\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: treat as alive
    return True


def clean_stale_temps(folder: str | os.PathLike, name: str) -> list[Path]:
    """Remove the temporary siblings of ``folder/name`` left by processes that are gone (a
    SIGKILL during ``atomic_write_*``/``atomic_folder``): files or folders ``.NAME.<pid>-XXXX.tmp``
    whose pid is not a running process. Temporaries of a live process, and those of the
    older naming without a pid (``.NAME.XXXX.tmp``) unless older than an hour, are left alone.
    Returns what was removed."""
    import re
    import time

    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(name)}\.(?:(\d+)-)?[^/]*\.tmp$")
    removed = []
    for p in folder.iterdir():
        m = pattern.match(p.name)
        if not m:
            continue
        if m.group(1) is not None:
            if int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
                continue
        else:
            try:
                if time.time() - p.lstat().st_mtime < 3600:
                    continue
            except OSError:
                continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        removed.append(p)
    return removed


class FolderLocked(Exception):
    """``folder_lock``: another process holds the folder's lock (``pid``: its process id, if known)."""

    def __init__(self, folder: Path, pid: int | None):
        super().__init__(f"{folder} is locked by process {pid}")
        self.folder, self.pid = folder, pid


LOCK_NAME = ".lock"


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, lock_file: str | os.PathLike | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` for the block, waiting (a blocking ``flock``,
    no polling) while another process holds it: for a read-modify-write of a file that several
    processes extend. The lock is held on ``lock_file``; by default it is not put beside
    ``path`` (a user's run folder stays as it was) but in ``sur_cache_dir()/locks``, named by a
    hash of ``path``'s absolute name. It dies with its process. Where ``fcntl`` is missing
    (Windows) the block runs unlocked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    if lock_file is None:
        import hashlib

        name = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:16]
        lock_file = sur_cache_dir() / "locks" / f"{name}.lock"
    lock = Path(lock_file)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (the file ``folder/.lock``, ``flock``) for the
    block; raise :class:`FolderLocked` at once if another process (or another open of the same
    lock in this one) holds it. The lock dies with its process, so a killed run never leaves a
    stale one. Where ``fcntl`` is missing (Windows) the block runs unlocked."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield folder
        return
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = int(os.pread(fd, 32, 0).decode().split()[0])
            except (ValueError, IndexError, OSError):
                pid = None
            raise FolderLocked(folder, pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield folder
    finally:
        os.close(fd)  # releases the lock
