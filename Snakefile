# kdbench pipeline: data -> teachers -> distilled students (method x pair x seed) -> tables.
#
#   snakemake --cores 2                           # the default suite (smoke)
#   snakemake --cores 2 --config suite=crd        # workflow/suites/crd.yaml
#   snakemake --cores 2 --config suite_file=my.yaml
#   snakemake --cores 2 --config pack_size=12     # distillations 12 per job (kdbench pack), see train.smk
#   snakemake --cores 2 --config suite=crd tables=crd_table1,crd_table2   # these tables and the runs they read
#
# The suite is validated (schema + registry names) when this file is parsed, before any job, and
# planned once: every run's resolved spec is written to runs/<id>/spec.json, the one file a job reads,
# and every value the rules are built from to .snakemake/kdbench-plans/ (kdbench.planning.plan_cache),
# which a cluster job's re-parse of this file (`snakemake --mode remote`) reads instead of the suite.
#
# `snakemake --lint` reports two kinds of findings, kept on purpose:
# - "Specify a conda environment or container for each rule": every rule runs the kdbench package,
#   the one Snakemake itself runs in; that environment is pinned once (environment.yml, README
#   "Install"), so jobs on a cluster run in it too (the SLURM plugin exports the environment).
# - "Mixed rules and functions in same snakefile": the functions are the target lists of the rules
#   beside them; all other logic lives in the kdbench package.
import sys

from snakemake.utils import validate

from kdbench.planning.checks import SuiteError
from kdbench.planning.plan_cache import Plan


def check_config(config, schema=f"{workflow.basedir}/workflow/schemas/config.schema.yaml"):
    """--config/--configfile hold pipeline settings only: a typo or a suite file is refused with the fix."""
    import yaml

    valid = sorted(yaml.safe_load(open(schema))["properties"])
    if "experiments" in config:
        raise SystemExit("kdbench: --configfile takes pipeline settings, not a suite: run a suite with "
                         "--config suite_file=PATH (or suite=NAME for workflow/suites/NAME.yaml)")
    unknown = sorted(set(config) - set(valid))
    if unknown:
        raise SystemExit(f"kdbench: unknown --config key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")
    validate(config, schema)


check_config(config)


def suite_file_of(config):
    """--config suite_file=PATH, or suite=NAME (default smoke): workflow/suites/NAME.yaml."""
    from kdbench.planning.suite_files import suite_file

    try:
        return str(suite_file(config.get("suite_file") or config.get("suite", "smoke")))
    except FileNotFoundError as e:
        raise SystemExit(f"kdbench: {e}") from None


def load(path):
    from kdbench.planning.suite import load_suite

    return load_suite(path)


def selection_of(config, suite):
    """--config tables=A,B: only these tables, their figures and the runs they read
    (kdbench.report.selection); None (every table) without it."""
    if not config.get("tables"):
        return None
    from kdbench.report.selection import select_tables

    try:
        sel = select_tables(suite, [t.strip() for t in str(config["tables"]).split(",") if t.strip()])
    except SuiteError as e:
        raise SystemExit(f"kdbench: {e}") from None
    return {"tables": list(sel.tables), "paper": list(sel.paper), "family": list(sel.family), "runs": sorted(sel.runs)}


def planned_part(suite, runs):
    """The suite restricted to ``runs`` and the runs they need (teachers, probed models)."""
    import dataclasses

    todo, keep = list(runs), set()
    while todo:
        r = todo.pop()
        if r not in keep:
            keep.add(r)
            todo += suite.runs[r].needs
    return dataclasses.replace(suite, runs={r: run for r, run in suite.runs.items() if r in keep})


SUITE_FILE = suite_file_of(config)
# every value below and in workflow/rules/ comes through PLAN.value(key, compute): computed from the
# suite here, read back from this invocation's plan in a cluster job's parse
PLAN = Plan(SUITE_FILE, config, load, reuse=workflow.remote_exec)
if workflow.remote_exec and not PLAN.reused:
    print(f"kdbench: no current plan at {PLAN.path} (a suite source changed since it was written, or it "
          f"was not written): this job's parse loads the suite", file=sys.stderr)
SELECTION = PLAN.value("selection", lambda: selection_of(config, PLAN.suite))
SELECTED = None if SELECTION is None else set(SELECTION["runs"])
NAME, RUNS_DIR = PLAN.value("suite", lambda: [PLAN.suite.name, PLAN.suite.runs_dir])
RUN_IDS = PLAN.value("runs", lambda: list(PLAN.suite.runs))
RESULTS = config.get("results_dir", f"results/{NAME}")

include: "workflow/rules/common.smk"

# light jobs run where snakemake runs, never submitted to a cluster
localrules: all, aggregate, seed_figures, paper  # and the rules that say `localrule: True`

include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/teachers.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/paper.smk"


rule all:
    input:
        # every run is a target too: Snakemake 9 does not recompute a deleted intermediate file
        # whose downstream outputs exist, and a deleted run must be recomputed (then its tables)
        all_metrics(),  # (with --config tables=...: the runs those tables read, see common.smk)
        table_outputs(),
        SEED_FIGURES,
        paper_outputs(),


if workflow.is_main_process and not workflow.dryrun:
    PLAN.write()  # for the jobs' parses (a dry run starts none)


onstart:
    from kdbench.planning.checks import check_files_exist, check_released_teachers
    from kdbench.planning.suite import write_specs

    # before any job (a dry run plans without): every real dataset root and imported teacher file
    # exists that the planned runs read (with --config tables=...: those tables' runs and their needs)
    checked = PLAN.suite if SELECTED is None else planned_part(PLAN.suite, SELECTED)
    try:
        check_files_exist(checked)
        check_released_teachers(checked, TEACHERS_DIR, config.get("fetch_teachers", "auto"))
    except SuiteError as e:
        raise SystemExit(f"kdbench: {e}")
    # the plan: each run's resolved spec in RUNS_DIR/<id>/spec.json, which its job reads instead of
    # this suite (rewritten only where it changed, so its time stamp says when the run's spec did)
    write_specs(PLAN.suite)


onsuccess:
    print(f"\nkdbench: suite {NAME!r} is complete ({len(RUN_IDS)} runs in {RUNS_DIR}/).")
    print(f"  seed tables:  {RESULTS}/*.md, per-seed {RESULTS}/runs.csv, per-cell {RESULTS}/summary.csv")
    if PAPER_TABLES:
        print(f"  paper tables: {PAPER_DIR}/*.md ({len(PAPER_TABLES)} tables), figures: {PAPER_DIR}/*.png")
