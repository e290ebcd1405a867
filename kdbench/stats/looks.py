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

from .budget import SPENDING, budget, cell_key, cell_seeds, read_state, state_path  # noqa: F401  (the declaration)

OPEN, DIFFERS, EQUIVALENT = "undecided", "differs", "equivalent"


# ----------------------------------------------------------------------------- boundaries

def spent(t: float, alpha: float, spending: str) -> float:
    """Cumulative α spent at information fraction ``t`` (Lan–DeMets)."""
    from scipy import stats
    if t <= 0:
        return 0.0
    if spending == "pocock":
        return alpha * math.log(1 + (math.e - 1) * min(t, 1.0))
    # each side spends the one-sided O'Brien–Fleming-type function at α/2
    return float(4 * stats.norm.sf(stats.norm.isf(alpha / 4) / math.sqrt(min(t, 1.0))))


def boundaries(looks: list[int], alpha: float = 0.05, spending: str = "obrien_fleming",
               points: int = 1201) -> list[float]:
    """Two-sided z boundaries c_k of the looks (seed counts): under no effect, P(first |Z_k| ≥ c_k
    at look k) = α(t_k) − α(t_{k−1}). Recursion on a grid of the score S = Z·√t."""
    import numpy as np
    from scipy import optimize, stats
    ts = [n / looks[-1] for n in looks]
    out, grid, dens, prev_t, prev_a = [], None, None, 0.0, 0.0
    for t in ts:
        target = spent(t, alpha, spending) - prev_a
        step = t - prev_t
        if grid is None:  # first look: S ~ N(0, t)
            c = stats.norm.isf(target / 2)
        else:
            w = dens * np.gradient(grid)  # sub-density times the grid's cell widths

            def cross(b):
                s = b * math.sqrt(t)
                sd = math.sqrt(step)
                return float(np.sum(w * (stats.norm.cdf((-s - grid) / sd) + stats.norm.sf((s - grid) / sd)))) - target
            c = optimize.brentq(cross, 0.0, 40.0, xtol=1e-10) if target > 0 else math.inf
        out.append(float(c))
        if not math.isfinite(c):
            break
        s_max = c * math.sqrt(t)
        new = np.linspace(-s_max, s_max, points)
        if grid is None:
            dens = stats.norm.pdf(new, scale=math.sqrt(t))
        else:
            sd = math.sqrt(step)
            dens = (stats.norm.pdf((new[:, None] - grid[None, :]) / sd) / sd) @ w
        grid, prev_t, prev_a = new, t, spent(t, alpha, spending)
    return out


def nominal_levels(looks: list[int], alpha: float = 0.05, spending: str = "obrien_fleming") -> list[float]:
    """The two-sided nominal level α_k = 2(1 − Φ(c_k)) each look tests at."""
    from scipy import stats
    return [float(2 * stats.norm.sf(c)) for c in boundaries(looks, alpha, spending)]


# ----------------------------------------------------------------------------- decisions

def paired_p_values(a: dict, b: dict, margin: float) -> tuple[int, float, float, float]:
    """(n pairs, mean difference, p of "no difference", TOST p of "|difference| ≥ margin")."""
    import numpy as np
    from scipy import stats

    from .paired import pair_by_seed, sign_flip_p
    seeds, x, y = pair_by_seed(a, b)
    d = x - y
    n = len(seeds)
    if n < 2:
        return n, float(d.mean()) if n else math.nan, math.nan, math.nan
    mean, sd = float(d.mean()), float(np.std(d, ddof=1))
    if sd == 0:  # every difference equal: the exact sign-flip p, and no TOST (no spread to test with)
        return n, mean, sign_flip_p(d), math.nan
    se = sd / math.sqrt(n)
    p = float(2 * stats.t.sf(abs(mean) / se, n - 1))
    tost = max(float(stats.t.sf((mean + margin) / se, n - 1)), float(stats.t.cdf((mean - margin) / se, n - 1)))
    return n, mean, p, tost


def verdict_p_values(delta: float, se: float, df: float, margin: float) -> tuple[float, float]:
    """(p of "reproduced = published", TOST p of "|reproduced − published| ≥ margin") of a
    reproduction verdict's Δ with its Welch standard error (:mod:`kdbench.stats.verdict`)."""
    from scipy import stats
    if not (math.isfinite(delta) and math.isfinite(se) and se > 0):
        return math.nan, math.nan
    p = float(2 * stats.t.sf(abs(delta) / se, df))
    return p, max(float(stats.t.sf((delta + margin) / se, df)), float(stats.t.cdf((delta - margin) / se, df)))


def reproduction_tests(suite, exp: dict, level: float, look: int, seeds: int) -> list[dict]:
    """One test per paper-table cell (not a stand-in) with a published value whose runs are this
    experiment's: its reproduction verdict's Δ, tested like a comparison (a cell without a verdict
    — too few seeds, every seed equal — is undecided)."""
    from .paper_tables import compute, table_specs
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


def decide(tests: list[dict], level: float) -> list[str]:
    """Holm at ``level`` over the look's open tests (``p``, ``tost``): differs / equivalent / undecided."""
    import numpy as np

    from .paired import holm
    p_adj = holm([t["p"] for t in tests])
    tost_adj = holm([t["tost"] for t in tests])
    out = []
    for p, q in zip(p_adj, tost_adj):
        out.append(DIFFERS if np.isfinite(p) and p <= level else EQUIVALENT if np.isfinite(q) and q <= level else OPEN)
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
    from .aggregate import run_records
    from .verdict import default_margin
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
        from ..engine.io import atomic_write_bytes
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

    from ..suite import load_suite
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
    from ..suite import SuiteError, load_suite
    try:
        if args.next:
            print(report(next_look(load_suite(args.suite))))
            return 0
        extra = args.snakemake_args[1:] if args.snakemake_args[:1] == ["--"] else args.snakemake_args
        return run_looks(args.suite, extra, args.cores)
    except (SuiteError, ValueError) as e:
        print(f"kdbench looks: error: {e}", file=sys.stderr)
        return 2
