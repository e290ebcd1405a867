"""``kdbench import-teacher`` and ``kdbench fetch-teachers``: the commands over
:mod:`kdbench.teachers` (imported checkpoints, released teachers). Their parsers load no torch (the
modules they drive do, once the arguments are read): ``--help`` answers at once."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kdbench.commands.cli import device_argument
from kdbench.teachers import TEACHERS_DIR


def import_teacher_main(argv: list[str] | None = None) -> int:
    """``kdbench import-teacher``: one published checkpoint as a kdbench model file
    (:func:`kdbench.teachers.imported.import_teacher`)."""
    p = argparse.ArgumentParser(prog="kdbench import-teacher", description="Import a published teacher checkpoint (RepDistiller/mdistiller "
                                "ckpt_epoch_240.pth, or torchvision ImageNet ResNet weights) as a kdbench model file, "
                                "checking keys, shapes, values and, with --check-data, the published accuracy.",
                                epilog="Examples:\n  kdbench import-teacher save/models/resnet32x4_vanilla/ckpt_epoch_240.pth "
                                       "teachers/resnet32x4.pt --check-data data/cifar100\n  kdbench import-teacher "
                                       "resnet34-b627a593.pth teachers/imagenet_resnet34.pt --check-data data/imagenet",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="RepDistiller/mdistiller ckpt_epoch_240.pth, or a torchvision resnet18/34 .pth")
    p.add_argument("out", help="kdbench model file to write (e.g. runs/teachers/resnet32x4.pt)")
    p.add_argument("--arch", help="kdbench architecture (default: from the RepDistiller folder <arch>_vanilla or "
                                  "<arch>_<dataset>_lr_..., the torchvision file name, else the one architecture "
                                  "whose keys and shapes fit)")
    p.add_argument("--dataset", help="dataset the teacher was trained on (default: cifar100 for RepDistiller files, "
                                     "imagenet for torchvision files)")
    p.add_argument("--check-data", metavar="ROOT", help="evaluate on this dataset root's test split and compare with "
                                                        "the published top-1")
    p.add_argument("--tolerance", type=float, default=0.1, help="allowed |measured - published| top-1, in points (0.1)")
    p.add_argument("--published", type=float, help="the published top-1 %% to check against (default: kdbench's table of "
                                                   "RepDistiller's and torchvision's teachers)")
    p.add_argument("--no-published-ok", action="store_true", help="with --check-data and no published top-1 known: "
                                                                  "import anyway, the accuracy measured but not checked")
    device_argument(p, "auto", " for --check-data")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size (for --check-data)")
    a = p.parse_args(argv)
    from kdbench.core.io import OutputError, remove_stale_temporaries
    from kdbench.data import DatasetMissingError
    from kdbench.engine.checkpoint import CheckpointError
    from kdbench.teachers.imported import import_teacher
    remove_stale_temporaries(a.out)  # what a killed import left
    try:
        report = import_teacher(a.checkpoint, a.out, a.arch, a.dataset, a.check_data, a.tolerance, a.device, a.batch_size,
                                a.published, a.no_published_ok)
    except (CheckpointError, DatasetMissingError, OutputError) as e:
        print(f"kdbench import-teacher: error: {e}", file=sys.stderr)
        return 2
    acc = f", measured top-1 {report['measured_top1']:.2f}% (published {report['published_top1']})" \
        if "measured_top1" in report else ""
    print(f"{a.out}: {report['arch']} ({report['num_classes']} classes, {report['format']} format){acc}; accuracy check: "
          f"{report['accuracy_check']}")
    return 0


def fetch_teachers_main(argv: list[str] | None = None) -> int:
    """``kdbench fetch-teachers``: obtain, check and import a suite's released teachers
    (:mod:`kdbench.teachers.released`)."""
    p = argparse.ArgumentParser(prog="kdbench fetch-teachers", description="Download (where the network allows), "
                                "check and import the released teachers of a suite's `teacher: released` pairs, as "
                                "runs the distillations read. Without network: put each file where the message says "
                                "and rerun.")
    p.add_argument("--suite", required=True, help="suite YAML file")
    p.add_argument("--run", action="append", help="only this import run (repeatable; default: all of the suite's)")
    p.add_argument("--dir", default=TEACHERS_DIR, help=f"folder of the raw released files (default {TEACHERS_DIR}/)")
    device_argument(p, None, " for the accuracy check")
    p.add_argument("--list", action="store_true", help="print each released teacher's file and URLs, fetch nothing")
    a = p.parse_args(argv)
    from kdbench.core.io import OutputError
    from kdbench.data import DatasetMissingError
    from kdbench.engine.checkpoint import CheckpointError
    from kdbench.planning.suite import SuiteError, load_suite
    from kdbench.teachers.released import import_released, released_teacher

    try:
        suite = load_suite(a.suite)
        runs = {r: run for r, run in suite.runs.items() if run.kind == "import"}
        unknown = [r for r in a.run or [] if r not in runs]
        if unknown:
            raise SuiteError(f"{', '.join(unknown)}: not import runs of {a.suite}; they are: {', '.join(runs) or 'none'}")
        for rid in a.run or list(runs):
            rt = released_teacher(runs[rid].spec.dataset, runs[rid].spec.student)
            if a.list:
                print(f"{rid}\n    file {Path(a.dir) / rt.file}\n    from {', '.join(rt.urls)}"
                      f"{', ' + rt.archive[0] + '#' + rt.archive[1] if rt.archive else ''}")
                continue
            resume = f"`kdbench fetch-teachers --suite {a.suite}` (or snakemake) again"
            m = import_released(rt, suite.run_dir(rid), a.dir, runs[rid].spec.data_root,
                                a.device or suite.config.get("device", "auto"), rid, resume)
            acc = f"top-1 {m['acc_last']:.2f}%" if m["acc_last"] is not None else "accuracy not measured"
            print(f"{rid}: {m['imported']['source']} sha256 {m['imported']['sha256']}, {acc} "
                  f"(published {rt.published_top1}); check: {m['imported']['accuracy_check']}")
    except (SuiteError, CheckpointError, DatasetMissingError, KeyError, OutputError) as e:
        print(f"kdbench fetch-teachers: error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    return 0
