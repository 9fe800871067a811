"""A SURD folder's files: ``metadata.jsonl`` and the images, read and checked row by row;
``metadata.jsonl`` written; the real SURD found and downloaded from the Hugging Face Hub.

The layout is the authors' "imagefolder": one folder holding the image files and a
``metadata.jsonl`` with one JSON object per line::

    {"file_name": "<name>.png", "text": "<simple prompt>", "prompt": "<complex prompt>"}

:func:`read_surd` checks every row (valid UTF-8 JSON object, the three keys, non-empty
strings, a file name that stays inside the folder, symbolic links included, an image PIL can
read, and a finite 1-D knowledge vector of one width for the simple prompt when knowledge is
given), so a broken file fails before training starts, with the metadata path, the 1-based line
number and the file name in the message (:class:`SURDError`). ``on_error="skip"`` drops bad
rows instead and records why in a :class:`SURDReport`. ``sur_lib.data.SURDDataset`` is the
dataset built on the rows it returns.
"""
from __future__ import annotations

import json
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple

import numpy as np
import torch
from PIL import Image

from .cli import UsageError
from .fileio import atomic_write_text

METADATA_NAME = "metadata.jsonl"
REQUIRED_KEYS = ("file_name", "text", "prompt")


class Reason:
    """The short reasons used in ``SURDReport.counts`` (one per kind of problem)."""

    BAD_JSON = "invalid JSON"
    NOT_OBJECT = "row is not a JSON object"
    MISSING_KEY = "missing key"
    BAD_FILE_NAME = "file_name is not a non-empty string"
    OUTSIDE = "file_name points outside the dataset folder"
    BAD_TEXT = "simple prompt (text) empty or not a string"
    BAD_PROMPT = "complex prompt (prompt) empty or not a string"
    MISSING_FILE = "image file not found"
    BAD_IMAGE = "unreadable image"
    NO_KNOWLEDGE = "no knowledge vector for the simple prompt"
    KNOWLEDGE_NOT_1D = "knowledge vector not 1-D"
    KNOWLEDGE_WIDTH = "knowledge vector has the wrong width"
    KNOWLEDGE_NONFINITE = "knowledge vector has NaN or inf"


class SURDError(UsageError):
    """A problem in a SURD folder, located by metadata path, line and file name.

    Attributes: ``path`` (metadata file or folder), ``line`` (1-based, or None),
    ``file_name`` (or None), ``reason`` (one of ``Reason``), ``detail`` (free text).
    """

    def __init__(self, path, reason: str, line: int | None = None,
                 file_name: str | None = None, detail: str = ""):
        self.path = str(path)
        self.line = line
        self.file_name = file_name
        self.reason = reason
        self.detail = detail
        where = self.path
        if line is not None:
            where += f" line {line}"
        if file_name is not None:
            where += f" (file {file_name!r})"
        msg = f"{where}: {reason}"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


@dataclass
class SURDReport:
    """What validation found. ``n_lines`` counts non-blank lines of metadata.jsonl that were
    examined (with ``max_samples``, reading stops early); ``skipped`` holds
    (line, file_name or "", reason) for each dropped row, ``messages`` the full error text.
    ``duplicates`` holds (line, first line, file_name) for each kept row that repeats an
    earlier row exactly (same file_name, text and prompt): such rows are kept, as the data
    says, but counted, since they weigh that example twice."""

    path: str = ""
    n_lines: int = 0
    n_ok: int = 0
    skipped: list[tuple[int, str, str]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    duplicates: list[tuple[int, int, str]] = field(default_factory=list)

    def add(self, err: SURDError) -> None:
        self.skipped.append((err.line or 0, err.file_name or "", err.reason))
        self.counts[err.reason] = self.counts.get(err.reason, 0) + 1
        self.messages.append(str(err))

    def __str__(self) -> str:
        s = f"{self.path}: {self.n_ok} of {self.n_lines} rows usable"
        if self.skipped:
            parts = ", ".join(f"{n} {r}" for r, n in Counter(self.counts).most_common())
            s += f", {len(self.skipped)} skipped ({parts})"
        if self.duplicates:
            s += (f", {len(self.duplicates)} duplicate rows kept (same file_name, text and prompt "
                  f"as an earlier row; first at line {self.duplicates[0][0]}, "
                  f"a copy of line {self.duplicates[0][1]})")
        return s


def check_image(path: Path, full: bool) -> None:
    """Raise (any exception) if PIL cannot read the image. ``verify()`` checks the header and,
    for PNG, every chunk's CRC up to IEND (so truncated PNGs fail); it does not decode JPEG
    data, so ``full`` also decodes the pixels."""
    with Image.open(path) as im:
        im.verify()
    if full:
        with Image.open(path) as im:
            im.load()


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB of any PIL image. 16-bit and 32-bit integer grayscale (``I;16*``, ``I``: a
    16-bit PNG) are scaled from 0..65535 to 0..255 first: PIL's ``convert("RGB")`` clips them
    at 255, which turns almost every pixel white; floating-point grayscale (``F``) is read as
    0..1 if its values lie there, else as 0..255."""
    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        scale = 255.0 if np.nanmax(a) <= 1.0 else 1.0
        img = Image.fromarray(np.clip(np.rint(np.nan_to_num(a) * scale), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


# ---------------------------------------------------------------- reading and checking
class SURDRows(NamedTuple):
    """What :func:`read_surd` found: the kept rows, the 1-based line of each in metadata.jsonl,
    the report and the knowledge vectors' width (given or inferred; None without knowledge)."""

    rows: list[dict[str, Any]]
    lines: list[int]
    report: SURDReport
    knowledge_dim: int | None


def read_surd(root, knowledge: Mapping[str, Any] | None = None, knowledge_dim: int | None = None,
              on_error: str = "raise", check_images: bool | str = True,
              max_samples: int | None = None) -> SURDRows:
    """Read ``root/metadata.jsonl`` and check every row (see the module's docstring).

    ``knowledge``: optional {simple prompt: 1-D vector}; every row's ``text`` must have one, of
    width ``knowledge_dim`` (if None, the first row's width). ``on_error``: "raise" (the first
    problem raises :class:`SURDError`) or "skip" (bad rows dropped, counted in the report and
    summarised in one warning). ``check_images``: ``verify()`` every image; "full" also decodes
    it (catches truncated JPEGs; slower); False only checks that the file exists.
    ``max_samples``: stop after this many valid rows. No usable row is an error either way.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    if check_images not in (True, False, "full"):
        raise ValueError(f"check_images must be True, False or 'full', not {check_images!r}")
    root = Path(root)
    meta = root / METADATA_NAME
    if not root.is_dir():
        raise SURDError(root, "dataset folder not found",
                        detail="expected a folder with metadata.jsonl and the images")
    if not meta.is_file():
        raise SURDError(meta, "metadata file not found",
                        detail="a SURD folder needs metadata.jsonl with one "
                               '{"file_name", "text", "prompt"} object per line')
    widths = _KnowledgeCheck(knowledge, knowledge_dim)
    rows, lines, report = [], [], SURDReport(path=str(meta))
    with open(meta, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if max_samples is not None and len(rows) >= max_samples:
                break
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark
                raw = raw[3:]
            if not raw.strip():
                continue  # blank lines are allowed
            report.n_lines += 1
            try:
                row = _check_row(root, meta, lineno, raw, check_images, widths)
            except SURDError as err:
                if on_error == "raise":
                    raise
                report.add(err)
                continue
            rows.append(row)
            lines.append(lineno)
    report.n_ok = len(rows)
    first: dict[tuple, int] = {}
    for row, lineno in zip(rows, lines):
        key = (row["file_name"], row["text"], row["prompt"])
        if key in first:
            report.duplicates.append((lineno, first[key], row["file_name"]))
        else:
            first[key] = lineno

    if report.skipped or report.duplicates:  # stacklevel 3: whoever built the SURDDataset
        warnings.warn(f"SURD: {report} (see the dataset's .report)", stacklevel=3)
    if not rows:
        detail = "no usable rows"
        if report.skipped:
            detail += f" ({len(report.skipped)} skipped: {report.counts})"
        raise SURDError(meta, "dataset is empty", detail=detail)
    return SURDRows(rows, lines, report, widths.dim)


def _check_row(root: Path, meta: Path, lineno: int, raw: bytes, check_images,
               widths: _KnowledgeCheck) -> dict[str, Any]:
    def fail(reason, file_name=None, detail=""):
        return SURDError(meta, reason, lineno, file_name, detail)

    try:
        row = json.loads(raw.rstrip(b"\r\n").decode("utf-8"))
    except UnicodeDecodeError as e:
        raise fail(Reason.BAD_JSON,
                   detail=f"not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise fail(Reason.BAD_JSON, detail=f"{e.msg} at column {e.colno}") from None
    if not isinstance(row, dict):
        raise fail(Reason.NOT_OBJECT, detail=f"got {type(row).__name__}")

    fn = row.get("file_name")
    known_fn = fn if isinstance(fn, str) else None
    missing = [k for k in REQUIRED_KEYS if k not in row]
    if missing:
        raise fail(Reason.MISSING_KEY, known_fn,
                   f"{', '.join(map(repr, missing))} (need {', '.join(REQUIRED_KEYS)})")
    if not isinstance(fn, str) or not fn.strip():
        raise fail(Reason.BAD_FILE_NAME, detail=f"got {fn!r}")
    for key, reason in (("text", Reason.BAD_TEXT), ("prompt", Reason.BAD_PROMPT)):
        v = row[key]
        if not isinstance(v, str):
            raise fail(reason, fn, f"got {type(v).__name__} {v!r}")
        if not v.strip():
            raise fail(reason, fn, f"got {v!r}")

    parts = Path(fn.replace("\\", "/")).parts
    if fn.startswith(("/", "\\")) or Path(fn).is_absolute() or ".." in parts or (
            len(fn) > 1 and fn[1] == ":" and fn[0].isalpha()):
        raise fail(Reason.OUTSIDE, fn, "file names must be relative to the dataset folder, "
                                       "without '..' or a drive")
    path = root / fn
    try:  # a symbolic link (the file's or a folder's on its way) may not lead outside either
        target = path.resolve()
        inside = target.is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        target, inside = "a loop of symbolic links", False
    if not inside:
        raise fail(Reason.OUTSIDE, fn, f"a symbolic link leads to {str(target)!r}, outside "
                                       "the dataset folder (copy the file in instead)")
    if not path.is_file():
        detail = f"no file {str(path)!r}"
        if not Path(fn).suffix:
            detail += (" - file_name has no extension (the authors' scraper dropped"
                       " extensions; write the full name into metadata.jsonl)")
            others = sorted(p.name for p in path.parent.glob(f"{Path(fn).name}.*"))[:3]
            if others:
                detail += f"; present: {', '.join(others)}"
        raise fail(Reason.MISSING_FILE, fn, detail)
    if check_images:
        try:
            check_image(path, full=check_images == "full")
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
            raise fail(Reason.BAD_IMAGE, fn, f"{type(e).__name__}: {e}") from None

    if widths.knowledge is not None:
        widths.check(row["text"], fn, fail, lineno)
    return row


class _KnowledgeCheck:
    """Each row's knowledge vector: present, 1-D, finite, and all of one width (``dim``, given or
    taken from the first row, whose line ``dim_line`` names in the error)."""

    def __init__(self, knowledge: Mapping[str, Any] | None, dim: int | None):
        self.knowledge = knowledge
        self.dim = None if dim is None else int(dim)
        self.dim_line: int | None = None

    def check(self, text: str, fn: str, fail, lineno: int) -> None:
        if text not in self.knowledge:
            raise fail(Reason.NO_KNOWLEDGE, fn, f"text {text!r} is not a key of the knowledge "
                                                "mapping (keys must match exactly)")
        v = self.knowledge[text]
        if not isinstance(v, torch.Tensor):
            try:
                v = torch.as_tensor(v)
            except Exception as e:
                raise fail(Reason.KNOWLEDGE_NOT_1D, fn, f"not a tensor: {e}") from None
        if v.dim() != 1:
            raise fail(Reason.KNOWLEDGE_NOT_1D, fn, f"shape {tuple(v.shape)}")
        if self.dim is None:
            self.dim = int(v.shape[0])
            self.dim_line = lineno
        if v.shape[0] != self.dim:
            src = (f"inferred from line {self.dim_line}"
                   if self.dim_line is not None else "knowledge_dim")
            raise fail(Reason.KNOWLEDGE_WIDTH, fn,
                       f"width {v.shape[0]}, expected {self.dim} ({src})")
        if not bool(torch.isfinite(v).all()):
            raise fail(Reason.KNOWLEDGE_NONFINITE, fn)


# ---------------------------------------------------------------- writing, the Hub copy
def write_metadata(root, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``root/metadata.jsonl`` (UTF-8, one object per line, non-ASCII kept as is).

    Each row needs file_name, text and prompt; these come first, other keys follow.
    Creates ``root`` if needed and returns the file's path.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / METADATA_NAME
    lines = []
    for i, row in enumerate(rows):
        missing = [k for k in REQUIRED_KEYS if k not in row]
        if missing:
            raise ValueError(f"row {i} lacks {', '.join(missing)}: {dict(row)!r}")
        ordered = {k: row[k] for k in REQUIRED_KEYS}
        ordered.update({k: v for k, v in row.items() if k not in ordered})
        lines.append(json.dumps(ordered, ensure_ascii=False))
    return atomic_write_text(path, "".join(line + "\n" for line in lines))


def find_metadata_folder(base: Path, split: str) -> Path:
    """The folder under ``base`` holding metadata.jsonl (the one named after ``split`` if there
    are several)."""
    found = sorted(p.parent for p in base.rglob(METADATA_NAME))
    if not found:
        raise RuntimeError(f"no {METADATA_NAME} under the downloaded dataset {base}")
    if len(found) == 1:
        return found[0]
    for p in found:
        if p.name == split or split in p.relative_to(base).parts:
            return p
    raise RuntimeError(f"several {METADATA_NAME} under {base} and none for split {split!r}: "
                       + ", ".join(str(p.relative_to(base)) for p in found))


def download_surd(repo_id: str = "zhongshsh/SURD", split: str = "train") -> Path:
    """Download the real SURD from the Hugging Face Hub and return the folder with its
    metadata.jsonl (see :func:`find_metadata_folder`).

    The dataset is gated: accept its terms on the Hub, run ``huggingface-cli login`` and have
    network access.
    """
    url = f"https://huggingface.co/datasets/{repo_id}"
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise RuntimeError("load_surd_hub needs huggingface_hub: pip install 'sur_lib[paper]'"
                           ) from e
    try:
        base = snapshot_download(repo_id, repo_type="dataset")
    except Exception as e:
        raise RuntimeError(
            f"could not download the SURD dataset {repo_id!r} from the Hugging Face Hub. "
            f"It is gated: accept its terms at {url}, run `huggingface-cli login`, and make "
            f"sure this machine has network access. ({type(e).__name__}: {e})") from e
    return find_metadata_folder(Path(base), split)
