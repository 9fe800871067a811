"""The book's time budgets, read from a build: each chapter under 3 minutes, the book under 6.

    python tools/chapter_times.py [_build]     # exit 1 if a budget is exceeded

A benchmark, not a test: the chapters glue their own run time (``*_runtime_s``, measured by
``book.env.elapsed()`` from the first cell to the last) and the build stores the glued values in
``_build/jupyter_execute/NAME.glue.json``. The times depend on the machine and on what else runs
on it (under two other jobs a chapter takes about twice as long), so they are reported here
instead of asserted inside the chapters, where a busy machine failed the build.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

CHAPTER_BUDGET_S = 180
BOOK_BUDGET_S = 360


def chapter_times(build: Path) -> dict[str, float]:
    """{chapter: seconds} for every chapter whose build glued a ``*_runtime_s``."""
    times = {}
    for path in sorted((build / "jupyter_execute").glob("*.glue.json")):
        glued = json.loads(path.read_text())
        for key, out in glued.items():
            if key.endswith("runtime_s"):
                times[path.name.removesuffix(".glue.json")] = float(out["data"]["text/plain"])
    return times


def main(argv: list[str]) -> int:
    build = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "_build"
    times = chapter_times(build)
    if not times:
        print(f"no glued run times under {build / 'jupyter_execute'}: build the book first (make book)")
        return 2
    over = {k: v for k, v in times.items() if v > CHAPTER_BUDGET_S}
    for name, s in times.items():
        print(f"{name:32s} {s:6.0f} s{'  OVER the 3-minute budget' if name in over else ''}")
    total = sum(times.values())
    print(f"{'book (chapters with a glued time)':32s} {total:6.0f} s (budget {BOOK_BUDGET_S} s)")
    return 1 if over or total > BOOK_BUDGET_S else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
