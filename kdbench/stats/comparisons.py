"""Method comparisons of paper tables: which pairs are tested, and how their p-values are adjusted.

* The **primary family** of a table is the paper's own claims (:class:`ClaimTest`: one per
  compared pair, from ``kdbench/reference/claims/*.yaml``, or a suite's own ``primary:`` for a table
  no paper claims file covers), tested in the groups the claim covers. Holm over the family
  (family-wise error at the table's α). A claim is either a difference (``better``, ``ablation``:
  the two-sided paired t-test) or a non-inferiority (``matches``: A ≥ B − margin, the one-sided
  paired t-test of :func:`kdbench.stats.paired.noninferiority_p`).
* Every other method against the table's ``reference`` column is **exploratory**:
  Benjamini–Hochberg (false discovery rate), and labelled so.
* **One test, one family.** A test is identified by its metric, its hypothesis and the runs on its
  two sides, in either order for a difference (:func:`comparison_key`). However many tables (or groups of
  a stand-in) show it, it counts once, in one family — the primary family of the first table that
  claims it, else the exploratory family of the first table that shows it (:attr:`Comparison.owner`)
  — and gets one adjusted p-value, the one every table prints (:func:`adjust`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from kdbench.stats.paired import PairedTest, benjamini_hochberg, holm, noninferiority_p, pooled_sd, seeds_needed

PRIMARY, EXPLORATORY = "primary", "exploratory"
CORRECTION = {PRIMARY: "Holm", EXPLORATORY: "BH"}
DIFFERENCE, NONINFERIOR = "difference", "noninferiority"


@dataclass(frozen=True)
class ClaimTest:
    """One compared pair of a claim: row ``a`` against row ``b`` (in ``a_group`` against ``b_group``
    for a claim across groups, e.g. an ensemble size against a smaller one; else in each of
    ``groups``, None: every group), with the claim's id and hypothesis."""

    a: str
    b: str
    claim: str = ""
    hypothesis: str = DIFFERENCE
    margin: float | None = None  # NONINFERIOR only; None: the table's δ
    groups: tuple[str, ...] | None = None
    a_group: str | None = None
    b_group: str | None = None

    @property
    def across_groups(self) -> bool:
        return self.a_group is not None


@dataclass(frozen=True)
class Comparison:
    """Row ``a`` − row ``b`` in ``group``, paired by seed."""

    a: str
    b: str
    group: str
    family: str  # PRIMARY | EXPLORATORY
    key: tuple  # :func:`comparison_key`: equal keys are the same test
    test: PairedTest
    p_adj: float = math.nan  # Holm (primary) or BH (exploratory) within the family
    claim: str = ""  # the claim a primary test tests
    hypothesis: str = DIFFERENCE
    margin: float = math.nan  # of a NONINFERIOR test
    sign: int = 1  # +1: higher is better (accuracy); −1: lower is (an error, a kernel gap)
    owner: str = ""  # the table whose family holds the test
    cells: tuple = ()  # ((row a, group of a), (row b, group of b)) in the table
    sequential: str = ""  # on seeds a budget's looks collected: their decision (a fixed-n p is not valid)

    @property
    def correction(self) -> str:
        return CORRECTION[self.family]

    @property
    def p(self) -> float:
        """The test's own p: two-sided paired t (difference), one-sided non-inferiority (matches)."""
        if self.hypothesis == NONINFERIOR:
            return noninferiority_p(self.test, self.margin, self.sign)
        return self.test.p

    @property
    def tested(self) -> bool:
        return math.isfinite(self.p)


def comparison_key(metric: str, hypothesis: str, runs_a: tuple, runs_b: tuple, margin: float = math.nan) -> tuple:
    """The identity of a test: a difference is the same test in either order (its two-sided p is)."""
    if hypothesis == DIFFERENCE:
        return (metric, hypothesis, *sorted([tuple(runs_a), tuple(runs_b)]))
    return (metric, hypothesis, tuple(runs_a), tuple(runs_b), margin)


def planned_pairs(rows: list[str], claims: list[ClaimTest], reference_row: str | None,
                  unpaired: set[str] = frozenset(), group: str | None = None) -> list[tuple[str, str, str, ClaimTest | None]]:
    """(a, b, family, claim test) for one group: the claims' pairs within the group whose rows it
    has, then every other row against the reference row (exploratory), leaving out rows in
    ``unpaired`` and pairs already primary. Claims across groups are planned by the caller."""
    out = [(c.a, c.b, PRIMARY, c) for c in claims if not c.across_groups and c.a in rows and c.b in rows
           and (c.groups is None or group is None or group in c.groups)]
    seen = {frozenset((a, b)) for a, b, _, _ in out}
    if reference_row is not None:
        for r in rows:
            if r != reference_row and r not in unpaired and frozenset((r, reference_row)) not in seen:
                out.append((r, reference_row, EXPLORATORY, None))
    return out


def adjust(comparisons: list[Comparison]) -> list[Comparison]:
    """The comparisons with ``family``, ``owner``, ``claim`` and ``p_adj`` of their test's one
    family: the first primary occurrence of a key owns it (else its first occurrence); Holm within
    each primary family, BH within each exploratory one, each distinct test counted once."""
    home: dict[tuple, Comparison] = {}
    for c in comparisons:
        if c.key not in home or (c.family == PRIMARY and home[c.key].family != PRIMARY):
            home[c.key] = c
    families: dict[tuple, dict[tuple, float]] = {}
    for key, c in home.items():
        families.setdefault((c.family, c.owner), {})[key] = c.p
    adjusted: dict[tuple, float] = {}
    for (family, _), tests in families.items():
        method = holm if family == PRIMARY else benjamini_hochberg
        adjusted.update(zip(tests, (float(p) for p in method(list(tests.values())))))
    return [replace(c, family=home[c.key].family, owner=home[c.key].owner, claim=home[c.key].claim,
                    hypothesis=home[c.key].hypothesis, p_adj=adjusted[c.key]) for c in comparisons]


def family_size(comparisons: list[Comparison], family: str = PRIMARY, owner: str | None = None) -> int:
    """Distinct tests with a p-value in ``family`` (of ``owner``'s table; None: any): the m of its correction."""
    return len({c.key for c in comparisons if c.family == family and c.tested and (owner is None or c.owner == owner)})


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
               family: str = PRIMARY, owner: str | None = None) -> SeedsPlan:
    """:class:`SeedsPlan` of a table's ``family`` (every distinct test with n ≥ 2 pools its sd)."""
    tests = list({c.key: c.test for c in comparisons if c.family == family and (owner is None or c.owner == owner)}.values())
    sd = pooled_sd([t.sd_diff for t in tests], [t.n for t in tests])
    a = alpha / max(1, family_size(comparisons, family, owner))
    n = seeds_needed(effect, sd, a, power) if math.isfinite(sd) else None
    return SeedsPlan(n, effect, sd, a, power)
