"""The statistics the experiments and the chapters report: intervals, tests, summaries.

Nothing here draws or judges an image; every function takes numbers or the per-prompt records
that ``sur_lib.study.experiments`` stores (``{"id", "type", "k", "n", "acc", "correct", "hits", ...}``).

* proportions: ``wilson_interval`` (Wilson score interval), ``accuracy_with_ci``;
* tests: ``paired_test`` (paired t-test and Wilcoxon signed-rank over prompts, with t and
  bootstrap intervals), ``ttest_ind`` (two-sample t-test, the paper's Table 3);
* records: ``summarize`` (per type and overall), ``compare`` (paired over prompts),
  ``quality_tests`` (Table 3 analogue), ``hit_rate`` (per-attribute verdicts);
* re-runs: ``agreement`` (does a live subset agree with a stored result?) and
  ``same_numbers`` (is a stored number the same thing recomputed?).
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
from scipy import stats

from ..world import toyworld as tw
from ..infra.fileio import clean_json

VERIFY_Z = 3.0  # agreement: the z of the two-proportion test (two-sided ~0.3%)


# =============================================================================== proportions and tests


def wilson_interval(k: int, n: int, conf: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k / n (e.g. k=8, n=10 ->
    (0.4902, 0.9433) at 95%). Returns (nan, nan) for n = 0."""
    if n == 0:
        return (float("nan"), float("nan"))
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    z = float(stats.norm.ppf(0.5 + conf / 2))
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (lo, hi)


def accuracy_with_ci(bools: Iterable, conf: float = 0.95) -> dict:
    """{"acc", "lo", "hi", "k", "n"}: the share of true values with its Wilson interval."""
    vals = [bool(b) for b in bools]
    k, n = sum(vals), len(vals)
    lo, hi = wilson_interval(k, n, conf)
    return {"acc": k / n if n else float("nan"), "lo": lo, "hi": hi, "k": k, "n": n}


def paired_test(a: Sequence[float], b: Sequence[float], conf: float = 0.95,
                n_boot: int = 10000, seed: int = 0) -> dict:
    """Paired comparison of per-prompt scores (e.g. per-prompt accuracies): b versus a.

    Returns ``mean_diff`` (mean of b - a), ``t_ci`` (t interval of the mean difference),
    ``boot_ci`` (percentile bootstrap over prompts, ``n_boot`` resamples from
    ``default_rng(seed)``), ``t``/``p_t`` (paired t-test, two-sided) and
    ``w``/``p_wilcoxon`` (Wilcoxon signed-rank, two-sided, zero differences dropped; p = 1
    when all differences are zero), and ``n``.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"need two 1-D sequences of equal length, got {a.shape} and {b.shape}")
    n = len(a)
    if n < 2:
        raise ValueError("need at least 2 pairs")
    d = b - a
    mean = float(d.mean())
    sd = float(d.std(ddof=1))
    if sd == 0:
        t, p_t = (float("nan"), 1.0) if mean == 0 else (math.copysign(float("inf"), mean), 0.0)
        t_ci = (mean, mean)
    else:
        res = stats.ttest_rel(b, a)
        t, p_t = float(res.statistic), float(res.pvalue)
        half = float(stats.t.ppf(0.5 + conf / 2, n - 1)) * sd / math.sqrt(n)
        t_ci = (mean - half, mean + half)
    if np.all(d == 0):
        w, p_w = float("nan"), 1.0
    else:
        res = stats.wilcoxon(b, a)
        w, p_w = float(res.statistic), float(res.pvalue)
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    q = (1 - conf) / 2
    boot_ci = (float(np.quantile(boots, q)), float(np.quantile(boots, 1 - q)))
    return {"mean_diff": mean, "t_ci": t_ci, "boot_ci": boot_ci, "t": t, "p_t": p_t,
            "w": w, "p_wilcoxon": p_w, "n": n}


def ttest_ind(a: Sequence[float], b: Sequence[float], equal_var: bool = True,
              alpha: float = 0.05) -> dict:
    """Two-sample t-test of quality scores, as in the paper's Table 3 (b versus a).

    Student's t-test by default (``equal_var=False``: Welch). ``changed`` is p < alpha;
    p > 0.05 is read, as the paper does, as "no evidence of a change in quality" (absence
    of evidence, not proof of equality).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    res = stats.ttest_ind(b, a, equal_var=equal_var)
    return {"mean_a": float(a.mean()), "mean_b": float(b.mean()),
            "diff": float(b.mean() - a.mean()), "t": float(res.statistic),
            "p": float(res.pvalue), "changed": bool(res.pvalue < alpha),
            "n_a": len(a), "n_b": len(b)}


# =============================================================================== per-prompt records


def summarize(records: Sequence[dict]) -> dict:
    """Per type and overall: pooled accuracy with a Wilson interval (images as trials), the
    mean of per-prompt accuracies with a t interval over prompts (which also carries the
    between-prompt spread), and the counts."""
    groups = {t: [r for r in records if r["type"] == t] for t in tw.TEST_TYPES}
    groups["overall"] = list(records)
    out = {}
    for name, recs in groups.items():
        if not recs:
            continue
        k, n = sum(r["k"] for r in recs), sum(r["n"] for r in recs)
        res = {"acc": k / n, "lo": None, "hi": None, "k": k, "n": n, "n_prompts": len(recs)}
        res["lo"], res["hi"] = wilson_interval(k, n)
        accs = np.array([r["acc"] for r in recs], dtype=np.float64)
        res["prompt_mean"] = float(accs.mean())
        if len(accs) > 1 and accs.std(ddof=1) > 0:
            half = float(stats.t.ppf(0.975, len(accs) - 1)) * accs.std(ddof=1) / math.sqrt(len(accs))
            res["prompt_t_ci"] = [res["prompt_mean"] - half, res["prompt_mean"] + half]
        else:
            res["prompt_t_ci"] = [res["prompt_mean"], res["prompt_mean"]]
        out[name] = res
    return out


def compare(a: Sequence[dict], b: Sequence[dict]) -> dict:
    """b versus a, paired over prompts (same ids, same seeds): per type and overall, the
    accuracy difference with ``paired_test`` (t and bootstrap intervals, paired t-test,
    Wilcoxon); groups with fewer than 2 prompts get the difference only."""
    by_id = {r["id"]: r for r in a}
    pairs = [(by_id[r["id"]], r) for r in b if r["id"] in by_id]
    groups = {t: [p for p in pairs if p[0]["type"] == t] for t in tw.TEST_TYPES}
    groups["overall"] = pairs
    out = {}
    for name, ps in groups.items():
        if not ps:
            continue
        xa = [p[0]["acc"] for p in ps]
        xb = [p[1]["acc"] for p in ps]
        res = {"diff": float(np.mean(xb) - np.mean(xa)), "n_prompts": len(ps)}
        res["paired"] = paired_test(xa, xb) if len(ps) >= 2 else None
        out[name] = res
    return out


def quality_tests(a: Sequence[dict], b: Sequence[dict]) -> dict:
    """Table 3 analogue: two-sample t-tests (b versus a) of per-image BRISQUE and clean-render
    distance (both: lower is better). BRISQUE caveat: it was fitted to natural photographs;
    on 32 x 32 flat synthetic images it is erratic (see ``sur_lib.world.evaluate.brisque_scores``)."""
    out = {}
    for key in ("brisque", "clean_render_distance"):
        xa = [x for r in a for x in r.get(key, [])]
        xb = [x for r in b for x in r.get(key, [])]
        if len(xa) >= 2 and len(xb) >= 2:
            out[key] = ttest_ind(xa, xb)
    return out


def hit_rate(records: Sequence[dict], attr: str, type_: str | None = None) -> float | None:
    """Share of images whose ``attr`` (one of ``sur_lib.study.experiments.HIT_KEYS``) the judge found
    right, pooled over ``records`` (of one test type when ``type_`` is given). ``arrangement_ok``
    counts only prompts that ask for an arrangement; None when no image is scored."""
    recs = [r for r in records if (type_ is None or r["type"] == type_)
            and (attr != "arrangement_ok" or r.get("arrangement") is not None)]
    n = sum(r["n"] for r in recs)
    return sum(r["hits"][attr] for r in recs) / n if n else None


# =============================================================================== re-runs


def agreement(live_k: int, live_n: int, stored_k: int, stored_n: int, z: float = VERIFY_Z) -> dict:
    """Does a live re-run of a subset agree with the stored numbers for the same prompts?

    Tolerance (binomial noise of the subset): with p the pooled accuracy
    (live_k + stored_k) / (live_n + stored_n), the live and stored accuracies may differ by at
    most ``z * sqrt(p (1 - p) (1/live_n + 1/stored_n)) + 1/live_n`` -- a two-proportion z-test
    at z = 3 (two-sided ~0.3%) plus one image of slack for the discreteness of small n. It
    treats the two as independent samples, which is conservative: the live images are the
    first images of the stored ones. E.g. 3 prompts x 4 images against 3 x 16 stored:
    tol = 0.57 at p = 0.5, 0.37 at p = 0.9. Because the subset reuses the stored seeds, on the
    machine that wrote a result the images are normally identical; the tolerance is for
    another machine's floating point and for images that sit on a decision boundary of the
    judge.
    """
    if live_n <= 0 or stored_n <= 0:
        raise ValueError("need at least one live and one stored image")
    a, b = live_k / live_n, stored_k / stored_n
    p = (live_k + stored_k) / (live_n + stored_n)
    tol = z * math.sqrt(p * (1 - p) * (1 / live_n + 1 / stored_n)) + 1 / live_n
    return {"live": a, "stored": b, "diff": a - b, "tol": tol, "ok": abs(a - b) <= tol + 1e-12,
            "live_k": live_k, "live_n": live_n, "stored_k": stored_k, "stored_n": stored_n}


def same_numbers(a, b, rel: float = 1e-9) -> bool:
    """Is a stored JSON result equal to the same thing recomputed? Both go through
    ``clean_json`` first (tuples as lists, NaN as None); numbers compare to a relative ``rel``
    when either is a float, everything else exactly."""
    a, b = clean_json(a), clean_json(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_numbers(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_numbers(x, y, rel) for x, y in zip(a, b))
    if (isinstance(a, float) or isinstance(b, float)) and all(isinstance(x, (int, float)) for x in (a, b)):
        return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)
    return a == b


def compare_block(base: Sequence[dict], other: Sequence[dict]) -> dict:
    """``summarize`` of both, ``compare`` (other versus base) and ``quality_tests``."""
    return {"base": summarize(base), "other": summarize(other), "change": compare(base, other),
            "quality": quality_tests(base, other)}


def holm(pvalues: dict[str, float | None]) -> dict[str, float | None]:
    """Holm's step-down adjustment of a family of p-values (controls the family-wise error
    rate): sorted ascending, p_(i) becomes max_{j <= i} min(1, (m - j + 1) p_(j)), m the number
    of tests. E.g. {a: 0.01, b: 0.04, c: 0.03} -> {a: 0.03, b: 0.06, c: 0.06}. ``None`` (no
    test) stays None and does not count in m."""
    items = sorted(((p, k) for k, p in pvalues.items() if p is not None), key=lambda x: x[0])
    m = len(items)
    out: dict[str, float | None] = {k: None for k in pvalues}
    running = 0.0
    for i, (p, k) in enumerate(items):
        running = max(running, min(1.0, (m - i) * float(p)))
        out[k] = running
    return out


# =============================================================================== nouns as the unit


def minimum_detectable_effect(diffs: Sequence[float], power: float = 0.8,
                              alpha: float = 0.05) -> float | None:
    """The smallest mean paired difference a two-sided paired t-test over these units (prompts
    or nouns) detects with probability ``power`` at level ``alpha``, given the observed spread
    of the differences: (t_{1-alpha/2, n-1} + t_{power, n-1}) * sd / sqrt(n). None for n < 2."""
    d = np.asarray(diffs, dtype=np.float64)
    if len(d) < 2:
        return None
    sd = float(d.std(ddof=1))
    n = len(d)
    return float((stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1)) * sd / math.sqrt(n))


def gap_closed(base: float, adapter: float, ceiling: float) -> float | None:
    """Share of the simple-to-complex gap an adapter closes: (adapter - base) / (ceiling - base)."""
    return None if ceiling == base else (adapter - base) / (ceiling - base)


def sign_flip_p(diffs: Sequence[float]) -> float:
    """Exact two-sided sign-flip permutation p-value of the mean of paired differences (every
    one of the 2^n sign patterns for n <= 16, else 20,000 seeded draws)."""
    d = np.asarray(diffs, dtype=np.float64)
    n = len(d)
    obs = abs(d.mean())
    if n <= 16:
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
    else:
        signs = np.random.default_rng(0).choice([-1, 1], size=(20000, n))
    means = np.abs((signs * d).mean(axis=1))
    return float(np.mean(means >= obs - 1e-12))


def noun_level(a: Sequence[dict], b: Sequence[dict], conf: float = 0.95) -> dict:
    """b versus a with NOUNS as the unit (prompts nested in nouns): each noun's mean per-prompt
    accuracy difference over its prompts (paired by id), then a t interval and t-test over the
    nouns, the exact sign-flip p and the MDE at 80% power. A claim about unseen nouns is a
    claim about nouns: this is its test (``compare`` treats prompts as independent)."""
    by_id = {r["id"]: r for r in a}
    per: dict[str, list[float]] = {}
    for r in b:
        if r["id"] in by_id:
            per.setdefault(r.get("noun") or "?", []).append(r["acc"] - by_id[r["id"]]["acc"])
    nouns = sorted(per)
    d = np.array([np.mean(per[n]) for n in nouns], dtype=np.float64)
    out = {"diff": float(d.mean()) if len(d) else float("nan"), "n_nouns": len(d),
           "per_noun": {n: float(x) for n, x in zip(nouns, d)}}
    if len(d) >= 2:
        sd = float(d.std(ddof=1))
        half = float(stats.t.ppf(0.5 + conf / 2, len(d) - 1)) * sd / math.sqrt(len(d))
        out["t_ci"] = [out["diff"] - half, out["diff"] + half]
        out["p_t"] = float(stats.ttest_1samp(d, 0.0).pvalue) if sd > 0 else (1.0 if out["diff"] == 0 else 0.0)
        out["p_signflip"] = sign_flip_p(d)
        out["mde"] = minimum_detectable_effect(d, alpha=1 - conf)
    return out


NOUN_KINDS = ("seen", "unseen")  # a prompt's noun was / was not in adapter training (SURD-mini)


def split_by_noun(records: Sequence[dict]) -> dict[str, list[dict]]:
    """{"seen": records whose noun is a training noun (only the phrasing is new), "unseen":
    the rest (a held-out noun)}."""
    out: dict[str, list[dict]] = {k: [] for k in NOUN_KINDS}
    for r in records:
        out["seen" if r.get("noun") in tw.TRAIN_NOUNS else "unseen"].append(r)
    return out


def seen_unseen(base: Sequence[dict], adapter: Sequence[dict], ceiling: Sequence[dict]) -> dict:
    """An adapter against the base model (simple prompts) and the ceiling (complex prompts) on
    the same prompts and seeds, split into seen-noun and unseen-noun prompts. Per kind: the
    accuracies, the gap closed, the paired test over prompts (``compare``) and over nouns
    (``noun_level``: the test for a claim about unseen nouns)."""
    parts = {k: split_by_noun(x) for k, x in (("base", base), ("adapter", adapter), ("ceiling", ceiling))}
    out = {}
    for kind in NOUN_KINDS:
        b, a, c = (parts[x][kind] for x in ("base", "adapter", "ceiling"))
        if not a:
            continue
        acc = {x: float(np.mean([r["acc"] for r in recs])) for x, recs in (("base", b), ("adapter", a),
                                                                            ("ceiling", c))}
        out[kind] = {"n_prompts": len(a), "n_nouns": len({r.get("noun") for r in a}), "acc": acc,
                     "gap_closed": gap_closed(acc["base"], acc["adapter"], acc["ceiling"]),
                     "prompts": compare(b, a)["overall"], "nouns": noun_level(b, a)}
    return out


def tost_paired(a: Sequence[float], b: Sequence[float], margin: float, alpha: float = 0.05) -> dict:
    """Equivalence of paired scores (b - a) within +-``margin``: two one-sided t-tests (TOST) at
    ``alpha``. Equivalent when both reject, i.e. when the (1 - 2 alpha) t interval of the mean
    difference lies inside (-margin, +margin); ``p_tost`` is the larger one-sided p. E.g.
    differences 0.1, 0.2, 0.3 with margin 1: mean 0.2, sd 0.1, t_upper = (0.2 - 1) / (0.1 / sqrt 3)
    = -13.9, p_upper 0.0026; t_lower = 20.8, p_lower 0.0012: equivalent."""
    if margin <= 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    n = len(d)
    if n < 2:
        raise ValueError(f"TOST needs at least 2 pairs, got {n}")
    mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(n))
    df = n - 1
    if se == 0:
        p_lower = p_upper = 0.0 if -margin < mean < margin else 1.0
    else:
        p_lower = float(stats.t.sf((mean + margin) / se, df))  # H0: mean <= -margin
        p_upper = float(stats.t.cdf((mean - margin) / se, df))  # H0: mean >= +margin
    half = float(stats.t.ppf(1 - alpha, df)) * se
    p = max(p_lower, p_upper)
    return {"margin": float(margin), "mean_diff": mean, "ci": [mean - half, mean + half],
            "ci_level": 1 - 2 * alpha,
            "p_lower": p_lower, "p_upper": p_upper, "p_tost": p, "equivalent": p < alpha, "n": n}
