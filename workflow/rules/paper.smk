# Paper-layout tables (`kdbench tables`), paper figures (`kdbench figures`) and the kernel-gap
# records they read (`kdbench kernel-gap`, KDA Fig. 3 and teacher-ensemble accuracies).
# paper_outputs() lists every output; `snakemake paper` builds them (and `all`, once it lists them).
PAPER_DIR = f"{RESULTS}/paper"
# with a selection (--config tables=...), its paper tables; the kernel-gap records of the tables
# whose tests the chosen ones show (SELECTION["family"]: a test's adjusted p is its owner table's)
_DIAGNOSED = None if SELECTION is None else SELECTION["family"]


def _paper_plan(suite):
    from kdbench.report.paper_tables import diagnostic_targets, table_specs

    specs = table_specs(suite)
    written = [s for s in specs if SELECTION is None or s.name in SELECTION["paper"]]
    return {"tables": [s.name for s in written], "figures": [s.name for s in written if s.figure],
            "forests": [s.name for s in written if s.reference],  # <table>_forest.png (kdbench figures)
            # record path -> (run id, teacher run folders or model files)
            "diagnostics": diagnostic_targets(suite, _DIAGNOSED) if _DIAGNOSED != [] else {},
            # the tables' resolved specs: a changed one reruns them (Snakemake's params trigger)
            "tables_param": spec_param(specs), "figures_param": spec_param([s for s in specs if s.figure or s.reference])}


_PAPER = PLAN.value("paper", lambda: _paper_plan(PLAN.suite))
PAPER_TABLES, PAPER_FIGURES, PAPER_FORESTS = _PAPER["tables"], _PAPER["figures"], _PAPER["forests"]
DIAGNOSTICS = _PAPER["diagnostics"]
DEVICE_ARG = PLAN.value("device", lambda: PLAN.suite.config.get("device", "auto"))


def paper_outputs():
    tables = [f"{PAPER_DIR}/{n}{suffix}" for n in PAPER_TABLES for suffix in (".md", ".csv", "_cells.csv")]
    return tables + _paper_pngs()


def _paper_pngs():
    return [f"{PAPER_DIR}/{n}.png" for n in PAPER_FIGURES] + [f"{PAPER_DIR}/{n}_forest.png" for n in PAPER_FORESTS]


def _paper_reported(path):
    """`snakemake --report`: every paper table (.md) and figure, with its caption (workflow/report/)."""
    kind = "forest" if path.endswith("_forest.png") else "figure" if path.endswith(".png") else "paper_table"
    return report(path, caption=f"../report/{kind}.rst", category="Paper tables", subcategory=kind.replace("_", " "))


def _diagnostic_inputs():
    runs = {f"{RUNS_DIR}/{r}" for r in RUN_IDS}
    needed = set()
    for run, teachers in DIAGNOSTICS.values():
        # a run is finished when its metrics.json exists; an imported teacher is its model file
        needed.add(f"{RUNS_DIR}/{run}/metrics.json")
        needed.update(f"{t}/metrics.json" if t in runs else t for t in teachers)
    return sorted(needed)


if DIAGNOSTICS:

    # one job for every record: loading torch and the test set once costs more than the records
    rule kernel_gap:
        input:
            _diagnostic_inputs(),
        output:
            list(DIAGNOSTICS),
        log:
            f"{LOGS}/kernel_gap.log",
        params:
            suite=SUITE_FILE,
            device=DEVICE_ARG,
        # a GPU job: teachers' and students' forward passes over the test sets
        resources:
            gpu=GPU,
            cpus_per_task=4,
            mem_mb=16000,
            runtime=120,
            nodes=1,
        shell:
            gpu_env(GPU) + f"kdbench kernel-gap --suite {{params.suite:q}} --device {{params.device}}{table_args(_DIAGNOSED)} > {{log:q}} 2>&1"


if PAPER_TABLES:

    rule paper_tables:
        input:
            all_metrics(),
            list(DIAGNOSTICS),
        output:
            [_paper_reported(f) if f.endswith(".md") else f
             for f in (f"{PAPER_DIR}/{n}{suffix}" for n in PAPER_TABLES for suffix in (".md", ".csv", "_cells.csv"))],
        params:
            spec=_PAPER["tables_param"],  # the tables' resolved specs: a changed one reruns them
            suite=SUITE_FILE,
            out=_output_dir,
        log:
            f"{LOGS}/paper_tables.log",
        localrule: True
        shell:
            f"kdbench tables --suite {{params.suite:q}} --out {{params.out:q}}{table_args(PAPER_TABLES)} > {{log:q}} 2>&1"


if PAPER_FIGURES or PAPER_FORESTS:

    rule paper_figures:
        input:
            all_metrics(),
            list(DIAGNOSTICS),
        output:
            [_paper_reported(f) for f in _paper_pngs()],
        params:
            spec=_PAPER["figures_param"],
            suite=SUITE_FILE,
            out=_output_dir,
        log:
            f"{LOGS}/paper_figures.log",
        localrule: True
        shell:
            f"kdbench figures --suite {{params.suite:q}} --out {{params.out:q}}{table_args(sorted(set(PAPER_FIGURES) | set(PAPER_FORESTS)))} > {{log:q}} 2>&1"


rule paper:
    input:
        paper_outputs(),
