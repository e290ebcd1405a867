"""The looks state (runs/looks/<suite>.json) is protected: stamped with every key of each budget
declaration and a digest of its content, refused with the fix when the declaration changed, it
was edited by hand or it is not the state kdbench writes, and locked, so that two
``kdbench looks --next`` at once take one look each, never two looks on one look's data."""

import json
import multiprocessing
import os
import time

import pytest
import yaml

from kdbench.commands import looks
from kdbench.planning import budget as bd
from kdbench.planning.suite import SuiteError, load_suite
from test_looks import budget_suite, write_results


@pytest.fixture
def one_look(tmp_path):
    path = budget_suite(tmp_path)
    write_results(load_suite(path))
    looks.next_look(load_suite(path))
    return path, tmp_path / "runs/looks/budget.json"


def test_the_state_is_stamped_with_the_whole_declaration(one_look):
    path, state = one_look
    raw = json.loads(state.read_text())
    assert raw[bd.STAMP]["format"] == bd.STATE_FORMAT
    assert raw["main"]["declaration"] == {"looks": [3, 5], "spending": "obrien_fleming", "alpha": 0.05,
                                          "margin": 0.5, "reference": "student", "metric": "acc_last"}
    assert looks.read_state(load_suite(path).config)["main"]["look"] == 1


@pytest.mark.parametrize("key, value", [("margin", 0.7), ("reference", "kd"), ("metric", "acc_best"),
                                        ("alpha", 0.1), ("spending", "pocock"), ("looks", [3, 6])])
def test_every_key_of_the_declaration_is_fixed_once_a_look_is_taken(one_look, key, value):
    path, _ = one_look
    cfg = yaml.safe_load(path.read_text())
    cfg["experiments"][0]["seeds"][key] = value
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SuiteError, match=rf"seed budget changed after looks were taken \(.*{key} .*\).*delete .*budget.json"):
        load_suite(path)


@pytest.mark.parametrize("edit", ["seeds", "decision", "look"])
def test_a_hand_edit_is_refused_not_obeyed(one_look, edit):
    path, state = one_look
    raw = json.loads(state.read_text())
    st = raw["main"]
    if edit == "seeds":
        st["seeds"] = {k: 5 for k in st["seeds"]} | {"resnet14--resnet8/kd": 5}
    elif edit == "decision":
        st["decisions"][0]["decision"] = "differs" if st["decisions"][0]["decision"] != "differs" else "undecided"
    else:
        st["look"] = 0
    state.write_text(json.dumps(raw, indent=1))
    with pytest.raises(SuiteError, match="edited by hand.*delete it to start the looks again"):
        load_suite(path)


@pytest.mark.parametrize("content, cause", [
    ("[1, 2]", "a JSON list, not the object kdbench writes"),
    ('{"main": [1]}', "experiment 'main': looks, spending, alpha, look, seeds, decisions missing or of the wrong type"),
    ('{"main": {"looks": [3, 5], "spending": "obrien_fleming", "alpha": 0.05, "look": "1", "seeds": {}, '
     '"decisions": []}}', "experiment 'main': look missing or of the wrong type"),
    ("{not json", "not JSON"),
    ("", "not JSON"),
])
def test_a_corrupt_or_wrongly_typed_state_is_one_line_naming_the_file_and_the_fix(tmp_path, content, cause):
    path = budget_suite(tmp_path)
    state = tmp_path / "runs/looks/budget.json"
    state.parent.mkdir(parents=True)
    state.write_text(content)
    with pytest.raises(SuiteError) as e:
        load_suite(path)
    msg = str(e.value)
    assert str(state) in msg and cause in msg and "delete it to start the looks again" in msg and "\n" not in msg


def test_a_state_kdbench_wrote_before_stamps_is_read_with_a_warning(one_look):
    path, state = one_look
    raw = json.loads(state.read_text())
    del raw[bd.STAMP]
    for st in raw.values():
        del st["declaration"]
    state.write_text(json.dumps(raw))
    with pytest.warns(UserWarning, match="no stamp"):
        assert load_suite(path).cells


def _take_look(path, started, out):
    started.wait(30)
    out.put(looks.main(["--suite", str(path), "--next"]))


def test_two_looks_at_once_take_one_look_each(tmp_path, monkeypatch):
    """Both start on look 1's finished runs. Serialised, the second plans on the state the first
    wrote, finds look 2's runs unfinished and refuses; without the lock both would decide look 2
    on look 1's data. The first is slowed while it holds the lock, so the two overlap."""
    path = budget_suite(tmp_path)
    write_results(load_suite(path))
    real = looks._next_look

    def slow(suite, write):
        time.sleep(1.5)
        return real(suite, write)
    monkeypatch.setattr(looks, "_next_look", slow)
    ctx = multiprocessing.get_context("fork")
    started, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_take_look, args=(path, started, out)) for _ in range(2)]
    for p in procs:
        p.start()
    started.set()
    codes = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    assert codes == [0, 2]  # one look taken; the other refused: runs of look 2 not finished
    st = looks.read_state(load_suite(path).config)["main"]
    assert st["look"] == 1 and len({d["look"] for d in st["decisions"]}) == 1


def test_the_state_lock_is_reentrant_and_exclusive(tmp_path):
    cfg = {"name": "s", "runs_dir": str(tmp_path / "runs"), "experiments": []}
    with bd.state_lock(cfg), bd.state_lock(cfg, exclusive=False):  # a reader inside a look: no deadlock
        assert bd.read_state(cfg) == {}
        pid = os.fork()
        if pid == 0:  # another process cannot take it
            import fcntl
            fd = os.open(tmp_path / "runs/looks", os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                os._exit(1)
            except BlockingIOError:
                os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
