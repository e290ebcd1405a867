"""Paired comparisons of two methods over seeds: pure functions of the per-seed numbers.

kdbench pairs its runs: the same seed gives every method the same student initialisation and
the same data order (``kdbench.core.seeding``), so two methods are compared through the
per-seed differences d_k = a_k − b_k, which removes the seed-to-seed variation they share.

* :func:`paired_test` — Student's paired t-test (two-sided, as ``scipy.stats.ttest_rel``) and
  the t-interval of the mean difference: the primary test. When every difference is equal
  (sd 0, common with an accuracy quantised by a small test set) the t statistic is ±∞ or 0/0:
  the p-value is then the exact sign-flip permutation p (:func:`sign_flip_p`: 2/2ⁿ at best,
  1 when every difference is 0), never 0, and there is no interval.
* :func:`bootstrap_mean_ci` — the percentile bootstrap (resampling seeds with replacement).
  Choice: percentile rather than BCa, because with the 3–10 seeds a table has BCa's
  acceleration estimate is itself noise. Below n = 10 (:data:`MIN_BOOTSTRAP_N`) a percentile
  interval under-covers badly (50% at n = 2, ~84% at n = 5), so :func:`paired_test` leaves it
  out (NaN).
* :func:`noninferiority_p` — the one-sided paired t-test of a "matches" claim (A ≥ B − margin).
* :func:`holm` — Holm's step-down adjustment (family-wise error) of a table's primary family;
  :func:`benjamini_hochberg` — the false-discovery-rate adjustment of its exploratory tests.
* :func:`seeds_needed` — a prospective figure: the paired seeds at which a two-sided paired
  t-test at level α detects a *stated* effect (a table's margin δ) with the given power, for an
  sd of the differences pooled over the table's cells (:func:`pooled_sd`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
from scipy import stats


MIN_BOOTSTRAP_N = 10
EXACT_SIGN_FLIP_MAX_N = 20  # 2^20 sign patterns


@dataclass(frozen=True)
class PairedTest:
    """a − b over ``n`` paired seeds (``seeds``); NaN where n is too small to say."""

    n: int
    seeds: tuple[int, ...]
    mean_diff: float
    sd_diff: float
    t: float
    p: float  # paired t-test; the exact sign-flip p when every difference is equal
    ci_lo: float  # t-interval of the mean difference (NaN when sd = 0)
    ci_hi: float
    boot_lo: float  # percentile bootstrap interval of the mean difference (NaN below n = 10)
    boot_hi: float

    @property
    def degenerate(self) -> bool:
        """Every paired difference equal (sd 0): no t-test, the sign-flip p instead."""
        return self.n >= 2 and self.sd_diff == 0


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


def sign_flip_p(d) -> float:
    """Exact two-sided sign-flip permutation p-value of mean(d) = 0: the share of the 2ⁿ sign
    patterns whose |mean| reaches the observed one (never below 2/2ⁿ; 1 when every d is 0).
    Above :data:`EXACT_SIGN_FLIP_MAX_N` values it is not enumerated: NaN."""
    d = np.asarray(d, float)
    n = len(d)
    if n == 0 or n > EXACT_SIGN_FLIP_MAX_N:
        return math.nan
    signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
    means = np.abs(signs @ d) / n
    observed = abs(d.mean())
    return float(np.mean(means >= observed - 1e-12 * max(1.0, observed)))  # ties within rounding count


def paired_test(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95,
                n_resamples: int = 10_000, seed: int = 0) -> PairedTest:
    """Compare ``a`` with ``b`` (both ``{seed: value}``) on the seeds they share (finite values)."""
    seeds, x, y = pair_by_seed(a, b)
    n = len(seeds)
    d = x - y
    nan = math.nan
    if n < 2:
        return PairedTest(n, seeds, float(d.mean()) if n else nan, nan, nan, nan, nan, nan, nan, nan)
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    boot = bootstrap_mean_ci(d, level, n_resamples, seed) if n >= MIN_BOOTSTRAP_N else (nan, nan)
    if sd == 0:  # identical differences: t is ±∞ (or 0/0) and the t-interval has zero width
        return PairedTest(n, seeds, mean, sd, math.copysign(math.inf, mean) if mean else nan, sign_flip_p(d),
                          nan, nan, *boot)
    res = stats.ttest_rel(x, y)
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
    return PairedTest(n, seeds, mean, sd, float(res.statistic), float(res.pvalue), mean - half, mean + half, *boot)


def noninferiority_p(test: PairedTest, margin: float, sign: int = 1) -> float:
    """One-sided paired t p-value of "a is worse than b by at least ``margin``" (H0: sign·(a − b) ≤
    −margin; ``sign`` = +1 where higher is better, −1 for an error): a small p says a matches or beats
    b within the margin. NaN below 2 pairs or at sd 0 (no spread to test with)."""
    if test.n < 2 or not (test.sd_diff > 0) or not math.isfinite(margin):
        return math.nan
    t = (sign * test.mean_diff + margin) / (test.sd_diff / math.sqrt(test.n))
    return float(stats.t.sf(t, test.n - 1))


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


def benjamini_hochberg(pvalues) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (false discovery rate): with the m finite p-values
    sorted ascending, p̃_(i) = min_{j ≥ i} min(1, m·p_(j)/j). NaN entries stay NaN."""
    p = np.asarray(pvalues, float)
    out = np.full(p.shape, math.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = len(finite)
    order = finite[np.argsort(p[finite], kind="stable")]
    running = 1.0
    for i in range(m - 1, -1, -1):
        running = min(running, m * p[order[i]] / (i + 1))
        out[order[i]] = running
    return out


def pooled_sd(sds, ns) -> float:
    """The sd pooled over cells: √(Σ (n_i − 1)·s_i² / Σ (n_i − 1)) over the cells with n_i ≥ 2 and a
    finite s_i (NaN when there is none)."""
    pairs = [(s, n) for s, n in zip(sds, ns) if n >= 2 and s is not None and math.isfinite(s)]
    dof = sum(n - 1 for _, n in pairs)
    return math.sqrt(sum((n - 1) * s * s for s, n in pairs) / dof) if dof else math.nan


def paired_t_power(n: int, effect: float, sd: float, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test with n pairs when the true mean difference is
    ``effect`` and the sd of the differences is ``sd``: P(|T| > c), c = t_{1−α/2, n−1},
    T ~ t'(n−1, λ), λ = |effect|·√n / sd.

    = nct.sf(c, df, λ) + nct.cdf(−c, df, λ). The second term is computed as nct.sf(c, df, −λ)
    (the same number by symmetry): scipy's nct.cdf returns NaN far in the lower tail (λ ≈ 4.6–11.5
    at small df), which made the power, and the seeds needed, depend on the effect's sign."""
    df = n - 1
    lam = abs(effect) * math.sqrt(n) / sd
    crit = stats.t.ppf(1 - alpha / 2, df)
    upper = float(stats.nct.sf(crit, df, lam))
    lower = float(stats.nct.sf(crit, df, -lam))
    if not math.isfinite(upper):
        upper = 1.0 - float(stats.nct.cdf(crit, df, lam))
    if not math.isfinite(lower):
        lower = 0.0  # below P(Z < −λ), itself negligible wherever scipy fails
    return min(1.0, upper + lower)


def seeds_needed(effect: float, sd: float, alpha: float = 0.05, power: float = 0.8, max_n: int = 10_000) -> int | None:
    """Smallest n ≥ 2 with :func:`paired_t_power` ≥ ``power`` for a stated ``effect`` (a table's
    margin δ), the pooled ``sd`` of the differences and the ``alpha`` the table applies (Holm-
    adjusted: α/m for a family of m); None when the effect is zero or not finite, or when more
    than ``max_n`` seeds would be needed."""
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
