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

    from sur_lib.study.oracle import oracle_knowledge
    knowledge = oracle_knowledge(SURDDataset(root, check_images=False).rows, width=576)
    train(cfg, knowledge=knowledge)       # the same {prompt: vector} form as knowledge_for
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch

from ..world import toyworld as tw

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


# ------------------------------------------------------------------ a teacher target a student can fit
#
# L_LLM's target is softmax(W0 k / T) over the D features (``losses.llm_distillation_loss``).
# With k at SmolLM2's mean norm (~1,500, inflated by its attention-sink token) W0 k has entries
# of about +-36, so the target is one-hot (median top probability 0.9994) and many attribute
# combinations share their top feature. ``calibrate_targets`` gives every teacher the same
# treatment: centre the vectors (subtract their mean over the prompts given, which removes what
# all prompts share, e.g. the sink) and scale each one so its target has entropy ``entropy``
# nats (bisection on the norm). ``target_stats`` reports what a target looks like.

CHANNEL_ENTROPY = 2.5  # nats (uniform over 384 features: 5.95); chosen for distinct, soft targets


def calibrate_targets(vectors: Mapping[str, torch.Tensor], projection, entropy: float = CHANNEL_ENTROPY,
                      temperature: float = 1.0, iters: int = 60) -> dict[str, torch.Tensor]:
    """{prompt: vector} centred over ``vectors`` and rescaled, one norm per vector, so that
    softmax(W0 k / T) has entropy ``entropy`` nats. ``projection``: W0 (a callable llm_dim ->
    D, e.g. ``adapter.KnowledgeProjection``)."""
    keys = sorted(vectors)
    if not keys:
        raise ValueError("calibrate_targets: no vectors given")
    v = torch.stack([torch.as_tensor(vectors[k]).float() for k in keys])
    v = v - v.mean(0, keepdim=True)
    n = v.norm(dim=1, keepdim=True)
    if bool((n == 0).any()):
        bad = [keys[i] for i in torch.nonzero(n[:, 0] == 0)[:, 0].tolist()[:3]]
        raise ValueError(f"calibrate_targets: vectors equal to the mean (nothing to scale): {bad}")
    with torch.no_grad():
        z = projection(v / n) / float(temperature)
    hmax = math.log(z.shape[1])
    if not 0 < entropy < hmax:
        raise ValueError(f"entropy must be in (0, {hmax:.2f}) nats, got {entropy}")
    lo, hi = torch.zeros(len(v)), torch.full((len(v),), 1e6)
    for _ in range(iters):  # entropy falls as the scale grows
        mid = (lo + hi) / 2
        h = _entropy(z * mid[:, None])
        lo, hi = torch.where(h > entropy, mid, lo), torch.where(h > entropy, hi, mid)
    scale = (lo + hi) / 2
    return {k: (v[i] / n[i, 0] * scale[i]).contiguous() for i, k in enumerate(keys)}


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    lp = logits.log_softmax(-1)
    return -(lp.exp() * lp).sum(-1)


def target_stats(vectors: Mapping[str, torch.Tensor], projection, temperature: float = 1.0,
                 groups: Mapping[str, object] | None = None) -> dict:
    """What the L_LLM targets softmax(W0 k / T) of ``vectors`` look like: entropy (nats) and
    top probability (median, min, max), mean norm, the number of distinct top features, and,
    over the distinct targets (or over ``groups``: {prompt: its attribute combination}, one
    target per combination, e.g. from ``prompt_attributes``), how many combinations share a
    target and the smallest L1 distance between two combinations' targets (0: a collision)."""
    keys = sorted(vectors)
    v = torch.stack([torch.as_tensor(vectors[k]).float() for k in keys])
    with torch.no_grad():
        logits = projection(v) / float(temperature)
    p = logits.softmax(-1)
    h, top = _entropy(logits), p.max(-1).values
    out = {"n": len(keys), "mean_norm": float(v.norm(dim=1).mean()),
           "entropy": {"median": float(h.median()), "min": float(h.min()), "max": float(h.max())},
           "top_prob": {"median": float(top.median()), "min": float(top.min()), "max": float(top.max())},
           "distinct_top_features": int(torch.unique(p.argmax(-1)).numel()),
           "uniform_entropy": math.log(p.shape[1])}
    if groups is not None:  # one representative target per attribute combination
        first: dict = {}
        for i, k in enumerate(keys):
            first.setdefault(groups[k], i)
        idx = list(first.values())
        out["combinations"] = len(idx)
    else:
        idx = list(range(len(keys)))
    q = p[idx]
    d = torch.cdist(q, q, p=1)
    d.fill_diagonal_(float("inf"))
    out["min_l1_between_targets"] = float(d.min()) if len(idx) > 1 else None
    out["colliding_pairs"] = int(((d < 1e-6).sum() // 2)) if len(idx) > 1 else 0
    return out


def permuted_classes(classes: Mapping[str, tuple[str, str]], seed: int = PROJECTION_SEED) -> dict[str, tuple[str, str]]:
    """{noun: (colour, shape)} with the classes shuffled across the nouns (the same multiset, so
    the same marginals), seeded; among 1,000 seeded shuffles the one that leaves the fewest
    nouns with their own class. The control teacher of the channel experiment."""
    nouns = sorted(classes)
    g = torch.Generator().manual_seed(int(seed))
    best = None
    for _ in range(1000):
        perm = torch.randperm(len(nouns), generator=g).tolist()
        kept = sum(classes[nouns[i]] == classes[nouns[j]] for i, j in enumerate(perm))
        if best is None or kept < best[0]:
            best = (kept, perm)
        if kept == 0:
            break
    return {n: classes[nouns[j]] for n, j in zip(nouns, best[1])}
