"""The ``kdbench`` command. Snakemake rules call these subcommands; each also works by hand."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _suite(args):
    from kdbench.planning.suite import load_suite
    return load_suite(args.suite)


def device_argument(parser, default: str | None = None, use: str = "") -> None:
    """``--device``, worded alike in every command; ``default`` None: the suite's device."""
    shown = default or "the suite's"
    parser.add_argument("--device", default=default, help=f"auto | cpu | cuda | cuda:N{use} (default: {shown})")


def job_arguments(parser, many: bool = False) -> None:
    """A job's run: ``--spec runs/<id>/spec.json`` (what the Snakemake rules pass: the job reads that
    file alone, never its suite), or by hand ``--suite FILE --run ID`` (plans the suite first); its
    ``--device`` and ``--threads`` (default: the run's)."""
    each = " (repeat for each run)" if many else ""
    parser.add_argument("--spec", action="append", metavar="SPEC_JSON",
                        help=f"the run's spec.json, as the planner (snakemake) wrote it{each}")
    parser.add_argument("--suite", help="suite YAML file (with --run: plan it, write the run's spec.json, run it)")
    parser.add_argument("--run", action="append", metavar="RUN_ID", dest="runs",
                        help=f"run id, as printed by `kdbench list-runs`{each}")
    device_argument(parser)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: the suite's)")
    parser.add_argument("--log", metavar="FILE",
                        help="write the output here once this process holds a run it trains (emptied then); "
                             "until then, and for a run already finished or held by another job, it is left alone")


def job_specs(parser, args) -> list[tuple[dict, object, str]]:
    """``(record, RunSpec, run folder)`` of each run a job command names (:func:`job_arguments`)."""
    from kdbench.core.spec import JOB_FILE, read_job_record

    if bool(args.spec) == bool(args.suite or args.runs) or bool(args.suite) != bool(args.runs):
        parser.error("give --spec runs/<id>/spec.json, or --suite FILE with --run ID")
    if len(args.spec or args.runs) > 1 and parser.prog != "kdbench pack":
        parser.error("one run per job: give --spec (or --run) once")
    paths = args.spec
    if args.suite:  # by hand: the planner's step, then the job's
        from kdbench.planning.suite import load_suite, write_specs
        suite = load_suite(args.suite)
        unknown = [r for r in args.runs if r not in suite.runs]
        if unknown:
            raise SystemExit(f"run(s) {', '.join(map(repr, unknown))} not in suite {suite.name!r}; `kdbench list-runs "
                             f"--suite {args.suite}` lists them")
        write_specs(suite, args.runs)
        paths = [f"{suite.run_dir(r)}/{JOB_FILE}" for r in args.runs]
    try:
        jobs = [(*read_job_record(p), os.path.dirname(p)) for p in paths]
    except ValueError as e:
        raise SystemExit(f"kdbench: error: {e}") from None
    if args.log:
        from kdbench.engine.run_folder import log_when_writing
        log_when_writing(args.log)
    return jobs


def cmd_fit(args, want: str, parser) -> int:
    from kdbench.engine.fit import fit

    [(record, spec, run_dir)] = job_specs(parser, args)
    commands = {"train": "train-teacher", "distill": "distill", "probe": "linear-probe", "import": "fetch-teachers"}
    if record["kind"] != want:
        raise SystemExit(f"run {record['run']!r} is a {record['kind']} run; use `kdbench {commands[record['kind']]}`")
    torch_threads(args.threads or record["threads"])
    metrics = fit(spec, run_dir, device=args.device or record["device"], run_id=record["run"], progress=not args.quiet)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary line
        print(json.dumps({k: metrics.get(k) for k in ("run", "status", "failure", "acc_last", "acc_best", "wall_time_s")}))
    return 0


def torch_threads(n: int) -> None:
    import torch
    torch.set_num_threads(n)


def cmd_make_data(args) -> int:
    from kdbench.data.synthetic_files import ensure_synthetic
    suite = _suite(args)
    cfg = suite.config["datasets"][args.dataset]
    path = ensure_synthetic(args.dataset, cfg["root"], cfg.get("synthetic") or {})
    print(path)
    return 0


def cmd_aggregate(args) -> int:
    from kdbench.report.aggregate import aggregate
    suite = _suite(args)
    for name, path in aggregate(suite, args.out or f"results/{suite.name}", args.table).items():
        print(f"{name}: {path}")
    return 0


def cmd_list_runs(args) -> int:
    from kdbench.teachers.released import teacher_source
    suite = _suite(args)
    for rid, run in suite.runs.items():
        source = teacher_source(suite, run)
        print(f"{run.kind:8s} {rid}" + (f"  teacher: {source}" if source else ""))
    print(f"# {len(suite.runs)} runs", file=sys.stderr)
    return 0


def cmd_validate(args) -> int:
    from kdbench.report.paper_tables import table_specs
    from kdbench.planning.checks import check_files_exist
    suite = _suite(args)
    table_specs(suite)  # paper-table columns, pairs and `like` references
    if not args.no_files:
        check_files_exist(suite)
    print(f"{suite.path}: valid suite {suite.name!r} with {len(suite.runs)} runs")
    return 0


def cmd_list(args) -> int:
    if args.what == "methods":
        from kdbench.methods import METHODS
        for name in METHODS:
            spec = METHODS.get(name)
            print(f"{name:16s} {spec.describe():40s} {spec.paper}")
    elif args.what == "models":
        from kdbench.models import MODELS
        print("\n".join(MODELS))
    else:
        from kdbench.data import DATASETS
        print("\n".join(DATASETS))
    return 0


def cmd_fetch(args) -> int:
    from kdbench.data.fetch import fetch
    print(fetch(args.dataset, args.root))
    return 0


def pack_main(argv: list[str] | None = None) -> int:
    """``kdbench pack``: train several runs of a suite together (:mod:`kdbench.engine.pack`)."""
    parser = argparse.ArgumentParser(
        prog="kdbench pack",
        description="Train several runs of a suite that share a teacher together in one process on one device "
                    "(each writes its own run folder exactly as `kdbench distill` would).")
    job_arguments(parser, many=True)
    parser.add_argument("--fuse", action="store_true",
                        help="fuse the students of runs that share an architecture (resnet, wrn, vgg) into one model "
                             "with grouped convolutions (horizontal fusion); only runs whose ids say fused (suite "
                             "pack: {fuse: true}), which are fused with or without it")
    args = parser.parse_args(argv)
    from kdbench.engine.pack import fit_packed
    jobs = job_specs(parser, args)
    torch_threads(args.threads or jobs[0][0]["threads"])
    ids = [record["run"] for record, _, _ in jobs]
    unfused = [record["run"] for record, spec, _ in jobs if not spec.execution.fuse]
    if args.fuse and unfused:  # fusion is in the run id (kdbench.planning.suite._fused)
        raise SystemExit(f"--fuse: the ids of {', '.join(unfused)} name unfused runs, and a fused run differs from "
                         f"an unfused one; set `pack: {{size: N, fuse: true}}` in the suite (new run ids) or drop --fuse")
    metrics = fit_packed([spec for _, spec, _ in jobs], [run_dir for _, _, run_dir in jobs],
                         device=args.device or jobs[0][0]["device"], run_ids=ids, fuse=not unfused)
    for m in metrics:
        print(json.dumps({k: m.get(k) for k in ("run", "status", "failure", "acc_last", "acc_best", "wall_time_s")}))
    return 0


def probe_main(argv: list[str] | None = None) -> int:
    """``kdbench probe``: the linear probe (:mod:`kdbench.engine.linear_probe`) of one model file, by hand."""
    from kdbench.core.spec import PROBE_RECIPE, Recipe, RunSpec
    d = dict(PROBE_RECIPE)
    p = argparse.ArgumentParser(
        prog="kdbench probe", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Linear probe (CRD/DKD transfer protocol): freeze a trained model (weights and BN statistics) and "
                    "train a new linear layer on its pooled feature on another dataset, weight decay 0.",
        epilog="Example:\n  kdbench probe runs/cifar100/wrn_40_2--wrn_16_2/crd/seed0-xxxx/model.pt "
               "--dataset stl10 --root data/stl10 --out runs/probes/crd-stl10")
    p.add_argument("model", help="the frozen model's file (a run's model.pt, kdbench-model/1)")
    p.add_argument("--dataset", required=True, help="target dataset (e.g. stl10, tinyimagenet; `kdbench list datasets`)")
    p.add_argument("--root", required=True, help="the target dataset's root folder")
    p.add_argument("--out", required=True, help="output folder (metrics.json, model.pt, checkpoint.pt)")
    p.add_argument("--epochs", type=int, default=d["epochs"], help=f"epochs ({d['epochs']})")
    p.add_argument("--milestones", type=int, nargs="*", default=d["milestones"],
                   help=f"lr ×0.1 after these epochs ({' '.join(map(str, d['milestones']))})")
    p.add_argument("--lr", type=float, default=d["lr"], help=f"SGD lr ({d['lr']})")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help=f"batch size ({d['batch_size']})")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"],
                   help=f"weight decay ({d['weight_decay']}, as the DKD maintainers prescribe)")
    p.add_argument("--seed", type=int, default=0)
    device_argument(p, "auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    from kdbench.core.registry import UnknownNameError
    from kdbench.data import DatasetMissingError
    from kdbench.engine.checkpoint import MODEL_FORMAT, CheckpointError, read_file
    from kdbench.engine.fit import fit
    try:
        arch = read_file(a.model, MODEL_FORMAT)["arch"]
        recipe = Recipe.from_config({**d, "epochs": a.epochs, "milestones": a.milestones, "lr": a.lr,
                                     "batch_size": a.batch_size, "weight_decay": a.weight_decay})
        spec = RunSpec(a.dataset, a.root, arch, "student", a.seed, recipe=recipe, protocol="linear_probe",
                       init_ckpt=a.model)
        m = fit(spec, a.out, a.device, run_id=None, progress=not a.quiet)
    except (CheckpointError, DatasetMissingError, UnknownNameError, ValueError) as e:
        print(f"kdbench probe: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: m.get(k) for k in ("status", "failure", "acc_last", "acc_best", "wall_time_s")}))
    return 0


#: subcommands with their own parser, ``main(argv) -> int``: here (the commands that read a suite
#: and drive the engine) or in the module they serve (each parser beside the code it configures).
#: Each module's top imports no torch, nor does any main before its arguments are read: every
#: ``--help`` answers without it (tests/test_cli.py). A module that needs torch at its top names a
#: third item, its parser in a module that does not: ``kdbench`` reads the arguments with it first
MODULE_COMMANDS = {
    "compare": ("kdbench.report.compare", "compare two methods from results on disk (paired tests)"),
    "tables": ("kdbench.report.paper_tables", "paper-layout tables with published values and verdicts"),
    "figures": ("kdbench.report.figures", "paper figures (PNG) from run outputs"),
    "kernel-gap": ("kdbench.commands.diagnostics", "untransferred kernel fraction of a student vs its teacher"),
    "import-teacher": ("kdbench.commands.teachers:import_teacher_main", "import a published teacher checkpoint"),
    "fetch-teachers": ("kdbench.commands.teachers:fetch_teachers_main", "download, check and import a suite's released teachers"),
    "probe": ("kdbench.commands.cli:probe_main", "linear probe of a frozen student on another dataset"),
    "export": ("kdbench.commands.export", "write a trained run's model as a RepDistiller-style checkpoint"),
    "bench": ("kdbench.commands.bench", "whole runs and steps: a RepDistiller-style loop vs kdbench's engine; a packed grid vs the same runs one by one",
              "kdbench.commands.bench_cli:parser"),
    "pack": ("kdbench.commands.cli:pack_main", "train several runs that share a teacher together on one device"),
    "looks": ("kdbench.commands.looks", "seeds as a budget: run, decide, add seeds to undecided cells, repeat"),
    "resume": ("kdbench.planning.resume", "continue a killed snakemake pipeline: unlock, then rerun incomplete jobs"),
    "stop": ("kdbench.planning.resume:stop_main", "stop a pipeline: its snakemake and (scancel) its cluster jobs"),
    "plan": ("kdbench.commands.plan", "a suite's runs, steps, GPU-hours and wall time, per table and in total"),
}


def main(argv: list[str] | None = None) -> int:
    """``kdbench``: a closed pipe (``kdbench list-runs | head``) ends the command quietly."""
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except BrokenPipeError:  # the reader went away: say nothing more, as `ls | head` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe


def _main(argv: list[str]) -> int:
    if argv and argv[0] in MODULE_COMMANDS:
        main_ref, _, *parser_ref = MODULE_COMMANDS[argv[0]]
        if parser_ref:  # --help and bad arguments are answered before the module loads torch
            _function(parser_ref[0])().parse_args(argv[1:])
        from kdbench.core.io import OutputError
        try:
            return _function(main_ref)(argv[1:])
        except OutputError as e:  # a full disk, a read-only folder: one line, the file, the cause, the fix
            print(f"kdbench {argv[0]}: error: {e}", file=sys.stderr)
            return 2
    p = parser()
    args = p.parse_args(argv)
    if args.cmd is None:  # bare `kdbench`: what it can do
        p.print_help()
        return 0
    from kdbench.data import DatasetMissingError
    from kdbench.engine.checkpoint import CheckpointError
    from kdbench.engine.device import NoGpuError
    from kdbench.core.registry import UnknownNameError
    from kdbench.core.io import OutputError
    from kdbench.planning.checks import SuiteError  # not planning.suite: a job never loads its suite
    try:
        return args.handler(args)
    except (SuiteError, UnknownNameError, DatasetMissingError, CheckpointError, NoGpuError, OutputError) as e:
        print(f"kdbench: error: {e}", file=sys.stderr)
        return 2


def _function(ref: str):
    """``module:function`` (or ``module``: its ``main``), imported."""
    import importlib
    module, _, func = ref.partition(":")
    return getattr(importlib.import_module(module), func or "main")


def parser() -> argparse.ArgumentParser:
    """The ``kdbench`` parser, every subcommand in it; each of this module's sets its handler. A
    :data:`MODULE_COMMANDS` one is a stub here (``kdbench`` hands its arguments to the command's
    own parser)."""
    from kdbench import __version__
    p = argparse.ArgumentParser(prog="kdbench", description="Knowledge-distillation benchmark reproduction suite.")
    p.add_argument("--version", action="version", version=f"kdbench {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    def with_suite(sp, handler):
        sp.add_argument("--suite", required=True, help="suite YAML file, or a suite name (crd = workflow/suites/crd.yaml)")
        sp.set_defaults(handler=handler)
        return sp

    jobs = {"train-teacher": ("train", "train a model from scratch (teachers and plain students)"),
            "distill": ("distill", "distil a student from its teacher(s)"),
            "linear-probe": ("probe", "linear probe of a suite's frozen model on another dataset")}
    for name, (kind, help_text) in jobs.items():
        sp = sub.add_parser(name, help=help_text)
        job_arguments(sp)
        sp.add_argument("--quiet", action="store_true", help="no progress bar")
        sp.set_defaults(handler=lambda a, kind=kind, sp=sp: cmd_fit(a, kind, sp))
    agg = with_suite(sub.add_parser("aggregate", help="seed-aggregated tables under results/<suite>/"), cmd_aggregate)
    agg.add_argument("--out", help="output folder (default results/<suite name>)")
    agg.add_argument("--table", action="append", help="only this table's <table>.md (repeatable; no runs.csv, summary.csv)")
    with_suite(sub.add_parser("list-runs", help="print the suite's run ids"), cmd_list_runs)
    va = with_suite(sub.add_parser("validate", help="check a suite file (and the files it needs) and count its runs"),
                    cmd_validate)
    va.add_argument("--no-files", action="store_true",
                    help="skip checking that dataset roots and imported teacher files exist (to plan elsewhere)")
    md = with_suite(sub.add_parser("make-data", help="write a suite's synthetic dataset in its real format"), cmd_make_data)
    md.add_argument("--dataset", required=True)
    ls = sub.add_parser("list", help="list registered methods, models or datasets")
    ls.add_argument("what", choices=["methods", "models", "datasets"])
    ls.set_defaults(handler=cmd_list)
    fe = sub.add_parser("fetch", help="download a dataset into its official layout (needs internet)")
    fe.add_argument("dataset")
    fe.add_argument("--root", required=True)
    fe.set_defaults(handler=cmd_fetch)
    import importlib.util
    for name, (module, help_text, *_) in MODULE_COMMANDS.items():
        if importlib.util.find_spec(module.partition(":")[0]) is not None:
            sub.add_parser(name, help=help_text, add_help=False)
    return p


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
