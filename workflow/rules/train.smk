# Every run (teacher, plain student, distilled student) is one job of rule `fit`, unless packing
# is on (suite `pack: {size: N}` or --config pack_size=N): then distillations that share a teacher
# are trained K at a time by one job of a rule `pack_<pack id>` (`kdbench pack`), which writes each
# run's folder exactly as rule fit would. Run ids name what defines the run; `kdbench list-runs
# --suite FILE` prints them.
import re
import shlex


def _job_resources(runs):
    from kdbench.planning.launch import job_resources

    return job_resources(runs, PLAN.suite.config, config)


PACKING = PLAN.value("packing", lambda: PLAN.suite.pack_options(config))  # {"size": N, "fuse": bool}
PACKS = PLAN.value("packs", lambda: PLAN.suite.packs(PACKING["size"]))  # pack id -> run ids (Suite.packs)
PACKED = {r for runs in PACKS.values() for r in runs}
# rule fit makes only the runs that no pack makes, so every metrics.json has one producer
# (Snakemake would prefer the wildcard-free pack rule anyway; this says it). "(?!)": fit makes none.
FIT_RUNS = ("|".join(re.escape(r) for r in RUN_IDS if r not in PACKED) or "(?!)") if PACKED else ".+"
# run id -> its job's size (kdbench.planning.launch.job_resources), computed without reading any data
SIZES = PLAN.value("sizes", lambda: {r: _job_resources(PLAN.suite.runs[r]) for r in RUN_IDS if r not in PACKED})
PACK_SIZES = PLAN.value("pack_sizes", lambda: {p: _job_resources([PLAN.suite.runs[r] for r in runs])
                                                for p, runs in PACKS.items()})


def _fit_command(wildcards):
    return {"train": "train-teacher", "distill": "distill", "probe": "linear-probe"}[KINDS[wildcards.run]]


def _sizes(run_id):
    return SIZES[run_id]


def _res(key):
    return lambda wildcards, **_: _sizes(wildcards.run)[key]


def _launch(sizes):
    """The command prefix that runs a kdbench subcommand on the job's GPUs: GPU jobs require a GPU
    (KDBENCH_REQUIRE_GPU=1: no silent CPU fallback) and go through the launcher (claims free GPUs
    when no scheduler assigned them, starts torchrun for DDP runs)."""
    import sys
    if sizes["gpu"] == 0 and sizes["nproc"] == 1:
        return "kdbench"
    return f"{gpu_env(sizes['gpu'])}{sys.executable} -m kdbench.planning.launch --gpus {sizes['gpu']} --nproc {sizes['nproc']} --"


# a run whose estimate exceeds max_runtime needs several submissions (each resumes from the
# checkpoint); one more for a failure, as the profiles' `retries: 1` gives every other rule
FIT_RETRIES = max([_sizes(r)["segments"] for r in RUN_IDS if r not in PACKED] or [1])


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
        spec=lambda wildcards: f"{RUNS_DIR}/{wildcards.run}/spec.json",  # the planner's (Snakefile: write_specs)
        command=_fit_command,
        launch=lambda wildcards: _launch(_sizes(wildcards.run)),
    threads: _res("threads")
    retries: FIT_RETRIES
    resources:
        gpu=_res("gpu"),  # sbatch --gpus; locally at most --resources gpu=N at once
        cpus_per_task=_res("cpus_per_task"),
        mem_mb=_res("mem_mb"),
        runtime=_res("runtime"),  # minutes, at most max_runtime
        nodes=_res("nodes"),  # DDP: torchrun's processes on one node
    shell:
        "{params.launch} {params.command} --spec {params.spec:q} --log {log:q}"  # kdbench opens the log, not the shell: run_folder.log_when_writing


# One job per pack: 1 GPU and one run's threads (never DDP: streamed datasets are not packed),
# memory and runtime scaled with the pack (job_resources). If a run fails with an error, the
# others finish, `kdbench pack` exits non-zero and Snakemake removes the pack's metrics.json files
# as it does for any failed job; their checkpoint.pt and model.pt stay, so the retry (or the next
# snakemake) rewrites a finished run's metrics.json from its complete checkpoint without training.
# A rule per pack, not one rule with a {pack} wildcard: Snakemake requires every output of a rule to
# carry all its wildcards, and a pack's outputs are its runs' folders, named by run id alone.
for _pack, _runs in PACKS.items():
    _size = PACK_SIZES[_pack]

    rule:
        name: f"pack_{_pack}"
        input:
            sorted({f for r in _runs for f in INPUTS[r]}),
        output:
            [f"{RUNS_DIR}/{r}/metrics.json" for r in _runs],
        log:
            f"{RUNS_DIR}/packs/{_pack}.log",
        params:
            specs=" ".join(f"--spec {shlex.quote(f'{RUNS_DIR}/{r}/spec.json')}" for r in _runs),
            fuse=" --fuse" if PACKING["fuse"] else "",
            launch=_launch(_size),
        threads: _size["threads"]
        retries: _size["segments"]
        resources:
            gpu=_size["gpu"],
            cpus_per_task=_size["cpus_per_task"],
            mem_mb=_size["mem_mb"],
            runtime=_size["runtime"],
            nodes=_size["nodes"],
        shell:
            "{params.launch} pack{params.fuse} {params.specs} --log {log:q}"
