"""Paired statistics: numbers equal scipy's (or a hand computation) on fixed data."""

import math
import warnings

import numpy as np
import pytest
from scipy import stats

from kdbench.stats.paired import bootstrap_mean_ci, holm, pair_by_seed, paired_t_power, paired_test, seeds_needed

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


def test_constant_differences_follow_scipy():
    same = paired_test({0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.0, 1: 1.0, 2: 2.0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about the zero variance it handles
        ref = stats.ttest_rel([1, 2, 3], [0, 1, 2])
    assert same.t == ref.statistic == math.inf and same.p == ref.pvalue == 0.0
    zero = paired_test({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})
    assert math.isnan(zero.p) and zero.seeds_needed is None


def test_holm_by_hand():
    # sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> max so far 0.06)
    p = [0.01, 0.04, 0.03, float("nan"), 0.005]
    assert np.allclose(holm(p), [0.03, 0.06, 0.06, np.nan, 0.02], equal_nan=True)
    assert holm([]).shape == (0,)


def test_holm_monotone_cap():
    # 0.5 x2 = 1.0 (capped), 0.9 x1 = 0.9 but step-down keeps the running max: 1.0
    assert list(holm([0.9, 0.5])) == [1.0, 1.0]


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


def test_seeds_needed_edge_cases():
    assert seeds_needed(0.0, 1.0) is None and seeds_needed(float("nan"), 1.0) is None
    assert seeds_needed(1.0, 0.0) == 2
    assert seeds_needed(0.001, 1.0, max_n=1000) is None
