# Synthetic datasets are generated in their real on-disk format; real ones are fetched by hand
# (`kdbench fetch`, see the README) and are not Snakemake outputs.

for _name, _ds in SUITE.synthetic_datasets().items():

    rule:
        name: f"synthetic_{_name}"
        output:
            f"{_ds['root']}/kdbench-synthetic.json",
        params:
            dataset=_name,
        resources:
            gpus=0,
            mem_mb=2000,
            runtime=10,
        localrule: True
        shell:
            "kdbench make-data --suite {SUITE_FILE:q} --dataset {params.dataset}"
