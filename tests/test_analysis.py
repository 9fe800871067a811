"""sur_lib.study.statistics: intervals and tests against hand-computed values, the per-prompt record
helpers (hit rates, stored-equals-recomputed) and verify's agreement tolerance."""
import math

import pytest

from sur_lib.study import statistics as an


# ------------------------------------------------------------------ intervals and tests
def test_wilson_interval_hand_values():
    assert an.wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert an.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert an.wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert an.wilson_interval(8, 10, conf=0.90) == pytest.approx((0.5408, 0.9314), abs=1e-4)
    assert all(math.isnan(x) for x in an.wilson_interval(0, 0))
    with pytest.raises(ValueError):
        an.wilson_interval(11, 10)


def test_accuracy_with_ci():
    r = an.accuracy_with_ci([True] * 8 + [False] * 2)
    assert (r["k"], r["n"], r["acc"]) == (8, 10, 0.8)
    assert (r["lo"], r["hi"]) == pytest.approx((0.4902, 0.9433), abs=1e-4)


def test_paired_test_hand_example():
    a = [0.2, 0.4, 0.5, 0.1, 0.3]
    b = [0.5, 0.6, 0.6, 0.4, 0.5]  # differences 0.3 0.2 0.1 0.3 0.2: mean 0.22, sd 0.0837
    r = an.paired_test(a, b)
    assert r["mean_diff"] == pytest.approx(0.22)
    assert r["t"] == pytest.approx(5.8797, abs=1e-4)  # 0.22 / (0.0837 / sqrt 5)
    assert r["p_t"] == pytest.approx(0.00418, abs=1e-5)
    assert r["p_wilcoxon"] == pytest.approx(2 / 32)  # all 5 signs positive, exact
    assert r["t_ci"] == pytest.approx((0.1161, 0.3239), abs=1e-4)  # 0.22 -+ 2.776 * 0.0374
    assert r["boot_ci"][0] <= 0.22 <= r["boot_ci"][1]
    assert r == an.paired_test(a, b)  # seeded bootstrap
    same = an.paired_test([0.5, 0.2], [0.5, 0.2])
    assert same["p_t"] == 1.0 and same["p_wilcoxon"] == 1.0 and same["mean_diff"] == 0.0
    with pytest.raises(ValueError):
        an.paired_test([1, 2], [1])


def test_ttest_ind_hand_example():
    r = an.ttest_ind([1, 2, 3], [4, 5, 6])  # pooled sd 1, se sqrt(2/3), t = 3 / 0.8165
    assert r["t"] == pytest.approx(3.6742, abs=1e-4)
    assert r["p"] == pytest.approx(0.02131, abs=1e-5) and r["changed"]
    assert not an.ttest_ind([1, 2, 3], [1.5, 2, 2.5])["changed"]


# ------------------------------------------------------------------ records and re-runs
def test_hit_rate_pools_images_and_skips_unscored_arrangements():
    recs = [{"type": "counting", "arrangement": None, "n": 4,
             "hits": {"count_ok": 1, "color_ok": 4, "shape_ok": 2, "arrangement_ok": 0}},
            {"type": "action", "arrangement": "row", "n": 2,
             "hits": {"count_ok": 2, "color_ok": 0, "shape_ok": 2, "arrangement_ok": 1}}]
    assert an.hit_rate(recs, "count_ok") == pytest.approx(3 / 6)
    assert an.hit_rate(recs, "color_ok", "counting") == 1.0
    assert an.hit_rate(recs, "arrangement_ok") == 0.5  # the counting prompt asks for none
    assert an.hit_rate(recs, "arrangement_ok", "counting") is None
    assert an.hit_rate(recs, "count_ok", "color") is None


def test_same_numbers_compares_stored_with_recomputed():
    stored = {"acc": 0.1, "ci": [0.05, 0.2], "n": 3, "p": None}
    assert an.same_numbers(stored, {"acc": 0.1 + 1e-15, "ci": (0.05, 0.2), "n": 3, "p": float("nan")})
    assert not an.same_numbers(stored, {**stored, "acc": 0.1001})
    assert not an.same_numbers(stored, {**stored, "n": 4})
    assert not an.same_numbers(stored, {k: v for k, v in stored.items() if k != "p"})
    assert not an.same_numbers([1.0, 2.0], [1.0])
    assert an.same_numbers(1, 1.0) and not an.same_numbers("1", 1.0)


def test_agreement_tolerance():
    # identical numbers always agree, including 0% and 100%
    assert an.agreement(0, 12, 0, 48)["ok"] and an.agreement(12, 12, 48, 48)["ok"]
    # the stated formula: pooled p, z = 3, plus one image of slack
    res = an.agreement(6, 12, 24, 48)
    assert res["tol"] == pytest.approx(3 * (0.25 * (1 / 12 + 1 / 48)) ** 0.5 + 1 / 12)
    # binomial noise passes, a different accuracy fails
    assert an.agreement(9, 12, 40, 48)["ok"]
    assert not an.agreement(0, 12, 48, 48)["ok"]
    assert not an.agreement(12, 12, 0, 48)["ok"]
    assert not an.agreement(2, 12, 40, 48)["ok"]


def test_tost_by_hand_and_its_errors():
    from sur_lib.study.statistics import tost_paired

    # differences 0.1, 0.2, 0.3: mean 0.2, se 0.1 / sqrt 3; margin 1 -> t = -13.86 and +20.78, df 2
    r = tost_paired([0, 0, 0], [0.1, 0.2, 0.3], 1.0)
    assert r["p_upper"] == pytest.approx(0.002584, abs=1e-5) and r["p_lower"] == pytest.approx(0.001153, abs=1e-5)
    assert r["equivalent"] and r["p_tost"] == r["p_upper"]
    half = 2.919986 * 0.1 / 3 ** 0.5  # t_0.95,2
    assert r["ci"] == pytest.approx([0.2 - half, 0.2 + half], abs=1e-5) and r["ci_level"] == pytest.approx(0.9)
    assert not tost_paired([0, 0, 0, 0], [0.9, 1.5, 0.8, 1.2], 1.0)["equivalent"]  # the interval leaves it
    with pytest.raises(ValueError, match="margin"):
        tost_paired([0, 0], [1, 1], 0)
    with pytest.raises(ValueError, match="2 pairs"):
        tost_paired([0], [1], 1)


def test_seen_unseen_splits_by_training_noun():
    from sur_lib.study.statistics import seen_unseen, split_by_noun

    def recs(accs):  # lemon is a training noun, plum and pearl are held out
        return [{"id": f"r{i}", "type": "color", "noun": n, "acc": a}
                for i, (n, a) in enumerate(zip(["lemon", "plum", "pearl", "lemon"], accs))]

    assert [r["id"] for r in split_by_noun(recs([0] * 4))["seen"]] == ["r0", "r3"]
    out = seen_unseen(recs([0.0, 0.0, 0.2, 0.0]), recs([0.5, 0.25, 0.2, 1.0]), recs([1.0, 1.0, 1.0, 1.0]))
    assert out["seen"]["acc"] == {"base": 0.0, "adapter": 0.75, "ceiling": 1.0}
    assert out["seen"]["gap_closed"] == pytest.approx(0.75) and out["seen"]["n_nouns"] == 1
    assert out["unseen"]["acc"]["base"] == pytest.approx(0.1) and out["unseen"]["n_prompts"] == 2
    assert out["unseen"]["nouns"]["per_noun"] == {"plum": 0.25, "pearl": 0.0}
    assert out["unseen"]["gap_closed"] == pytest.approx((0.225 - 0.1) / 0.9)
