"""The ``kdbench`` command as a user meets it: bare ``kdbench`` and ``--version``, a suite given by
name anywhere a suite is asked for, a closed pipe, and ``--help`` that does not load torch."""

import argparse
import subprocess
import sys

import pytest

from conftest import REPO, child_env
from kdbench import __version__
from kdbench.commands.cli import MODULE_COMMANDS, parser


def subcommands() -> list[str]:
    """Every subcommand the ``kdbench`` parser has: its own and the module commands."""
    [sub] = [a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return list(sub.choices)


def kdbench(*args, **kw):
    return subprocess.run([sys.executable, "-m", "kdbench.commands.cli", *args], capture_output=True, text=True,
                          env=child_env(), cwd=REPO, timeout=300, **kw)


def test_bare_kdbench_prints_help_and_version_prints_the_version():
    done = kdbench()
    assert done.returncode == 0 and done.stdout.startswith("usage: kdbench") and "list-runs" in done.stdout
    done = kdbench("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"kdbench {__version__}"


def test_a_suite_name_is_its_file_everywhere_and_a_misspelt_one_lists_the_names(tmp_path):
    by_name, by_file = kdbench("list-runs", "--suite", "smoke"), kdbench("list-runs", "--suite",
                                                                       "workflow/suites/smoke.yaml")
    assert by_name.returncode == 0 and by_name.stdout == by_file.stdout and by_name.stdout
    done = kdbench("list-runs", "--suite", "papr")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "Did you mean 'paper'?" in done.stderr and "Suite names: crd, dkd" in done.stderr
    snake = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--workflow-profile", "none", "-n", "--directory",
                            str(tmp_path), "--config", "suite=papr"], capture_output=True, text=True,
                           env=child_env(), timeout=300)
    out = snake.stdout + snake.stderr
    assert snake.returncode != 0 and "Did you mean 'paper'?" in out and "Traceback" not in out, out[-2000:]


def test_a_closed_pipe_ends_quietly():
    done = subprocess.run(f"{sys.executable} -m kdbench.commands.cli list-runs --suite smoke | head -1; "
                          "echo rc=${PIPESTATUS[0]}", shell=True, executable="/bin/bash", capture_output=True,
                          text=True, env=child_env(), cwd=REPO, timeout=300)
    assert done.stdout.splitlines()[-1] in ("rc=0", "rc=141") and "Traceback" not in done.stderr, done.stderr


def loads_torch(*argv: str) -> tuple[bool, str]:
    """Run ``kdbench ARGV`` in a fresh interpreter: (whether torch was imported, its stdout)."""
    code = ("import sys\nfrom kdbench.commands.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
            "    pass\nprint('torch' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=child_env(),
                          cwd=REPO, timeout=300)
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    return done.stderr.strip().splitlines()[-1] == "True", done.stdout


def test_every_command_is_in_the_parser():
    commands = subcommands()
    assert set(MODULE_COMMANDS) <= set(commands) and len(commands) == len(set(commands))
    assert {"train-teacher", "distill", "linear-probe", "pack", "list-runs", "tables"} <= set(commands)


@pytest.mark.parametrize("argv", [[], ["--help"], ["--version"], *([c, "--help"] for c in subcommands())], ids=" ".join)
def test_help_and_version_never_load_torch(argv):
    """Every subcommand's --help (each enumerated from the parser), bare kdbench and --version print
    what they say without importing torch (issue 27: 9-22 s each on a cluster's shared file system)."""
    loads, out = loads_torch(*argv)
    assert f"kdbench {argv[0]}" in out if argv[1:] == ["--help"] else out.startswith(
        "kdbench " if argv == ["--version"] else "usage: kdbench"), out[:200]
    assert not loads, f"kdbench {' '.join(argv)} imports torch"


def test_the_torch_probe_sees_torch_where_a_command_needs_it():
    """The check above can fail: a command that builds the model registry imports torch, and is seen to."""
    loads, out = loads_torch("list", "models")
    assert loads and "resnet8" in out.split()
