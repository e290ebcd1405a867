"""A cluster job's parse of the Snakefile (`snakemake --mode remote`) reads the plan its invocation
wrote and loads no suite (no torch); a changed suite source makes it load the suite again."""

import subprocess
import sys
from pathlib import Path

from conftest import REPO, child_env, write_suite

from kdbench.planning.plan_cache import Plan, digests, plan_path


def parse(workdir: Path, suite: Path, *mode: str) -> subprocess.CompletedProcess:
    """The Snakefile parsed (--list-rules) with Python's import log (-X importtime) on stderr."""
    cmd = [sys.executable, "-X", "importtime", "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--workflow-profile", "none", *mode, "--config", f"suite_file={suite}", "--list-rules"]
    return subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=300)


def imported(done: subprocess.CompletedProcess, module: str) -> bool:
    return any(line.startswith("import time:") and line.split("|")[-1].strip() == module
               for line in done.stderr.splitlines())


def test_a_jobs_parse_reads_the_plan_and_loads_no_suite(tmp_path):
    suite = write_suite(tmp_path / "tiny.yaml", tmp_path / "data")
    work = tmp_path / "work"
    main = parse(work, suite)
    assert main.returncode == 0, main.stderr[-3000:]
    assert imported(main, "kdbench.planning.suite") and imported(main, "torch")
    plans = list((work / ".snakemake/kdbench-plans").glob("*.json"))
    assert len(plans) == 1  # written by the main process's parse, for the jobs

    job = parse(work, suite, "--mode", "remote")
    assert job.returncode == 0, job.stderr[-3000:]
    assert job.stdout == main.stdout and "fit" in job.stdout.split()  # the same rules
    assert not imported(job, "kdbench.planning.suite") and not imported(job, "torch")
    assert "no current plan" not in job.stderr
    assert not imported(job, "matplotlib")  # (pandas: Snakemake imports it itself)

    suite.write_text(suite.read_text() + "\n# edited after the plan was written\n")
    stale = parse(work, suite, "--mode", "remote")
    assert stale.returncode == 0 and stale.stdout == main.stdout
    assert imported(stale, "kdbench.planning.suite")  # the plan's sources changed: the suite is loaded
    assert "kdbench: no current plan at .snakemake/kdbench-plans/" in stale.stderr


def test_a_plan_is_read_back_only_while_its_sources_are_unchanged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = write_suite(tmp_path / "base.yaml", tmp_path / "data")
    suite = tmp_path / "s.yaml"
    suite.write_text(f"include: [{base.name}]\nname: s\n")
    loads = []

    def load(path):
        loads.append(path)
        return {"runs": ["a", "b"]}

    plan = Plan(suite, {"pack_size": 2}, load, reuse=False)
    assert plan.value("runs", lambda: tuple(plan.suite["runs"])) == ["a", "b"]  # as a job reads it (JSON)
    plan.write()
    assert plan_path(suite, {"pack_size": 2}) != plan_path(suite, {"pack_size": 3})  # another invocation's

    again = Plan(suite, {"pack_size": 2}, load, reuse=True)
    assert again.reused and again.value("runs", lambda: 1 / 0) == ["a", "b"] and loads == [str(suite)]
    assert not Plan(suite, {"pack_size": 3}, load, reuse=True).reused  # no plan for other --config values
    assert str(base.resolve()) in digests(suite)  # an included suite is a source
    base.write_text(base.read_text() + "\n")
    assert not Plan(suite, {"pack_size": 2}, load, reuse=True).reused
    suite.write_text(f"include: [{base.name}]\nname: s\nimports: [mymodels]\n")
    assert digests(suite) is None  # untracked plugin files: always loaded
