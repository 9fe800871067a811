"""Rebuilds execute a chapter again when a file it read changes (book/_ext/sur_book_deps.py,
sur_lib.study.book.record_reads): the decision on its own, then a small Sphinx build (myst-nb,
execution forced, as the book) of a two-page book, rebuilt after its results file changes."""
import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers import CHAPTER_HEADER

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "book" / "_ext"))
import sur_book_deps as deps  # noqa: E402

sys.path.pop(0)


def test_outdated_when_a_recorded_file_changes_or_goes(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text("1"), b.write_text("2")
    recorded = {"ch1": {str(a): deps.digest(a)}, "ch2": {str(b): deps.digest(b)}, "ch3": {}}
    assert deps.outdated(recorded) == set()
    stamp = os.stat(a).st_mtime
    a.write_text("3")
    os.utime(a, (stamp, stamp))  # same time stamp, other bytes: still outdated
    assert deps.outdated(recorded) == {"ch1"}
    b.unlink()
    assert deps.outdated(recorded) == {"ch1", "ch2"}


def test_record_reads_logs_reads_under_the_folders_only(tmp_path):
    """In a child process (an audit hook cannot be removed): reads under `data` are logged,
    by any route; writes and reads elsewhere are not."""
    import subprocess

    data, other = tmp_path / "data", tmp_path / "other"
    data.mkdir(), other.mkdir()
    (data / "r.json").write_text("{}"), (other / "o.json").write_text("{}")
    log = tmp_path / "reads.txt"
    code = textwrap.dedent(f"""
        import json, pathlib
        from sur_lib.study.book import record_reads
        record_reads({str(log)!r}, [{str(data)!r}])
        name = "r"
        json.loads((pathlib.Path({str(data)!r}) / f"{{name}}.json").read_text())
        open({str(other / 'o.json')!r}).read()
        open({str(data / 'w.json')!r}, "w").write("{{}}")
        with open({str(data / 'r.json')!r}, "rb") as f: f.read()
        """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    assert deps.read_log(log) == [(data / "r.json").resolve()]


def _write_book(src: Path, results: Path):
    src.mkdir()
    (src / "conf.py").write_text(textwrap.dedent(f"""\
        import sys
        sys.path.insert(0, {str(ROOT / 'book' / '_ext')!r})
        extensions = ["myst_nb", "sur_book_deps"]
        nb_execution_mode = "force"
        nb_execution_raise_on_error = True
        exclude_patterns = ["_build"]
        """))
    (src / "index.md").write_text("# Index\n\n```{toctree}\nreads\nplain\n```\n")
    (src / "plain.md").write_text("# Plain\n\nReads nothing.\n")
    (src / "reads.md").write_text(CHAPTER_HEADER + textwrap.dedent("""\
        # Reads

        ```{code-cell} ipython3
        import json
        from sur_lib.study.book import setup
        env = setup(seed=0, threads=1)
        name = "acc"  # the path is built at run time: no file name in the source
        print("accuracy is", json.loads((env.results / f"{name}.json").read_text())["value"])
        ```
        """))
    results.mkdir(parents=True)


@pytest.mark.timeout(300)
def test_rebuild_executes_again_the_chapter_whose_results_changed(tmp_path, monkeypatch):
    sphinx_app = pytest.importorskip("sphinx.application")
    pytest.importorskip("myst_nb")
    src, results = tmp_path / "book", tmp_path / "data" / "results"
    _write_book(src, results)
    acc = results / "acc.json"
    acc.write_text(json.dumps({"value": 0.5}))
    monkeypatch.setenv("SUR_BOOK_RESULTS", str(results))
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out, doctrees = tmp_path / "_build" / "html", tmp_path / "_build" / "doctrees"

    def build():
        read = []
        app = sphinx_app.Sphinx(str(src), str(src), str(out), str(doctrees), "html",
                                status=None, warning=None, freshenv=False)
        app.connect("env-before-read-docs", lambda app, env, docs: read.extend(sorted(docs)))
        app.build()
        return read, (out / "reads.html").read_text()

    read, page = build()
    assert read == ["index", "plain", "reads"] and "accuracy is 0.5" in page
    read, _ = build()
    assert read == [], "nothing changed, nothing re-read"
    stamp = os.stat(acc).st_mtime
    acc.write_text(json.dumps({"value": 0.75}))
    os.utime(acc, (stamp, stamp))  # new bytes under the old time stamp: the digest sees it
    read, page = build()
    assert read == ["reads"] and "accuracy is 0.75" in page
    time.sleep(0.01)
    acc.touch()  # a newer time stamp, same bytes: Sphinx's own dependency check
    read, page = build()
    assert read == ["reads"] and "accuracy is 0.75" in page
