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
from .fileio import read_json

ALPHA = 0.05
VERDICTS = ("supported", "contradicted", "not detected")
RESULT_FILES = ("failure", "sur", "ablations", "convergence", "probe")
LATER_FILES = ("tune", "retest")  # used when they exist (long runs that land over sessions)


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
SUMMARY_RETEST = ("no_llm", "no_cp", "teacher_oracle")  # the re-test's rows in the claims table


def verdict(c: dict, alpha: float = ALPHA) -> str:
    """The verdict on "b is better than a" for one ``analysis.compare`` entry (b - a)."""
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
            raise FileNotFoundError(f"{path} is missing: run python -m sur_lib.experiments {name}")
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
        rows.append({"key": name, "claim": claim.text,
                     "tested by": (f"`retest.json`: {name} vs "
                                   f"{'the recipe' if claim.against == 'recipe' else claim.against}, "
                                   f"{steps:,} steps, 150 extended prompts"),
                     "evidence": evidence(c["extended"], f", Holm p {fmt_p(c['extended']['paired']['p_t_holm'])}; "
                                          f"test prompts {100 * t['diff'] + 0.0:+.1f} points, "
                                          f"Holm p {fmt_p(t['paired']['p_t_holm'])}"),
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
                                    f"{fmt_p(t['paired']['p_t'])}"),
            "verdict": verdict(c, alpha)}


def claims_table(res: dict, alpha: float = ALPHA) -> list[dict]:
    """One row per claim: claim, tested by, evidence, verdict (``res``: ``load_results``)."""
    fail, sur, abl, dose, pr = (res[n] for n in RESULT_FILES)
    rows = []
    c = fail["summary"]["complex_minus_simple"]["overall"]
    rows.append({"key": "failure",
                 "claim": "SD 1.5 fails on simple prompts that it draws from complex ones (Sec. 1)",
                 "tested by": "`failure.json`: complex vs simple prompts, base model",
                 "evidence": evidence(c), "verdict": verdict(c, alpha)})
    last = str(dose["settings"]["eval_steps"][-1])
    for set_name, label in (("test", "45 test prompts"), ("extended", "150 extended prompts")):
        s = dose["curve"][set_name]["steps"][last]
        rows.append({"key": f"adapter_{set_name}",
                     "claim": f"SUR-adapter raises simple-prompt accuracy (Table 2): {label}",
                     "tested by": f"`convergence.json`: the paper's settings at {int(last):,} steps",
                     "evidence": evidence(s["change"]["overall"],
                                          f"; {s['gap_closed']['overall']:.0%} of the gap closed; "
                                          f"detectable: {100 * s['mde_80']['overall']:.1f} points"),
                     "verdict": verdict(s["change"]["overall"], alpha)})
    q = sur["summary"]["quality"]["clean_render_distance"]  # lower is better
    rows.append({"key": "quality", "claim": "image quality does not drop (Table 3)",
                 "tested by": (f"`sur.json`: clean-render distance, {sur['train']['steps']}-step "
                               "adapter vs base"),
                 "evidence": (f"{q['diff']:+.2f} (lower is better), two-sample t-test p "
                              f"{fmt_p(q['p'])}, {q['n_a']} + {q['n_b']} images"),
                 "verdict": ("not detected" if q["p"] >= alpha else
                             "supported" if q["diff"] <= 0 else "contradicted")})
    if "tune" in res:
        rows.append(tune_row(res["tune"], alpha))
    if res.get("retest", {}).get("complete"):
        rows += retest_rows(res["retest"], alpha)
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
