# Seed aggregation: one job reads every run's metrics.json and writes the suite's tables; one
# draws the seed tables' forest plots and learning curves (`kdbench figures --seed-tables`).
# report(...) puts them in `snakemake --report report.html`, with the captions in workflow/report/.


def _seed_figure_names(suite):
    from kdbench.report.figures import seed_figure_names

    return seed_figure_names(suite, SELECTION and SELECTION["tables"])


SEED_FIGURES = [f"{RESULTS}/{n}" for n in PLAN.value("seed_figures", lambda: _seed_figure_names(PLAN.suite))]
# the seed tables' items: a changed metric, caption, margin or reference reruns them (params trigger)
_SEED_PARAM = PLAN.value("seed_tables_param", lambda: spec_param(PLAN.suite.config.get("tables", [])))
_ONLY = table_args(TABLE_NAMES if SELECTION is None else SELECTION["tables"])  # --config tables=...: --table NAME ...


def _seed_reported(path):
    kind = "forest" if path.endswith("_forest.png") else "curves" if path.endswith("_curves.png") else "table"
    caption = {"forest": "../report/forest.rst", "curves": "../report/curves.rst", "table": "../report/seed_table.rst"}
    return report(path, caption=caption[kind], category="Seed tables", subcategory=kind)


rule aggregate:
    input:
        all_metrics(),
    output:
        [_seed_reported(f) if f.endswith(".md") else f for f in table_outputs()],
    log:
        f"{LOGS}/aggregate.log",
    params:
        spec=_SEED_PARAM,
        suite=SUITE_FILE,
        out=_output_dir,
    shell:
        f"kdbench aggregate --suite {{params.suite:q}} --out {{params.out:q}}{_ONLY} > {{log:q}} 2>&1"


if SEED_FIGURES:

    rule seed_figures:
        input:
            all_metrics(),
        output:
            [_seed_reported(f) for f in SEED_FIGURES],
        params:
            spec=_SEED_PARAM,
            suite=SUITE_FILE,
            out=_output_dir,
        log:
            f"{LOGS}/seed_figures.log",
        shell:
            f"kdbench figures --seed-tables --suite {{params.suite:q}} --out {{params.out:q}}{_ONLY} > {{log:q}} 2>&1"
