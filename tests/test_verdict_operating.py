"""The reproduction verdict keeps its error rates for every plausible published noise (issue 25):
simulated over the spread types, the truths behind them, n_r = 3–20 and offsets 0, δ/2, δ, 2δ."""

import math

import pytest

from kdbench.stats.operating import SCENARIOS, Scenario, operating_table, simulate
from kdbench.stats.verdict import PublishedSD, published_sd

REPS = 20_000
MC = 4 * math.sqrt(0.05 * 0.95 / REPS)  # four Monte Carlo standard errors at a 5% rate (~130 checks)
EQUIVALENT = ("reproduced", "differs, within ±δ")  # the 90% CI of Δ inside ±δ


@pytest.mark.parametrize("sd", [0.3, 1.0])  # δ/σ = 1.67 (CIFAR-100-like) and 0.5
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.label)
def test_an_offset_of_delta_or_more_is_rarely_called_equivalent(scenario, sd):
    for n_r in (3, 5, 10, 20):
        for offset in (0.5, 1.0):  # δ and 2δ, δ = 0.5
            p = simulate(scenario, n_r, offset, 0.5, sd, REPS, seed=n_r)
            assert sum(p[v] for v in EQUIVALENT) <= 0.05 + MC, (n_r, offset, p)
        # no offset: rarely a difference. Exact (5%) where no spread is printed (one variance estimate,
        # t with n_r − 1 df); Welch–Satterthwaite's df is an approximation that reaches ~7% when a
        # printed sd over 3 runs dominates the SE (measured: 7.3% at n_r = 20, δ/σ = 0.5)
        p = simulate(scenario, n_r, 0.0, 0.5, sd, REPS, seed=100 + n_r)
        bound = 0.05 if scenario.printed is None else 0.075
        assert p["differs"] + p["differs, within ±δ"] <= bound + MC, (n_r, p)
        assert math.isclose(sum(p.values()), 1.0)


def test_the_old_reading_of_no_spread_fails_the_same_check():
    """s_p = s_r over the suite's 5 seeds (the reading before issue 25) against a one-seed paper:
    the check above must catch it, or it proves nothing."""
    one_seed = Scenario("one seed", "none", None, 1, 1.0, None)
    old = PublishedSD(None, 5, "old reading", 1.0)
    worst = max(sum(simulate(one_seed, n, 0.5, 0.5, 0.3, REPS, seed=n, reading=old)[v] for v in EQUIVALENT)
                for n in (5, 10, 20))
    assert worst > 0.05 + MC
    new = published_sd(None, "none", None)
    assert all(sum(simulate(one_seed, n, 0.5, 0.5, 0.3, REPS, seed=n, reading=new)[v] for v in EQUIVALENT)
               <= 0.05 + MC for n in (5, 10, 20))


def test_a_large_offset_is_found_and_a_perfect_reproduction_can_be_reproduced():
    # not only conservative: with a stated 95% CI over 5 runs, 20 seeds reproduce a perfect copy
    # most of the time and call an offset of 2δ `differs` almost always
    ci = SCENARIOS[0]
    assert simulate(ci, 20, 0.0, 0.5, 0.3, REPS)["reproduced"] >= 0.75
    assert simulate(ci, 20, 1.0, 0.5, 0.3, REPS)["differs"] >= 0.95


def test_operating_table_is_markdown_with_every_cell():
    text = operating_table(n_values=(3,), offsets=(0.0, 1.0), reps=500)
    rows = [r for r in text.splitlines() if r.startswith("| ") and "n_r" not in r]
    assert len(rows) == len(SCENARIOS)
    for r in rows:
        for cell in r.strip("|").split("|")[-2:]:
            assert math.isclose(sum(float(x) for x in cell.split("/")), 100.0, abs_tol=0.3)
