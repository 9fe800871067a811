"""The committed files a result depends on, each with its SHA-256 (``inputs`` in the result).

A result names the files it was made from: loss logs, stored adapters (folders: every file in
them), the base model, the judge's result. ``input_files`` collects every such path that the
result mentions under ``INPUT_ROOTS`` (committed data; ``data/surd-mini`` and the caches are
rebuilt on each machine and are not inputs) plus the prompt sets an experiment reads by name
(``PROMPT_SETS``). ``record_inputs`` writes ``{path: sha256}`` into the result under
``inputs``; ``input_check`` (part of ``verify``) recomputes every digest: a file edited after
the result was made (one line of a loss log, one byte of an adapter), removed, or a dependency
the result names but did not record, fails.

Backfill or refresh after a deliberate change: ``python -m sur_lib.study.experiments inputs
data/results/sur.json ...`` adds ``inputs`` and changes nothing else in the file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from sur_lib.infra.checkpoints import sha256
from sur_lib.infra.provenance import ROOT
from . import registry

INPUT_ROOTS = ("data/models/", "data/runs/", "data/prompts/", "data/results/")
PROMPT_SETS = {n: e.prompt_sets for n, e in registry.COMMANDS.items() if e.prompt_sets}  # registry
INPUTS_KEY = "inputs"


def _named_paths(x) -> set[str]:
    """Every string in ``x`` (a JSON document) that names an existing path under
    ``INPUT_ROOTS`` (results store paths relative to the repository)."""
    if isinstance(x, dict):
        return set().union(*(_named_paths(v) for k, v in x.items() if k != INPUTS_KEY)) if x else set()
    if isinstance(x, list):
        return set().union(*(_named_paths(v) for v in x)) if x else set()
    if isinstance(x, str) and x.startswith(INPUT_ROOTS) and len(x) < 500 and (ROOT / x).exists():
        return {Path(x).as_posix()}
    return set()


def input_files(doc: dict) -> list[str]:
    """The committed files ``doc`` depends on (repository-relative, sorted): the files and the
    files inside the folders it names under ``INPUT_ROOTS`` (but hidden ones: locks, temporary
    copies), and its experiment's ``PROMPT_SETS``."""
    name = doc.get("experiment")
    named = _named_paths(doc) | set(PROMPT_SETS.get(name, ()))
    named -= {f"data/results/{name}.json", f"data/results/{name}.partial.json"}  # itself
    files = set()
    for rel in named:
        p = ROOT / rel
        if p.is_dir():
            files |= {f.relative_to(ROOT).as_posix() for f in p.rglob("*")
                      if f.is_file() and not any(s.startswith(".") for s in f.relative_to(p).parts)}
        elif p.is_file():
            files.add(rel)
    return sorted(files)


def file_digests(files: Sequence[str]) -> dict[str, str]:
    """{path: SHA-256 of its bytes} (paths relative to the repository)."""
    return {f: sha256(ROOT / f) for f in files}


def record_inputs(doc: dict) -> dict:
    """``doc`` with ``inputs``: the digest of every file it depends on (``input_files``)."""
    return {**doc, INPUTS_KEY: file_digests(input_files(doc))}


def input_check(doc: dict, partial: bool = False) -> dict:
    """verify's check of ``doc``'s inputs: every recorded file still has its digest, and every
    file the result depends on is recorded. A result without ``inputs`` fails, unless it is a
    partial file (a run still under way records them when it writes its result)."""
    check = "inputs: SHA-256 of every file the result depends on"
    recorded = doc.get(INPUTS_KEY)
    if not isinstance(recorded, dict):
        return {"check": check, "ok": partial, "message": (
            "none recorded (a partial result: its final file records them)" if partial else
            "none recorded: record them with python -m sur_lib.study.experiments inputs RESULT_FILE")}
    changed, missing = [], []
    for f, digest in sorted(recorded.items()):
        p = ROOT / f
        if not p.is_file():
            missing.append(f)
        elif sha256(p) != digest:
            changed.append(f)
    unrecorded = [f for f in input_files(doc) if f not in recorded]
    problems = ([f"{f} changed since the result was made" for f in changed]
                + [f"{f} is missing" for f in missing]
                + [f"{f} is named by the result but its digest is not recorded" for f in unrecorded])
    return {"check": check, "ok": not problems,
            "message": (f"{len(recorded)} file(s), each as recorded" if not problems else
                        f"{len(problems)} problem(s): {problems[0]}")}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sur_lib.study.experiments inputs RESULT_FILE ...``: (re)record the ``inputs`` of
    each result file in place; the rest of the file is unchanged."""
    import argparse

    from sur_lib.infra.fileio import read_json, write_json

    ap = argparse.ArgumentParser(prog="python -m sur_lib.study.experiments inputs", description=main.__doc__)
    ap.add_argument("results", nargs="+", help="result files (data/results/NAME.json)")
    for path in ap.parse_args(argv).results:
        doc = read_json(path, "result file")
        if json.dumps(doc, indent=1) + "\n" != Path(path).read_text(encoding="utf-8"):
            raise SystemExit(f"{path} is not as write_json writes it: refusing to rewrite it")
        doc = record_inputs(doc)
        write_json(doc, path)
        print(f"{path}: {len(doc[INPUTS_KEY])} input file(s) recorded")
    return 0


if __name__ == "__main__":
    from sur_lib.infra.cli import run as run_cli

    run_cli(main)
