"""The judge's own accuracy, measured on fresh ground-truth renders of random scenes.

``judge_accuracy`` renders scenes of the SUR world clean and degraded and lets the judge
(``sur_lib.world.evaluate``) read them; the result, with Wilson intervals, is what
``data/results/judge.json`` stores:

    python -m sur_lib.study.judge_accuracy --out data/results/judge.json --n 2000

(``python -m sur_lib.world.evaluate judge-accuracy ...``, the command that file records, still runs.)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

import numpy as np

from sur_lib.infra import cli
from sur_lib.infra.cli import UsageError
from sur_lib.infra.config import check_seed
from sur_lib.infra.fileio import atomic_write_text
from sur_lib.infra.provenance import versions
from sur_lib.study.statistics import accuracy_with_ci
from sur_lib.world import evaluate as ev
from sur_lib.world import toyworld as tw


def judge_accuracy(n: int = 1000, seed: int = 2024, size: int = tw.SIZE,
                   progress: bool = False) -> dict:
    """The judge's accuracy on ``n`` fresh ground-truth scenes, each rendered clean and
    degraded.

    Scenes: uniform over all 7 x 3 classes, counts 1-6 and (3+ objects) the 4 arrangements,
    from ``default_rng([seed, i])``; these seeds were not used to set the judge's
    thresholds. Attributes: ``count``, ``color`` (all objects), ``shape`` (majority),
    ``object`` (colour and shape), ``arrangement`` (scenes with 3+ objects only),
    ``scene`` (everything right). Returns accuracies with Wilson 95% intervals, overall,
    per count and per arrangement, for "clean" and "degraded".
    """
    from tqdm import tqdm

    rec = {"clean": [], "degraded": []}
    for i in tqdm(range(n), desc="judge", disable=not progress):
        rng = np.random.default_rng([seed, i])
        scene = tw.sample_scene(rng, nouns=None, p_clean=1.0)
        objects = tw.place(scene, rng)
        clean = tw.draw(objects, size)
        for quality, img in (("clean", clean), ("degraded", tw.degrade(clean, rng))):
            s = ev.score(img, {"count": scene.count, "color": scene.color,
                            "shape": scene.shape, "arrangement": scene.arrangement})
            rec[quality].append((scene, s))
    out = {}
    for quality, rows in rec.items():
        res = {}
        for attr in ev.ATTRIBUTES:
            if attr == "scene":
                vals = [s["correct"] for _, s in rows]
            elif attr == "arrangement":
                vals = [s["arrangement_ok"] for _, s in rows if s["arrangement_ok"] is not None]
            else:
                vals = [s[f"{attr}_ok"] for _, s in rows]
            res[attr] = accuracy_with_ci(vals)
        res["count_by_count"] = {str(c): accuracy_with_ci([s["count_ok"] for sc, s in rows
                                                          if sc.count == c])
                                 for c in range(1, tw.MAX_COUNT + 1)}
        res["shape_by_shape"] = {sh: accuracy_with_ci([s["shape_ok"] for sc, s in rows
                                                       if sc.shape == sh]) for sh in tw.SHAPES}
        res["arrangement_by_arrangement"] = {
            a: accuracy_with_ci([s["arrangement_ok"] for sc, s in rows if sc.arrangement == a])
            for a in tw.ARRANGEMENTS}
        out[quality] = res
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sur_lib.study.judge_accuracy",
                                 description="measure the judge on fresh ground-truth renders")
    ap.add_argument("--out", default=None, help="write the result JSON here")
    ap.add_argument("--n", type=int, default=1000, help="number of scenes (each clean + degraded)")
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--size", type=int, default=tw.SIZE)
    args = ap.parse_args(argv)
    if args.n < 1:
        raise UsageError(f"--n must be >= 1, got {args.n}")
    if not 8 <= args.size <= 4096:
        raise UsageError(f"--size must be from 8 to 4096 pixels, got {args.size}")
    check_seed("--seed", args.seed)
    t0 = time.perf_counter()
    res = judge_accuracy(args.n, args.seed, args.size, progress=True)
    wall = time.perf_counter() - t0
    doc = {
        "command": "python -m sur_lib.study.judge_accuracy " + " ".join(
            sys.argv[1:] if argv is None else list(argv)),
        "seed": args.seed, "n_scenes": args.n, "size": args.size,
        "versions": versions(), "wall_time_s": round(wall, 2),
        "thresholds": {"FG_COVERAGE": ev.FG_COVERAGE, "MIN_AREA_PX32": ev.MIN_AREA_PX32,
                       "REGION_RADIUS_PX32": ev.REGION_RADIUS_PX32,
                       "BLUR_GRID_PX32": list(ev.BLUR_GRID_PX32)},
        "results": res,
    }
    for q in ("clean", "degraded"):
        print(q, "  ".join(f"{a} {res[q][a]['acc']:.3f}" for a in ev.ATTRIBUTES))
    text = json.dumps(doc, indent=2)
    if args.out:
        atomic_write_text(args.out, text + "\n")
        print(f"wrote {args.out} ({wall:.1f} s)")
    return 0


if __name__ == "__main__":
    cli.run(main)
