"""Sphinx extension: the chapters a build reads are executed side by side, not one by one.

myst-nb (``execute_notebooks: force``) executes a notebook when Sphinx reads it, and Sphinx
reads one document at a time, so the build waited for each chapter in turn although every
chapter runs its kernel on one torch thread (``book.setup(threads=1)``): on two cores, half
the machine sat idle for the whole build. This extension executes them first, ``jobs`` at a
time, then lets myst-nb read them as usual:

- *before reading* (``env-before-read-docs``: Sphinx has chosen the documents to read, the
  changed ones and those ``sur_book_deps`` marked outdated), every one that myst-nb reads as a
  notebook is read with myst-nb's own reader and executed exactly as myst-nb's direct client
  executes it (``jupyter_cache``'s ``single_nb_execution``: cwd ``book/``, the configured
  timeout, errors not allowed), in a process of its own (each with its own
  ``SUR_BOOK_READS_LOG``, so ``sur_book_deps`` still learns what each chapter read), the
  longest first (the run time of its last build when known, else ``EXPECTED_SECONDS``, else
  its size);
- *threads*: the kernels share the cores: each gets ``OMP_NUM_THREADS`` = cores / jobs (unless
  the variable is set already), which limits torch, numpy's BLAS and scikit-learn, and
  ``book.setup`` caps a chapter's torch threads at it (without it, chapter 05, which leaves
  torch's default of two threads, took 228 s beside another chapter in a fresh-clone build);
- *when myst-nb executes it* (``NotebookClientDirect.start_client``), a chapter executed here
  without an error gets its outputs from that run instead of a second run (only if its code
  cells are the same text); anything else, a failed chapter included, is executed by myst-nb
  itself as before, so a failing cell still fails the build with its traceback.

``SUR_BOOK_JOBS`` sets ``jobs`` (default: the machine's cores, at most 4; 1 turns the
extension off). Executed outputs are the same as a serial build's: each chapter runs in a
fresh kernel either way.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

JOBS_VARIABLE = "SUR_BOOK_JOBS"
# The order a build with no run times of its own (a fresh clone) starts the chapters in, the longest
# first: their run times in the fresh-clone build of 2026-12-07 (2 idle cores, two chapters and the
# browser demo's export side by side, SmolLM2's first load in 05). Ordered by size instead,
# 06_training started seventh and ran alone for its last 35 s. Only the order depends on these
# numbers; a chapter not listed starts after the listed ones (by size).
EXPECTED_SECONDS = {"07_evaluation": 114, "05_losses_knowledge": 89, "06_training": 88, "08_ablations": 57,
                    "02_sur_failure": 55, "085_composing": 46, "03_surd_statistics": 24,
                    "09_limitations": 22, "intro": 12, "04_adapter": 9, "01_reproducibility_summary": 7}
_executed: dict[str, dict] = {}  # absolute source path -> {"nb", "time"} of a chapter run here


def jobs() -> int:
    """How many chapters run side by side: ``$SUR_BOOK_JOBS``, else the cores (at most 4)."""
    value = os.environ.get(JOBS_VARIABLE)
    if value:
        try:
            n = int(value)
        except ValueError:
            raise ValueError(f"{JOBS_VARIABLE} must be a whole number, got {value!r}") from None
        if n < 1:
            raise ValueError(f"{JOBS_VARIABLE} must be at least 1, got {n}")
        return n
    return max(1, min(4, os.cpu_count() or 1))


def _execute(source: str, nb: dict, cwd: str, timeout: int | None, log: str | None,
             threads: int) -> dict:
    """Run in a worker process: execute ``nb`` as myst-nb's direct client does, in a kernel
    limited to ``threads`` threads (``OMP_NUM_THREADS``, unless set already)."""
    import nbformat
    from jupyter_cache.executors.utils import single_nb_execution

    if log:  # the kernel started next inherits it (sur_book_deps)
        os.environ["SUR_BOOK_READS_LOG"] = log
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    node = nbformat.from_dict(nb)
    result = single_nb_execution(node, cwd=cwd, timeout=timeout, allow_errors=False, meta_override=True)
    return {"source": source, "nb": node if result.err is None else None, "time": result.time,
            "error": None if result.err is None else f"{type(result.err).__name__}"}


def start_order(sizes: dict[str, int], run_times: dict[str, float]) -> list[str]:
    """The docnames of ``sizes`` (docname -> length of its source) in the order they start: the
    longest first, by the run time of the last build, else ``EXPECTED_SECONDS``; the rest after
    them, the largest first."""
    def key(docname):
        t = run_times.get(docname, EXPECTED_SECONDS.get(docname))
        return (t is not None, t or 0.0, sizes[docname])

    return sorted(sizes, key=key, reverse=True)


def code_cells(nb) -> list[str]:
    return [c["source"] for c in nb["cells"] if c["cell_type"] == "code"]


def _before_read(app, env, docnames):
    from myst_nb.core.read import create_nb_reader

    _executed.clear()
    app.sur_book_executed_ahead = set()
    n_jobs = jobs()
    cfg = env.mystnb_config
    if n_jobs < 2 or cfg.execution_mode != "force" or cfg.execution_in_temp:
        return
    todo = []
    for docname in docnames:
        path = Path(env.doc2path(docname))
        text = path.read_text(encoding="utf-8")
        reader = create_nb_reader(str(path), env.myst_config, cfg, text)
        if reader is None:
            continue
        nb = reader.read(text)
        if not code_cells(nb) or cfg.metadata_key in nb.metadata:  # own settings: myst-nb runs it
            continue
        log = None
        if "sur_book_deps" in app.extensions:
            import sur_book_deps

            log = str(sur_book_deps.start_log(app, docname))
        todo.append((docname, len(text), str(path), nb, log))
    if len(todo) < 2:
        return
    order = start_order({d: size for d, size, *_ in todo}, getattr(env, "sur_book_run_times", {}))
    todo.sort(key=lambda t: order.index(t[0]))
    t0 = time.time()
    print(f"sur_book_execute: executing {len(todo)} notebooks, {n_jobs} at a time", flush=True)
    workers = min(n_jobs, len(todo))
    threads = max(1, (os.cpu_count() or 1) // workers)  # the kernels share the cores
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_execute, path, nb, str(Path(path).parent), cfg.execution_timeout, log, threads)
                   for _, _, path, nb, log in todo]
        for fut in futures:
            res = fut.result()
            name = Path(res["source"]).name
            if res["nb"] is None:
                print(f"sur_book_execute: {name} failed ({res['error']}); myst-nb runs it again", flush=True)
                continue
            _executed[res["source"]] = res
            print(f"sur_book_execute: {name} executed in {res['time']:.0f} s", flush=True)
    print(f"sur_book_execute: {len(_executed)} of {len(todo)} notebooks in {time.time() - t0:.0f} s", flush=True)
    if not hasattr(env, "sur_book_run_times"):
        env.sur_book_run_times = {}
    for docname in docnames:
        done = _executed.get(str(Path(env.doc2path(docname))))
        if done is not None:
            env.sur_book_run_times[docname] = done["time"]
            app.sur_book_executed_ahead.add(docname)


def _patch_direct_client():
    """``NotebookClientDirect.start_client`` takes a chapter's outputs from its run here."""
    from datetime import datetime

    from myst_nb.core.execute.direct import NotebookClientDirect

    if getattr(NotebookClientDirect.start_client, "sur_book_execute", False):
        return
    direct = NotebookClientDirect.start_client

    def start_client(self):
        done = _executed.pop(str(self.path), None) if self.path is not None else None
        if done is None or code_cells(done["nb"]) != code_cells(self.notebook):
            return direct(self)
        for own, ran in zip(self.notebook.cells, done["nb"].cells):
            if own.cell_type == "code":
                own.outputs = ran.outputs
                own.execution_count = ran.get("execution_count")
        self.notebook.metadata = done["nb"].metadata
        self.logger.info(f"Executed notebook in {done['time']:.2f} seconds (side by side with others)")
        self.exec_metadata = {"mtime": datetime.now().timestamp(), "runtime": done["time"],
                              "method": self.nb_config.execution_mode, "succeeded": True,
                              "error": None, "traceback": None}

    start_client.sur_book_execute = True
    NotebookClientDirect.start_client = start_client


def setup(app):
    _patch_direct_client()
    app.connect("env-before-read-docs", _before_read)
    return {"parallel_read_safe": False, "parallel_write_safe": True, "env_version": 1}
