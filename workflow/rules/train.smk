# Every run (teacher, plain student, distilled student) is one job of rule `fit`, unless packing
# is on (suite `pack: {size: N}` or --config pack_size=N): then distillations that share a teacher
# are trained K at a time by one job of a rule `pack_<pack id>` (`kdbench pack`), which writes each
# run's folder exactly as rule fit would. Run ids name what defines the run; `kdbench list-runs
# --suite FILE` prints them.
import re
import shlex

from kdbench.launch import job_resources

PACKING = SUITE.pack_options(config)  # {"size": N, "fuse": bool}
PACKS = SUITE.packs(PACKING["size"])  # pack id -> run ids (kdbench.suite.Suite.packs)
PACKED = {r for runs in PACKS.values() for r in runs}
# rule fit makes only the runs that no pack makes, so every metrics.json has one producer
# (Snakemake would prefer the wildcard-free pack rule anyway; this says it). "(?!)": fit makes none.
FIT_RUNS = ("|".join(re.escape(r) for r in SUITE.runs if r not in PACKED) or "(?!)") if PACKED else ".+"


def _fit_command(wildcards):
    return {"train": "train-teacher", "distill": "distill", "probe": "linear-probe"}[SUITE.runs[wildcards.run].kind]


def _res(key):
    """One of the run's resource requests (kdbench.launch.job_resources: GPUs, DDP
    processes, threads, memory, runtime in minutes), computed without reading any data."""
    return lambda wildcards, **_: job_resources(SUITE.runs[wildcards.run], SUITE.config, config)[key]


def _launch(wildcards, resources):
    """GPU runs go through the launcher (claims free GPUs locally, starts torchrun for DDP runs)."""
    import sys
    if resources.gpus == 0 and resources.nproc == 1:
        return "kdbench"
    return f"{sys.executable} -m kdbench.launch --gpus {resources.gpus} --nproc {resources.nproc} --"


rule fit:
    input:
        run_inputs,
    output:
        metrics=f"{RUNS_DIR}/{{run}}/metrics.json",
    log:
        f"{RUNS_DIR}/{{run}}/log.txt",
    wildcard_constraints:
        run=FIT_RUNS,
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


# One job per pack: 1 GPU and one run's threads (never DDP: streamed datasets are not packed),
# memory and runtime scaled with the pack (job_resources). If a run fails with an error, the
# others finish, `kdbench pack` exits non-zero and Snakemake removes the pack's metrics.json files
# as it does for any failed job; their checkpoint.pt and model.pt stay, so the retry (or the next
# snakemake) rewrites a finished run's metrics.json from its complete checkpoint without training.
for _pack, _runs in PACKS.items():
    _res_pack = job_resources([SUITE.runs[r] for r in _runs], SUITE.config, config)

    rule:
        name: f"pack_{_pack}"
        input:
            sorted({f for r in _runs for f in inputs_of(r)}),
        output:
            [f"{RUNS_DIR}/{r}/metrics.json" for r in _runs],
        log:
            f"{RUNS_DIR}/packs/{_pack}.log",
        params:
            runs=" ".join(f"--run {shlex.quote(r)}" for r in _runs),
            fuse=" --fuse" if PACKING["fuse"] else "",
            launch=_launch,
        threads: _res_pack["threads"]
        resources:
            gpus=_res_pack["gpus"],
            gpu=_res_pack["gpu"],
            nproc=_res_pack["nproc"],
            mem_mb=_res_pack["mem_mb"],
            runtime=_res_pack["runtime"],
        shell:
            "{params.launch} pack --suite {SUITE_FILE:q}{params.fuse} {params.runs} > {log:q} 2>&1"
