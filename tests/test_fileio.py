"""sur_lib.infra.fileio (atomic writes) and sur_lib.infra.cli (one-line errors)."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from sur_lib.infra import cli, fileio


def test_atomic_write_text_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "sub" / "a.txt"
    fileio.atomic_write_text(p, "one")
    fileio.atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert sorted(x.name for x in p.parent.iterdir()) == ["a.txt"]


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    p = tmp_path / "a.txt"
    p.write_text("old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        fileio.atomic_write_text(p, "new")
    assert p.read_text() == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.txt"]


def test_atomic_folder_commit_and_rollback(tmp_path):
    target = tmp_path / "model"
    with fileio.atomic_folder(target) as tmp:
        (tmp / "w.bin").write_bytes(b"1")
    assert (target / "w.bin").read_bytes() == b"1"
    with pytest.raises(RuntimeError):
        with fileio.atomic_folder(target) as tmp:
            (tmp / "w.bin").write_bytes(b"2")
            raise RuntimeError("killed")
    assert (target / "w.bin").read_bytes() == b"1"  # the old folder survives a failed write
    with fileio.atomic_folder(target) as tmp:
        (tmp / "v.bin").write_bytes(b"3")
    assert sorted(x.name for x in target.iterdir()) == ["v.bin"]  # replaced, not merged
    assert sorted(x.name for x in tmp_path.iterdir()) == ["model"]


def test_write_json_cleans_values(tmp_path):
    p = fileio.write_json({"a": (1, 2), "b": np.float32(0.5), "c": math.nan, 3: np.int64(4),
                           "d": np.bool_(True), "e": tmp_path}, tmp_path / "r.json")
    assert json.loads(p.read_text()) == {"a": [1, 2], "b": 0.5, "c": None, "3": 4, "d": True,
                                         "e": str(tmp_path)}


def _main_usage(argv):
    raise cli.UsageError(f"--max_steps: expected an integer, got {argv[0]!r}")


def test_cli_usage_error_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(_main_usage, ["abc"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max_steps: expected an integer, got 'abc'" in err
    assert "Traceback" not in err


def test_cli_other_error_exit_1_and_debug_reraises(capsys, monkeypatch):
    def main(argv):
        raise KeyError("prompt")

    with pytest.raises(SystemExit) as e:
        cli.run(main, [])
    assert e.value.code == 1 and "KeyError" in capsys.readouterr().err
    with pytest.raises(KeyError):
        cli.run(main, ["--debug"])
    monkeypatch.setenv("SUR_DEBUG", "1")
    with pytest.raises(KeyError):
        cli.run(main, [])


def test_cli_passes_argv_without_debug_and_status():
    seen = []

    def main(argv):
        seen.append(argv)
        return 3

    with pytest.raises(SystemExit) as e:
        cli.run(main, ["--x", "1", "--debug"])
    assert e.value.code == 3 and seen == [["--x", "1"]]


def test_cli_subprocess_prints_no_traceback(tmp_path):
    script = tmp_path / "t.py"
    script.write_text("from sur_lib.infra import cli\n"
                      "def main(argv):\n    raise cli.UsageError('bad value for --n: -3')\n"
                      "cli.run(main)\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: bad value for --n: -3")
    assert "Traceback" not in r.stderr
