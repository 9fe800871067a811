"""Sphinx extension: a chapter is read (so executed) again when a data file it read changes.

Sphinx re-reads a document when its source changes, and myst-nb executes a notebook when it
is read (``execute_notebooks: force``). A chapter that reads ``data/results/sur.json`` was
therefore not executed again after ``sur.json`` changed ("no targets are out of date"), and a
changed result could not fail a rebuild. This extension makes the files a chapter read, while
the build executed it, that chapter's dependencies:

- *which files*: those the chapter's kernel opened for reading under ``data/`` or the
  results folder. Before a chapter is executed, the extension sets ``SUR_BOOK_READS_LOG``;
  ``sur_lib.study.book.setup`` (every chapter's first cell) then records each such file in that log
  (``sur_lib.study.book.record_reads``), whatever code built its path (``sur_lib.study.claims``,
  ``f"{name}.json"``, a glob). Files opened outside Python (safetensors' native reader) are
  not seen;
- *when they changed*: Sphinx's own check (``env.note_dependency``: a file newer than the
  chapter's last read), plus a SHA-256 digest of each file taken after the run (``outdated``):
  a file replaced by one with an older time stamp (``cp -p``, ``rsync -t``, an unpacked
  archive) counts as changed too, and so does a file that disappeared.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

LOG_VARIABLE = "SUR_BOOK_READS_LOG"


def digest(path: Path) -> str | None:
    """SHA-256 of a file's bytes; None when it does not exist."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except (FileNotFoundError, IsADirectoryError):
        return None


def outdated(recorded: dict[str, dict[str, str | None]]) -> set[str]:
    """The documents whose recorded files (path -> digest after their last run) now have
    another digest, or are gone."""
    return {doc for doc, files in recorded.items()
            if any(digest(Path(p)) != d for p, d in files.items())}


def read_log(log: Path) -> list[Path]:
    """The files listed in a reads log (one path a line), each once, in order."""
    if not log.is_file():
        return []
    return [Path(p) for p in dict.fromkeys(log.read_text(encoding="utf-8").splitlines()) if p]


def _log_path(app, docname: str) -> Path:
    return Path(app.doctreedir) / "sur_book_reads" / f"{docname}.txt"


def start_log(app, docname: str) -> Path:
    """An empty reads log for ``docname`` (its path): the kernel given it in ``LOG_VARIABLE``
    writes the files the chapter reads there."""
    log = _log_path(app, docname)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)
    return log


def _start(app, docname, source):
    if docname in getattr(app, "sur_book_executed_ahead", ()):  # its kernel already ran, and
        os.environ.pop(LOG_VARIABLE, None)  # logged its reads (sur_book_execute)
        return
    os.environ[LOG_VARIABLE] = str(start_log(app, docname))  # the kernel myst-nb starts next inherits it


def _finish(app, doctree):
    docname = app.env.docname
    os.environ.pop(LOG_VARIABLE, None)
    files = read_log(_log_path(app, docname))
    for path in files:
        app.env.note_dependency(str(path))
    if not hasattr(app.env, "sur_book_reads"):
        app.env.sur_book_reads = {}
    app.env.sur_book_reads[docname] = {str(p): digest(p) for p in files}


def _outdated(app, env, added, changed, removed):
    return sorted(outdated(getattr(env, "sur_book_reads", {})) - set(removed))


def _purge(app, env, docname):
    getattr(env, "sur_book_reads", {}).pop(docname, None)


def _merge(app, env, docnames, other):
    if not hasattr(env, "sur_book_reads"):
        env.sur_book_reads = {}
    for doc in docnames:
        if doc in getattr(other, "sur_book_reads", {}):
            env.sur_book_reads[doc] = other.sur_book_reads[doc]


def setup(app):
    app.connect("source-read", _start)
    app.connect("doctree-read", _finish)
    app.connect("env-get-outdated", _outdated)
    app.connect("env-purge-doc", _purge)
    app.connect("env-merge-info", _merge)
    # serial reading only: the log variable names the one chapter being executed
    return {"parallel_read_safe": False, "parallel_write_safe": True, "env_version": 1}
