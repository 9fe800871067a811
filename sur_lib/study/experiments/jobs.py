"""Several jobs side by side on one long experiment (one torch thread each, two on 2 cores).

A long experiment is a list of *units* (an adapter to train and judge, a prompt set to draw)
whose results go into one partial results file. Jobs that run side by side share it:

* ``claim(path, name)``: a non-blocking ``flock`` on a file named after the unit. A job works
  on a unit only while it holds the claim; the lock goes with the process, so a killed job
  leaves no stale claim and the unit is simply picked up again (resuming from its checkpoint).
* ``locked(path)``: an exclusive lock held while a job reads what the others wrote
  (``merge``) and writes the file back, so that no job overwrites another's results.
* ``add_job_time``: the file's ``wall_time_s`` is the sum of every job's time.
* ``run_unit``: the three together for one unit (take in, claim, work, store, write).

``convergence``, ``tune`` and ``retest`` use it; the lock and claim files sit beside the
partial file (``<file>.lock``, ``<file>.claims/``) and are not committed.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
from pathlib import Path
from typing import Callable, Iterable

from sur_lib.infra.fileio import write_json


@contextlib.contextmanager
def locked(path: Path):
    """Hold an exclusive lock on ``path``.lock (POSIX ``flock``; released if the process dies)."""
    lock = Path(path).with_name(Path(path).name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def claim(path: Path, name: str):
    """An open file holding a non-blocking lock for unit ``name`` of the partial file ``path``,
    or None if another job holds it now. Close it (or let the process end) to release it."""
    path = Path(path)
    f_name = name.replace("/", "__") + ".lock"
    lock = path.parent / (path.name + ".claims") / f_name
    lock.parent.mkdir(parents=True, exist_ok=True)
    f = open(lock, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def read(path: Path) -> dict:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}


def merge(partial: dict, path: Path, keys: Iterable[str] = (), scalars: Iterable[str] = ()) -> dict:
    """Add to ``partial`` what other jobs wrote to ``path`` since we read it: the entries of each
    dict under ``keys`` that ``partial`` lacks, each key of ``scalars`` that it lacks, and the
    file's ``wall_time_s`` (the sum of the jobs' times, which only ``add_job_time`` raises).
    Nothing is taken from a file made with other ``settings`` (when ``partial`` has them)."""
    disk = read(path)
    if "settings" in partial and disk.get("settings") != partial["settings"]:
        return partial
    for key in keys:
        for k, v in disk.get(key, {}).items():
            partial.setdefault(key, {}).setdefault(k, v)
    for key in scalars:
        if key in disk and key not in partial:
            partial[key] = disk[key]
    if "wall_time_s" in disk:  # the job-time sum so far: a write must not undo another job's
        partial["wall_time_s"] = disk["wall_time_s"]
    return partial


def add_job_time(partial: dict, path: Path, seconds: float) -> float:
    """``partial["wall_time_s"]`` = the file's sum so far + this job's ``seconds`` (call under
    ``locked``, then write ``partial``); returns the new sum."""
    disk = read(path)
    before = disk.get("wall_time_s", 0.0) if disk.get("settings") == partial.get("settings") else 0.0
    partial["wall_time_s"] = round(before + seconds, 1)
    return partial["wall_time_s"]


def run_unit(partial: dict, path: Path, sync: Callable[[], object], store: dict, key: str,
             claim_name: str, work: Callable[[], object]) -> bool:
    """One unit of a long experiment: take in what the other job wrote (``sync``, under the
    lock); if ``key`` is not in ``store`` yet and no other job holds ``claim_name``, run
    ``work()``, then, under the lock, sync again, store the result as ``store[key]`` and write
    ``partial`` to ``path``. Returns whether this job did the unit."""
    with locked(path):
        sync()
    if key in store:
        return False
    held = claim(path, claim_name)
    if held is None:
        return False
    try:
        result = work()
        with locked(path):
            sync()
            store[key] = result
            write_json(partial, path)
    finally:
        held.close()
    return True
