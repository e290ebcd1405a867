"""Recipe blocks laid over each other (issue 17 item 3): a block that sets ``epochs`` without
``milestones`` gets RepDistiller's default milestones (150/180/210 of 240) scaled to its epochs,
never the milestones of the block below it."""

from kdbench.core.spec import Recipe
from kdbench.core.spec import PROBE_RECIPE
from kdbench.planning.suite import load_suite

from conftest import write_suite


def default_scaled(epochs: int) -> tuple[int, ...]:
    # by hand: round(150·E/240), round(180·E/240), round(210·E/240)
    return tuple(max(1, round(m * epochs / 240)) for m in (150, 180, 210))


def recipes(path, **overrides):
    """(teacher recipe, student recipe) of the suite's one pair."""
    suite = load_suite(write_suite(path, path.parent / "data", **overrides))
    teacher = next(r.spec.recipe for r in suite.runs.values() if r.spec.method == "student" and "/scratch/" in r.id
                   and r.id in {n for run in suite.runs.values() for n in run.needs})
    student = next(r.spec.recipe for r in suite.runs.values() if r.spec.method == "kd")
    return teacher, student


EXP = {"name": "main", "dataset": "cifar100", "pairs": [["resnet8", "resnet8"]], "methods": ["kd"], "seeds": [0]}


def test_teacher_epochs_rescale_default_milestones_not_the_suites(tmp_path):
    teacher, student = recipes(tmp_path / "s.yaml", recipe={"epochs": 8, "milestones": [5, 6, 7]},
                               experiments=[{**EXP, "teacher_recipe": {"epochs": 10}}])
    assert default_scaled(10) == (6, 8, 9)
    assert (teacher.epochs, teacher.milestones) == (10, (6, 8, 9))  # was (5, 6, 7), inherited from `recipe`
    assert (student.epochs, student.milestones) == (8, (5, 6, 7))


def test_experiment_recipe_epochs_rescale_default_milestones(tmp_path):
    teacher, student = recipes(tmp_path / "s.yaml", recipe={"epochs": 8, "milestones": [5, 6, 7]},
                               experiments=[{**EXP, "recipe": {"epochs": 12}}])
    assert (student.epochs, student.milestones) == (12, default_scaled(12)) == (12, (8, 9, 10))
    assert (teacher.epochs, teacher.milestones) == (12, (8, 9, 10))  # the teacher follows the experiment's recipe


def test_block_without_epochs_keeps_the_milestones_below(tmp_path):
    teacher, _ = recipes(tmp_path / "s.yaml", recipe={"epochs": 8, "milestones": [5, 6, 7]},
                         experiments=[{**EXP, "teacher_recipe": {"lr": 0.1}}])
    assert (teacher.epochs, teacher.milestones, teacher.lr) == (8, (5, 6, 7), 0.1)


def test_block_with_epochs_and_milestones_is_taken_as_written(tmp_path):
    teacher, _ = recipes(tmp_path / "s.yaml", recipe={"epochs": 8, "milestones": [5, 6, 7]},
                         experiments=[{**EXP, "teacher_recipe": {"epochs": 10, "milestones": [2]}}])
    assert (teacher.epochs, teacher.milestones) == (10, (2,))


def test_smoke_like_teacher_recipe():
    """The smoke suite's shape: recipe {epochs: 3}, teacher_recipe {epochs: 5} (unchanged by the rule)."""
    teacher = Recipe.from_config(Recipe.layer({"epochs": 3}, {"epochs": 5}))
    assert teacher.milestones == default_scaled(5) == (3, 4, 4)


def test_probe_epochs_rescale_the_probe_defaults():
    assert PROBE_RECIPE["epochs"] == 40 and list(PROBE_RECIPE["milestones"]) == [20, 30]
    r = Recipe.from_config(Recipe.layer(PROBE_RECIPE, {"epochs": 80}, defaults=PROBE_RECIPE))
    assert (r.epochs, r.milestones) == (80, (40, 60))
    r = Recipe.from_config(Recipe.layer(PROBE_RECIPE, {"lr": 0.5}, defaults=PROBE_RECIPE))
    assert (r.epochs, r.milestones, r.lr) == (40, (20, 30), 0.5)
