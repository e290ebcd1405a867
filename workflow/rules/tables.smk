# Seed aggregation: one job reads every run's metrics.json and writes the suite's tables.


rule aggregate:
    input:
        all_metrics(),
    output:
        table_outputs(),
    shell:
        "kdbench aggregate --suite {SUITE_FILE:q} --out {RESULTS:q}"
