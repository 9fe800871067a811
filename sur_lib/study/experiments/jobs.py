"""Several jobs side by side on one long experiment (one torch thread each, two on 2 cores).

A long experiment is a list of *units* (an adapter to judge, a variant to train and judge, a
prompt set to draw) whose results go into one partial results file. Any number of jobs may
work on it at once, and a job stopped anywhere is resumed by running it again:

* ``Unit``: one unit, its key in the partial file, the work that makes its result, and the
  name of its claim.
* ``run_units(partial, path, sync, units, deadline)``: the one loop: each unit that is not
  stored yet and that no other job holds is done, in order, until ``deadline`` (``Deadline``,
  from ``--max-minutes``). With ``wait=True`` a job then waits for the units other jobs hold
  (a blocking ``flock``: it proceeds the moment the claim is released, no polling) and does
  one itself only if its holder left it undone (the holder was killed).
* ``run_unit``: one unit: take in what the other jobs wrote (``sync``, under ``locked``),
  claim, take in again, work, and under the lock take in again, store and write the file.
* ``claim(path, name)``: an exclusive ``flock`` on a file named after the unit; non-blocking,
  or with ``wait`` blocking (``timeout`` bounds it). The lock goes with the process, so a
  killed job leaves no stale claim and its unit is picked up again (resuming from its
  checkpoint).
* ``locked(path)``: an exclusive lock held while a job reads what the others wrote
  (``merge``) and writes the file back, so that no job overwrites another's results.
* ``add_job_time``: the file's ``wall_time_s`` is the sum of every job's time.

Who uses it: ``convergence`` (its evaluation units; no waiting: a unit another job holds, or
whose adapter the training job has not stored yet, is left for a later run), ``tune`` (the
configurations and the final units, no waiting; a final unit waits for the claim on its
recipe's training), ``retest`` (the strong lambdas, the variants and the base units, with
waiting), ``ablations`` (its variants, with waiting; a variant of either is a
``runs.variant_unit``) and ``channel`` (its lambda, waited for, then its units). The lock and claim files
sit beside the partial file (``<file>.lock``, ``<file>.claims/``) and are not committed; the
partial files' contents are each experiment's own.
"""
from __future__ import annotations

import fcntl
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from sur_lib.infra.fileio import file_lock, write_json


class Deadline:
    """When a job stops taking new units: ``minutes`` from now (None: never). Checked between
    units; a unit that has started is finished."""

    def __init__(self, minutes: float | None):
        self.end = None if minutes is None else time.time() + 60 * minutes

    def passed(self) -> bool:
        return self.end is not None and time.time() > self.end

    def left(self) -> float | None:
        """Seconds left (None: no deadline)."""
        return None if self.end is None else max(0.0, self.end - time.time())


def locked(path: Path):
    """Hold an exclusive lock on ``path``.lock, beside the partial file (``fileio.file_lock``:
    a blocking ``flock``, released if the process dies)."""
    return file_lock(path, Path(path).with_name(Path(path).name + ".lock"))


def claim(path: Path, name: str, wait: bool = False, timeout: float | None = None):
    """An open file holding the lock of unit ``name`` of the partial file ``path``, or None if
    another job holds it. Close it (or let the process end) to release it. With ``wait``, block
    until the holder releases it (its unit done, or its process gone); ``timeout`` (seconds)
    bounds the wait, None on running out."""
    path = Path(path)
    f_name = name.replace("/", "__") + ".lock"
    lock = path.parent / (path.name + ".claims") / f_name
    lock.parent.mkdir(parents=True, exist_ok=True)
    f = open(lock, "a")
    if wait and timeout is None:
        fcntl.flock(f, fcntl.LOCK_EX)
        return f
    if wait:
        return f if _flock_within(f, timeout) else None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def _flock_within(f, timeout: float) -> bool:
    """Lock ``f`` if that happens within ``timeout`` seconds. ``flock`` has no timeout, so a
    helper thread blocks on it; if the time runs out first, the helper lets the lock go (closes
    ``f``) as soon as it gets it."""
    got, gate, late = threading.Event(), threading.Lock(), []

    def take():
        fcntl.flock(f, fcntl.LOCK_EX)
        with gate:
            if late:
                f.close()
            else:
                got.set()

    threading.Thread(target=take, daemon=True).start()
    if got.wait(timeout):
        return True
    with gate:
        if got.is_set():
            return True
        late.append(True)
    return False


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


@dataclass
class Unit:
    """One unit of a long experiment: done once ``key`` is in ``store`` (a dict inside the
    partial file, which ``sync`` keeps up to date); ``work()`` makes its result, stored as
    ``store[key]`` or by ``put(result)``. Units with the same ``claim`` (default: ``key``) are
    never worked on by two jobs at once."""

    key: str
    work: Callable[[], object]
    store: dict
    claim: str | None = None
    put: Callable[[object], None] | None = None


def run_unit(partial: dict, path: Path, sync: Callable[[], object], unit: Unit,
             wait: bool = False, deadline: Deadline | None = None) -> bool:
    """Do ``unit`` unless it is stored: claim it, take in what the other jobs wrote (``sync``,
    under the lock; one of them may have finished it meanwhile), run ``unit.work()``, then
    under the lock sync again, store the result and write ``partial`` to ``path``. A unit
    another job holds is left to it, or with ``wait`` waited for (until ``deadline``) and done
    only if that job left it unstored. Returns whether this job did the unit."""
    def stored() -> bool:
        with locked(path):
            sync()
        return unit.key in unit.store

    if stored():
        return False
    name = unit.claim or unit.key
    held = claim(path, name)
    if held is None and wait and not (deadline is not None and deadline.passed()):
        held = claim(path, name, wait=True, timeout=None if deadline is None else deadline.left())
    if held is None:
        return False
    try:
        if stored():
            return False
        result = unit.work()
        with locked(path):
            sync()
            if unit.put is not None:
                unit.put(result)
            else:
                unit.store[unit.key] = result
            write_json(partial, path)
    finally:
        held.close()
    return True


def run_units(partial: dict, path: Path, sync: Callable[[], object],
              units: Iterable[Unit] | Callable[[], Iterable[Unit]], deadline: Deadline,
              wait: bool = False) -> None:
    """Do, in order, each unit of ``units`` that is not stored yet and that no other job holds,
    until ``deadline``. ``units``: a list, or a function that lists them (called for each pass;
    a generator function decides on each unit when its turn comes, e.g. whether its input
    exists yet).

    With ``wait``, then wait for the first unit another job holds (``run_unit``'s ``wait``) and
    go over the units again, until a pass finds nothing to do and nothing held: a unit is
    listed again after its holder finished it, so units that the function lists only once
    another is stored (retest's strong-lambda variants) are done too."""
    while True:
        did, held = False, None
        for unit in (units() if callable(units) else units):
            if deadline.passed():
                return
            if run_unit(partial, path, sync, unit):
                did = True
            elif held is None and unit.key not in unit.store:
                held = unit
        if not wait or (held is None and not did):
            return
        if held is not None:
            if deadline.passed():
                return
            run_unit(partial, path, sync, held, wait=True, deadline=deadline)
