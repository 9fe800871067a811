"""The book's chapters are executed side by side (book/_ext/sur_book_execute.py), once each, with
their outputs, their reads logs (sur_book_deps) and a failing cell failing the build as before.

A two-chapter book in a temporary folder is built with Sphinx, myst-nb (``force``) and both
extensions. Each chapter waits, with a deadline, for a file the other one writes: the build can
only pass when the two kernels run at the same time.
"""
from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from tests.helpers import CHAPTER_HEADER

ROOT = Path(__file__).resolve().parents[1]
sys_path = str(ROOT / "book" / "_ext")

CHAPTER = CHAPTER_HEADER.replace("{", "{{").replace("}", "}}") + """\
# {name}

```{{code-cell}} ipython3
import json, os, time
from pathlib import Path
from sur_lib.study.book import setup
env = setup(seed=0, threads=1)
runs = Path(os.environ["RUNS"])
with open(runs / "executions.txt", "a") as f:
    f.write("{name}\\n")
(runs / "{name}.started").touch()
deadline = time.time() + 60
while {wait} and not (runs / "{other}.started").exists() and time.time() < deadline:
    time.sleep(0.05)
assert {wait} is False or (runs / "{other}.started").exists(), "the other chapter never ran beside this one"
print("{name} value is", json.loads((env.results / "{name}.json").read_text())["value"])
{extra}
```
"""


def _write_book(src: Path, wait: bool = True, fail: str | None = None):
    src.mkdir(parents=True, exist_ok=True)
    (src / "conf.py").write_text(textwrap.dedent(f"""\
        import sys
        sys.path.insert(0, {sys_path!r})
        extensions = ["myst_nb", "sur_book_deps", "sur_book_execute"]
        nb_execution_mode = "force"
        nb_execution_raise_on_error = True
        nb_execution_timeout = 120  # a cell waits up to 60 s for the other chapter
        exclude_patterns = ["_build"]
        """))
    (src / "index.md").write_text("# Index\n\n```{toctree}\nalpha\nbeta\n```\n")
    for name, other in (("alpha", "beta"), ("beta", "alpha")):
        extra = "raise RuntimeError('chapter ' + 'beta' + ' broke')" if fail == name else ""
        (src / f"{name}.md").write_text(CHAPTER.format(name=name, other=other, wait=wait, extra=extra))


@pytest.fixture
def book(tmp_path, monkeypatch):
    pytest.importorskip("myst_nb")
    results, runs = tmp_path / "data" / "results", tmp_path / "runs"
    results.mkdir(parents=True)
    runs.mkdir()
    for name, value in (("alpha", 0.5), ("beta", 0.25)):
        (results / f"{name}.json").write_text(json.dumps({"value": value}))
    monkeypatch.setenv("SUR_BOOK_RESULTS", str(results))
    monkeypatch.setenv("RUNS", str(runs))
    monkeypatch.setenv("SUR_BOOK_JOBS", "2")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return tmp_path, results, runs


def _build(tmp_path: Path):
    from sphinx.application import Sphinx

    src = tmp_path / "book"
    out, doctrees = tmp_path / "_build" / "html", tmp_path / "_build" / "doctrees"
    read = []
    app = Sphinx(str(src), str(src), str(out), str(doctrees), "html", status=None, warning=None, freshenv=False)
    app.connect("env-before-read-docs", lambda app, env, docs: read.extend(sorted(docs)))
    app.build()
    return read, {n: (out / f"{n}.html").read_text() for n in ("alpha", "beta")}


@pytest.mark.timeout(300)
def test_chapters_run_side_by_side_once_each_and_a_changed_result_reruns_its_chapter(book):
    tmp_path, results, runs = book
    _write_book(tmp_path / "book")
    read, pages = _build(tmp_path)
    assert read == ["alpha", "beta", "index"]
    assert "alpha value is 0.5" in pages["alpha"] and "beta value is 0.25" in pages["beta"]
    # each kernel ran once (not again by myst-nb), and both at the same time (each waited for the other)
    assert sorted((runs / "executions.txt").read_text().split()) == ["alpha", "beta"]
    # sur_book_deps still learnt what each chapter read: a changed result re-executes its chapter
    # (alone, so by myst-nb itself; alpha's marker from the first build is still there)
    (runs / "executions.txt").unlink()
    (results / "beta.json").write_text(json.dumps({"value": 0.75}))
    read, pages = _build(tmp_path)
    assert read == ["beta"] and "beta value is 0.75" in pages["beta"]
    assert (runs / "executions.txt").read_text().split() == ["beta"]


@pytest.mark.timeout(300)
def test_a_failing_cell_still_fails_the_build_and_names_its_error(book):
    from myst_nb.core.execute import ExecutionError

    tmp_path, results, runs = book
    _write_book(tmp_path / "book", fail="beta")
    with pytest.raises(ExecutionError) as err:
        _build(tmp_path)
    assert "beta.md" in str(err.value)
    assert "chapter beta broke" in str(err.value.__cause__)
    # alpha was executed once (side by side), beta once there and once more by myst-nb for its traceback
    assert sorted((runs / "executions.txt").read_text().split()) == ["alpha", "beta", "beta"]


def test_jobs_reads_the_variable_and_names_a_bad_value(monkeypatch):
    import sys

    sys.path.insert(0, sys_path)
    import sur_book_execute as ext

    monkeypatch.setenv("SUR_BOOK_JOBS", "3")
    assert ext.jobs() == 3
    monkeypatch.delenv("SUR_BOOK_JOBS")
    assert 1 <= ext.jobs() <= 4
    for bad in ("two", "0"):
        monkeypatch.setenv("SUR_BOOK_JOBS", bad)
        with pytest.raises(ValueError, match="SUR_BOOK_JOBS"):
            ext.jobs()


def test_chapters_start_longest_first_by_last_run_else_expected_time_else_size(monkeypatch):
    """A fresh clone has no run times: the chapters start in the order of ``EXPECTED_SECONDS``
    (06_training, the third longest, is not left for last although its source is shorter than
    others'); a build's own run times take over; a chapter of neither comes last, by size."""
    import sys

    sys.path.insert(0, sys_path)
    import sur_book_execute as ext

    book = ROOT / "book"
    sizes = {p.stem: len(p.read_text(encoding="utf-8")) for p in book.glob("*.md")
             if p.stem in ext.EXPECTED_SECONDS}
    assert set(sizes) == set(ext.EXPECTED_SECONDS)  # every listed chapter exists
    fresh = ext.start_order(sizes, {})
    assert fresh == sorted(ext.EXPECTED_SECONDS, key=ext.EXPECTED_SECONDS.get, reverse=True)
    assert fresh.index("06_training") < 3 < sorted(sizes, key=sizes.get, reverse=True).index("06_training")
    rebuilt = ext.start_order(sizes, {"01_reproducibility_summary": 500.0})
    assert rebuilt[0] == "01_reproducibility_summary"
    assert ext.start_order({**sizes, "new_b": 10, "new_a": 20}, {})[-2:] == ["new_a", "new_b"]
