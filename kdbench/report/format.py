"""Rendering of a computed paper table (:class:`kdbench.report.paper_tables.TableResult`): the cell
text, the caption, the markdown page and the two CSV frames, all through one walk
(:func:`grid`) over the table in the paper's orientation."""

from __future__ import annotations

import math

import pandas as pd
from tabulate import tabulate

from kdbench.planning.rehearsal import NOTE as REHEARSAL_NOTE
from kdbench.planning.rehearsal import is_rehearsal_caption
from kdbench.stats.comparisons import EXPLORATORY, PRIMARY, family_size
from kdbench.stats.paired import MIN_BOOTSTRAP_N
from kdbench.report.paper_layout import METRICS
from kdbench.stats.verdict import MAX_MORE_SEEDS

SPREAD_WORDS = {"ci95": "95% CI", "sd": "sd", "unknown": "type unknown"}


def _nan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _p(p: float) -> str:
    return "—" if _nan(p) else (f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}")


def _signed(x, digits=2) -> str:
    return "—" if _nan(x) else f"{x:+.{digits}f}".replace("-", "−")


def _interval(lo, hi, digits=2) -> str:
    return "" if _nan(lo) else f" [{_signed(lo, digits)}, {_signed(hi, digits)}]"


def _digits(metric: str) -> int:
    return 3 if metric.startswith("kernel_gap") else 2


def grid(res) -> tuple[list[str], list[tuple[str, list]]]:
    """The table as the paper prints it: (column labels, [(row label, [cell, …]), …])."""
    spec = res.spec
    rows, groups = list(spec.rows), [g.label for g in spec.groups]
    if spec.layout == "methods_as_rows":
        return groups, [(r, [res.cell(r, g) for g in groups]) for r in rows]
    return rows, [(g, [res.cell(r, g) for r in rows]) for g in groups]


def published_text(c) -> str:
    """The published value exactly as printed, its ± with the spread's type, and n_p where known."""
    if c.published is None:
        return ""
    what = [SPREAD_WORDS[c.spread_type]] if c.spread_type != "none" else []
    what += [f"n={c.published_n}"] if c.published_n else []
    spread = f" ± {c.spread_text}" if c.spread_type != "none" else ""
    return f"pub {c.published_text}{spread}" + (f" ({', '.join(what)})" if what else "")


def verdict_text(c) -> str:
    """Δ with its 90% CI and the verdict, or why there is none ('' in a stand-in)."""
    v = c.check
    if v is None:
        return ""
    d = _digits(c.metric)
    if v.verdict is None:
        delta = f"Δ {_signed(v.delta, d)} · " if not _nan(v.delta) else ""
        return f"{delta}{v.reason}"
    verdict = v.verdict
    if verdict == "inconclusive":
        verdict += f" (+{v.more_seeds} seeds)" if v.more_seeds else f" (not decided by {MAX_MORE_SEEDS} more seeds)"
    return f"Δ {_signed(v.delta, d)}{_interval(*v.ci90, d)} · {verdict}" + (f" · {c.sequential}" if c.sequential else "")


def cell_text(c, sep: str = "<br>") -> str:
    """``75.42 ± 0.21 (n=5)<br>pub 75.48 · Δ −0.06 [−0.41, +0.29] · reproduced (±0.5)``."""
    d = _digits(c.metric)
    notes = [f"{k} {v}" for k, v in (("failed", c.n_failed), ("missing", c.n_missing)) if v]
    if c.n_expected == 0:
        return "n/a" if c.published is None else f"not in suite{sep}{published_text(c)}"
    if c.n == 0:
        text = f"— (0 of {c.n_expected} ok)"
    elif c.n == 1:
        text = f"{c.mean:.{d}f} (n=1)"
    elif c.sd == 0:  # a zero-width interval would claim a certainty the quantised accuracy does not have
        text = f"{c.mean:.{d}f} (n={c.n}, every seed equal)"
    else:
        text = f"{c.mean:.{d}f} ± {(c.hi - c.lo) / 2:.{d}f} (n={c.n})"
    if notes:
        text += f" [{', '.join(notes)}]"
    tail = " · ".join(x for x in (published_text(c), verdict_text(c)) if x)
    return text + (f"{sep}{tail}" if tail else "")


def _verdict_caption(res) -> str:
    spec = res.spec
    margins = sorted({spec.margin_for(g) for g in spec.groups})
    assumed = sorted({c.check.assumption for c in res.cells if c.check is not None and c.check.assumption})
    return (f" pub = the published value as printed (± its spread: type and run count where known). "
            f"Δ = reproduced − published [its 90% CI; SE √(s_r²/n_r + s_p²/n_p), Welch–Satterthwaite df]. Verdict "
            f"against the margin δ = ±{'/'.join(f'{m:g}' for m in margins)} (TOST): `reproduced (±δ)` — the 90% CI "
            f"of Δ inside ±δ; `differs` — the 95% CI excludes 0 and |Δ| ≥ δ; `differs, within ±δ` — the 95% CI "
            f"excludes 0 and the 90% CI is inside ±δ; `inconclusive` — neither, with the further seeds that would "
            f"decide it at the observed Δ and sd; `not decided by {MAX_MORE_SEEDS} more seeds` — the published "
            f"mean's own noise (printed, or assumed where the paper is silent) alone keeps the 90% half-width "
            f"above δ − |Δ|, so no number of our seeds decides it. No verdict below n = 3, at sd 0 or with a "
            f"non-finite value."
            + (f" Assumed where the paper is silent: {'; '.join(assumed)}." if assumed else ""))


def claim_text(t) -> str:
    """One planned primary test in words: ``FKD ≥ CRD − δ`` (a `matches` claim) or ``FKD vs KD``."""
    a = t.a + (f" @ {t.a_group}" if t.a_group else "")
    b = t.b + (f" @ {t.b_group}" if t.b_group else "")
    return f"{a} ≥ {b} − δ" if t.hypothesis == "noninferiority" else f"{a} vs {b}"


def claims_text(primary) -> str:
    """The primary tests grouped by claim: ``claim x: A vs B, A vs C; claim y: …``."""
    by: dict[str, list[str]] = {}
    for t in primary:
        by.setdefault(t.claim, []).append(claim_text(t))
    return "; ".join(f"{'claim ' + c if c else 'the suite’s own'}: {', '.join(v)}" for c, v in by.items())


def _family_caption(res) -> str:
    spec = res.spec
    if not res.comparisons:
        return ""
    m = family_size(res.comparisons, PRIMARY, spec.name)
    text = (f" Paired tests (a seed gives every method the same initialisation and data order): paired t-test "
            f"with the 95% t-interval of the mean difference; where every difference is equal, the exact "
            f"sign-flip p (never 0) and no interval; bootstrap intervals only from n = {MIN_BOOTSTRAP_N} pairs; "
            f"a teacher with one value is a constant its students' seeds are tested against (one-sample t).")
    if spec.primary:
        source = (f"kdbench/reference/claims/{spec.claims[0].paper}.yaml, each with the sentence or table it comes "
                  f"from" if spec.claims else "declared by the suite")
        text += (f" Primary family, the paper's claims ({source}): {claims_text(spec.primary)}; "
                 f"a `better`/`ablation` claim is tested as a difference (two-sided), a `matches` claim as "
                 f"non-inferiority within δ (one-sided); Holm at α = {spec.alpha:g} over {m} distinct test(s).")
    if spec.reference:
        text += f" Every other method − `{spec.reference}`: exploratory, Benjamini–Hochberg."
    if any(c.sequential for c in res.comparisons):
        text += (" Seeds as a budget: where the looks added seeds (kdbench looks), n is adaptive, so no fixed-n "
                 "adjusted p is printed; the decision column gives the looks' own (Holm over the family at "
                 "each look with alpha spending; <runs_dir>/looks/<suite>.md).")
    return text + (" One test, one family: a test repeated on the same runs (a stand-in's groups, or another table "
                   "of the suite, in either order) counts once, in the family of the table that claims it (else "
                   "shows it) first, and every table prints that family's adjusted p.")


def caption(res) -> str:
    """What the table shows, its statistic, verdicts, families and assumptions, in words."""
    spec = res.spec
    what = "; ".join(METRICS[m][0] for m in dict.fromkeys(g.metric for g in spec.groups))
    where = spec.published.get("table", "")
    own, first = spec.caption, ""
    if is_rehearsal_caption(own):  # a rehearsal (kdbench.planning.rehearsal) says so before anything else
        own, first = own[len(REHEARSAL_NOTE):].strip(), f"**{REHEARSAL_NOTE}** "
    head = f"{first}**{spec.name}** — {res.paper_title}{', ' + where if where else ''}."
    body = (f" Reproduced: {what}; mean ± 95% t-interval half-width over seeds (n = finished runs; failed and "
            f"missing runs are counted, never averaged; a run with a non-finite accuracy counts as failed).")
    if spec.stand_in:
        body += " No reproduction verdicts: the published values belong to the paper's setting, not this one."
    else:
        body += _verdict_caption(res)
    extra = " ".join(x for x in (own, spec.stand_in or "") if x)
    return head + body + _family_caption(res) + (f" {extra}" if extra else "")


def _distinct(tests) -> list[tuple]:
    """(comparison, its groups' text): a test repeated on the same runs (a stand-in) listed once."""
    groups: dict[tuple, list] = {}
    for c in tests:
        groups.setdefault((c.a, c.b, c.key), [c]).append(c.group)
    return [(v[0], v[1] if len(v) == 2 else f"{', '.join(v[1:])} (same runs)") for v in groups.values()]


def _decision(c, alpha: float) -> str:
    if c.sequential:
        return c.sequential
    if not c.tested:
        return "not tested"
    return "yes" if c.p_adj < alpha else "no"


def _tests_table(res, family: str) -> list[str]:
    tests = [c for c in res.comparisons if c.family == family and c.test.n > 0]
    if not tests:
        return []
    d = _digits(res.spec.groups[0].metric)
    boot = any(c.test.n >= MIN_BOOTSTRAP_N for c in tests)
    alpha = res.spec.alpha
    rows = []
    for c, group in _distinct(tests):
        t = c.test
        ci = "all differences equal" if t.degenerate else _interval(t.ci_lo, t.ci_hi, d).strip()
        what = (f"{c.claim or 'primary'}" + (" (A ≥ B − δ)" if c.hypothesis == "noninferiority" else "")
                if family == PRIMARY else "exploratory")
        if c.owner != res.spec.name:
            what += f", family of {c.owner}"
        row = [f"{c.a} − {c.b}", what, group, t.n, f"{_signed(t.mean_diff, d)} {ci}", _p(c.p),
               "— (adaptive n)" if c.sequential else _p(c.p_adj), _decision(c, alpha)]
        if boot:
            row.insert(5, _interval(t.boot_lo, t.boot_hi, d).strip() or "—")
        rows.append(row)
    corr = tests[0].correction
    head = ["comparison", "claim" if family == PRIMARY else "family", "group", "pairs", "Δ mean [95% t-CI]", "p",
            f"p ({corr})", f"p ({corr}) < {alpha:g}"]
    if boot:
        head.insert(5, "bootstrap 95% CI")
    title = ("Primary family (the paper's claims; p of a `matches` claim: one-sided non-inferiority)"
             if family == PRIMARY else "Exploratory comparisons")
    return [f"{title}:", "", tabulate(rows, head, tablefmt="github", disable_numparse=True), ""]


def markdown(res) -> str:
    """The page of one table: caption, the table in the paper's layout, the paired tests."""
    labels, body = grid(res)
    text = tabulate([[lab, *(cell_text(c) for c in cells)] for lab, cells in body], ["", *labels],
                    tablefmt="github", disable_numparse=True)
    out = [caption(res), "", text, ""]
    untested = sum(1 for c in res.comparisons if c.test.n == 0)
    if untested:
        out += [f"{untested} comparison(s) have no paired seeds with finished runs yet (not tested).", ""]
    out += _tests_table(res, PRIMARY) + _tests_table(res, EXPLORATORY)
    plan = res.seeds_plan
    if plan is not None and _nan(plan.sd):
        out += ["Seeds needed (prospective): not estimable yet (no primary test has 2 paired seeds).", ""]
    elif plan is not None:
        need = f"{plan.n}" if plan.n is not None else "more than 10,000"
        out += [f"Seeds needed (prospective): {need} paired seeds for power {plan.power:g} to detect a difference of "
                f"δ = {plan.effect:g} at α = {plan.alpha:.3g} (Holm's strictest step), with the sd of the differences "
                f"pooled over the primary family ({plan.sd:.3g}).", ""]
    return "\n".join(out)


def cells_frame(res) -> pd.DataFrame:
    """One row per cell with every statistic (its comparison: against the table's reference)."""
    rows = []
    for c in res.cells:
        v, k = c.check, c.comparison
        t = k.test if k else None
        rows.append({"table": res.spec.name, "row": c.row, "group": c.group, "column": c.column, "metric": c.metric,
                     "n": c.n, "n_failed": c.n_failed, "n_missing": c.n_missing, "n_expected": c.n_expected,
                     "mean": c.mean, "sd": c.sd, "ci_lo": c.lo, "ci_hi": c.hi,
                     "published": c.published_text or None, "published_spread": c.spread_text or None,
                     "spread_type": c.spread_type if c.published is not None else None, "published_n": c.published_n,
                     "published_row": c.published_row, "delta": c.delta, "margin": v.margin if v else None,
                     "delta_ci90_lo": v.ci90[0] if v else None, "delta_ci90_hi": v.ci90[1] if v else None,
                     "delta_ci95_lo": v.ci95[0] if v else None, "delta_ci95_hi": v.ci95[1] if v else None,
                     "verdict": c.verdict, "more_seeds": v.more_seeds if v else None,
                     "assumption": v.assumption if v else None,
                     "reference": k.b if k else None, "family": k.family if k else None,
                     "family_of": k.owner if k else None, "claim": (k.claim or None) if k else None,
                     "pairs": t.n if t else None,
                     "diff_mean": t.mean_diff if t else None, "diff_ci_lo": t.ci_lo if t else None,
                     "diff_ci_hi": t.ci_hi if t else None, "boot_lo": t.boot_lo if t else None,
                     "boot_hi": t.boot_hi if t else None, "p": k.p if k else None, "p_adj": k.p_adj if k else None,
                     "correction": k.correction if k else None, "seeds": " ".join(map(str, sorted(c.values)))})
    return pd.DataFrame(rows)


def layout_frame(res) -> pd.DataFrame:
    """The paper's rows and columns; each paper column expands to mean, ci95_half_width, n,
    failed, missing, published (as printed), delta, verdict."""
    labels, body = grid(res)
    table = []
    for lab, cells in body:
        line = {"": lab}
        for i, c in zip(labels, cells):
            line.update({f"{i} | mean": c.mean, f"{i} | ci95_half_width": (c.hi - c.lo) / 2, f"{i} | n": c.n,
                         f"{i} | failed": c.n_failed, f"{i} | missing": c.n_missing,
                         f"{i} | published": c.published_text or None, f"{i} | delta": c.delta,
                         f"{i} | verdict": c.verdict})
        table.append(line)
    return pd.DataFrame(table)
