"""Reproduction verdicts (statistics.md §1): hand-computed numbers and simulated error rates."""

import functools
import math
from dataclasses import replace

import numpy as np
import pytest
from scipy import stats

from kdbench.stats.comparisons import (DIFFERENCE, EXPLORATORY, PRIMARY, ClaimTest, Comparison, adjust, planned_pairs,
                                      seeds_plan, comparison_key)
from kdbench.stats.paired import paired_test
from kdbench.stats.verdict import (PublishedSD, classify, default_margin, no_verdict_reason, published_sd,
                                   reproduction_verdict, welch_se_df)


def test_published_spread_converted_by_type():
    # FKD's own rows: 95% CI half-width 0.22 over 5 students -> s_p = 0.22·√5 / t_{0.975,4}
    ci = published_sd(0.22, "ci95", 5, default_n=3)
    assert math.isclose(ci.sd, 0.22 * math.sqrt(5) / 2.7764451051977987, rel_tol=1e-9) and ci.n == 5 and ci.note == ""
    assert published_sd(0.3, "sd", 4, 5) == PublishedSD(0.3, 4, "")
    unknown = published_sd(0.3, "unknown", None, 5)  # the suite states n_p = 5
    assert unknown.sd == 0.3 and unknown.n == 5 and "unknown type read as an sd" in unknown.note and "n_p = 5" in unknown.note
    # nothing stated: one run, the widest reading of any spread (an sd over 1 run ≥ sd/√n ≥ CI/t)
    assert published_sd(0.3, "unknown", None).n == 1 and "read as one run" in published_sd(0.3, "unknown", None).note
    ci_no_n = published_sd(0.22, "ci95", None)
    assert ci_no_n.sd == 0.22 and ci_no_n.n == 1 and "read as an sd" in ci_no_n.note
    # no spread, run count unpublished: one run with s_p = s_r; stated n_p: twice our sd over n_p
    none = published_sd(None, "none", None)
    assert none.sd is None and (none.n, none.ratio) == (1, 1.0) and "one run with s_p = s_r" in none.note
    stated = published_sd(None, "none", 5)
    assert stated.sd is None and (stated.n, stated.ratio) == (5, 2.0) and "2·s_r over n_p = 5" in stated.note
    with pytest.raises(ValueError, match="ci95, sd, unknown, none"):
        published_sd(0.2, "se", 5, 5)


def test_welch_by_hand():
    # s_r = 0.2, n_r = 10; s_p = 0.3, n_p = 5: a = 0.004, b = 0.018
    se, df = welch_se_df(0.2, 10, 0.3, 5)
    assert math.isclose(se, math.sqrt(0.022))
    assert math.isclose(df, 0.022 ** 2 / (0.004 ** 2 / 9 + 0.018 ** 2 / 4))


def test_verdict_numbers_by_hand():
    x = [75.2, 75.6, 75.4, 75.3, 75.5]
    pub = published_sd(0.2, "sd", 5, 5)
    v = reproduction_verdict(x, 75.48, pub, 0.5)
    s_r = np.std(x, ddof=1)
    se, df = welch_se_df(s_r, 5, 0.2, 5)
    h90 = stats.t.ppf(0.95, df) * se
    assert math.isclose(v.delta, np.mean(x) - 75.48) and math.isclose(v.se, se) and math.isclose(v.df, df)
    assert math.isclose(v.ci90[0], v.delta - h90) and math.isclose(v.ci90[1], v.delta + h90)
    assert v.verdict == "reproduced (±0.5)"


def test_assumed_published_spread_uses_the_reproduced_seeds_df():
    x = [75.0, 75.4, 75.2]
    v = reproduction_verdict(x, 75.1, published_sd(None, "none", None), 0.5)
    s = np.std(x, ddof=1)
    assert math.isclose(v.se, s * math.sqrt(1 / 3 + 1)) and v.df == 2 and "s_p = s_r" in v.assumption
    v = reproduction_verdict(x, 75.1, published_sd(None, "none", 5), 0.5)  # DKD: 5 runs, no spread
    assert math.isclose(v.se, s * math.sqrt(1 / 3 + 4 / 5)) and v.df == 2 and "2·s_r" in v.assumption


@pytest.mark.parametrize("delta, se, expected", [
    (0.0, 0.1, "reproduced (±0.5)"),          # 90% CI ±0.17 inside ±0.5, 95% CI holds 0
    (0.3, 0.05, "differs, within ±0.5"),      # 95% CI excludes 0, 90% CI [0.22, 0.38] inside
    (1.0, 0.1, "differs"),                    # 95% CI excludes 0, |Δ| ≥ δ
    (0.4, 0.2, "inconclusive"),               # 90% CI reaches past 0.5, 95% CI holds 0
    (0.45, 0.1, "inconclusive"),              # 95% CI excludes 0 but |Δ| < δ and 90% CI not inside
])
def test_four_verdicts(delta, se, expected):
    assert classify(delta, se, 20, 0.5)[0] == expected


def test_no_verdict_cases_say_why():
    pub = published_sd(0.2, "sd", 5, 5)
    assert reproduction_verdict([75.0, 75.2], 75.0, pub, 0.5).reason == "no verdict: n < 3"
    equal = reproduction_verdict([75.0, 75.0, 75.0, 75.0], 75.0, pub, 0.5)
    assert equal.verdict is None and "sd 0" in equal.reason
    nan = reproduction_verdict([75.0, float("nan"), 75.2, 75.1], 75.0, pub, 0.5)
    assert nan.verdict is None and "non-finite" in nan.reason and math.isnan(nan.delta)
    assert reproduction_verdict([1.0, 2.0, 3.0], None, None, 0.5).reason == "no published value"
    assert no_verdict_reason([1.0, 2.0, 3.0]) is None


def test_inconclusive_says_how_many_more_seeds_decide_it():
    x = [74.5, 75.0, 75.5]  # s_r = 0.5: the 90% CI is ±0.84 at n = 3
    v = reproduction_verdict(x, 74.95, published_sd(0.05, "sd", 10, 5), 0.5)
    assert v.verdict == "inconclusive" and v.more_seeds is not None
    # at the observed Δ̂ = 0.05 and s_r = 0.5: decided with that many more seeds, not with one fewer
    se, df = welch_se_df(0.5, 3 + v.more_seeds, 0.05, 10)
    assert classify(v.delta, se, df, 0.5)[0] == "reproduced (±0.5)"
    se, df = welch_se_df(0.5, 2 + v.more_seeds, 0.05, 10)
    assert classify(v.delta, se, df, 0.5)[0] == "inconclusive"
    # the published mean's own noise wider than the margin: no number of seeds decides it
    wide = reproduction_verdict(x, float(np.mean(x)), published_sd(0.9, "sd", 3, 5), 0.5)
    assert wide.verdict == "inconclusive" and wide.more_seeds is None


@functools.cache
def _rates(offset, n_r, sigma=0.2, n_p=5, margin=0.5, sims=2000, seed=0):
    """Share of simulated reproductions called reproduced / differs when the reproduced mean is
    ``offset`` above the true published mean; the paper's mean and sd are themselves from n_p seeds."""
    rng = np.random.default_rng(seed)
    calls = []
    for _ in range(sims):
        paper = rng.normal(70.0, sigma, n_p)
        ours = rng.normal(70.0 + offset, sigma, n_r)
        v = reproduction_verdict(ours, float(paper.mean()), published_sd(float(paper.std(ddof=1)), "sd", n_p, n_p), margin)
        calls.append(v.verdict)
    return (np.mean([c.startswith("reproduced") for c in calls]), np.mean([c == "differs" for c in calls]))


def test_simulated_perfect_reproduction_is_called_reproduced():
    # σ = 0.2 pp, n_p = 5, δ = 0.5: at n = 10 a true offset 0 is reproduced >= 90% of the time
    assert _rates(0.0, 10)[0] >= 0.90
    assert _rates(0.0, 5)[0] >= 0.80  # and more seeds never make it worse
    assert _rates(0.0, 20)[0] >= _rates(0.0, 10)[0] - 0.01


def test_simulated_offset_of_one_margin_is_rarely_called_reproduced():
    # TOST at 90%: an offset of exactly δ is called equivalent at most ~5% of the time
    for n in (3, 5, 10, 20):
        assert _rates(0.5, n)[0] <= 0.06, n
    assert _rates(1.5, 10)[1] >= 0.9  # a large offset is called `differs`


def test_default_margins():
    assert default_margin("cifar100") == 0.5 and default_margin("imagenet") == 0.3
    assert default_margin("cifar100", "kernel_gap_pooled") == 0.05 and default_margin("somewhere") == 0.5


def _cmp(a, b, group, family, runs_a, runs_b, values_a, values_b):
    return Comparison(a, b, group, family, (runs_a, runs_b), paired_test(values_a, values_b))


def test_planned_pairs_primary_then_exploratory():
    rows = ["Teacher", "Student", "KD", "FitNet", "CRD"]
    claims = [ClaimTest("CRD", "KD", "c1"), ClaimTest("CRD", "FitNet", "c1"), ClaimTest("CRD", "AT", "c1"),  # no AT row
              ClaimTest("CRD", "Student", "c2", groups=("g2",)), ClaimTest("CRD", "KD", "c3", a_group="g1", b_group="g2")]
    pairs = [(a, b, f, t.claim if t else None) for a, b, f, t in
             planned_pairs(rows, claims, "Student", unpaired={"Teacher"}, group="g1")]
    assert pairs == [("CRD", "KD", PRIMARY, "c1"), ("CRD", "FitNet", PRIMARY, "c1"), ("KD", "Student", EXPLORATORY, None),
                     ("FitNet", "Student", EXPLORATORY, None), ("CRD", "Student", EXPLORATORY, None)]
    in_g2 = [(a, b, f) for a, b, f, _ in planned_pairs(rows, claims, "Student", {"Teacher"}, group="g2")]
    assert ("CRD", "Student", PRIMARY) in in_g2 and ("CRD", "Student", EXPLORATORY) not in in_g2


def test_a_difference_is_one_test_in_either_order():
    assert comparison_key("acc", DIFFERENCE, ("a",), ("b",)) == comparison_key("acc", DIFFERENCE, ("b",), ("a",))
    assert comparison_key("acc", DIFFERENCE, ("a",), ("b",)) != comparison_key("err", DIFFERENCE, ("a",), ("b",))
    assert comparison_key("acc", "noninferiority", ("a",), ("b",), 0.5) != comparison_key("acc", "noninferiority", ("b",), ("a",), 0.5)


def test_shared_test_gets_one_family_and_one_p_across_tables():
    a = {0: 75.1, 1: 75.6, 2: 75.3}
    b = {0: 74.0, 1: 74.2, 2: 74.9}
    c = {0: 74.9, 1: 75.0, 2: 75.5}
    # table T1 claims A − B; table T2 shows B − A (reversed) as exploratory, beside its own C − B
    t1 = replace(_cmp("A", "B", "g", PRIMARY, ("a",), ("b",), a, b), owner="T1", claim="claim1",
                 key=comparison_key("acc", DIFFERENCE, ("a",), ("b",)))
    t2_rev = replace(_cmp("B", "A", "g", EXPLORATORY, ("b",), ("a",), b, a), owner="T2",
                     key=comparison_key("acc", DIFFERENCE, ("b",), ("a",)))
    t2_own = replace(_cmp("C", "B", "g", EXPLORATORY, ("c",), ("b",), c, b), owner="T2",
                     key=comparison_key("acc", DIFFERENCE, ("c",), ("b",)))
    out = adjust([t2_rev, t2_own, t1])  # the order tables come in does not decide the family: the claim does
    assert out[0].family == PRIMARY and out[0].owner == "T1" and out[0].claim == "claim1"
    assert out[0].p_adj == out[2].p_adj == paired_test(a, b).p  # Holm over T1's family of one
    assert out[1].family == EXPLORATORY and math.isclose(out[1].p_adj, paired_test(c, b).p)  # BH over T2's one test


def test_duplicate_tests_count_once_in_holm():
    a = {0: 75.1, 1: 75.6, 2: 75.3}
    b = {0: 74.0, 1: 74.2, 2: 74.9}
    c = {0: 74.9, 1: 75.0, 2: 75.5}
    same_runs = [_cmp("CRD", "KD", g, PRIMARY, ("r1",), ("r2",), a, b) for g in ("g1", "g2", "g3")]
    other = _cmp("CRD", "FitNet", "g1", PRIMARY, ("r1",), ("r3",), a, c)
    out = adjust(same_runs + [other])
    p1, p2 = paired_test(a, b).p, paired_test(a, c).p
    lo, hi = sorted([p1, p2])  # m = 2, not 4
    expected = {lo: min(1, 2 * lo), hi: max(min(1, 2 * lo), hi)}
    assert all(math.isclose(x.p_adj, expected[p1]) for x in out[:3]) and math.isclose(out[3].p_adj, expected[p2])
    plan = seeds_plan(out, 0.5)
    assert math.isclose(plan.alpha, 0.025)  # α / m with m = 2 distinct tests


def test_exploratory_family_is_bh_apart_from_primary():
    a = {0: 75.1, 1: 75.6, 2: 75.3}
    b = {0: 74.0, 1: 74.2, 2: 74.9}
    c = {0: 74.9, 1: 75.0, 2: 75.5}
    prim = _cmp("CRD", "KD", "g", PRIMARY, ("a",), ("b",), a, b)
    e1 = _cmp("KD", "Student", "g", EXPLORATORY, ("b",), ("s",), b, c)
    e2 = _cmp("CRD", "Student", "g", EXPLORATORY, ("a",), ("s",), a, c)
    out = adjust([prim, e1, e2])
    assert math.isclose(out[0].p_adj, prim.test.p)  # a family of one: Holm leaves it alone
    p = sorted([e1.test.p, e2.test.p])
    bh = {p[1]: p[1], p[0]: min(p[1], 2 * p[0])}
    assert math.isclose(out[1].p_adj, bh[e1.test.p]) and math.isclose(out[2].p_adj, bh[e2.test.p])
    assert out[0].correction == "Holm" and out[1].correction == "BH"
