"""The paper's claims, each with the result file that tests it and a verdict from its numbers.

The limitations chapter shows the whole table and the introduction its gist; both call
``claims_table`` so that they cannot disagree. A verdict follows one rule: a paired t-test over
prompts (or, for image quality, the stored two-sample t-test) at ``ALPHA``; "supported" or
"contradicted" when it rejects, by the sign of the effect, and "not detected" otherwise, always
next to the interval, so that a reader sees how large an effect could still hide in it.

Two long runs join the table when their files exist: ``tune.json`` (ours: a tuned recipe
against the paper's settings) and a complete ``retest.json``, whose rows at the plateau
replace the 150-step ablation rows of the same claims; their verdicts use the Holm-adjusted
p-value of the re-test's family of comparisons.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .book import fmt_p, pct
from ..infra.fileio import read_json

ALPHA = 0.05
VERDICTS = ("supported", "contradicted", "not detected")
# the results claims_table reads (each a registered experiment: ``experiments.registry``)
RESULT_FILES = ("failure", "sur", "ablations", "convergence", "probe")
LATER_FILES = ("tune", "retest", "quality", "channel")  # used when they exist (runs that land over sessions)


@dataclass(frozen=True)
class RetestClaim:
    """What a re-test variant (``experiments.retest``) tests, as a claim about the method."""
    text: str
    against: str  # the variant it is compared with: "recipe" or "strong_llm"
    flip: bool  # True: the claim is that taking something away hurts (against - variant > 0)

    @property
    def key(self) -> str:  # the comparison's key in retest.json's table
        return f"vs_{self.against}"


RETEST_CLAIMS = {
    "no_llm": RetestClaim("the LLM teacher ($L_{LLM}$) helps (Sec. 4 ablation)", "recipe", True),
    "no_cp": RetestClaim("the alignment to the complex prompt ($L_{CP}$) helps", "recipe", True),
    "strong_llm": RetestClaim("a louder teacher (a larger $\\lambda_{LLM}$) helps", "recipe", False),
    "strong_cp": RetestClaim("a louder alignment (a larger $\\lambda_{CP}$) helps", "recipe", False),
    "path_official": RetestClaim("the paper's gradient path beats the authors' detached one",
                                 "recipe", True),
    "teacher_gemma": RetestClaim("Gemma 3 270M teaches better than SmolLM2", "strong_llm", False),
    "teacher_no_sink": RetestClaim("SmolLM2 without its attention-sink token teaches better",
                                   "strong_llm", False),
    "teacher_oracle": RetestClaim("ours: a teacher that knows each prompt's attributes teaches "
                                  "better than SmolLM2", "strong_llm", False),
}
TERM_CLAIMS = {v: RETEST_CLAIMS[v].text for v in ("no_llm", "no_cp")}  # also the 150-step rows
SUMMARY_RETEST = tuple(RETEST_CLAIMS)  # the re-test's rows in the claims table: every verdict it reaches


def verdict(c: dict, alpha: float = ALPHA) -> str:
    """The verdict on "b is better than a" for one ``statistics.compare`` entry (b - a)."""
    p = c["paired"]
    if p is None or p["p_t"] >= alpha:
        return "not detected"
    return "supported" if c["diff"] > 0 else "contradicted"


def evidence(c: dict, extra: str = "") -> str:
    """'+x.x points [lo, hi], p, n prompts' of one ``compare`` entry."""
    p = c["paired"]
    lo, hi = (100 * v + 0.0 for v in p["t_ci"])  # + 0.0: no "-0.0"
    return (f"{100 * c['diff'] + 0.0:+.1f} points [{lo:+.1f}, {hi:+.1f}], p {fmt_p(p['p_t'])}, "
            f"{p['n']} prompts{extra}")


def flipped(c: dict) -> dict:
    """a - b from a ``compare`` entry of b - a (the interval mirrored)."""
    p = c["paired"]
    return {"diff": -c["diff"], "paired": None if p is None else
            dict(p, mean_diff=-p["mean_diff"], t_ci=[-p["t_ci"][1], -p["t_ci"][0]])}


def load_results(folder: Path | str) -> dict:
    """The result files the table needs; a missing one raises, naming its command."""
    out = {}
    for name in RESULT_FILES:
        path = Path(folder) / f"{name}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run python -m sur_lib.study.experiments {name}")
        out[name] = read_json(path, "result file")
    for name in LATER_FILES:
        path = Path(folder) / f"{name}.json"
        if path.is_file():
            out[name] = read_json(path, "result file")
    return out


def holm_adjusted(c: dict) -> dict:
    """A ``compare`` entry whose p-value is its Holm-adjusted one (``retest.table``'s)."""
    return dict(c, paired=dict(c["paired"], p_t=c["paired"]["p_t_holm"]))


def retest_rows(rt: dict, alpha: float = ALPHA) -> list[dict]:
    """The loss-weight and teacher claims at the re-test's budget (``retest.json``): the
    verdict on the 150 extended prompts (the larger set), Holm-corrected across the variants;
    the 45 test prompts' evidence beside it."""
    steps = rt["settings"]["knobs"]["steps"]
    rows = []
    for name in SUMMARY_RETEST:
        claim = RETEST_CLAIMS[name]
        c = {s: rt["table"][s]["variants"][name][claim.key]["overall"] for s in ("extended", "test")}
        if claim.flip:  # against - variant: taking the term away should hurt
            c = {s: flipped(v) for s, v in c.items()}
        t = c["test"]
        va = rt["variants"][claim.against]["records"]["extended"]
        vb = rt["variants"][name]["records"]["extended"]
        split = split_evidence(vb, va) if claim.flip else split_evidence(va, vb)
        rows.append({"key": name, "claim": claim.text,
                     "tested by": (f"`retest.json`: {name} vs "
                                   f"{'the recipe' if claim.against == 'recipe' else claim.against}, "
                                   f"{steps:,} steps, 150 extended prompts"),
                     "evidence": evidence(c["extended"], f" (interval and p unadjusted), Holm p "
                                          f"{fmt_p(c['extended']['paired']['p_t_holm'])}; "
                                          f"test prompts {100 * t['diff'] + 0.0:+.1f} points, "
                                          f"Holm p {fmt_p(t['paired']['p_t_holm'])}; extended, "
                                          f"uncorrected: {split}"),
                     "verdict": verdict(holm_adjusted(c["extended"]), alpha)})
    return rows


def tune_row(tn: dict, alpha: float = ALPHA) -> dict:
    """Ours, not the paper's: the tuned recipe against the paper's settings at the same budget
    (``tune.json``), on the 150 extended prompts; the 45 test prompts' evidence beside it."""
    c, t = (tn["final"][s]["tuned_vs_paper_settings"]["overall"] for s in ("extended", "test"))
    steps = tn["choice"]["knobs"]["steps"]
    return {"key": "tuned", "claim": ("ours: a recipe tuned on the tuning set beats the paper's "
                                      "settings at the same budget"),
            "tested by": (f"`tune.json`: {len(tn['tried'])} configurations, the best vs tiny.yaml "
                          f"at {steps:,} steps, 150 extended prompts"),
            "evidence": evidence(c, f"; test prompts {100 * t['diff'] + 0.0:+.1f} points, p "
                                    f"{fmt_p(t['paired']['p_t'])}; on the extended prompts: " + split_evidence(
                                        tn["final_records"]["paper_settings/extended"]["records"],
                                        tn["final_records"]["tuned/extended"]["records"])),
            "verdict": verdict(c, alpha)}


def noun_evidence(part: dict) -> str:
    """'+x.x points [lo, hi] over n nouns, p (sign-flip p), m prompts' of one kind of
    ``statistics.seen_unseen`` (nouns as the unit)."""
    n = part["nouns"]
    lo, hi = (100 * v + 0.0 for v in n["t_ci"])
    return (f"{100 * n['diff'] + 0.0:+.1f} points [{lo:+.1f}, {hi:+.1f}] over {n['n_nouns']} nouns, "
            f"p {fmt_p(n['p_t'])} (sign-flip p {fmt_p(n['p_signflip'])}), {part['n_prompts']} prompts")


def split_evidence(a: list[dict], b: list[dict]) -> str:
    """'seen nouns +x.x (p), unseen nouns +y.y over n nouns (p)': b - a split by noun kind,
    the unseen part with nouns as the unit."""
    from .statistics import compare, noun_level, split_by_noun

    sa, sb = split_by_noun(a), split_by_noun(b)
    seen = compare(sa["seen"], sb["seen"])["overall"]
    nouns = noun_level(sa["unseen"], sb["unseen"])
    return (f"seen nouns {100 * seen['diff'] + 0.0:+.1f} points (p {fmt_p(seen['paired']['p_t'])}, "
            f"{seen['n_prompts']} prompts), unseen nouns {100 * nouns['diff'] + 0.0:+.1f} points "
            f"(p {fmt_p(nouns['p_t'])} over {nouns['n_nouns']} nouns)")


def noun_verdict(part: dict, alpha: float = ALPHA) -> str:
    """The verdict with nouns as the unit: the t-test over the nouns' mean differences."""
    n = part["nouns"]
    if n.get("p_t") is None or n["p_t"] >= alpha:
        return "not detected"
    return "supported" if n["diff"] > 0 else "contradicted"


def adapter_rows(dose: dict, alpha: float = ALPHA) -> list[dict]:
    """Table 2's claim at the paper's budget (``convergence.json``, the last stored step), split
    by noun: prompts of training nouns in new phrasings (the prompt is the unit) and prompts of
    nouns the adapter never trained on (the noun is the unit, prompts nested in nouns). The
    verdict is on the 150 extended prompts (the larger set); the 45 test prompts beside it."""
    from .statistics import seen_unseen

    last = str(dose["settings"]["eval_steps"][-1])
    rec = dose["records"]
    parts = {s: seen_unseen(rec[f"base-simple/{s}"], rec[f"step-{last}/{s}"], rec[f"base-complex/{s}"])
             for s in ("extended", "test")}
    rows = []
    for kind, what in (("seen", "training nouns in new phrasings"), ("unseen", "nouns it never trained on")):
        e, t = parts["extended"][kind], parts["test"][kind]
        gap = f"; {e['gap_closed']:.0%} of the gap closed"
        if kind == "seen":
            ev = evidence(e["prompts"], gap) + f"; test prompts {100 * t['prompts']['diff'] + 0.0:+.1f} points, " \
                 f"{t['gap_closed']:.0%} of the gap"
            v = verdict(e["prompts"], alpha)
        else:
            ev = noun_evidence(e) + gap + f"; test prompts {100 * t['nouns']['diff'] + 0.0:+.1f} points, " \
                 f"p {fmt_p(t['nouns']['p_t'])} over {t['nouns']['n_nouns']} nouns, {t['gap_closed']:.0%} of the gap"
            v = noun_verdict(e, alpha)
        rows.append({"key": f"adapter_{kind}",
                     "claim": f"SUR-adapter raises simple-prompt accuracy (Table 2): {what}",
                     "tested by": (f"`convergence.json`: the paper's settings at {int(last):,} steps, "
                                   f"{e['n_prompts']} extended prompts of {kind} nouns"),
                     "evidence": ev, "verdict": v})
    return rows


def quality_row_short(sur: dict, alpha: float = ALPHA) -> dict:
    """Table 3 from ``sur.json`` (the short-budget adapter, a two-sample t-test over images):
    the row before ``quality.json`` exists."""
    q = sur["summary"]["quality"]["clean_render_distance"]  # lower is better
    return {"key": "quality", "claim": "image quality does not drop (Table 3)",
            "tested by": (f"`sur.json`: clean-render distance, {sur['train']['steps']}-step "
                          "adapter vs base"),
            "evidence": (f"{q['diff']:+.2f} (lower is better), two-sample t-test p "
                         f"{fmt_p(q['p'])}, {q['n_a']} + {q['n_b']} images"),
            "verdict": ("not detected" if q["p"] >= alpha else
                        "supported" if q["diff"] <= 0 else "contradicted")}


def quality_row(q: dict, alpha: float = ALPHA) -> dict:
    """Table 3 at the plateau (``quality.json``): the clean-render distance paired over prompts,
    with TOST against the margin fixed before the run. "Does not drop" is supported when the
    change is equivalent to 0 within the margin (or a detected improvement), contradicted by a
    detected increase of the distance, else not detected."""
    t = q["table"]["clean_render_distance"]
    p, e = t["paired"], t["tost"]
    lo, hi = e["ci"]
    if e["equivalent"] or (p["p_t"] < alpha and p["mean_diff"] < 0):
        v = "supported"
    elif p["p_t"] < alpha and p["mean_diff"] > 0:
        v = "contradicted"
    else:
        v = "not detected"
    return {"key": "quality", "claim": "image quality does not drop (Table 3)",
            "tested by": (f"`quality.json`: clean-render distance, the {q['adapter']['step']:,}-step adapter "
                          f"vs base, paired over {t['n_prompts']} prompts, TOST margin ±{q['margin']:g}"),
            "evidence": (f"{p['mean_diff']:+.2f} (lower is better), {100 * e['ci_level']:.0f}% CI "
                         f"[{lo:+.2f}, {hi:+.2f}], paired p {fmt_p(p['p_t'])}, TOST p {fmt_p(e['p_tost'])}"),
            "verdict": v}


CHANNEL_CLAIMS = {  # the channel experiment's reading, oracle vs permuted oracle per noun group
    "seen": "ours: the distillation channel carries a true teacher's knowledge to the training nouns",
    "unseen": "ours: the distillation channel carries a true teacher's knowledge to nouns the adapter never trained on",
    "text_only": "ours: a teacher alone teaches a noun that appears only as text, never in an image",
}


def channel_rows(ch: dict, alpha: float = ALPHA) -> list[dict]:
    """The channel experiment (``channel.json``, complete): oracle vs permuted oracle in each
    noun group, at the group's unit (seen: prompts; unseen, text-only: nouns), Holm across the
    group's four comparisons, with the difference the test could detect."""
    from .experiments import channel as chx

    steps = ch["settings"]["steps"]
    rows = []
    for g, text in CHANNEL_CLAIMS.items():
        t = ch["table"][g]["tests"]["oracle_vs_permuted"]
        unit = chx.UNIT[g]
        lvl = t[unit]
        lo, hi = (round(100 * v, 1) + 0.0 for v in (lvl["t_ci"] if unit == "nouns" else lvl["paired"]["t_ci"]))
        diff = round(100 * lvl["diff"], 1) + 0.0  # + 0.0 after rounding: no "-0.0"
        n = lvl["n_nouns"] if unit == "nouns" else lvl["paired"]["n"]
        mde = chx.detectable(ch["variants"], g, "oracle", "permuted")
        rows.append({"key": f"channel_{g}", "claim": text,
                     "tested by": (f"`channel.json`: oracle vs permuted oracle, {steps:,} steps, "
                                   f"{g.replace('_', '-')} nouns, {n} {unit}"),
                     "evidence": (f"{diff:+.1f} points [{lo:+.1f}, {hi:+.1f}] (unadjusted), "
                                  f"Holm p {fmt_p(lvl['p_holm'])}; detectable {100 * mde:.1f} points"),
                     "verdict": chx.verdict(t, g, alpha)})
    return rows


def claims_table(res: dict, alpha: float = ALPHA) -> list[dict]:
    """One row per claim: claim, tested by, evidence, verdict (``res``: ``load_results``)."""
    fail, sur, abl, dose, pr = (res[n] for n in RESULT_FILES)
    rows = []
    c = fail["summary"]["complex_minus_simple"]["overall"]
    rows.append({"key": "failure",
                 "claim": "SD 1.5 fails on simple prompts that it draws from complex ones (Sec. 1)",
                 "tested by": "`failure.json`: complex vs simple prompts, base model",
                 "evidence": evidence(c), "verdict": verdict(c, alpha)})
    rows += adapter_rows(dose, alpha)
    rows.append(quality_row(res["quality"], alpha) if "quality" in res else quality_row_short(sur, alpha))
    if "tune" in res:
        rows.append(tune_row(res["tune"], alpha))
    if res.get("retest", {}).get("complete"):
        rows += retest_rows(res["retest"], alpha)
    if res.get("channel", {}).get("complete"):
        rows += channel_rows(res["channel"], alpha)
    steps = abl["settings"]["budget"]["overrides"]["max_steps"]
    for name, what in TERM_CLAIMS.items():
        if any(r["key"] == name for r in rows):  # the re-test at the plateau answers it
            continue
        helps = flipped(abl["variants"][name]["vs_reference"]["overall"])  # reference - variant
        rows.append({"key": name, "claim": what,
                     "tested by": f"`ablations.json`: the term switched off, {steps} steps",
                     "evidence": evidence(helps, f"; at the short budget ({steps} steps) only"),
                     "verdict": verdict(helps, alpha)})
    col = {k: pr["features"][k]["color"]["all"] for k in ("smollm2", "minilm")}
    ci = {k: [100 * v for v in col[k]["prompt_acc_t_ci"]] for k in col}
    more = col["smollm2"]["prompt_acc_t_ci"][0] > col["minilm"]["prompt_acc_t_ci"][1]
    less = col["smollm2"]["prompt_acc_t_ci"][1] < col["minilm"]["prompt_acc_t_ci"][0]
    rows.append({"key": "probe",
                 "claim": "the LLM knows what the text encoder does not (the premise of $L_{LLM}$)",
                 "tested by": (f"`probe.json`: colour of each of {col['minilm']['n_nouns']} nouns from a "
                               "probe trained without it (leave one noun out)"),
                 "evidence": (f"SmolLM2 {pct(col['smollm2']['prompt_acc'], 0, '%')} "
                              f"[{ci['smollm2'][0]:.0f}, {ci['smollm2'][1]:.0f}] vs MiniLM "
                              f"{pct(col['minilm']['prompt_acc'], 0, '%')} [{ci['minilm'][0]:.0f}, "
                              f"{ci['minilm'][1]:.0f}], chance "
                              f"{pct(col['minilm']['uniform_chance'], 0, '%')}"),
                 "verdict": "supported" if more else "contradicted" if less else "not detected"})
    return rows


def noun_split_sources(res: dict) -> list[tuple[str, str, list, list, list]]:
    """(adapter, set, base, adapter, ceiling records) of every stored headline adapter: the
    paper's settings at 2,000 and 5,000 steps and, when ``tune.json`` exists, the tuned recipe.
    Each triple is one result's own draws (same prompts, seeds and images per prompt)."""
    rec = res["convergence"]["records"]
    out = []
    for step in ("2000", "5000"):
        for s in ("test", "extended"):
            if f"step-{step}/{s}" in rec:
                out.append((f"paper's settings, {int(step):,} steps", s, rec[f"base-simple/{s}"],
                            rec[f"step-{step}/{s}"], rec[f"base-complex/{s}"]))
    rt = res.get("retest")
    if rt and "recipe" in rt.get("variants", {}) and "base_simple/extended" in rt.get("base", {}):
        out.append(("paper's settings, 2,000 steps", "extended", rt["base"]["base_simple/extended"]["records"],
                    rt["variants"]["recipe"]["records"]["extended"], rt["base"]["base_complex/extended"]["records"]))
    if "tune" in res:
        fr = res["tune"]["final_records"]
        for s in ("test", "extended"):
            out.append(("tuned recipe (ours)", s, fr[f"base_simple/{s}"]["records"], fr[f"tuned/{s}"]["records"],
                        fr[f"base_complex/{s}"]["records"]))
    order = {"test": 0, "extended": 1}
    return sorted(out, key=lambda x: (x[0], order[x[1]]))


def noun_split_rows(res: dict) -> list[dict]:
    """The headline adapters on seen-noun and unseen-noun prompts, one row each: accuracy base ->
    adapter (ceiling), the gap closed, and the change with its test (seen: over prompts; unseen:
    over nouns, prompts nested in nouns)."""
    from .statistics import seen_unseen

    rows = []
    for name, s, base, adapter, ceiling in noun_split_sources(res):
        for kind, part in seen_unseen(base, adapter, ceiling).items():
            a = part["acc"]
            if kind == "seen":
                c = part["prompts"]
                lo, hi = (100 * v for v in c["paired"]["t_ci"])
                test = f"{100 * c['diff']:+.1f} [{lo:+.1f}, {hi:+.1f}], p {fmt_p(c['paired']['p_t'])} (prompts)"
            else:
                n = part["nouns"]
                lo, hi = (100 * v for v in n["t_ci"])
                test = f"{100 * n['diff']:+.1f} [{lo:+.1f}, {hi:+.1f}], p {fmt_p(n['p_t'])} (nouns)"
            rows.append({"adapter": name, "set": s, "nouns": f"{kind} ({part['n_nouns']})",
                         "prompts": part["n_prompts"],
                         "accuracy: base → adapter (ceiling)": f"{pct(a['base'], 0)} → {pct(a['adapter'], 0)} "
                                                               f"({pct(a['ceiling'], 0)})",
                         "gap closed": "–" if part["gap_closed"] is None else f"{part['gap_closed']:.0%}",
                         "change, points [95% CI], p": test})
    return rows
