"""Group-sequential tests for seeds as a budget: Lan–DeMets alpha-spending boundaries, the nominal
level of each look, and the decisions at a look (statistics.md §3). Pure functions of numbers;
:mod:`kdbench.commands.looks` runs the looks over a suite's run records and keeps their state.

**Holm over the whole family at every look** (:func:`decide`): the family is fixed when the looks
are declared, and a test closed at an earlier look keeps its place in it. Holm's step-down runs
twice per look, once over the p-values of "no difference" and once over the TOST p-values of "a
difference of at least δ". In each, a test already closed by that kind of decision counts as
rejected (its hypothesis stays rejected), a test closed by the other kind counts as not rejected
(it can never be rejected later, so it keeps Holm's multiplier as it was), and the j-th smallest open
p (with r hypotheses still unrejected) is compared with the level of look k of a design spending α/r
(:func:`look_level`: the α/r the look spends, valid for t-tests at any n). Closing tests as
equivalent therefore never loosens the rest (old code ran Holm over the open tests only: family-wise
error 0.054–0.073 under Pocock). A reproduction (``kind = "reproduction"``) closes as ``differs``
only when |Δ̂| ≥ δ as well, the verdict's rule (:mod:`kdbench.stats.verdict`); rejected with a
smaller |Δ̂| it stays open unless its equivalence is decided.
"""

from __future__ import annotations

import functools
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
    return list(_levels(tuple(looks), float(alpha), spending))


@functools.lru_cache(maxsize=4096)
def _levels(looks: tuple, alpha: float, spending: str) -> tuple:
    from scipy import stats
    return tuple(float(2 * stats.norm.sf(c)) for c in boundaries(list(looks), alpha, spending))


def nominal_level(looks: list[int], k: int, alpha: float, spending: str) -> float:
    """The nominal level of look ``k`` (0-based) of a design spending ``alpha``, by the normal-theory
    boundaries (:func:`boundaries`)."""
    return _levels(tuple(looks), float(alpha), spending)[k]


def look_level(looks: list[int], k: int, alpha: float, spending: str) -> float:
    """The level look ``k`` (0-based) tests at: the α it spends, α(t_k) − α(t_{k−1}) (Bonferroni over
    the looks). Choice: exact for t-tests at any seed count, where the normal-theory nominal level
    (:func:`nominal_level`, which credits the correlation between looks) is not — simulated with
    paired t-tests from n = 3 under Pocock: 5.5% family-wise error at α = 5%. It is never above the
    nominal level, so it gives up a little power for that guarantee."""
    return _look_level(tuple(looks), k, float(alpha), spending)


@functools.lru_cache(maxsize=65536)
def _look_level(looks: tuple, k: int, alpha: float, spending: str) -> float:
    t = [n / looks[-1] for n in looks]
    return spent(t[k], alpha, spending) - (spent(t[k - 1], alpha, spending) if k else 0.0)


#: a first look needing |t| above this cannot stop in practice (O'Brien–Fleming at 3 seeds: ~108)
MAX_USABLE_T = 20.0


def first_look_warning(looks: list[int], alpha: float = 0.05, spending: str = "obrien_fleming",
                       family: int = 1) -> str:
    """Why the first look can decide nothing (a paired t-test at n = looks[0] would need |t| above
    :data:`MAX_USABLE_T` at Holm's strictest step, α/family), or "" when it can."""
    from scipy import stats
    n = looks[0]
    if n < 2:
        return f"the first look at n = {n} has no t-test (needs 2 seeds)"
    level = look_level(looks, 0, alpha / max(1, family), spending)
    t_needed = float(stats.t.isf(level / 2, n - 1))
    if t_needed <= MAX_USABLE_T:
        return ""
    return (f"the first look (n = {n}) can decide nothing: its nominal level {level:.2g} "
            f"({spending}, α = {alpha:g}{f' / {family} tests' if family > 1 else ''}) needs |t| ≥ {t_needed:.0f} "
            f"with {n - 1} degrees of freedom; start the looks at more seeds"
            + (" or use spending: pocock" if spending != "pocock" else ""))


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


def _step_down(p_open: list[float], n_rejected: int, n_total: int, looks: list[int], k: int, alpha: float,
               spending: str) -> list[bool]:
    """Holm's step-down over a family of ``n_total`` at look ``k``: ``n_rejected`` hypotheses already
    rejected at earlier looks, the open ones' p-values ``p_open``; which open ones are rejected now."""
    out = [False] * len(p_open)
    order = sorted((i for i, p in enumerate(p_open) if math.isfinite(p)), key=lambda i: p_open[i])
    for j, i in enumerate(order):
        remaining = n_total - n_rejected - j
        if p_open[i] > look_level(looks, k, alpha / remaining, spending):
            break
        out[i] = True
    return out


def decide(tests: list[dict], looks: list[int], k: int, alpha: float = 0.05, spending: str = "obrien_fleming",
           closed: list[str] = ()) -> list[str]:
    """Decisions at look ``k`` (0-based) of the family's open ``tests`` (``p``, ``tost``, and for a
    reproduction ``kind = "reproduction"``, ``diff`` and ``margin``): differs / equivalent /
    undecided, by Holm over the whole family — the open tests and the ``closed`` decisions of
    earlier looks (DIFFERS or EQUIVALENT), which keep their place."""
    m = len(tests) + len(closed)
    differs = _step_down([t["p"] for t in tests], sum(d == DIFFERS for d in closed), m, looks, k, alpha, spending)
    equivalent = _step_down([t["tost"] for t in tests], sum(d == EQUIVALENT for d in closed), m, looks, k, alpha,
                            spending)
    out = []
    for t, dif, eq in zip(tests, differs, equivalent):
        big_enough = t.get("kind") != "reproduction" or abs(t["diff"]) >= t["margin"]
        out.append(DIFFERS if dif and big_enough else EQUIVALENT if eq else OPEN)
    return out
