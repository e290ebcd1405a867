# Seed aggregation: one job reads every run's metrics.json and writes the suite's tables.


rule aggregate:
    input:
        all_metrics(),
    output:
        table_outputs(),
    params:
        spec=spec_param(SUITE.config.get("tables", [])),  # a changed metric or caption reruns the tables
    resources:
        gpus=0,
        mem_mb=2000,
        runtime=10,
    shell:
        "kdbench aggregate --suite {SUITE_FILE:q} --out {RESULTS:q}"
