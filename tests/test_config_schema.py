"""Snakemake's --config (workflow/schemas/config.schema.yaml): paths are taken as written, so one
relying on the shell's ~ or $VAR expansion (which a quoted --config value never gets) is refused."""

import jsonschema
import pytest
import yaml

from conftest import REPO

SCHEMA = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())


@pytest.mark.parametrize("key", ["suite_file", "results_dir", "teachers_dir"])
@pytest.mark.parametrize("value, ok", [("suites/a.yaml", True), ("/abs/path", True), ("a~b", True),
                                       ("~/suites/a.yaml", False), ("$HOME/a", False), ("x/${SCRATCH}", False)])
def test_paths_relying_on_the_shell_are_refused(key, value, ok):
    errors = list(jsonschema.Draft202012Validator(SCHEMA).iter_errors({key: value}))
    assert (not errors) == ok, errors
