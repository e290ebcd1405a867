"""Method comparisons of one table: which pairs are tested, and how their p-values are adjusted.

* The **primary family** is the paper's own claims, declared per table in the suite
  (``primary: {CRD: [KD, FitNet, …]}``: the proposed method's row against each baseline row it
  claims to beat), tested in every group (teacher → student pair, dataset, …) of the table.
  Holm over the family (family-wise error at the table's α).
* Every other method against the table's ``reference`` column is **exploratory**:
  Benjamini–Hochberg (false discovery rate), and labelled so.
* A test is identified by the runs on its two sides (:attr:`Comparison.key`): a stand-in table
  that shows the same runs in several groups repeats one test, which counts once in its family
  and gets one adjusted p-value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from kdbench.stats.paired import PairedTest, benjamini_hochberg, holm, pooled_sd, seeds_needed

PRIMARY, EXPLORATORY = "primary", "exploratory"
CORRECTION = {PRIMARY: "Holm", EXPLORATORY: "BH"}


@dataclass(frozen=True)
class Comparison:
    """Row ``a`` − row ``b`` in ``group``, paired by seed."""

    a: str
    b: str
    group: str
    family: str  # PRIMARY | EXPLORATORY
    key: tuple  # (runs of a, runs of b): equal keys are the same test
    test: PairedTest
    p_adj: float = math.nan  # Holm (primary) or BH (exploratory) within the family

    @property
    def correction(self) -> str:
        return CORRECTION[self.family]


def planned_pairs(rows: list[str], primary: dict[str, list[str]], reference_row: str | None,
                  unpaired: set[str] = frozenset()) -> list[tuple[str, str, str]]:
    """(a, b, family) for one group: the declared primary pairs, then every other row against the
    reference row (exploratory), leaving out rows in ``unpaired`` and pairs already primary."""
    out = [(a, b, PRIMARY) for a, bs in primary.items() for b in bs]
    seen = {frozenset((a, b)) for a, b, _ in out}
    if reference_row is not None:
        for r in rows:
            if r != reference_row and r not in unpaired and frozenset((r, reference_row)) not in seen:
                out.append((r, reference_row, EXPLORATORY))
    return out


def adjust(comparisons: list[Comparison]) -> list[Comparison]:
    """The comparisons with ``p_adj`` filled: Holm within the primary family, BH within the
    exploratory one, each distinct test (by key) counted once."""
    adjusted: dict[tuple, float] = {}
    for family in (PRIMARY, EXPLORATORY):
        unique = {c.key: c.test.p for c in comparisons if c.family == family}
        method = holm if family == PRIMARY else benjamini_hochberg
        for key, p in zip(unique, method(list(unique.values()))):
            adjusted[(family, key)] = float(p)
    return [replace(c, p_adj=adjusted[(c.family, c.key)]) for c in comparisons]


def family_size(comparisons: list[Comparison], family: str = PRIMARY) -> int:
    """Distinct tests with a p-value in ``family`` (the m of its correction)."""
    return len({c.key for c in comparisons if c.family == family and math.isfinite(c.test.p)})


@dataclass(frozen=True)
class SeedsPlan:
    """Seeds needed, prospectively: paired seeds for ``power`` to detect ``effect`` at ``alpha``
    (Holm's strictest step, α/m) with the sd of the differences pooled over the family's tests."""

    n: int | None
    effect: float
    sd: float
    alpha: float
    power: float


def seeds_plan(comparisons: list[Comparison], effect: float, alpha: float = 0.05, power: float = 0.8,
               family: str = PRIMARY) -> SeedsPlan:
    """:class:`SeedsPlan` of a table's ``family`` (every distinct test with n ≥ 2 pools its sd)."""
    tests = list({c.key: c.test for c in comparisons if c.family == family}.values())
    sd = pooled_sd([t.sd_diff for t in tests], [t.n for t in tests])
    a = alpha / max(1, family_size(comparisons, family))
    n = seeds_needed(effect, sd, a, power) if math.isfinite(sd) else None
    return SeedsPlan(n, effect, sd, a, power)
