"""Seeds as a budget keeps α (issue 25): Holm over the whole family at every look, closed tests in
their place, simulated under the global null with t-tests from n = 3 seeds."""

import math

import numpy as np
import pytest
from scipy import stats

from kdbench.stats.sequential import DIFFERS, EQUIVALENT, OPEN, decide, first_look_warning, look_level

LOOKS = [3, 5, 10]
MARGIN = 0.5  # in units of the differences' sd: under the null some tests close as equivalent


def _p_values(d: np.ndarray, margin: float):
    """Two-sided paired t p and TOST p of each row of d (reps × n)."""
    n = d.shape[-1]
    mean, se = d.mean(-1), d.std(-1, ddof=1) / math.sqrt(n)
    p = 2 * stats.t.sf(np.abs(mean) / se, n - 1)
    tost = np.maximum(stats.t.sf((mean + margin) / se, n - 1), stats.t.cdf((mean - margin) / se, n - 1))
    return p, tost


def family_error(m: int, spending: str, reps: int, seed: int = 0, decide_fn=decide, effect: float = 0.0) -> float:
    """Share of simulated families (m paired comparisons, true difference ``effect``) in which
    any test is declared `differs` at some look."""
    rng = np.random.default_rng(seed)
    d = effect + rng.standard_normal((reps, m, LOOKS[-1]))
    pv = [_p_values(d[..., :n], MARGIN) for n in LOOKS]
    errors = 0
    for r in range(reps):
        state = [OPEN] * m
        for k in range(len(LOOKS)):
            open_ = [i for i in range(m) if state[i] == OPEN]
            if not open_:
                break
            tests = [{"p": pv[k][0][r, i], "tost": pv[k][1][r, i]} for i in open_]
            closed = [s for s in state if s != OPEN]
            for i, dec in zip(open_, decide_fn(tests, LOOKS, k, 0.05, spending, closed)):
                state[i] = dec
        errors += DIFFERS in state
    return errors / reps


@pytest.mark.parametrize("spending", ["pocock", "obrien_fleming"])
@pytest.mark.parametrize("m, reps", [(1, 100_000), (12, 20_000)])
def test_family_wise_error_under_the_global_null(m, reps, spending):
    mc = 3 * math.sqrt(0.05 * 0.95 / reps)
    assert family_error(m, spending, reps, seed=m) <= 0.05 + mc


def test_the_check_catches_an_unadjusted_design():
    """Every look at the full α with no Holm: the same simulation must call it out of bounds."""
    def naive(tests, looks, k, alpha, spending, closed):
        return [DIFFERS if t["p"] <= alpha else EQUIVALENT if t["tost"] <= alpha else OPEN for t in tests]
    assert family_error(12, "pocock", 2000, decide_fn=naive) > 0.3


def test_a_real_difference_is_found():
    # every one of 12 comparisons off by 2 sd: nearly always found by the last look
    assert family_error(12, "pocock", 500, effect=2.0) > 0.95


def test_closed_tests_keep_their_place_in_holm():
    looks, k = [3, 5, 10], 1
    level = {r: look_level(looks, k, 0.05 / r, "pocock") for r in (1, 2, 3)}
    p = (level[3] + level[2]) / 2  # between Holm's step for 3 and for 2 remaining
    tests = [{"p": p, "tost": 1.0}]
    # two tests closed as equivalent stay unrejected: the open one is at its Holm step of 3
    assert decide(tests, looks, k, 0.05, "pocock", [EQUIVALENT, EQUIVALENT]) == [OPEN]
    # one closed as differs stays rejected: 2 remain, and p passes level(α/2)
    assert decide(tests, looks, k, 0.05, "pocock", [DIFFERS, EQUIVALENT]) == [DIFFERS]
    # the old rule (Holm over the open tests only) would have rejected at α/1 in the first case
    assert p <= level[1]


def test_a_reproduction_differs_only_by_delta_as_the_verdict():
    looks = [3, 5]
    tiny_p = {"p": 1e-12, "tost": 1.0, "kind": "reproduction", "margin": 0.5}
    assert decide([{**tiny_p, "diff": 0.2}], looks, 0, 0.05, "pocock") == [OPEN]
    assert decide([{**tiny_p, "diff": -0.7}], looks, 0, 0.05, "pocock") == [DIFFERS]
    assert decide([{**tiny_p, "diff": 0.2, "tost": 1e-12}], looks, 0, 0.05, "pocock") == [EQUIVALENT]


def test_a_first_look_that_cannot_stop_is_named():
    why = first_look_warning([3, 5, 10], 0.05, "obrien_fleming")
    assert "can decide nothing" in why and "|t| ≥ 108" in why
    assert first_look_warning([3, 5, 10], 0.05, "pocock") == ""
    assert "12 tests" in first_look_warning([3, 5, 10], 0.05, "pocock", family=12)
    assert first_look_warning([10, 20], 0.05, "obrien_fleming") == ""  # 10 seeds: |t| ≥ 4.3 suffices
