"""Seeds as a budget: more seeds only where a comparison is still undecided (statistics.md §3).

An experiment may declare its seeds as a budget instead of a list::

    seeds: {min: 3, looks: [3, 5, 10], spending: obrien_fleming, alpha: 0.05, margin: 0.5,
            reference: student}

``looks`` are the pre-declared cumulative seed counts at which the results are examined (``min``,
if given, must equal ``looks[0]``). Every cell (method × teacher → student pair) starts with seeds
``0 … looks[0]−1``. After the runs of look k have finished, :func:`next_look` (``kdbench looks
--next``) tests the experiment's family — the tables' primary families on its runs (the papers'
claims; every method − ``reference`` per pair, paired by seed, only where no claim covers the
experiment) and each reproduction verdict of a paper table (not a stand-in): Δ = reproduced −
published with its Welch standard error (:mod:`kdbench.stats.verdict`) — and gives the next
look's seeds only to the cells it could not decide (a comparison's both sides, so they stay
paired); decided cells keep theirs.

**Decision at look k** (:mod:`kdbench.stats.sequential`). A Lan–DeMets alpha-spending function
of the information fraction t_k = looks[k] / looks[-1] (``obrien_fleming``, the default:
α(t) = 4 − 4Φ(z_{1−α/4}/√t), almost nothing spent early; ``pocock``: α(t) = α·ln(1 + (e − 1)·t))
gives each look the α it spends, α(t_k) − α(t_{k−1}), and the look tests at that level: valid
for t-tests at any seed count. Holm's step-down runs over the whole family at every look, once
for the paired t-test of "no difference" and once for the TOST of "a difference of at least δ":
tests closed earlier keep their place (a rejected one stays rejected), and the j-th smallest open
p is compared with the level of a design spending α/r (r hypotheses still unrejected). A
comparison is decided when either rejects: ``differs`` (a reproduction only when |Δ| ≥ δ too, as
its verdict) or ``equivalent (±δ)``; otherwise it is ``undecided`` and, before the last look, gets
more seeds. Choice: stopping for equivalence spends the same α as stopping for a difference. A
first look that cannot stop (O'Brien–Fleming at 3 seeds) is warned before any run.

**State.** ``<runs_dir>/looks/<suite>.json`` records, per experiment, the declaration, the
look reached, the seeds of every cell and every decision; :func:`cell_seeds` reads it when the
suite is loaded, so Snakemake then runs exactly the added seeds and redraws the tables.
``<runs_dir>/looks/<suite>.md`` says the same for a reader. ``kdbench looks --suite S`` runs
the loop: Snakemake, next look, Snakemake … until nothing is added.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from kdbench.planning.budget import (SPENDING, budget, cell_key, cell_seeds, read_state, state_lock,  # noqa: F401
                                     state_path, write_state)
from kdbench.stats.sequential import (DIFFERS, EQUIVALENT, OPEN, boundaries, decide, first_look_warning,  # noqa: F401
                                      look_level, nominal_levels, paired_p_values, spent, verdict_p_values)

def _run_experiment(suite) -> dict:
    return {c.run: c.experiment for c in suite.cells}


def _cells_in(res, cells, exp_of, exp: str) -> bool:
    """Every run of the table cells ``cells`` ((row, group) pairs) is one of experiment ``exp``'s."""
    runs = [r for cell in cells for r in res.cell(*cell).run_ids]
    return bool(runs) and all(exp_of.get(r) == exp for r in runs)


def primary_tests(suite, exp: dict, results, look: int, seeds: int, level: float, margin: float) -> list[dict]:
    """One test per distinct primary comparison (a paper claim) of the suite's tables whose two
    cells are this experiment's: the paired t-test of no difference and the TOST against ±margin.
    A claim across experiments (e.g. two ensemble sizes) is left to the tables: no single
    experiment's looks can add seeds to both of its sides."""
    from kdbench.report.paper_tables import looks_test_id
    exp_of, seen, out = _run_experiment(suite), set(), []
    for res in results:
        groups = {g.label: g for g in res.spec.groups}
        for c in res.comparisons:
            if c.family != "primary" or c.owner != res.spec.name or c.key in seen or not c.cells:
                continue
            if not _cells_in(res, c.cells, exp_of, exp["name"]):
                continue
            seen.add(c.key)
            (ra, ga), (rb, gb) = c.cells
            a, b = res.cell(ra, ga), res.cell(rb, gb)
            n, diff, p, tost = paired_p_values(a.values, b.values, margin)
            pair = groups[ga].pair
            out.append({"look": look, "seeds": seeds, "test": looks_test_id(res.spec.name, ra, rb, c.group),
                        "claim": c.claim, "pair": f"{pair[0]}--{pair[1]}", "method": a.column, "reference": b.column,
                        "n": n, "diff": diff, "p": p, "tost": tost, "level": level, "margin": margin})
    return out


def reproduction_tests(suite, exp: dict, results, level: float, look: int, seeds: int) -> list[dict]:
    """One test per paper-table cell (not a stand-in) with a published value whose runs are this
    experiment's: its reproduction verdict's Δ, tested like a comparison (a cell without a verdict
    — too few seeds, every seed equal — is undecided); it closes as ``differs`` only when |Δ| ≥ δ too."""
    from kdbench.report.paper_tables import reproduction_test_id
    out = []
    for res in results:
        spec = res.spec
        if spec.stand_in or not any(exp["name"] in g.experiments for g in spec.groups):
            continue
        for c in res.cells:
            g = next(g for g in spec.groups if g.label == c.group)
            if c.published is None or c.n_expected == 0 or exp["name"] not in g.experiments or c.column == "teacher":
                continue
            margin = spec.margin_for(g)
            check = c.check
            p, tost = verdict_p_values(check.delta, check.se, check.df, margin) if check else (math.nan, math.nan)
            reference = reproduction_test_id(spec.name, c.row, c.group)
            out.append({"look": look, "seeds": seeds, "test": reference, "kind": "reproduction",
                        "pair": f"{g.pair[0]}--{g.pair[1]}", "method": c.column, "reference": reference, "n": c.n,
                        "diff": c.delta, "p": p, "tost": tost, "level": level, "margin": margin})
    return out


def test_id(d: dict) -> str:
    """A look's test, the same at every look (a state written before issue 25 has no ``test``)."""
    return d.get("test") or f"{d['pair']}: {d['method']} − {d['reference']}"


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
    with state_lock(suite.config):  # read, decide, write: one look at a time
        return _next_look(suite, write)


def _next_look(suite, write: bool) -> dict[str, dict]:
    from kdbench.report.aggregate import run_records
    from kdbench.stats.verdict import default_margin
    from kdbench.report.paper_tables import compute_tables
    cfg, state = suite.config, read_state(suite.config)
    records = run_records(suite)
    results = compute_tables(suite)
    for exp in cfg["experiments"]:
        b = budget(exp)
        if b is None:
            continue
        rec = records[records.experiment == exp["name"]]
        unfinished = rec[~rec.status.isin(["ok", "failed"])]
        if len(unfinished):
            raise ValueError(f"experiment {exp['name']!r}: {len(unfinished)} run(s) of the current look have not "
                             f"finished (e.g. {unfinished.run.iloc[0]}); run snakemake first, then kdbench looks --next")
        st = state.get(exp["name"]) or {"looks": b["looks"], "spending": b["spending"], "alpha": b["alpha"],
                                        "look": 0, "seeds": {}, "decisions": []}
        k = st["look"]
        if k >= len(b["looks"]) or st.get("done"):
            continue
        margin = float(b["margin"] if b["margin"] is not None else default_margin(exp["dataset"], b["metric"]))
        level = look_level(b["looks"], k, b["alpha"], b["spending"])
        values = _values(rec, exp["name"], b["metric"])
        closed = {test_id(d): d["decision"] for d in st["decisions"] if d["decision"] != OPEN}
        tests = primary_tests(suite, exp, results, k + 1, b["looks"][k], level, margin)
        if not tests:  # no paper claim covers the experiment: every method − its declared reference
            for t_arch, s_arch in exp["pairs"]:
                pair = f"{t_arch}--{s_arch}"
                ref = values.get((t_arch, s_arch, b["reference"]), {})
                for column in dict.fromkeys(c.column for c in suite.cells if c.experiment == exp["name"]
                                            and (c.teacher, c.student) == (t_arch, s_arch)):
                    if column in (b["reference"], "teacher"):
                        continue
                    n, diff, p, tost = paired_p_values(values.get((t_arch, s_arch, column), {}), ref, margin)
                    tests.append({"look": k + 1, "seeds": b["looks"][k], "pair": pair, "method": column,
                                  "reference": b["reference"], "n": n, "diff": diff, "p": p, "tost": tost,
                                  "level": level, "margin": margin})
        tests += reproduction_tests(suite, exp, results, level, k + 1, b["looks"][k])
        if k == 0:
            st["warning"] = first_look_warning(b["looks"], b["alpha"], b["spending"], len(tests))
            if st["warning"]:
                warnings.warn(f"experiment {exp['name']!r}: {st['warning']}", stacklevel=2)
        tests = [t for t in tests if test_id(t) not in closed]
        # Holm over the whole family: the open tests and the closed ones in their place
        for t, verdict in zip(tests, decide(tests, b["looks"], k, b["alpha"], b["spending"], list(closed.values()))):
            t["decision"] = verdict
        st["decisions"] = st["decisions"] + tests
        undecided = [t for t in tests if t["decision"] == OPEN]
        if k + 1 < len(b["looks"]) and undecided:
            n_next = b["looks"][k + 1]
            for t in undecided:  # a comparison's two cells (they stay paired), or a reproduced cell
                for column in (t["method"],) if t.get("kind") == "reproduction" else (t["method"], t["reference"]):
                    st["seeds"][f"{t['pair']}/{column}"] = n_next
            st["look"] = k + 1
        else:
            st["done"] = True
        state[exp["name"]] = st
    if write:
        from kdbench.core.io import atomic_write_bytes
        write_state(cfg, state)
        atomic_write_bytes(state_path(cfg).with_suffix(".md"), report(state).encode())
    return state


def report(state: dict) -> str:
    """The looks of every budgeted experiment, for a reader (also ``kdbench looks --next``'s output)."""
    lines = []
    for name, st in state.items():
        levels = nominal_levels(st["looks"], st["alpha"], st["spending"])
        spend = [look_level(st["looks"], k, st["alpha"], st["spending"]) for k in range(len(st["looks"]))]
        rule = ("O'Brien–Fleming-type" if st["spending"] == "obrien_fleming" else "Pocock-type")
        lines += [f"## {name}", "",
                  f"Seeds as a budget: looks at n = {', '.join(map(str, st['looks']))} seeds; {rule} Lan–DeMets "
                  f"alpha spending of α = {st['alpha']:g} (two-sided nominal levels "
                  f"{', '.join(f'{a:.4g}' for a in levels)}; each look tests at the α it spends, "
                  f"{', '.join(f'{a:.4g}' for a in spend)}, "
                  f"valid for t-tests at any n); Holm over the whole family at every look, closed tests in their "
                  f"place (paired t for a difference, TOST for equivalence within ±δ; the family: the paper's "
                  f"claims on this experiment's runs, else every method − the reference, and the reproduction "
                  f"verdicts, which close as `differs` only when |Δ| ≥ δ). "
                  + (f"**Warning**: {st['warning']}. " if st.get("warning") else "")
                  + ("All looks taken." if st.get("done") else f"Next: look {st['look'] + 1}."), "",
                  "| look | n | comparison | pair | Δ mean | p | TOST p | level | decision |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for d in st["decisions"]:
            verdict = d["decision"] + (f" (±{d['margin']:g})" if d["decision"] == EQUIVALENT else "")
            what = d["test"] + (f" [claim {d['claim']}]" if d.get("claim") else "") if d.get("test") else f"{d['method']} − {d['reference']}"
            lines.append(f"| {d['look']} | {d['n']} | {what} | {d['pair']} | "
                         f"{d['diff']:+.2f} | {d['p']:.3g} | {d['tost']:.3g} | {d['level']:.3g} | {verdict} |")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line

def warn_first_looks(suite_file: str) -> list[str]:
    """Before any run: the budgets whose first look can decide nothing even for a single test (a
    family only makes its levels stricter; :func:`kdbench.stats.sequential.first_look_warning`),
    printed to stderr and returned."""
    import sys

    from kdbench.planning.suite import load_suite
    out = []
    for exp in load_suite(suite_file).config["experiments"]:
        b = budget(exp)
        why = first_look_warning(b["looks"], b["alpha"], b["spending"]) if b else ""
        if why:
            out.append(f"experiment {exp['name']!r}: {why}")
            print(f"kdbench looks: warning: {out[-1]}", file=sys.stderr, flush=True)
    return out


def run_looks(suite_file: str, snakemake_args: list[str], cores: int = 2) -> int:
    """The loop: Snakemake (every run of the current look, then the tables), the next look, and
    again, until no cell gets more seeds. Returns Snakemake's exit status (0 when all went well)."""
    import subprocess
    import sys

    from kdbench.planning.suite import load_suite
    snakefile = Path(__file__).resolve().parents[2] / "Snakefile"
    warn_first_looks(suite_file)
    while True:
        cmd = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "--cores", str(cores),
               "--config", f"suite_file={suite_file}", *snakemake_args]
        print("kdbench looks:", " ".join(cmd), flush=True)
        rc = subprocess.run(cmd).returncode
        if rc:
            return rc
        with state_lock(_suite_cfg(suite_file)):  # the suite planned on the state this look reads
            suite = load_suite(suite_file)
            before = {n: st["look"] for n, st in read_state(suite.config).items()}
            state = next_look(suite)
        print(report(state), flush=True)
        if all(st["look"] == before.get(n, 0) for n, st in state.items()):  # no cell got more seeds
            return 0


def _suite_cfg(suite_file: str) -> dict:
    """The suite's name and runs_dir (what locates its looks state), read before it is planned."""
    from kdbench.planning.suite import read_suite_file
    cfg = read_suite_file(Path(suite_file))
    return {"name": cfg["name"], "runs_dir": cfg.get("runs_dir", "runs"), "experiments": []}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys
    p = argparse.ArgumentParser(
        prog="kdbench looks",
        description="Seeds as a budget (experiments with seeds: {min, looks, ...}): run the pipeline, decide every "
                    "open comparison at the current look (alpha spending, Holm over the whole family at every look), give the next "
                    "look's seeds to the undecided cells only, and repeat until nothing is added. With --next: "
                    "only take the next look (after `snakemake`), writing <runs_dir>/looks/<suite>.json and .md.")
    p.add_argument("--suite", required=True, help="suite YAML file")
    p.add_argument("--next", action="store_true", help="only decide the current look and add the next look's seeds")
    p.add_argument("--cores", type=int, default=2, help="snakemake --cores (default 2)")
    p.add_argument("snakemake_args", nargs=argparse.REMAINDER, help="after --: more snakemake arguments")
    args = p.parse_args(argv)
    from kdbench.core.io import OutputError
    from kdbench.planning.suite import SuiteError, load_suite
    try:
        if args.next:  # two at once: the second waits, then plans on the state the first left
            with state_lock(_suite_cfg(args.suite)):
                print(report(next_look(load_suite(args.suite))))
            return 0
        extra = args.snakemake_args[1:] if args.snakemake_args[:1] == ["--"] else args.snakemake_args
        return run_looks(args.suite, extra, args.cores)
    except (SuiteError, ValueError, OutputError) as e:  # OutputError: the state could not be written
        print(f"kdbench looks: error: {e}", file=sys.stderr)
        return 2
