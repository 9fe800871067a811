"""The extended held-out test set: 50 prompts per type, for power.

The fixed test set (``toyworld.TEST_PROMPTS``) has 15 prompts per type, as the paper's
evaluation does. With 15 prompts a paired test over prompts can only see large effects, so
the book reports a second, larger held-out set beside it, made by the same rules:

* counting: 2-6 objects, the layout left open; a held-out noun with a train phrasing, a train
  noun with a held-out phrasing, or both held out;
* color: one or two objects of a held-out noun (the colour must come from what the noun is),
  with a train or a held-out phrasing;
* action: 3-6 objects in a named arrangement; a held-out arrangement phrasing with any noun,
  or a train arrangement phrasing with a held-out noun.

Each prompt says what adapter training never saw in ``heldout`` (noun, phrasing or both); no
prompt repeats a fixed test prompt or another extended one. The set is generated once by
``build(seed=EXTENDED_SEED)`` and stored in ``data/prompts/extended_heldout.json``; a test
checks that the file equals what ``build`` makes and that its SHA-256 is ``EXTENDED_DIGEST``
(pinned before any training that is evaluated on it), so it cannot drift.

    python -m sur_lib.world.extended_prompts write   # (re)writes the JSON file; the digest test pins it
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from . import toyworld as tw
from .paths import EXTENDED_PROMPTS_FILE

EXTENDED_FILE = EXTENDED_PROMPTS_FILE  # data/prompts/extended_heldout.json
EXTENDED_SEED = 20261201
PER_TYPE = 50
# SHA-256 of the canonical JSON of the prompt list (sorted keys), pinned when first written
EXTENDED_DIGEST = "fbb2d1f9b99a5cde6f852552d6b044a655ac173e1fd3371295cc24f2da835742"


def _spec(type_: str, text: str, count: int, noun: str, arrangement: str | None,
          heldout: Sequence[str]) -> dict:
    info = tw.NOUNS[noun]
    scene = tw.Scene(count, info.color, info.shape, arrangement, noun)
    return {"id": "", "type": type_, "text": text, "prompt": tw.canonical_complex_prompt(scene),
            "count": count, "color": info.color, "shape": info.shape,
            "arrangement": arrangement, "noun": noun, "heldout": list(heldout)}


def _text(template: str, count: int, noun: str) -> str:
    a_noun = ("an " if noun[0] in "aeiou" else "a ") + noun
    return template.format(num=tw.NUMBER_WORDS[count], noun=noun, a_noun=a_noun,
                           nouns=tw.NOUNS[noun].plural)


def _draw(rng: np.random.Generator, type_: str) -> dict:
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    T = tw.TEMPLATES
    if type_ == "counting":
        count = int(rng.integers(2, tw.MAX_COUNT + 1))
        mode = pick(("noun", "phrasing", "both"))
        noun = pick(tw.TRAIN_NOUNS if mode == "phrasing" else tw.HELDOUT_NOUNS)
        phr = "train" if mode == "noun" else "heldout"
        return _spec(type_, _text(pick(T[phr]["count"]), count, noun), count, noun, None,
                     ("noun",) if mode == "noun" else ("phrasing",) if mode == "phrasing"
                     else ("noun", "phrasing"))
    if type_ == "color":
        count = 1 if rng.random() < 0.75 else 2
        noun = pick(tw.HELDOUT_NOUNS)
        phr = pick(("train", "heldout"))
        key = "single" if count == 1 else "count"
        return _spec(type_, _text(pick(T[phr][key]), count, noun), count, noun, None,
                     ("noun",) if phr == "train" else ("noun", "phrasing"))
    if type_ == "action":
        count = int(rng.integers(tw.MIN_ARRANGED, tw.MAX_COUNT + 1))
        arrangement = pick(tw.ARRANGEMENTS)
        mode = pick(("phrasing", "noun", "both"))
        noun = pick(tw.TRAIN_NOUNS if mode == "phrasing" else tw.HELDOUT_NOUNS)
        phr = "train" if mode == "noun" else "heldout"
        return _spec(type_, _text(pick(T[phr][arrangement]), count, noun), count, noun,
                     arrangement, ("noun",) if mode == "noun" else ("phrasing",)
                     if mode == "phrasing" else ("noun", "phrasing"))
    raise ValueError(f"type must be one of {tw.TEST_TYPES}, got {type_!r}")


def build(seed: int = EXTENDED_SEED, per_type: int = PER_TYPE) -> list[dict]:
    """``per_type`` distinct prompts of each type (ids ``ext-<type>-NN``), none of them a
    fixed test prompt; a pure function of ``seed``."""
    taken = {p["text"] for p in tw.TEST_PROMPTS}
    out = []
    for k, type_ in enumerate(tw.TEST_TYPES):
        rng = np.random.default_rng([seed, k])
        made: list[dict] = []
        while len(made) < per_type:
            spec = _draw(rng, type_)
            if spec["text"] in taken:
                continue
            taken.add(spec["text"])
            spec["id"] = f"ext-{type_}-{len(made):02d}"
            made.append(spec)
        out += made
    return out


def digest(prompts: Sequence[dict]) -> str:
    return hashlib.sha256(json.dumps(list(prompts), sort_keys=True).encode()).hexdigest()


def extended_prompts(type_: str | None = None, path: Path | str = EXTENDED_FILE) -> list[dict]:
    """The stored extended held-out prompts (optionally of one type), checked against the
    pinned digest."""
    prompts = json.loads(Path(path).read_text())["prompts"]
    if digest(prompts) != EXTENDED_DIGEST:
        raise ValueError(f"{path}: the extended held-out prompts do not match the pinned "
                         f"digest {EXTENDED_DIGEST[:12]}... (they must stay fixed once committed)")
    if type_ is not None and type_ not in tw.TEST_TYPES:
        raise ValueError(f"type must be one of {tw.TEST_TYPES}, got {type_!r}")
    return [p for p in prompts if type_ is None or p["type"] == type_]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv != ["write"]:
        print(__doc__)
        return 2
    from ..infra.fileio import write_json

    prompts = build()
    write_json({"made_by": "python -m sur_lib.world.extended_prompts write", "seed": EXTENDED_SEED,
                "per_type": PER_TYPE, "sha256": digest(prompts), "prompts": prompts},
               EXTENDED_FILE)
    print(f"wrote {len(prompts)} prompts to {EXTENDED_FILE} (sha256 {digest(prompts)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
