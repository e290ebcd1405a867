"""``kdbench compare``: two methods of a suite, compared from the run outputs on disk.

For every experiment and teacher → student pair that ran both methods, the seeds both finished
are paired (same seed = same student initialisation and data order) and
:func:`kdbench.stats.paired.paired_test` gives the mean difference A − B, its 95% t-interval,
the two-sided paired t-test p-value (the exact sign-flip p when every difference is equal) and,
from 10 pairs, a percentile-bootstrap interval. The comparisons of A with B over the selected
pairs are one family, Holm-adjusted, each distinct test counted once — the same machinery as
``kdbench tables`` (:mod:`kdbench.stats.comparisons`). Seeds needed is prospective: the paired
seeds for power 0.8 to detect ``--effect`` (default: the first pair's dataset margin δ) at
α = 0.05/m, with the sd of the differences pooled over the pairs. Failed and missing runs are
counted on each side, never used.
"""

from __future__ import annotations

import argparse
import json
import sys

from tabulate import tabulate

from kdbench.core.names import did_you_mean
from kdbench.stats.comparisons import PRIMARY, Comparison, adjust, seeds_plan
from kdbench.stats.paired import paired_test
from kdbench.report.paper_layout import METRICS
from kdbench.report.records import Records
from kdbench.stats.verdict import default_margin


def compare(suite, a: str, b: str, metric: str = "acc_last", experiments: list[str] | None = None,
            dataset: str | None = None, pair: tuple[str, str] | None = None, effect: float | None = None) -> list[dict]:
    """One record per (experiment, dataset, teacher, student) that has both columns; ``effect`` is
    the difference the prospective seeds-needed figure is planned for (default: the margin δ)."""
    columns = {c.column for c in suite.cells}
    for name in (a, b):
        if name not in columns:
            raise ValueError(f"column {name!r} is not in suite {suite.name!r}.{did_you_mean(name, sorted(columns))} Its columns: {', '.join(sorted(columns))}")
    if experiments:
        unknown = set(experiments) - set(suite.experiment_runs)
        if unknown:
            raise ValueError(f"unknown experiment(s) {sorted(unknown)}; valid: {', '.join(suite.experiment_runs)}")
    rec = Records(suite)
    groups: dict[tuple, dict[str, list]] = {}
    for c in suite.cells:
        if c.column in (a, b) and (not experiments or c.experiment in experiments) \
                and (dataset is None or c.dataset == dataset) and (pair is None or (c.teacher, c.student) == tuple(pair)):
            groups.setdefault((c.experiment, c.dataset, c.teacher, c.student), {a: [], b: []})[c.column].append(c)
    out, tests = [], []
    for (exp, ds, t, s), cols in groups.items():
        if not cols[a] or not cols[b]:
            continue
        row = {"experiment": exp, "dataset": ds, "teacher": t, "student": s, "metric": metric}
        values = {}
        for name in (a, b):
            vals, bad = {}, {"failed": 0, "missing": 0}
            for c in cols[name]:
                status, v = rec.value(c, metric)
                if status == "ok":
                    vals[c.seed] = v
                else:
                    bad["missing" if status == "missing" else "failed"] += 1
            values[name] = vals
            row.update({f"{name}_n": len(vals), f"{name}_failed": bad["failed"], f"{name}_missing": bad["missing"]})
        test = paired_test(values[a], values[b])
        runs = tuple(tuple(sorted(c.run for c in cols[name])) for name in (a, b))
        tests.append(Comparison(a, b, f"{exp}/{ds}: {t} → {s}", PRIMARY, runs, test))
        row.update(pairs=test.n, seeds=list(test.seeds), diff=test.mean_diff, sd_diff=test.sd_diff, ci_lo=test.ci_lo,
                   ci_hi=test.ci_hi, boot_lo=test.boot_lo, boot_hi=test.boot_hi, t=test.t, p=test.p)
        out.append(row)
    tests = adjust(tests)
    for row, k in zip(out, tests):
        row["p_holm"] = k.p_adj
    if out:
        plan = seeds_plan(tests, effect if effect is not None else default_margin(out[0]["dataset"], metric))
        for row in out:
            row.update(seeds_needed=plan.n, seeds_needed_effect=plan.effect, seeds_needed_alpha=plan.alpha,
                       pooled_sd_diff=plan.sd)
    return out


def _fmt(x, spec=".2f"):
    return "—" if x is None or x != x else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="kdbench compare",
        description="Compare method A with method B from a suite's finished runs: paired over seeds, prints the "
                    "mean difference A - B, its 95% t-interval (bootstrap interval from 10 pairs), the paired t-test "
                    "p-value (exact sign-flip p when every difference is equal; Holm-adjusted across pairs) and the "
                    "seeds needed to detect --effect (power 0.8, α 0.05/m, sd pooled over the pairs).")
    p.add_argument("a", help="method (column) A, e.g. crd")
    p.add_argument("b", help="method (column) B, the reference, e.g. kd")
    p.add_argument("--suite", required=True, help="suite YAML file whose runs to read")
    p.add_argument("--metric", default="acc_last", choices=list(METRICS), help="statistic (default acc_last)")
    p.add_argument("--experiment", action="append", help="only this experiment (repeatable)")
    p.add_argument("--dataset", help="only this dataset (e.g. a linear-probe dataset)")
    p.add_argument("--pair", nargs=2, metavar=("TEACHER", "STUDENT"), help="only this teacher -> student pair")
    p.add_argument("--effect", type=float, help="smallest difference of interest for seeds needed "
                                                "(default: the dataset's margin δ, e.g. 0.5 pp on CIFAR-100)")
    p.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    args = p.parse_args(argv)
    from kdbench.planning.suite import SuiteError, load_suite
    try:
        rows = compare(load_suite(args.suite), args.a, args.b, args.metric, args.experiment, args.dataset, args.pair,
                       args.effect)
    except (SuiteError, ValueError) as e:
        print(f"kdbench compare: error: {e}", file=sys.stderr)
        return 2
    if not rows:
        print(f"kdbench compare: no experiment of the suite runs both {args.a!r} and {args.b!r} "
              f"(with the filters given)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    a, b = args.a, args.b
    table = [[r["experiment"], r["dataset"], f"{r['teacher']} → {r['student']}",
              f"{r[f'{a}_n']}/{r[f'{b}_n']}" + (" (!)" if any(r[f"{m}_{k}"] for m in (a, b) for k in ("failed", "missing")) else ""),
              r["pairs"], f"{_fmt(r['diff'], '+.2f')} [{_fmt(r['ci_lo'], '+.2f')}, {_fmt(r['ci_hi'], '+.2f')}]",
              f"[{_fmt(r['boot_lo'], '+.2f')}, {_fmt(r['boot_hi'], '+.2f')}]", _fmt(r["p"], ".4g"), _fmt(r["p_holm"], ".4g")]
             for r in rows]
    print(f"{a} − {b}, {METRICS[args.metric][0]}; paired over shared seeds\n")
    print(tabulate(table, ["experiment", "dataset", "pair", f"n {a}/{b}", "pairs", "Δ mean [95% t-CI]",
                           "bootstrap 95% CI (n ≥ 10)", "p", "p (Holm)"], tablefmt="github", disable_numparse=True))
    r = rows[0]
    need = "—" if r["pooled_sd_diff"] != r["pooled_sd_diff"] else (r["seeds_needed"] or "more than 10,000")
    print(f"\nSeeds needed: {need} paired seeds for power 0.8 to detect "
          f"{r['seeds_needed_effect']:g} at α = {r['seeds_needed_alpha']:.3g}, pooled sd of the differences "
          f"{_fmt(r['pooled_sd_diff'], '.3g')}.")
    bad = [r for r in rows if any(r[f"{m}_{k}"] for m in (a, b) for k in ("failed", "missing"))]
    for r in bad:
        print(f"(!) {r['experiment']} {r['teacher']} → {r['student']}: " + ", ".join(
            f"{m}: {r[f'{m}_failed']} failed, {r[f'{m}_missing']} missing" for m in (a, b)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
