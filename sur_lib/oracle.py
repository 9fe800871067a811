"""An oracle teacher: knowledge vectors made from each training prompt's true attributes.

Not in the paper. The SUR-adapter's L_LLM (Eq. 5) distils a vector fLLM(p) of the simple
prompt p into the adapter. Whether that channel can carry knowledge to held-out nouns at all
is a separate question from whether a small LLM *has* that knowledge. This module builds a
teacher that certainly has it: for every simple prompt of SURD-mini, the one-hot codes of its
true count, colour, shape and arrangement (from the scene that ``toyworld.build_dataset``
rendered and wrote to metadata.jsonl), mapped to the LLM's width by a fixed, seeded Gaussian
random projection, so the adapter's shapes (``llm_dim``, the frozen W0) are unchanged:

    code(p) = [onehot(count) | onehot(colour) | onehot(shape) | onehot(arrangement or "unstated")]
    k(p)    = code(p) @ P,   P ~ N(0, 1/len(code)) of shape [len(code), width], seeded

The arrangement is the scene's only when the simple text names it (it matches a phrasing
template of that arrangement, train or held-out); "four tomatoes on a table" is rendered in
several arrangements, and a teacher that reads the prompt cannot know which one. Count,
colour and shape follow from the prompt (the number word and the noun) and must agree for
every row with the same text. ``norm``: every vector rescaled to this length (the retest
matches the mean norm of SmolLM2's vectors, so the KL term's scale is comparable).

    from sur_lib.oracle import oracle_knowledge
    knowledge = oracle_knowledge(SURDDataset(root, check_images=False).rows, width=576)
    train(cfg, knowledge=knowledge)       # the same {prompt: vector} form as knowledge_for
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

from . import toyworld as tw

SMOLLM2_WIDTH = 576  # hidden size of SmolLM2-135M, the LLM of tiny.yaml
COUNTS = tuple(range(1, tw.MAX_COUNT + 1))
ARRANGEMENT_CODES = tw.ARRANGEMENTS + ("unstated",)
CODE_DIM = len(COUNTS) + len(tw.COLORS) + len(tw.SHAPES) + len(ARRANGEMENT_CODES)
PROJECTION_SEED = 20231  # fixed: the same attributes give the same vector in every run

_ARR_REGEX = {a: [tw.template_regex(t) for split in tw.TEMPLATES.values() for t in split[a]]
              for a in tw.ARRANGEMENTS}


def text_names_arrangement(text: str, arrangement: str | None) -> bool:
    """Does the simple prompt's wording name ``arrangement`` (one of its templates)?"""
    return arrangement is not None and any(r.match(text) for r in _ARR_REGEX[arrangement])


def prompt_attributes(rows: Iterable[Mapping]) -> dict[str, tuple]:
    """{simple prompt: (count, colour, shape, arrangement or None)} from SURD-mini rows
    (metadata.jsonl: "text", "count", "color", "shape", "arrangement"). Raises ValueError when
    two rows with the same text disagree on count, colour or shape, or a row lacks them."""
    out: dict[str, tuple] = {}
    for row in rows:
        missing = [k for k in ("text", "count", "color", "shape") if row.get(k) is None]
        if missing:
            raise ValueError(f"row {row.get('file_name', row)!r} has no {missing}: the oracle "
                             "needs SURD-mini's ground truth (toyworld.build_dataset)")
        text = row["text"]
        arr = row.get("arrangement") if text_names_arrangement(text, row.get("arrangement")) else None
        attrs = (int(row["count"]), row["color"], row["shape"], arr)
        old = out.get(text)
        if old is not None and old[:3] != attrs[:3]:
            raise ValueError(f"rows with the text {text!r} disagree: {old[:3]} vs {attrs[:3]}")
        if old is not None and old[3] != attrs[3]:
            attrs = attrs[:3] + (None,)
        out[text] = attrs
    return out


def attribute_code(count: int, color: str, shape: str, arrangement: str | None) -> torch.Tensor:
    """The concatenated one-hot code (length ``CODE_DIM``) of one prompt's attributes."""
    for name, value, known in (("count", count, COUNTS), ("color", color, tuple(tw.COLORS)),
                               ("shape", shape, tw.SHAPES),
                               ("arrangement", arrangement or "unstated", ARRANGEMENT_CODES)):
        if value not in known:
            raise ValueError(f"unknown {name} {value!r}; known: {list(known)}")
    code = torch.zeros(CODE_DIM)
    offset = 0
    for value, known in ((count, COUNTS), (color, tuple(tw.COLORS)), (shape, tw.SHAPES),
                         (arrangement or "unstated", ARRANGEMENT_CODES)):
        code[offset + known.index(value)] = 1.0
        offset += len(known)
    return code


def projection(width: int, seed: int = PROJECTION_SEED) -> torch.Tensor:
    """The fixed random projection P [CODE_DIM, width], entries N(0, 1 / CODE_DIM)."""
    if width < CODE_DIM:
        raise ValueError(f"width must be >= {CODE_DIM} (the code length) so that distinct "
                         f"attributes stay distinct, got {width}")
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(CODE_DIM, int(width), generator=g) / CODE_DIM ** 0.5


def oracle_knowledge(rows: Iterable[Mapping], width: int = SMOLLM2_WIDTH,
                     seed: int = PROJECTION_SEED, norm: float | None = None) -> dict[str, torch.Tensor]:
    """{simple prompt: float32 [width] vector} for every distinct prompt of ``rows``: the
    projected attribute code (see the module docstring), rescaled to length ``norm`` if given."""
    attrs = prompt_attributes(rows)
    if not attrs:
        raise ValueError("oracle_knowledge: no rows given")
    p = projection(width, seed)
    out = {}
    for text in sorted(attrs):
        v = attribute_code(*attrs[text]) @ p
        if norm is not None:
            v = v * (float(norm) / float(v.norm()))
        out[text] = v.contiguous()
    return out


def mean_norm(vectors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> float:
    """Mean Euclidean length of knowledge vectors (what ``norm`` is matched to)."""
    vals = list(vectors.values()) if isinstance(vectors, Mapping) else list(vectors)
    return float(torch.stack([torch.as_tensor(v).float() for v in vals]).norm(dim=1).mean())
