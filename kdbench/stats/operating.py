"""The reproduction verdict's operating characteristic, simulated: how often each verdict is given
when the reproduction is off the published mean by a known offset, for every kind of published
spread and the noise the paper may really have had (:mod:`kdbench.stats.verdict` reads what the
paper leaves unsaid the widest plausible way; this module is the evidence that it keeps α).

Each :class:`Scenario` is a spread type as published.csv records it (type, and whether the run
count is stated) together with the truth behind it (the paper's real run count and seed sd, in
units of ours). The simulation draws the reproduced seeds (n_r normal values, sd σ), the paper's
mean over its own n_p seeds (sd ``ratio``·σ) and the spread it prints (its sample sd, or the 95%
CI half-width of its mean), and classifies Δ̂ exactly as a table does. ``python -m
kdbench.stats.operating`` prints the markdown table (for the README).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from kdbench.stats.verdict import PublishedSD, interval_tests, published_sd, se_df, welch_se_df



@dataclass(frozen=True)
class Scenario:
    """A published spread type (``spread_type``, ``n_stated``: the run count published.csv holds,
    None when the paper does not state it) and the truth behind it: the paper ran ``n_true`` seeds
    with a seed sd ``ratio`` times ours, and printed ``printed`` (``sd``, ``ci95`` or nothing)."""

    label: str
    spread_type: str
    n_stated: int | None
    n_true: int
    ratio: float
    printed: str | None


#: the plausible truths behind each spread type (issue 25: one seed, or twice our noise)
SCENARIOS = (
    Scenario("ci95, n_p = 5 stated; paper sd = ours", "ci95", 5, 5, 1.0, "ci95"),
    Scenario("ci95, n_p = 5 stated; paper sd = 2 × ours", "ci95", 5, 5, 2.0, "ci95"),
    Scenario("sd, n_p = 5 stated; paper sd = 2 × ours", "sd", 5, 5, 2.0, "sd"),
    Scenario("unknown (an sd over 3 runs); paper sd = 2 × ours", "unknown", None, 3, 2.0, "sd"),
    Scenario("unknown (a 95% CI over 3 runs); paper sd = 2 × ours", "unknown", None, 3, 2.0, "ci95"),
    Scenario("none, n_p unstated; the paper ran 1 seed, sd = ours", "none", None, 1, 1.0, None),
    Scenario("none, n_p unstated; 5 seeds, sd = 2 × ours", "none", None, 5, 2.0, None),
    Scenario("none, n_p = 5 stated; paper sd = 2 × ours", "none", 5, 5, 2.0, None),
)


def simulate(scenario: Scenario, n_r: int, offset: float, margin: float, sd: float = 1.0,
             reps: int = 20_000, seed: int = 0, reading: PublishedSD | None = None) -> dict[str, float]:
    """P(each verdict) over ``reps`` simulated reproductions with n_r seeds whose true mean is
    ``offset`` above the paper's (all in units where our seed sd is ``sd``). ``reading``: another
    reading of a paper that prints no spread than :func:`published_sd`'s (to test a rejected one)."""
    rng = np.random.default_rng(seed)
    sd_p = scenario.ratio * sd
    delta = offset + sd * rng.standard_normal(reps) / np.sqrt(n_r) - sd_p * rng.standard_normal(reps) / np.sqrt(scenario.n_true)
    s_r = sd * np.sqrt(rng.chisquare(n_r - 1, reps) / (n_r - 1))
    if scenario.printed is None:
        se, df = se_df(s_r, n_r, reading or published_sd(None, "none", scenario.n_stated))
    else:
        s_hat = sd_p * np.sqrt(rng.chisquare(scenario.n_true - 1, reps) / (scenario.n_true - 1))
        printed = s_hat if scenario.printed == "sd" else stats.t.ppf(0.975, scenario.n_true - 1) * s_hat / np.sqrt(scenario.n_true)
        unit = published_sd(1.0, scenario.spread_type, scenario.n_stated)  # the reading is linear in the spread
        se, df = welch_se_df(s_r, n_r, unit.sd * printed, unit.n)
    _, _, equivalent, excludes_0 = interval_tests(delta, se, df, margin)
    differs = ~equivalent & excludes_0 & (np.abs(delta) >= margin)
    counts = {"reproduced": equivalent & ~excludes_0, "differs, within ±δ": equivalent & excludes_0, "differs": differs}
    out = {k: float(v.mean()) for k, v in counts.items()}
    out["inconclusive"] = 1.0 - sum(out.values())
    return out


def operating_table(n_values=(3, 5, 10, 20), offsets=(0.0, 0.5, 1.0, 2.0), margin: float = 0.5, sd: float = 0.3,
                    reps: int = 20_000, seed: int = 0) -> str:
    """The operating characteristic as markdown: one row per scenario × n_r, one column per offset
    (in units of δ), each cell ``inside ±δ / differs / inconclusive`` in percent (inside ±δ:
    `reproduced` + `differs, within ±δ`, the 90% CI of Δ inside ±δ)."""
    lines = [f"Simulated verdicts: δ = {margin:g}, our seed sd {sd:g}, {reps:,} reproductions per cell "
             "(`python -m kdbench.stats.operating`). Offset = true reproduced − published mean. Each cell: "
             "% inside ±δ (`reproduced` or `differs, within ±δ`) / % `differs` / % `inconclusive`. At an offset "
             "≥ δ, inside ±δ is an error (≤ 5%); at offset 0, `differs` is.", "",
             "| published spread (the truth behind it) | n_r | " + " | ".join(f"offset {o:g}δ" for o in offsets) + " |",
             "|---|---|" + "---|" * len(offsets)]
    for i, sc in enumerate(SCENARIOS):
        for n_r in n_values:
            cells = []
            for j, off in enumerate(offsets):
                p = simulate(sc, n_r, off * margin, margin, sd, reps, seed + 1000 * i + 10 * n_r + j)
                inside = p["reproduced"] + p["differs, within ±δ"]
                cells.append(f"{100 * inside:.1f} / {100 * p['differs']:.1f} / {100 * p['inconclusive']:.1f}")
            lines.append(f"| {sc.label} | {n_r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(operating_table())
