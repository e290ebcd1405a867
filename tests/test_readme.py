"""The README is the contract: its example suite is valid and CI runs exactly its commands."""

import re

from kdbench.planning.suite import load_suite

from conftest import REPO

README = (REPO / "README.md").read_text()


def test_readme_example_suite_is_valid(tmp_path):
    block = README.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "mysuite.yaml"
    path.write_text(block)
    suite = load_suite(path)
    assert suite.name == "mysuite" and len(suite.runs) > 0


def test_ci_runs_the_readme_install_and_test_commands():
    main, tests = re.findall(r"```bash\n(.+?)\n```", README, flags=re.S)[:2]
    install = main.split(" && ")[0]
    ci = (REPO / ".ci/run").read_text().splitlines()
    assert install in ci and tests in ci
    assert main.endswith("snakemake --cores 2")
