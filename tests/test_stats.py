import math

import numpy as np
from scipy import stats

from kdbench.stats import mean_ci


def test_mean_ci_equals_scipy_t_interval():
    x = [71.2, 72.5, 70.9, 71.8, 72.1]
    ci = mean_ci(x)
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    assert ci.n == 5
    assert math.isclose(ci.mean, np.mean(x)) and math.isclose(ci.std, np.std(x, ddof=1))
    assert math.isclose(ci.lo, lo, rel_tol=1e-12) and math.isclose(ci.hi, hi, rel_tol=1e-12)


def test_mean_ci_hand_computed():
    # mean 2, s = 1, n = 3, t_{0.975,2} = 4.302652729911275
    ci = mean_ci([1.0, 2.0, 3.0])
    assert math.isclose(ci.half_width, 4.302652729911275 / math.sqrt(3), rel_tol=1e-9)


def test_mean_ci_small_n_and_missing_values():
    assert mean_ci([]).n == 0 and math.isnan(mean_ci([]).mean)
    one = mean_ci([5.0, None])
    assert one.n == 1 and one.mean == 5.0 and math.isnan(one.lo)
