# Every run (teacher, plain student, distilled student) is one job. Run ids name what defines
# the run; `kdbench list-runs --suite FILE` prints them.


def _fit_command(wildcards):
    return {"train": "train-teacher", "distill": "distill", "probe": "linear-probe"}[SUITE.runs[wildcards.run].kind]


def _res(key):
    """One of the run's resource requests (kdbench.engine.distributed.job_resources: GPUs, DDP
    processes, threads, memory, runtime in minutes), computed without reading any data."""
    from kdbench.engine.distributed import job_resources
    return lambda wildcards, **_: job_resources(SUITE.runs[wildcards.run], SUITE.config, config)[key]


def _launch(wildcards, resources):
    """GPU runs go through the launcher (claims free GPUs locally, starts torchrun for DDP runs)."""
    import sys
    if resources.gpus == 0 and resources.nproc == 1:
        return "kdbench"
    return f"{sys.executable} -m kdbench.engine.distributed --gpus {resources.gpus} --nproc {resources.nproc} --"


rule fit:
    input:
        run_inputs,
    output:
        metrics=f"{RUNS_DIR}/{{run}}/metrics.json",
    log:
        f"{RUNS_DIR}/{{run}}/log.txt",
    params:
        command=_fit_command,
        launch=_launch,
    threads: _res("threads")
    resources:
        gpus=_res("gpus"),  # local scheduling: at most --resources gpus=N at once
        gpu=_res("gpu"),  # the SLURM executor plugin's name (sbatch --gpus)
        nproc=_res("nproc"),  # DDP processes (torchrun) for this run
        mem_mb=_res("mem_mb"),
        runtime=_res("runtime"),  # minutes
    shell:
        "{params.launch} {params.command} --suite {SUITE_FILE:q} --run {wildcards.run:q} --quiet > {log:q} 2>&1"
