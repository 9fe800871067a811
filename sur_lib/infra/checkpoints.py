"""Checkpoints on disk: verified before they are trusted, pruned without losing the last good one,
and optimizer states stored without pickle.

A training checkpoint is a folder ``checkpoints/step-NNNNNN`` holding the files of a training
state and a ``state.json`` with the step, the config and a *manifest*: the size and SHA-256 of
every other file, written when the checkpoint is saved, and ``finite`` (whether every weight
was a finite number). ``verify`` checks a folder against it, so a checkpoint that was truncated
or edited after it was written is recognised (and named, with the file and why) instead of
failing deep inside a loader; ``newest_intact`` walks back to the newest checkpoint that
passes. Checkpoints written before manifests existed are checked by structure: their
safetensors headers must parse and cover the file, and their torch zip files must pass the
zip CRC check, without unpickling anything.

``save_state_dict`` / ``load_state_dict`` store a nested state dict (an optimizer's, an LR
scheduler's) as ``NAME.safetensors`` (every tensor) + ``NAME.json`` (everything else), so
loading a state never runs code (a pickle can: unpickling may call any function).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import torch

PREFIX = "step-"
STATE_FILE = "state.json"


# ----------------------------------------------------------------------------- listing


def scan(root: str | os.PathLike) -> tuple[list[tuple[int, Path]], list[tuple[Path, str]]]:
    """(checkpoints, skipped) under ``root``: [(step, folder)] sorted by step, for every
    ``step-N`` folder with a state.json; and [(path, why)] for ``step-*`` entries that are not
    checkpoints (a name whose suffix is not a number, a file, no state.json)."""
    root = Path(root)
    found, skipped = [], []
    if not root.is_dir():
        return found, skipped
    for p in sorted(root.iterdir()):
        if not p.name.startswith(PREFIX):
            continue  # temporary folders (hidden names) and anything else
        suffix = p.name[len(PREFIX):]
        if not suffix.isdigit():
            skipped.append((p, f"{p.name!r} is not step-<number>"))
        elif not p.is_dir():
            skipped.append((p, "not a folder"))
        elif not (p / STATE_FILE).is_file():
            skipped.append((p, f"no {STATE_FILE} (not a complete checkpoint)"))
        else:
            found.append((int(suffix), p))
    return sorted(found), skipped


# ----------------------------------------------------------------------------- manifests


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def manifest(folder: str | os.PathLike) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of every file under ``folder`` but state.json."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != STATE_FILE}


def read_state(folder: str | os.PathLike) -> dict:
    """state.json of a checkpoint (ValueError if it is not a JSON object)."""
    path = Path(folder) / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{STATE_FILE} unreadable ({type(e).__name__}: {e})") from None
    except RecursionError:
        raise ValueError(f"{STATE_FILE} is damaged (nested too deeply to be a checkpoint's state)") from None
    if not isinstance(state, dict):
        raise ValueError(f"{STATE_FILE} is not a JSON object")
    return state


def _structural_problem(path: Path) -> str | None:
    """Why a file without a manifest entry cannot be trusted (None: it looks whole)."""
    try:
        if path.suffix == ".safetensors":  # 8-byte header length, JSON header, then the data
            size = path.stat().st_size
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if n <= 0 or 8 + n > size:
                    return f"{size} bytes, too short for its header"
                header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                      default=0)
            if 8 + n + end != size:
                return f"{size} bytes, the header says {8 + n + end} (truncated)"
        elif path.suffix in (".bin", ".pt", ".pkl", ".pth"):
            if not zipfile.is_zipfile(path):
                return "not a complete torch zip file"
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
                if bad is not None:
                    return f"CRC error in {bad}"
    except Exception as e:  # noqa: BLE001 - any failure means: not trustworthy
        return f"{type(e).__name__}: {e}"
    return None


def _missing(folder: Path, required, files) -> str | None:
    """The first file of ``required`` that is neither in ``folder`` nor in its manifest
    ``files`` (None: all there). ``required`` may list alternatives (a tuple of tuples, one per
    format): None as soon as one of them is complete, else the first format's missing file."""
    formats = required if required and not isinstance(required[0], str) else (required,)
    first = None
    for names in formats:
        gone = next((rel for rel in names if not (folder / rel).is_file()
                     and not (files and rel in files)), None)
        if gone is None:
            return None
        first = first or gone
    return first


def verify(folder: str | os.PathLike, required: tuple = ()) -> str | None:
    """None if the checkpoint in ``folder`` is intact, else the reason (naming the file).

    ``required``: the files a complete checkpoint holds, or a tuple of such tuples (formats,
    one of which must be complete). With a manifest in state.json: those files, and every
    listed file present with its size and SHA-256, and ``finite`` not false. Without one
    (older checkpoints): the required files present and every safetensors / torch zip file
    structurally whole."""
    folder = Path(folder)
    try:
        state = read_state(folder)
    except ValueError as e:
        return str(e)
    if state.get("finite") is False:
        return "its weights are not finite (NaN or inf)"
    files = state.get("files")
    missing = _missing(folder, required, files)
    if missing is not None:
        return f"{missing} missing"
    if isinstance(files, dict):
        for rel, want in files.items():
            p = folder / rel
            if not p.is_file():
                return f"{rel} missing"
            size = p.stat().st_size
            if size != want.get("size"):
                return f"{rel} is {size} bytes, {want.get('size')} when saved (truncated or changed)"
            if sha256(p) != want.get("sha256"):
                return f"{rel} differs from what was saved (SHA-256 mismatch)"
        return None
    for p in sorted(folder.rglob("*")):
        if p.is_file() and (problem := _structural_problem(p)):
            return f"{p.relative_to(folder).as_posix()}: {problem}"
    return None


def newest_intact(root: str | os.PathLike, required: tuple = ()):
    """((step, folder) of the newest intact checkpoint or None, notes): the notes say which
    entries were skipped or found damaged, and why (one line each)."""
    found, skipped = scan(root)
    notes = [f"skipping {p.name}: {why}" for p, why in skipped]
    for step, path in reversed(found):
        problem = verify(path, required)
        if problem is None:
            return (step, path), notes
        notes.append(f"checkpoint {path.name} is damaged ({problem}); trying an older one")
    return None, notes


def prune(root: str | os.PathLike, keep: int, required: tuple = (),
          trusted: str | os.PathLike | None = None) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints, never the newest intact one (if the
    newest ones are damaged or hold NaN weights, the last good one stays). ``trusted``: a
    checkpoint known to be good (just written with finite weights), not re-hashed. Returns
    what was deleted."""
    found, _ = scan(root)
    doomed = [p for _, p in found[:-keep]] if keep > 0 else [p for _, p in found]
    good = None
    for _, path in reversed(found):
        if (trusted is not None and path == Path(trusted)) or verify(path, required) is None:
            good = path
            break
    if good is not None and good in doomed:
        doomed.remove(good)
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def all_finite(module: torch.nn.Module) -> bool:
    """Whether every parameter and buffer of ``module`` is finite."""
    tensors = list(module.parameters()) + list(module.buffers())
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


# ----------------------------------------------------------------------------- state dicts


def _encode(obj, tensors: dict, key: str):
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        items = [[k, _encode(v, tensors, f"{key}.{k}")] for k, v in obj.items()]
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return dict(items)
        if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in obj):
            raise TypeError(f"{key}: cannot store dict keys {list(obj)!r}")
        return {"__items__": items}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{key}: cannot store a {type(obj).__name__} without pickle")


def _decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if set(obj) == {"__items__"}:
            return {k: _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def save_state_dict(state: dict, folder: str | os.PathLike, name: str) -> list[Path]:
    """Write ``state`` (nested dicts/lists/tuples of tensors and plain values) as
    ``folder/NAME.safetensors`` + ``folder/NAME.json``; returns the two paths."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    doc = _encode(state, tensors, name)
    st, js = folder / f"{name}.safetensors", folder / f"{name}.json"
    save_file(tensors, str(st))
    js.write_text(json.dumps(doc, indent=None, allow_nan=True) + "\n", encoding="utf-8")
    return [st, js]


def load_state_dict(folder: str | os.PathLike, name: str) -> dict:
    """Read what ``save_state_dict`` wrote (no pickle involved)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    tensors = load_file(str(folder / f"{name}.safetensors"))
    doc = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
    return _decode(doc, tensors)
