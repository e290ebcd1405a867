# Released teachers (`teacher: released` in a suite; kdbench/teachers/released.py): one job per
# teacher downloads the checkpoint the papers used (where the network allows; otherwise the job
# fails saying which file to put where), checks it and imports it as the run
# <dataset>/released/<arch>/<source>-<hash>, whose model.pt every distillation from it reads.
# Distillations list that run's metrics.json among their inputs (common.smk: run.needs), so the
# import always comes first. `--config teachers_dir=DIR` moves the raw files (default teachers/).
import re

IMPORT_RUNS = [r for r in RUN_IDS if KINDS[r] == "import"]
TEACHERS_DIR = config.get("teachers_dir", "teachers")

if IMPORT_RUNS:

    ruleorder: fetch_teacher > fit

    rule fetch_teacher:
        input:
            run_inputs,
        output:
            metrics=f"{RUNS_DIR}/{{run}}/metrics.json",
        log:
            f"{RUNS_DIR}/{{run}}/log.txt",
        wildcard_constraints:
            run="|".join(re.escape(r) for r in IMPORT_RUNS),
        params:
            suite=SUITE_FILE,
            dir=TEACHERS_DIR,
        # on the login node, where clusters allow downloads (compute nodes often have no network);
        # the accuracy check of one test set runs on its CPU if it has no GPU
        localrule: True
        retries: 0  # a download that failed fails again at once; the pre-flight checked a source answers
        shell:
            "kdbench fetch-teachers --suite {params.suite:q} --run {wildcards.run:q} --dir {params.dir:q} > {log:q} 2>&1"
