"""The seed papers' claims as data: ``kdbench/reference/claims/<paper>.yaml``, one file per paper.

Each file lists every comparison the paper's text and tables assert, with where it comes from::

    paper: he2022_fkd                      # published.csv's paper key
    claims:
      - id: fkd_table2_beats_kd_rkd_sp
        table: fkd_table2                  # the paper table (its name in workflow/suites/<paper>.yaml)
        says: better                       # better | matches | ablation
        pairs: [[FKD, "KD (from Tian et al. 2020)"], …]   # row labels; "Row @ Group" for one cell
        groups: [...]                      # optional: the groups it covers (default: every group)
        margin: 0.5                        # matches only, optional: A ≥ B − margin (default: the table's δ)
        quote: "Table 2 shows us that …"   # the sentence, verbatim — or, where no sentence says it,
        inferred: "from the table: …"      # how it is read from a table or figure (never both)
        source: "seed 002 (Samsung blog)"
    not_tested:                            # sentences that assert no pairwise comparison, and why
      - {quote: "…", why: "…"}

``better`` and ``ablation`` (the method beats its variant without a component) are tested as a
difference (two-sided paired t); ``matches`` as non-inferiority (A ≥ B − margin, one-sided). The
table's primary family is generated from its claims (:func:`claim_tests`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import yaml

from kdbench.stats.comparisons import DIFFERENCE, NONINFERIOR, ClaimTest

CLAIMS_DIR = Path(__file__).resolve().parent.parent / "reference" / "claims"
SAYS = {"better": DIFFERENCE, "ablation": DIFFERENCE, "matches": NONINFERIOR}


class ClaimsError(ValueError):
    """A claims file that does not say what it must."""


@dataclass(frozen=True)
class Claim:
    id: str
    paper: str
    table: str
    says: str
    pairs: tuple[tuple[str, str], ...]
    groups: tuple[str, ...] | None
    margin: float | None
    quote: str
    inferred: str
    source: str

    def tests(self) -> list[ClaimTest]:
        """One :class:`ClaimTest` per pair."""
        out = []
        for a, b in self.pairs:
            (ra, ga), (rb, gb) = _cell(a), _cell(b)
            if (ga is None) != (gb is None):
                raise ClaimsError(f"claim {self.id!r}: pair {[a, b]} names a group on one side only")
            out.append(ClaimTest(ra, rb, self.id, SAYS[self.says], self.margin, self.groups, ga, gb))
        return out


def _cell(label: str) -> tuple[str, str | None]:
    row, _, group = label.partition(" @ ")
    return row.strip(), (group.strip() or None)


def _claim(entry: dict, paper: str, path: Path) -> Claim:
    where = f"{path.name}: claim {entry.get('id')!r}"
    missing = [k for k in ("id", "table", "says", "pairs") if k not in entry]
    if missing:
        raise ClaimsError(f"{where}: missing {', '.join(missing)}")
    if entry["says"] not in SAYS:
        raise ClaimsError(f"{where}: says {entry['says']!r}; valid: {', '.join(SAYS)}")
    if bool(entry.get("quote")) == bool(entry.get("inferred")):
        raise ClaimsError(f"{where}: give exactly one of `quote` (the sentence) or `inferred` (how it is read)")
    if "margin" in entry and entry["says"] != "matches":
        raise ClaimsError(f"{where}: a margin belongs to a `matches` claim only")
    pairs = tuple(tuple(p) for p in entry["pairs"])
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ClaimsError(f"{where}: pairs must be [A, B] row labels")
    return Claim(entry["id"], paper, entry["table"], entry["says"], pairs,
                 tuple(entry["groups"]) if entry.get("groups") else None, entry.get("margin"),
                 entry.get("quote", ""), entry.get("inferred", ""), entry.get("source", ""))


@functools.cache
def all_claims(directory: Path = CLAIMS_DIR) -> tuple[Claim, ...]:
    """Every claim of every claims file (ids unique)."""
    out = []
    for path in sorted(directory.glob("*.yaml")):
        with open(path) as f:
            doc = yaml.safe_load(f) or {}
        out += [_claim(e, doc["paper"], path) for e in doc.get("claims", [])]
    ids = [c.id for c in out]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ClaimsError(f"claim ids used twice: {', '.join(dup)}")
    return tuple(out)


def claims_for(table: str, paper: str | None) -> list[Claim]:
    """The claims of paper table ``table`` (of ``paper``, published.csv's key)."""
    return [c for c in all_claims() if c.table == table and c.paper == paper]


def claim_tests(claims: list[Claim]) -> list[ClaimTest]:
    return [t for c in claims for t in c.tests()]
