# Helpers shared by the rules: they only list targets, all logic lives in the kdbench package.

wildcard_constraints:
    run=".+",
    dataset="[A-Za-z0-9_]+",


#: GPUs a single-GPU job asks for (sbatch --gpus; locally --resources gpu=N): none for CPU suites
GPU = PLAN.value("gpu", lambda: 0 if PLAN.suite.config.get("device", "auto") == "cpu" else 1)
LOGS = f"{RUNS_DIR}/logs/{NAME}"  # the logs of the jobs that are not one run's (tables, data)


def gpu_env(gpu: int) -> str:
    """Shell prefix of a job that asked for a GPU: it must find one (KDBENCH_REQUIRE_GPU=1 makes
    the run fail at once, with the fix, instead of training on the CPU). `--config
    require_gpu=false` lets `device: auto` suites fall back to the CPU (a workstation without one)."""
    return "KDBENCH_REQUIRE_GPU=1 " if gpu and str(config.get("require_gpu", True)).lower() != "false" else ""


def _output_dir(wildcards, output):
    """The folder of a rule's outputs (a table or figure job's --out)."""
    import os
    return os.path.dirname(output[0])


def run_inputs(wildcards):
    return INPUTS[wildcards.run]


def _inputs_of(suite, run_id):
    run = suite.runs[run_id]
    # a teacher's (or probed model's) metrics.json marks it finished; a failed run leaves no
    # model.pt and the job that needs it then stops with a message naming it
    inputs = [f"{RUNS_DIR}/{t}/metrics.json" for t in run.needs]
    if run.kind == "distill" and not run.needs:  # teacher_checkpoints: the imported files themselves
        inputs += list(run.spec.teacher_ckpts)
    synthetic = suite.synthetic_datasets()
    if run.spec.dataset in synthetic:
        inputs.append(f"{synthetic[run.spec.dataset]['root']}/kdbench-synthetic.json")
    return inputs


INPUTS = PLAN.value("inputs", lambda: {r: _inputs_of(PLAN.suite, r) for r in RUN_IDS})  # run id -> its job's inputs
KINDS = PLAN.value("kinds", lambda: {r: run.kind for r, run in PLAN.suite.runs.items()})  # train | distill | probe | import


def all_metrics():
    """Every run's metrics.json; with --config tables=...: those of the runs the tables read
    (SELECTION, kdbench.report.selection), which the table jobs then read alone."""
    return [f"{RUNS_DIR}/{r}/metrics.json" for r in RUN_IDS if SELECTED is None or r in SELECTED]


def table_outputs():
    """`kdbench aggregate`'s outputs: runs.csv, summary.csv and each table's seed aggregate, or with
    --config tables=... only those tables' (`--table`, no suite-wide CSVs)."""
    if SELECTION is not None:
        return [f"{RESULTS}/{n}.md" for n in SELECTION["tables"]]
    return [f"{RESULTS}/runs.csv", f"{RESULTS}/summary.csv"] + [f"{RESULTS}/{n}.md" for n in TABLE_NAMES]


TABLE_NAMES = PLAN.value("table_names", lambda: [t["name"] for t in PLAN.suite.config.get("tables", [])] or ["summary"])


def table_args(names) -> str:
    """The `--table NAME ...` of a table or figure job under --config tables=... ("" for every table)."""
    import shlex

    return "" if SELECTION is None else "".join(f" --table {shlex.quote(n)}" for n in names)


def spec_param(obj) -> str:
    """A rule's ``params:`` value holding the part of the suite its outputs follow (Snakemake's
    default rerun trigger ``params`` reruns the rule when it changes: a table's metric or caption)."""
    import dataclasses
    import json

    def plain(o):
        return dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o)

    return json.dumps(obj, sort_keys=True, default=plain)


def set_aside_corrupt_metrics():
    """A metrics.json that is not JSON (kdbench writes it atomically, so a damaged disk or a hand
    edit) is moved to metrics.json.corrupt: this invocation then reruns the run's job, which
    rewrites it from the run's complete checkpoint.pt without training, and the tables. A dry run
    (-n) only says so. Reads every existing metrics.json once per invocation (main process only)."""
    import pathlib

    from kdbench.core.io import read_json_state

    for run in RUN_IDS:
        path = pathlib.Path(f"{RUNS_DIR}/{run}/metrics.json")
        if read_json_state(path)[1] != "corrupt":
            continue
        if workflow.dryrun:
            print(f"kdbench: {path} is corrupt; a real invocation moves it to metrics.json.corrupt and reruns its job")
        else:
            path.replace(path.with_name("metrics.json.corrupt"))
            print(f"kdbench: {path} was corrupt: moved to metrics.json.corrupt; its job reruns and rewrites it")


if workflow.is_main_process:
    set_aside_corrupt_metrics()
