"""Paired comparisons of two methods over seeds: pure functions of the per-seed numbers.

kdbench pairs its runs: the same seed gives every method the same student initialisation and
the same data order (``kdbench.engine.seeding``), so two methods are compared through the
per-seed differences d_k = a_k − b_k, which removes the seed-to-seed variation they share.

* :func:`paired_test` — Student's paired t-test (two-sided, as ``scipy.stats.ttest_rel``), the
  t-interval of the mean difference, and a percentile bootstrap interval of the same mean.
* :func:`bootstrap_mean_ci` — the percentile bootstrap (resampling seeds with replacement).
  Choice: percentile rather than BCa, because with the 3–10 seeds a table has BCa's
  acceleration estimate is itself noise; the t-interval stays the primary interval and the
  bootstrap is a distribution-free cross-check (it is known to be too narrow for n < 10).
* :func:`holm` — Holm's step-down adjustment of the p-values of one table (family-wise error).
* :func:`seeds_needed` — the number of paired seeds at which a two-sided paired t-test at
  level α detects the observed mean difference with the given power (noncentral t).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class PairedTest:
    """a − b over ``n`` paired seeds (``seeds``); NaN where n is too small to say."""

    n: int
    seeds: tuple[int, ...]
    mean_diff: float
    sd_diff: float
    t: float
    p: float
    ci_lo: float  # t-interval of the mean difference
    ci_hi: float
    boot_lo: float  # percentile bootstrap interval of the mean difference
    boot_hi: float
    seeds_needed: int | None  # for power 0.8 at α = 0.05 (None: no effect, or more than 10,000)


def pair_by_seed(a: Mapping[int, float], b: Mapping[int, float]) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
    """The seeds present (with a finite value) on both sides, and the two aligned arrays."""
    def ok(v):
        return v is not None and math.isfinite(v)
    seeds = tuple(sorted(s for s in a if s in b and ok(a[s]) and ok(b[s])))
    return seeds, np.array([a[s] for s in seeds], float), np.array([b[s] for s in seeds], float)


def bootstrap_mean_ci(d, level: float = 0.95, n_resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(d): resample the n values with replacement
    ``n_resamples`` times (numpy PCG64 seeded with ``seed``, so the interval is reproducible)."""
    d = np.asarray(d, float)
    if len(d) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_resamples, len(d)))].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def paired_test(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95,
                n_resamples: int = 10_000, seed: int = 0) -> PairedTest:
    """Compare ``a`` with ``b`` (both ``{seed: value}``) on the seeds they share."""
    seeds, x, y = pair_by_seed(a, b)
    n = len(seeds)
    d = x - y
    if n < 2:
        mean = float(d.mean()) if n else math.nan
        return PairedTest(n, seeds, mean, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, None)
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd > 0:
        res = stats.ttest_rel(x, y)
        t, p = float(res.statistic), float(res.pvalue)
    else:  # identical differences: the t statistic is undefined (0/0) or infinite
        t, p = (math.copysign(math.inf, mean), 0.0) if mean != 0 else (math.nan, math.nan)
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
    boot = bootstrap_mean_ci(d, level, n_resamples, seed)
    return PairedTest(n, seeds, mean, sd, t, p, mean - half, mean + half, *boot, seeds_needed(mean, sd))


def holm(pvalues) -> np.ndarray:
    """Holm-adjusted p-values: with the m finite p-values sorted ascending,
    p̃_(i) = max_{j ≤ i} min(1, (m − j + 1)·p_(j)). NaN entries stay NaN and do not count in m."""
    p = np.asarray(pvalues, float)
    out = np.full(p.shape, math.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = len(finite)
    order = finite[np.argsort(p[finite], kind="stable")]
    running = 0.0
    for i, idx in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[idx]))
        out[idx] = running
    return out


def paired_t_power(n: int, effect: float, sd: float, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test with n pairs when the true mean difference is
    ``effect`` and the sd of the differences is ``sd``: P(|T| > t_{1−α/2, n−1}), T ~ t'(n−1, δ),
    δ = effect·√n / sd."""
    df = n - 1
    delta = effect * math.sqrt(n) / sd
    crit = stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(crit, df, delta) + stats.nct.cdf(-crit, df, delta))


def seeds_needed(effect: float, sd: float, alpha: float = 0.05, power: float = 0.8, max_n: int = 10_000) -> int | None:
    """Smallest n ≥ 2 with :func:`paired_t_power` ≥ ``power``; None when the effect is zero or
    not finite, or when more than ``max_n`` seeds would be needed."""
    if not (math.isfinite(effect) and math.isfinite(sd)) or effect == 0:
        return None
    if sd == 0:
        return 2
    lo, hi = 2, 2
    while paired_t_power(hi, effect, sd, alpha) < power:  # power grows with n: bracket, then bisect
        if hi >= max_n:
            return None
        lo, hi = hi, min(hi * 2, max_n)
    while lo < hi:
        mid = (lo + hi) // 2
        if paired_t_power(mid, effect, sd, alpha) >= power:
            hi = mid
        else:
            lo = mid + 1
    return hi
