"""The suite mutation fuzzer (tests/suite_fuzz.py) on every shipped suite: each mutant is refused
naming the key, or plans exactly the cells its declarations imply, and no accepted change is
inert unless documented. The CI sample is 4,000 mutants (about 50 s on 2 cores); a longer run:
``python tests/suite_fuzz.py 20000 [seed]``."""

import random

import pytest
import yaml

from suite_fuzz import SUITES, duplicate_line, expected_cells, fixed_keys, run, typo


@pytest.fixture(scope="module")
def result():
    return run(4000, seed=0)


def test_every_mutant_is_refused_naming_the_key_or_plans_what_it_says(result):
    assert not result["failures"], "\n".join(map(str, result["failures"][:20]))


def test_every_shipped_suite_and_every_kind_of_mutation_is_exercised(result):
    assert set(result["suites"]) == {s.stem for s in SUITES}
    assert sum(result["outcomes"].values()) == 4000
    for kind in ("typo", "duplicate", "wrong_type", "nonfinite", "dangling", "inert", "perturb"):
        assert result["by_kind"][kind]["refused"] > 50, kind
    assert result["by_kind"]["perturb"]["effective"] > 50  # the oracle is compared on accepted plans too
    for kind in ("duplicate", "nonfinite", "dangling", "inert"):  # these must never be accepted
        assert set(result["by_kind"][kind]) <= {"refused", "warned"}, (kind, result["by_kind"][kind])


def test_the_oracle_is_independent_and_exact_on_a_hand_counted_suite():
    """2 pairs × (teacher seeds 0, 1 + student, kd at seeds 0, 1, 2 + a sweep of kd's weight over
    two values) + the probe dataset's copy of each: counted by hand, 2 × (2 + 3 + 3 + 2·3) × 2."""
    cfg = {"experiments": [{"name": "e", "dataset": "cifar100", "pairs": [["resnet14", "resnet8"], ["vgg13", "vgg8"]],
                            "methods": ["student", "kd"], "seeds": [0, 1, 2], "teacher_seeds": [0, 1],
                            "sweep": {"kd": [0.5, 1.0]}, "linear_probe": {"datasets": ["stl10"]}}]}
    cells = expected_cells(cfg, SUITES[0].parent)
    assert len(cells) == 2 * (2 + 3 + 2 * 3) * 2
    assert ("e", "stl10", "vgg13", "vgg8", "kd[kd=0.5]", 2) in cells and ("e", "cifar100", "vgg13", "vgg8", "teacher", 1) in cells


def test_the_mutations_do_what_they_say():
    assert all(typo("epochs", random.Random(i)) != "epochs" for i in range(50))
    text, key = duplicate_line("a: 1\nb:\n  c: 2\n  d: >-\n    long\n    text\ne: 3\n", random.Random(3))
    with pytest.raises(Exception, match="appears twice"):
        from kdbench.core.yaml_strict import loads
        loads(text)
    assert yaml.safe_load(text) is not None
    assert fixed_keys(("experiments", 0, "recipe")) and not fixed_keys(("datasets",))
    assert not fixed_keys(("experiments", 0, "method_overrides")) and fixed_keys(("experiments", 0, "method_overrides", "kd"))


def test_a_planner_that_ignores_a_declaration_is_caught(monkeypatch):
    """The fuzzer can fail: a planner that drops teacher_seeds (trains teacher seed 0 only)
    disagrees with the oracle on every mutant that changes them."""
    from kdbench.planning import suite as planner

    real = planner.flatten

    def drop_teacher_seeds(cfg, path, seen=()):
        out = real(cfg, path, seen)
        for e in out["experiments"]:
            e.pop("teacher_seeds", None)
        return out
    monkeypatch.setattr(planner, "flatten", drop_teacher_seeds)
    res = run(150, seed=5)
    assert any("differ from the oracle" in f[3] for f in res["failures"]), res["outcomes"]
