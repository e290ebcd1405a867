"""The pinned environment agrees with itself: environment.yml's torch/torchvision are the pair CI
installs (.ci/run) and lie within pyproject's bounds, and every pyproject dependency is pinned."""

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    return dict(p.lower().split("==") for p in pip if "==" in p)


def test_environment_pins_the_ci_pair_within_pyproject_bounds():
    pinned = pins()
    ci = (REPO / ".ci/run").read_text()
    assert f"torch=={pinned['torch']} torchvision=={pinned['torchvision']}" in ci
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    for req in requirements:
        name = req.name.lower()
        assert name in pinned, f"{name} is not pinned in environment.yml"
        assert req.specifier.contains(pinned[name]), (name, str(req.specifier), pinned[name])
    torch = next(r for r in requirements if r.name == "torch")
    assert not torch.specifier.contains("2.15.0") and not torch.specifier.contains("2.13.0")  # bounded both ways
    major, minor = map(int, re.match(r"(\d+)\.(\d+)", pinned["torch"]).groups())
    assert pinned["torchvision"].startswith(f"0.{minor + 15}.")  # torchvision 0.(N+15) pairs with torch 2.N
