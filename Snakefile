# kdbench pipeline: data -> teachers -> distilled students (method x pair x seed) -> tables.
#
#   snakemake --cores 2                           # the default suite (smoke)
#   snakemake --cores 2 --config suite=crd        # workflow/suites/crd.yaml
#   snakemake --cores 2 --config suite_file=my.yaml
#   snakemake --cores 2 --config pack_size=12     # distillations 12 per job (kdbench pack), see train.smk
#   snakemake --cores 2 --config suite=crd tables=crd_table1,crd_table2   # these tables and the runs they read
#
# The suite is validated (schema + registry names) when this file is parsed, before any job, and
# planned once: every run's resolved spec is written to runs/<id>/spec.json, the one file a job reads.
#
# `snakemake --lint` reports two kinds of findings, kept on purpose:
# - "Specify a conda environment or container for each rule": every rule runs the kdbench package,
#   the one Snakemake itself runs in; that environment is pinned once (environment.yml, README
#   "Install"), so jobs on a cluster run in it too (the SLURM plugin exports the environment).
# - "Mixed rules and functions in same snakefile": the functions are the target lists of the rules
#   beside them; all other logic lives in the kdbench package.
from snakemake.utils import validate

from kdbench.planning.suite import SuiteError, load_suite, write_specs
from kdbench.planning.checks import check_files_exist, check_released_teachers


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


def selection_of(config, suite):
    """--config tables=A,B: only these tables, their figures and the runs they read
    (kdbench.report.selection); None (every table) without it."""
    if not config.get("tables"):
        return None
    from kdbench.report.selection import select_tables

    try:
        return select_tables(suite, [t.strip() for t in str(config["tables"]).split(",") if t.strip()])
    except SuiteError as e:
        raise SystemExit(f"kdbench: {e}") from None


SUITE_FILE = suite_file_of(config)
SUITE = load_suite(SUITE_FILE)
SELECTION = selection_of(config, SUITE)
RUNS_DIR = SUITE.runs_dir
RESULTS = config.get("results_dir", f"results/{SUITE.name}")

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


onstart:
    # before any job (a dry run plans without): every real dataset root and imported teacher file exists
    try:
        check_files_exist(SUITE)
        check_released_teachers(SUITE, TEACHERS_DIR, config.get("fetch_teachers", "auto"))
    except SuiteError as e:
        raise SystemExit(f"kdbench: {e}")
    # the plan: each run's resolved spec in RUNS_DIR/<id>/spec.json, which its job reads instead of
    # this suite (rewritten only where it changed, so its time stamp says when the run's spec did)
    write_specs(SUITE)


onsuccess:
    print(f"\nkdbench: suite {SUITE.name!r} is complete ({len(SUITE.runs)} runs in {RUNS_DIR}/).")
    print(f"  seed tables:  {RESULTS}/*.md, per-seed {RESULTS}/runs.csv, per-cell {RESULTS}/summary.csv")
    if PAPER_TABLES:
        print(f"  paper tables: {PAPER_DIR}/*.md ({len(PAPER_TABLES)} tables), figures: {PAPER_DIR}/*.png")
