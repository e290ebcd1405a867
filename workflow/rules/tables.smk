# Seed aggregation: one job reads every run's metrics.json and writes the suite's tables; one
# draws the seed tables' forest plots and learning curves (`kdbench figures --seed-tables`).
# report(...) puts them in `snakemake --report report.html`, with the captions in workflow/report/.
from kdbench.report.figures import seed_figure_names

SEED_FIGURES = [f"{RESULTS}/{n}" for n in seed_figure_names(SUITE, SELECTION and list(SELECTION.tables))]


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
        spec=spec_param(SUITE.config.get("tables", [])),  # a changed metric or caption reruns the tables
        suite=SUITE_FILE,
        out=_output_dir,
    shell:
        "kdbench aggregate --suite {params.suite:q} --out {params.out:q}" + table_args(SELECTION and SELECTION.tables) + " > {log:q} 2>&1"


if SEED_FIGURES:

    rule seed_figures:
        input:
            all_metrics(),
        output:
            [_seed_reported(f) for f in SEED_FIGURES],
        params:
            spec=spec_param(SUITE.config.get("tables", [])),  # a changed metric, margin or reference redraws them
            suite=SUITE_FILE,
            out=_output_dir,
        log:
            f"{LOGS}/seed_figures.log",
        shell:
            "kdbench figures --seed-tables --suite {params.suite:q} --out {params.out:q}" + table_args(SELECTION and SELECTION.tables) + " > {log:q} 2>&1"
