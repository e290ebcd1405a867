"""Group-sequential tests for seeds as a budget: Lan–DeMets alpha-spending boundaries, the nominal
level of each look, and the decisions at a look (statistics.md §3). Pure functions of numbers;
:mod:`kdbench.commands.looks` runs the looks over a suite's run records and keeps their state.
"""

from __future__ import annotations

import math

OPEN, DIFFERS, EQUIVALENT = "undecided", "differs", "equivalent"


# ----------------------------------------------------------------------------- boundaries

def spent(t: float, alpha: float, spending: str) -> float:
    """Cumulative α spent at information fraction ``t`` (Lan–DeMets)."""
    from scipy import stats
    if t <= 0:
        return 0.0
    if spending == "pocock":
        return alpha * math.log(1 + (math.e - 1) * min(t, 1.0))
    # each side spends the one-sided O'Brien–Fleming-type function at α/2
    return float(4 * stats.norm.sf(stats.norm.isf(alpha / 4) / math.sqrt(min(t, 1.0))))


def boundaries(looks: list[int], alpha: float = 0.05, spending: str = "obrien_fleming",
               points: int = 1201) -> list[float]:
    """Two-sided z boundaries c_k of the looks (seed counts): under no effect, P(first |Z_k| ≥ c_k
    at look k) = α(t_k) − α(t_{k−1}). Recursion on a grid of the score S = Z·√t."""
    import numpy as np
    from scipy import optimize, stats
    ts = [n / looks[-1] for n in looks]
    out, grid, dens, prev_t, prev_a = [], None, None, 0.0, 0.0
    for t in ts:
        target = spent(t, alpha, spending) - prev_a
        step = t - prev_t
        if grid is None:  # first look: S ~ N(0, t)
            c = stats.norm.isf(target / 2)
        else:
            w = dens * np.gradient(grid)  # sub-density times the grid's cell widths

            def cross(b):
                s = b * math.sqrt(t)
                sd = math.sqrt(step)
                return float(np.sum(w * (stats.norm.cdf((-s - grid) / sd) + stats.norm.sf((s - grid) / sd)))) - target
            c = optimize.brentq(cross, 0.0, 40.0, xtol=1e-10) if target > 0 else math.inf
        out.append(float(c))
        if not math.isfinite(c):
            break
        s_max = c * math.sqrt(t)
        new = np.linspace(-s_max, s_max, points)
        if grid is None:
            dens = stats.norm.pdf(new, scale=math.sqrt(t))
        else:
            sd = math.sqrt(step)
            dens = (stats.norm.pdf((new[:, None] - grid[None, :]) / sd) / sd) @ w
        grid, prev_t, prev_a = new, t, spent(t, alpha, spending)
    return out


def nominal_levels(looks: list[int], alpha: float = 0.05, spending: str = "obrien_fleming") -> list[float]:
    """The two-sided nominal level α_k = 2(1 − Φ(c_k)) each look tests at."""
    from scipy import stats
    return [float(2 * stats.norm.sf(c)) for c in boundaries(looks, alpha, spending)]


# ----------------------------------------------------------------------------- decisions

def paired_p_values(a: dict, b: dict, margin: float) -> tuple[int, float, float, float]:
    """(n pairs, mean difference, p of "no difference", TOST p of "|difference| ≥ margin")."""
    import numpy as np
    from scipy import stats

    from kdbench.stats.paired import pair_by_seed, sign_flip_p
    seeds, x, y = pair_by_seed(a, b)
    d = x - y
    n = len(seeds)
    if n < 2:
        return n, float(d.mean()) if n else math.nan, math.nan, math.nan
    mean, sd = float(d.mean()), float(np.std(d, ddof=1))
    if sd == 0:  # every difference equal: the exact sign-flip p, and no TOST (no spread to test with)
        return n, mean, sign_flip_p(d), math.nan
    se = sd / math.sqrt(n)
    p = float(2 * stats.t.sf(abs(mean) / se, n - 1))
    tost = max(float(stats.t.sf((mean + margin) / se, n - 1)), float(stats.t.cdf((mean - margin) / se, n - 1)))
    return n, mean, p, tost


def verdict_p_values(delta: float, se: float, df: float, margin: float) -> tuple[float, float]:
    """(p of "reproduced = published", TOST p of "|reproduced − published| ≥ margin") of a
    reproduction verdict's Δ with its Welch standard error (:mod:`kdbench.stats.verdict`)."""
    from scipy import stats
    if not (math.isfinite(delta) and math.isfinite(se) and se > 0):
        return math.nan, math.nan
    p = float(2 * stats.t.sf(abs(delta) / se, df))
    return p, max(float(stats.t.sf((delta + margin) / se, df)), float(stats.t.cdf((delta - margin) / se, df)))


def decide(tests: list[dict], level: float) -> list[str]:
    """Holm at ``level`` over the look's open tests (``p``, ``tost``): differs / equivalent / undecided."""
    import numpy as np

    from kdbench.stats.paired import holm
    p_adj = holm([t["p"] for t in tests])
    tost_adj = holm([t["tost"] for t in tests])
    out = []
    for p, q in zip(p_adj, tost_adj):
        out.append(DIFFERS if np.isfinite(p) and p <= level else EQUIVALENT if np.isfinite(q) and q <= level else OPEN)
    return out
