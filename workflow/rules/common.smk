# Helpers shared by the rules: they only list targets, all logic lives in the kdbench package.

wildcard_constraints:
    run=".+",
    dataset="[A-Za-z0-9_]+",


def run_inputs(wildcards):
    return inputs_of(wildcards.run)


def inputs_of(run_id):
    run = SUITE.runs[run_id]
    # a teacher's (or probed model's) metrics.json marks it finished; a failed run leaves no
    # model.pt and the job that needs it then stops with a message naming it
    inputs = [f"{RUNS_DIR}/{t}/metrics.json" for t in run.needs]
    if run.kind == "distill" and not run.needs:  # teacher_checkpoints: the imported files themselves
        inputs += list(run.spec.teacher_ckpts)
    synthetic = SUITE.synthetic_datasets()
    if run.spec.dataset in synthetic:
        inputs.append(f"{synthetic[run.spec.dataset]['root']}/kdbench-synthetic.json")
    return inputs


def all_metrics():
    return [f"{RUNS_DIR}/{r}/metrics.json" for r in SUITE.runs]


def table_outputs():
    names = [t["name"] for t in SUITE.config.get("tables", [])] or ["summary"]
    return [f"{RESULTS}/runs.csv", f"{RESULTS}/summary.csv"] + [f"{RESULTS}/{n}.md" for n in names]
