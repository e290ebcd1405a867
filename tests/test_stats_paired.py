"""Paired statistics: numbers equal scipy's (or a hand computation) on fixed data."""

import math
import warnings

import numpy as np
import pytest
from scipy import stats

from scipy import integrate

from kdbench.stats.paired import (benjamini_hochberg, bootstrap_mean_ci, holm, pair_by_seed, paired_t_power,
                                  paired_test, pooled_sd, seeds_needed, sign_flip_p)

A = {0: 75.12, 1: 74.80, 2: 75.61, 3: 74.95, 4: 75.40}   # e.g. CRD over 5 seeds
B = {0: 73.41, 1: 73.02, 2: 73.90, 3: 73.55, 4: 73.20}   # e.g. KD, same seeds


def test_paired_test_equals_scipy_ttest_rel_and_t_interval():
    res = paired_test(A, B)
    a, b = np.array(list(A.values())), np.array(list(B.values()))
    ref = stats.ttest_rel(a, b)
    d = a - b
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    assert res.n == 5 and res.seeds == (0, 1, 2, 3, 4)
    assert math.isclose(res.t, ref.statistic, rel_tol=1e-12) and math.isclose(res.p, ref.pvalue, rel_tol=1e-12)
    assert math.isclose(res.mean_diff, d.mean()) and math.isclose(res.sd_diff, d.std(ddof=1))
    assert math.isclose(res.ci_lo, lo, rel_tol=1e-12) and math.isclose(res.ci_hi, hi, rel_tol=1e-12)


def test_pairs_only_seeds_both_sides_finished():
    a = {0: 1.0, 1: 2.0, 2: float("nan"), 3: 4.0, 7: 9.0}
    b = {0: 0.5, 1: 1.0, 2: 3.0, 3: None, 5: 1.0}
    seeds, x, y = pair_by_seed(a, b)
    assert seeds == (0, 1) and list(x) == [1.0, 2.0] and list(y) == [0.5, 1.0]
    res = paired_test(a, b)
    ref = stats.ttest_rel([1.0, 2.0], [0.5, 1.0])
    assert res.n == 2 and math.isclose(res.p, ref.pvalue)
    assert math.isnan(paired_test({0: 1.0}, {0: 2.0}).p)  # one pair: no test


def test_identical_differences_get_the_exact_sign_flip_p_never_0():
    same = paired_test({0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.0, 1: 1.0, 2: 2.0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about the zero variance it handles
        assert stats.ttest_rel([1, 2, 3], [0, 1, 2]).pvalue == 0.0  # what the formula gives
    # of the 2^3 sign patterns of (1, 1, 1) only all-plus and all-minus reach |mean| = 1
    assert same.degenerate and same.p == 2 / 8 and same.t == math.inf
    assert math.isnan(same.ci_lo) and math.isnan(same.ci_hi)  # no zero-width interval
    zero = paired_test({0: 1.0, 1: 2.0, 2: 5.0}, {0: 1.0, 1: 2.0, 2: 5.0})
    assert zero.p == 1.0 and math.isnan(zero.t)  # every difference 0: nothing against H0


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_p_is_never_0_on_quantised_accuracies(n):
    rng = np.random.default_rng(n)
    for _ in range(200):  # accuracies on a 200-image test set move in 0.5 pp steps
        a = dict(enumerate(rng.integers(120, 200, n) * 0.5))
        b = {s: v - 0.5 * rng.integers(0, 2) for s, v in a.items()}
        assert paired_test(a, b).p > 0


def test_sign_flip_p_by_enumeration():
    # d = (1, 2, 3): |mean| 2; patterns reaching it: +++ (2) and --- (2) -> 2/8
    assert sign_flip_p([1.0, 2.0, 3.0]) == 2 / 8
    # d = (1, -1, 2, 3): |mean| 1.25; |±1 ±1 ±2 ±3|/4 >= 1.25 in 6 of 16 patterns
    by_hand = sum(abs(s1 * 1 + s2 * -1 + s3 * 2 + s4 * 3) / 4 >= 1.25
                  for s1 in (1, -1) for s2 in (1, -1) for s3 in (1, -1) for s4 in (1, -1))
    assert sign_flip_p([1.0, -1.0, 2.0, 3.0]) == by_hand / 16 == 6 / 16


def test_bootstrap_interval_hidden_below_10_pairs():
    rng = np.random.default_rng(1)
    a9, b9 = dict(enumerate(rng.normal(75, 0.3, 9))), dict(enumerate(rng.normal(74, 0.3, 9)))
    assert math.isnan(paired_test(a9, b9).boot_lo)
    a10, b10 = {**a9, 9: 75.1}, {**b9, 9: 74.2}
    res = paired_test(a10, b10)
    assert math.isfinite(res.boot_lo) and res.boot_lo < res.mean_diff < res.boot_hi


def test_holm_by_hand():
    # sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> max so far 0.06)
    p = [0.01, 0.04, 0.03, float("nan"), 0.005]
    assert np.allclose(holm(p), [0.03, 0.06, 0.06, np.nan, 0.02], equal_nan=True)
    assert holm([]).shape == (0,)


def test_holm_monotone_cap():
    # 0.5 x2 = 1.0 (capped), 0.9 x1 = 0.9 but step-down keeps the running max: 1.0
    assert list(holm([0.9, 0.5])) == [1.0, 1.0]


def test_benjamini_hochberg_by_hand():
    # m = 4, sorted 0.005, 0.01, 0.03, 0.04 -> m·p/rank = 0.02, 0.02, 0.04, 0.04 (running min from the top)
    p = [0.01, 0.04, 0.03, float("nan"), 0.005]
    assert np.allclose(benjamini_hochberg(p), [0.02, 0.04, 0.04, np.nan, 0.02], equal_nan=True)
    assert list(benjamini_hochberg([0.9, 0.5])) == [0.9, 0.9]  # 2·0.5/1 = 1.0 > 0.9 from above


def test_pooled_sd_by_hand():
    # (2·1² + 4·2²) / (2 + 4) = 18/6 = 3; the n = 1 cell and the NaN sd are left out
    assert math.isclose(pooled_sd([1.0, 2.0, 5.0, float("nan")], [3, 5, 1, 4]), math.sqrt(3))
    assert math.isnan(pooled_sd([1.0], [1]))


def test_bootstrap_is_reproducible_and_close_to_t_interval_on_normal_data():
    d = np.random.default_rng(3).normal(0.7, 1.0, size=200)
    b1, b2 = bootstrap_mean_ci(d, seed=11), bootstrap_mean_ci(d, seed=11)
    assert b1 == b2 and bootstrap_mean_ci(d, seed=12) != b1
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    width = hi - lo
    assert abs(b1[0] - lo) < 0.1 * width and abs(b1[1] - hi) < 0.1 * width
    assert all(map(math.isnan, bootstrap_mean_ci([1.0])))  # no interval from one value


@pytest.mark.parametrize("d, n", [(0.5, 34), (0.8, 15), (1.0, 10), (0.2, 199)])
def test_seeds_needed_matches_published_power_tables(d, n):
    # one-sample/paired t-test, two-sided α 0.05, power 0.8 (G*Power; Cohen 1988 tables)
    assert seeds_needed(d, 1.0) == n
    assert seeds_needed(2 * d, 2.0) == n  # only the standardised effect matters


def test_power_function_agrees_with_simulation():
    rng = np.random.default_rng(0)
    n, sims = 10, 20000
    d = rng.normal(1.0, 1.0, size=(sims, n))
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    rejected = np.mean(np.abs(t) > stats.t.ppf(0.975, n - 1))
    assert abs(rejected - paired_t_power(n, 1.0, 1.0)) < 0.015


def power_by_quadrature(n, effect, alpha=0.05):
    """Independent: T = (Z + λ)/√(V/df), V ~ χ²(df), so P(|T| > c) = E_V[Φ(λ − c·s) + Φ(−λ − c·s)],
    s = √(V/df), integrated over V's density."""
    df, lam = n - 1, effect * math.sqrt(n)
    c = stats.t.ppf(1 - alpha / 2, df)

    def integrand(v):
        s = math.sqrt(v / df)
        return (stats.norm.cdf(lam - c * s) + stats.norm.cdf(-lam - c * s)) * stats.chi2.pdf(v, df)
    lo, hi = stats.chi2.ppf([1e-13, 1 - 1e-13], df)  # V's whole mass, so quad sees its peak
    return integrate.quad(integrand, lo, hi, limit=200, epsabs=1e-11)[0]


EFFECTS = [0.2, 0.5, 1.0, 2.0, 3.0, 4.6, 6.0, 7.5, 9.0, 10.0, 11.5, 13.0, 15.0]


@pytest.mark.parametrize("sign", [1, -1])
def test_power_matches_quadrature_over_effects_of_both_signs(sign):
    for e in EFFECTS:
        for n in (2, 3, 4, 5, 10):
            p = paired_t_power(n, sign * e, 1.0)
            assert math.isfinite(p), (e, n)
            assert abs(p - power_by_quadrature(n, e)) < 1e-6, (sign * e, n)
    for e in EFFECTS:  # and at a Holm-adjusted α
        assert abs(paired_t_power(3, sign * e, 1.0, 0.05 / 7) - power_by_quadrature(3, e, 0.05 / 7)) < 1e-6


def test_seeds_needed_does_not_depend_on_the_effects_sign():
    # results/smoke's example: +13.25 / 1.768 gave 2 and -13.25 / 1.768 gave 3 (a NaN from nct.cdf)
    for e in EFFECTS:
        n = seeds_needed(e, 1.0)
        assert n == seeds_needed(-e, 1.0)
        by_quadrature = next(k for k in range(2, 400) if power_by_quadrature(k, e) >= 0.8)
        assert n == by_quadrature, e
    assert seeds_needed(13.25, 1.768) == seeds_needed(-13.25, 1.768)


def test_seeds_needed_edge_cases():
    assert seeds_needed(0.0, 1.0) is None and seeds_needed(float("nan"), 1.0) is None
    assert seeds_needed(1.0, 0.0) == 2
    assert seeds_needed(0.5, 0.3, alpha=0.05 / 10) > seeds_needed(0.5, 0.3)  # a Holm-adjusted α needs more
    assert seeds_needed(0.001, 1.0, max_n=1000) is None
