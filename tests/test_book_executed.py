"""Every chapter ran, once, in the build: `make test` executes each chapter a single time, in
`jupyter-book build` (``execute_notebooks: force``, ``allow_errors: false``, warnings are
errors, so a failing ``assert`` in a chapter fails the build), and this test reads what that
execution left in _build/jupyter_execute instead of running every chapter a second time
with nbval (`make nbval` still does: ``pytest --nbval-lax book``).

Skips without a build (or $SUR_BOOK_BUILD pointing at one).
"""
import json
import os
from pathlib import Path

import pytest

from test_book import BOOK, ROOT, _chapters

BUILD = Path(os.environ.get("SUR_BOOK_BUILD", ROOT / "_build"))
EXECUTED = BUILD / "jupyter_execute"

CHAPTERS = [name for name, _ in _chapters()]


def _code(cells):
    return [c["source"] if isinstance(c["source"], str) else "".join(c["source"])
            for c in cells if c["cell_type"] == "code"]


@pytest.mark.parametrize("name", CHAPTERS)
def test_the_build_executed_the_current_chapter_without_error(name):
    if not EXECUTED.is_dir():
        pytest.skip(f"no executed notebooks in {EXECUTED}: run `make book` first")
    path = EXECUTED / f"{name}.ipynb"
    assert path.is_file(), f"{path} missing: the build did not execute {name}"
    nb = json.loads(path.read_text(encoding="utf-8"))
    jupytext = pytest.importorskip("jupytext")
    source = jupytext.read(BOOK / f"{name}.md")
    assert _code(nb["cells"]) == [c.source for c in source.cells if c.cell_type == "code"], (
        f"{path} was executed from another version of book/{name}.md: rebuild the book")
    for i, cell in enumerate(c for c in nb["cells"] if c["cell_type"] == "code"):
        if not cell["source"]:
            continue
        assert cell.get("execution_count") is not None, f"{name}: code cell {i} did not run"
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{name}: code cell {i} raised {errors[0].get('ename')}: {errors[0].get('evalue')}"


def test_a_cell_error_is_reported_by_name(tmp_path, monkeypatch):
    """The check above fails on an error output (a hand-made executed notebook)."""
    name = CHAPTERS[0]
    jupytext = pytest.importorskip("jupytext")
    source = jupytext.read(BOOK / f"{name}.md")
    cells = [{"cell_type": "code", "source": c.source, "execution_count": 1, "metadata": {},
              "outputs": []} for c in source.cells if c.cell_type == "code"]
    cells[-1]["outputs"] = [{"output_type": "error", "ename": "AssertionError", "evalue": "boom",
                             "traceback": []}]
    (tmp_path / "jupyter_execute").mkdir()
    (tmp_path / "jupyter_execute" / f"{name}.ipynb").write_text(json.dumps({"cells": cells}))
    monkeypatch.setattr(__import__(__name__), "EXECUTED", tmp_path / "jupyter_execute")
    with pytest.raises(AssertionError, match="AssertionError: boom"):
        test_the_build_executed_the_current_chapter_without_error(name)
