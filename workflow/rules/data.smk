# Synthetic datasets are generated in their real on-disk format; real ones are fetched by hand
# (`kdbench fetch`, see the README) and are not Snakemake outputs.

SYNTHETIC = PLAN.value("synthetic", lambda: {n: ds["root"] for n, ds in PLAN.suite.synthetic_datasets().items()})

for _name, _root in SYNTHETIC.items():

    rule:
        name: f"synthetic_{_name}"
        output:
            f"{_root}/kdbench-synthetic.json",
        log:
            f"{LOGS}/synthetic_{_name}.log",
        params:
            suite=SUITE_FILE,
            dataset=_name,
        localrule: True
        shell:
            "kdbench make-data --suite {params.suite:q} --dataset {params.dataset} > {log:q} 2>&1"
