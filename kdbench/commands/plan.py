"""``kdbench plan``: a suite's runs, training steps, GPU-hours and wall time, per table and in total.

    kdbench plan --suite paper [--gpu h100|h200|a100|v100] [--gpus 8] [--tables crd_table1,crd_table2]

The computation and its model are :mod:`kdbench.planning.cost`'s. A table costs every run of the
experiments it reads (a paper table's groups' experiments, a seed table's ``experiments``) and
the runs those wait for (teachers, probed models); a run in several tables is counted in each
(``shared``) and once in the total. ``--suite`` takes a file or a suite name, as Snakemake's
``--config suite=NAME`` does (``workflow/suites/NAME.yaml``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

GPU_KINDS = ("h100", "h200", "a100", "v100")  # kdbench.planning.cost.GPUS (not imported: --help stays light)
KINDS = ("train", "distill", "probe", "import")


def suite_path(name: str) -> Path:
    """A suite file, or ``workflow/suites/<name>.yaml`` (:func:`kdbench.planning.suite_files.suite_file`)."""
    from kdbench.planning.suite_files import suite_file
    try:
        return suite_file(name)
    except FileNotFoundError as e:
        raise SystemExit(f"kdbench plan: error: {e}") from None


def table_experiments(suite) -> dict[str, list[str]]:
    """Table name -> the experiments it reads (paper tables: their groups'; seed tables: their own)."""
    from kdbench.report.paper_tables import table_specs
    out = {t["name"]: list(t["experiments"]) for t in suite.config.get("tables", [])}
    for spec in table_specs(suite):
        out[spec.name] = list(dict.fromkeys(e for g in spec.groups for e in g.experiments))
    return out


def plan(suite, gpu: str, gpus: int, ddp_procs: int | None = None, tables: list[str] | None = None,
         records_dir: str = "results/gpu") -> dict:
    """The plan of ``suite`` as a JSON-able mapping: ``tables`` (per table) and ``total``."""
    from kdbench.planning import cost

    measured = cost.device_records(gpu, records_dir)
    needs = {rid: run.needs for rid, run in suite.runs.items()}
    costs = {rid: cost.run_cost(suite, run, cost.run_plan(suite, run, ddp_procs), cost.GPUS[gpu], measured)
             for rid, run in suite.runs.items()}
    per_table = {name: cost.with_needs([r for e in exps for r in suite.experiment_runs[e]], needs)
                 for name, exps in table_experiments(suite).items()}
    if tables:
        unknown = [t for t in tables if t not in per_table]
        if unknown:
            raise SystemExit(f"kdbench plan: error: no table {', '.join(unknown)} in suite {suite.name!r}; its tables: "
                             f"{', '.join(per_table)}")
        per_table = {t: per_table[t] for t in tables}
        in_total = list(dict.fromkeys(r for t in tables for r in per_table[t]))
    else:
        in_table = {r for ids in per_table.values() for r in ids}
        outside = [r for r in suite.runs if r not in in_table]
        if outside:
            per_table["(in no table)"] = outside
        in_total = list(suite.runs)
    count = {}
    for ids in per_table.values():
        for r in ids:
            count[r] = count.get(r, 0) + 1

    def row(ids) -> dict:
        s = cost.summarise(costs, ids, needs)
        return {"runs": s.total_runs, "by_kind": {k: s.runs.get(k, 0) for k in KINDS},
                "shared": sum(count.get(r, 0) > 1 for r in ids), "steps": s.steps, "measured_steps": s.measured_steps,
                "gpu_hours": s.gpu_hours, "max_processes": s.max_nproc, "critical_path_hours": s.critical_hours,
                "wall_hours": s.wall_hours(max(gpus, s.max_nproc)), "wall_gpus": max(gpus, s.max_nproc)}

    total = row(in_total)
    if gpus < total["max_processes"]:
        cost.wall_hours(0, 0, total["max_processes"], gpus)  # raises, naming the fix
    records = sorted({m.record for m in measured})
    return {"suite": suite.name, "path": str(suite.path), "gpu": gpu, "model": cost.GPUS[gpu].describe(),
            "gpus": gpus, "ddp_procs": ddp_procs, "records": records,
            "measured": [{"pair": list(m.pair), "method": m.method, "batch": m.batch,
                          "seconds_per_step": m.seconds_per_step, "device": m.device_name} for m in measured],
            "tables": {name: row(ids) for name, ids in per_table.items()}, "total": total}


def _hours(h: float) -> str:
    return f"{h:,.1f} h" if h >= 1 else f"{h * 60:.1f} min"


def render(p: dict) -> str:
    head = (f"{'table':24s} {'runs':>6s} {'train':>6s} {'distill':>7s} {'probe':>6s} {'import':>6s} {'shared':>6s} "
            f"{'steps':>13s} {'GPU-hours':>10s} {'wall':>10s}  source")

    def line(name: str, r: dict) -> str:
        k = r["by_kind"]
        share = r["measured_steps"] / r["steps"] if r["steps"] else 0.0
        source = "model" if not r["measured_steps"] else f"measured {share:.0%} of steps, model the rest"
        wall = _hours(r["wall_hours"]) + ("" if r["wall_gpus"] == p["gpus"] else f" @{r['wall_gpus']}")
        return (f"{name:24s} {r['runs']:6d} {k['train']:6d} {k['distill']:7d} {k['probe']:6d} {k['import']:6d} "
                f"{r['shared']:6d} {r['steps']:13,d} {_hours(r['gpu_hours']):>10s} {wall:>10s}  {source}")

    t = p["total"]
    lines = [f"kdbench plan: suite {p['suite']} ({p['path']}) on {p['gpu']}, wall time at {p['gpus']} GPUs",
             f"model: {p['model']}; step floors and data decoding: kdbench/planning/cost.py",
             "measured: " + ("; ".join(f"{m['method']} {'→'.join(m['pair'])} batch {m['batch']}: "
                                      f"{1000 * m['seconds_per_step']:.2f} ms/step on {m['device']}"
                                      for m in p["measured"]) + f" ({', '.join(p['records'])})"
                             if p["measured"] else f"none (no results/gpu/{p['gpu']}.json): every cost is the model's"),
             "", head]
    lines += [line(name, r) for name, r in p["tables"].items()]
    lines += ["-" * len(head), line("total (each run once)", t), "",
              f"GPU-hours: per GPU (a run on P processes counts P GPU-hours per wall hour; the largest run here uses "
              f"{t['max_processes']}); wall: the lower bound of perfect packing, max(GPU-hours / GPUs, the longest "
              f"teacher → student → probe chain: {_hours(t['critical_path_hours'])}); shared: runs also in another "
              f"table, counted once in the total."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kdbench plan", description="A suite's runs, training steps, GPU-hours (per GPU) "
                                "and wall time at N GPUs, per table and in total: from measured per-step costs where "
                                "results/gpu/<gpu>.json has them, from the stated model otherwise (each line says which).")
    p.add_argument("--suite", required=True, help="suite file, or a suite name (workflow/suites/NAME.yaml)")
    p.add_argument("--gpu", default="h100", choices=GPU_KINDS, help="GPU kind (default h100)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs for the wall time (default 8)")
    p.add_argument("--ddp-procs", type=int, help="processes (GPUs) of each streamed-dataset run (ImageNet; default 4)")
    p.add_argument("--tables", help="only these tables, comma-separated (the total: their runs, each once)")
    p.add_argument("--records", default="results/gpu", help="folder of the bench records <gpu>.json (default results/gpu)")
    p.add_argument("--json", help="also write the plan to this JSON file")
    a = p.parse_args(argv)
    if a.gpus < 1 or (a.ddp_procs is not None and a.ddp_procs < 1):
        p.error("--gpus and --ddp-procs take a whole number >= 1")
    from kdbench.planning.suite import SuiteError, load_suite
    try:
        suite = load_suite(suite_path(a.suite))
        out = plan(suite, a.gpu, a.gpus, a.ddp_procs, a.tables.split(",") if a.tables else None, a.records)
    except (SuiteError, ValueError) as e:
        print(f"kdbench plan: error: {e}", file=sys.stderr)
        return 2
    print(render(out))
    if a.json:
        from kdbench.core.io import atomic_write_bytes
        atomic_write_bytes(a.json, json.dumps(out, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
