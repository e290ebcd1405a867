"""Seeds as a budget: more seeds only where a comparison is still undecided (statistics.md §3).

An experiment may declare its seeds as a budget instead of a list::

    seeds: {min: 3, looks: [3, 5, 10], spending: obrien_fleming, alpha: 0.05, margin: 0.5,
            reference: student}

``looks`` are the pre-declared cumulative seed counts at which the results are examined (``min``,
if given, must equal ``looks[0]``). Every cell (method × teacher → student pair) starts with seeds
``0 … looks[0]−1``. After the runs of look k have finished, :func:`next_look` (``kdbench
next-look``) tests every comparison still open — each method − ``reference`` per pair, paired by
seed, and each reproduction verdict of a paper table (not a stand-in) over the experiment's runs:
Δ = reproduced − published with its Welch standard error (:mod:`kdbench.stats.verdict`) — and
gives the next look's seeds only to the cells it could not decide (a comparison's both sides, so
they stay paired); decided cells keep theirs.

**Decision at look k.** The nominal two-sided level α_k of look k comes from a Lan–DeMets
alpha-spending function of the information fraction t_k = looks[k] / looks[-1], so that the
whole sequence of looks keeps the family-wise error at ``alpha``:

* ``obrien_fleming`` (default): α(t) = 4 − 4Φ(z_{1−α/4}/√t) (each side spends the one-sided
  O'Brien–Fleming-type function at α/2) — almost nothing is spent at the early looks, so the
  last look is tested at nearly the full α;
* ``pocock``: α(t) = α·ln(1 + (e − 1)·t) — about equal levels at every look.

The boundaries c_k (|Z| ≥ c_k stops) are found by numerical integration of the Brownian-motion
sub-densities over the continuation region (Armitage–McPherson–Rowe recursion), and α_k =
2(1 − Φ(c_k)). Within a look, Holm's procedure at level α_k runs over the look's open
comparisons, once for the paired t-test of "no difference" and once for the TOST of "a
difference of at least δ" (two one-sided paired t-tests against ±δ). A comparison is decided
when either rejects: ``differs`` (the difference is real) or ``equivalent (±δ)``; otherwise it
is ``undecided`` and, before the last look, gets more seeds. Choice: the normal-theory boundary
is used as the t-test's nominal level (the usual group-sequential t approximation), and
stopping for equivalence spends the same α_k as stopping for a difference.

**State.** ``<runs_dir>/looks/<suite>.json`` records, per experiment, the declaration, the
look reached, the seeds of every cell and every decision; :func:`cell_seeds` reads it when the
suite is loaded, so Snakemake then runs exactly the added seeds and redraws the tables.
``<runs_dir>/looks/<suite>.md`` says the same for a reader. ``kdbench looks --suite S`` runs
the loop: Snakemake, next look, Snakemake … until nothing is added.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from kdbench.planning.budget import SPENDING, budget, cell_key, cell_seeds, read_state, state_path  # noqa: F401  (the declaration)
from kdbench.stats.sequential import (DIFFERS, EQUIVALENT, OPEN, boundaries, decide, nominal_levels,  # noqa: F401
                                      paired_p_values, spent, verdict_p_values)

def reproduction_tests(suite, exp: dict, level: float, look: int, seeds: int) -> list[dict]:
    """One test per paper-table cell (not a stand-in) with a published value whose runs are this
    experiment's: its reproduction verdict's Δ, tested like a comparison (a cell without a verdict
    — too few seeds, every seed equal — is undecided)."""
    from kdbench.report.paper_tables import compute, table_specs
    out = []
    for spec in table_specs(suite):
        if spec.stand_in or not any(exp["name"] in g.experiments for g in spec.groups):
            continue
        res = compute(spec, suite)
        for c in res.cells:
            g = next(g for g in spec.groups if g.label == c.group)
            if c.published is None or c.n_expected == 0 or exp["name"] not in g.experiments or c.column == "teacher":
                continue
            margin = spec.margin_for(g)
            check = c.check
            p, tost = verdict_p_values(check.delta, check.se, check.df, margin) if check else (math.nan, math.nan)
            out.append({"look": look, "seeds": seeds, "pair": f"{g.pair[0]}--{g.pair[1]}", "method": c.column,
                        "reference": f"published ({spec.name}: {c.row} / {c.group})", "n": c.n,
                        "diff": c.delta, "p": p, "tost": tost, "level": level, "margin": margin})
    return out


def _values(records, exp: str, metric: str) -> dict[tuple, dict[int, float]]:
    out: dict[tuple, dict[int, float]] = {}
    for r in records[(records.experiment == exp) & (records.status == "ok")].itertuples():
        v = getattr(r, metric)
        if v is not None and math.isfinite(v):
            out.setdefault((r.teacher, r.student, r.method), {})[r.seed] = float(v)
    return out


def next_look(suite, write: bool = True) -> dict[str, dict]:
    """Decide the comparisons of every budgeted experiment at its current look and give the next
    look's seeds to the undecided ones; returns (and writes) the new state. A look is taken only
    once every run of the current look has finished (else ValueError naming the missing ones)."""
    from kdbench.report.aggregate import run_records
    from kdbench.stats.verdict import default_margin
    cfg, state = suite.config, read_state(suite.config)
    records = run_records(suite)
    for exp in cfg["experiments"]:
        b = budget(exp)
        if b is None:
            continue
        rec = records[records.experiment == exp["name"]]
        unfinished = rec[~rec.status.isin(["ok", "failed"])]
        if len(unfinished):
            raise ValueError(f"experiment {exp['name']!r}: {len(unfinished)} run(s) of the current look have not "
                             f"finished (e.g. {unfinished.run.iloc[0]}); run snakemake first, then kdbench next-look")
        st = state.get(exp["name"]) or {"looks": b["looks"], "spending": b["spending"], "alpha": b["alpha"],
                                        "look": 0, "seeds": {}, "decisions": []}
        k = st["look"]
        if k >= len(b["looks"]) or st.get("done"):
            continue
        margin = float(b["margin"] if b["margin"] is not None else default_margin(exp["dataset"], b["metric"]))
        level = nominal_levels(b["looks"], b["alpha"], b["spending"])[k]
        values = _values(rec, exp["name"], b["metric"])
        closed = {(d["pair"], d["method"], d["reference"]) for d in st["decisions"] if d["decision"] != OPEN}
        tests = []
        for t_arch, s_arch in exp["pairs"]:
            pair = f"{t_arch}--{s_arch}"
            ref = values.get((t_arch, s_arch, b["reference"]), {})
            for column in dict.fromkeys(c.column for c in suite.cells if c.experiment == exp["name"]
                                        and (c.teacher, c.student) == (t_arch, s_arch)):
                if column in (b["reference"], "teacher") or (pair, column, b["reference"]) in closed:
                    continue
                n, diff, p, tost = paired_p_values(values.get((t_arch, s_arch, column), {}), ref, margin)
                tests.append({"look": k + 1, "seeds": b["looks"][k], "pair": pair, "method": column,
                              "reference": b["reference"], "n": n, "diff": diff, "p": p, "tost": tost,
                              "level": level, "margin": margin})
        tests += [t for t in reproduction_tests(suite, exp, level, k + 1, b["looks"][k])
                  if (t["pair"], t["method"], t["reference"]) not in closed]
        for t, verdict in zip(tests, decide(tests, level)):
            t["decision"] = verdict
        st["decisions"] = st["decisions"] + tests
        undecided = [t for t in tests if t["decision"] == OPEN]
        if k + 1 < len(b["looks"]) and undecided:
            n_next = b["looks"][k + 1]
            for t in undecided:  # a comparison's two cells (they stay paired), or a reproduced cell
                for column in (t["method"], b["reference"]) if t["reference"] == b["reference"] else (t["method"],):
                    st["seeds"][f"{t['pair']}/{column}"] = n_next
            st["look"] = k + 1
        else:
            st["done"] = True
        state[exp["name"]] = st
    if write:
        from kdbench.core.io import atomic_write_bytes
        path = state_path(cfg)
        atomic_write_bytes(path, json.dumps(state, indent=1).encode())
        atomic_write_bytes(path.with_suffix(".md"), report(state).encode())
    return state


def report(state: dict) -> str:
    """The looks of every budgeted experiment, for a reader (also ``kdbench next-look``'s output)."""
    lines = []
    for name, st in state.items():
        levels = nominal_levels(st["looks"], st["alpha"], st["spending"])
        rule = ("O'Brien–Fleming-type" if st["spending"] == "obrien_fleming" else "Pocock-type")
        lines += [f"## {name}", "",
                  f"Seeds as a budget: looks at n = {', '.join(map(str, st['looks']))} seeds; {rule} Lan–DeMets "
                  f"alpha spending of α = {st['alpha']:g} (two-sided nominal levels "
                  f"{', '.join(f'{a:.4g}' for a in levels)}); Holm within each look over its open comparisons "
                  f"(paired t for a difference, TOST for equivalence within ±δ). "
                  + ("All looks taken." if st.get("done") else f"Next: look {st['look'] + 1}."), "",
                  "| look | n | comparison | pair | Δ mean | p | TOST p | level | decision |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for d in st["decisions"]:
            verdict = d["decision"] + (f" (±{d['margin']:g})" if d["decision"] == EQUIVALENT else "")
            lines.append(f"| {d['look']} | {d['n']} | {d['method']} − {d['reference']} | {d['pair']} | "
                         f"{d['diff']:+.2f} | {d['p']:.3g} | {d['tost']:.3g} | {d['level']:.3g} | {verdict} |")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line

def run_looks(suite_file: str, snakemake_args: list[str], cores: int = 2) -> int:
    """The loop: Snakemake (every run of the current look, then the tables), the next look, and
    again, until no cell gets more seeds. Returns Snakemake's exit status (0 when all went well)."""
    import subprocess
    import sys

    from kdbench.planning.suite import load_suite
    snakefile = Path(__file__).resolve().parents[2] / "Snakefile"
    while True:
        cmd = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "--cores", str(cores),
               "--config", f"suite_file={suite_file}", *snakemake_args]
        print("kdbench looks:", " ".join(cmd), flush=True)
        rc = subprocess.run(cmd).returncode
        if rc:
            return rc
        suite = load_suite(suite_file)
        before = {n: st["look"] for n, st in read_state(suite.config).items()}
        state = next_look(suite)
        print(report(state), flush=True)
        if all(st["look"] == before.get(n, 0) for n, st in state.items()):  # no cell got more seeds
            return 0


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys
    p = argparse.ArgumentParser(
        prog="kdbench looks",
        description="Seeds as a budget (experiments with seeds: {min, looks, ...}): run the pipeline, decide every "
                    "open comparison at the current look (alpha spending, Holm within the look), give the next "
                    "look's seeds to the undecided cells only, and repeat until nothing is added. With --next: "
                    "only take the next look (after `snakemake`), writing <runs_dir>/looks/<suite>.json and .md.")
    p.add_argument("--suite", required=True, help="suite YAML file")
    p.add_argument("--next", action="store_true", help="only decide the current look and add the next look's seeds")
    p.add_argument("--cores", type=int, default=2, help="snakemake --cores (default 2)")
    p.add_argument("snakemake_args", nargs=argparse.REMAINDER, help="after --: more snakemake arguments")
    args = p.parse_args(argv)
    from kdbench.planning.suite import SuiteError, load_suite
    try:
        if args.next:
            print(report(next_look(load_suite(args.suite))))
            return 0
        extra = args.snakemake_args[1:] if args.snakemake_args[:1] == ["--"] else args.snakemake_args
        return run_looks(args.suite, extra, args.cores)
    except (SuiteError, ValueError) as e:
        print(f"kdbench looks: error: {e}", file=sys.stderr)
        return 2
