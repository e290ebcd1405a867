# Every run (teacher, plain student, distilled student) is one job. Run ids name what defines
# the run; `kdbench list-runs --suite FILE` prints them.


def _fit_command(wildcards):
    return {"train": "train-teacher", "distill": "distill", "probe": "linear-probe"}[SUITE.runs[wildcards.run].kind]


rule fit:
    input:
        run_inputs,
    output:
        metrics=f"{RUNS_DIR}/{{run}}/metrics.json",
    log:
        f"{RUNS_DIR}/{{run}}/log.txt",
    params:
        command=_fit_command,
    threads: SUITE.config.get("threads", 1)
    resources:
        gpus=lambda w: 0 if SUITE.config.get("device", "auto") == "cpu" else 1,
    shell:
        "kdbench {params.command} --suite {SUITE_FILE:q} --run {wildcards.run:q} --quiet > {log:q} 2>&1"
