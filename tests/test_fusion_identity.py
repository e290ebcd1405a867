"""Fusion is part of a run's identity (issue 26): a fused and an unfused run of one spec have
different run ids, unfused ids are those from before fusion entered the hash, and tables say
which runs were fused."""

import hashlib
import json
from dataclasses import replace

import pytest

from kdbench.commands.cli import pack_main
from kdbench.core.spec import Execution, RunSpec
from kdbench.engine.fusion import SUPPORTED_ARCHS
from kdbench.planning.suite import SuiteError, load_suite
from kdbench.report.aggregate import aggregate
from kdbench.report.paper_layout import fusion_note

from conftest import write_suite

# resnet8 (fusable) and ShuffleV2 (refused by kdbench.engine.fusion) students; plain students,
# teachers and a linear probe of each distilled model, which fusion must leave alone or follow
EXPERIMENT = {"name": "main", "dataset": "cifar100", "pairs": [["resnet8", "resnet8"], ["resnet8", "ShuffleV2"]],
              "methods": ["student", "kd", "fitnet"], "seeds": [0, 1]}
PROBED = {**EXPERIMENT, "name": "probe", "pairs": [["resnet8", "resnet8"]], "methods": ["kd"], "seeds": [0],
          "linear_probe": {"datasets": ["cifar100"]}}


def suites(tmp_path, **pack):
    kw = {"experiments": [EXPERIMENT, PROBED], "tables": [{"name": "main", "experiments": ["main"]}]}
    plain = load_suite(write_suite(tmp_path / "plain.yaml", tmp_path / "data", **kw))
    fused = load_suite(write_suite(tmp_path / "fused.yaml", tmp_path / "data", pack={"size": 2, "fuse": True}, **kw))
    return plain, fused


def old_hash(spec: RunSpec, execution: dict | None = None) -> str:
    """The run hash as it was before ``fuse`` existed, written out independently: everything but
    the paths and the (unhashed fp32) execution options, sorted JSON, 8 hex digits of sha256."""
    d = spec.to_dict()
    for key in ("data_root", "teacher_ckpts", "init_ckpt", "execution"):
        d.pop(key)
    for key in ("unlabeled", "validation", "data_id"):
        if d[key] is None:
            d.pop(key)
    assert d.pop("rehearsal") is False  # newer than fusion, and hashed only when true
    assert d["recipe"].pop("test_every") == 1  # newer than fusion, and hashed only when not 1
    if execution:
        d["execution"] = execution
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:8]


def test_fused_runs_get_new_ids_and_every_other_run_keeps_its_id(tmp_path):
    plain, fused = suites(tmp_path)
    assert len(plain.runs) == len(fused.runs) == 14  # 12 in main (its teacher is resnet8 seed 0) + 2 probes
    def key(suite, run):  # what a run is, apart from its id (a probe: with what it probes)
        s = run.spec
        return run.kind, s.dataset, s.teacher, s.student, s.method, s.seed, *(key(suite, suite.runs[n]) for n in run.needs)
    twins = {key(plain, x): r for r, x in plain.runs.items()}
    assert len(twins) == len(plain.runs)
    by_spec = {rid: twins[key(fused, run)] for rid, run in fused.runs.items()}  # the unfused twin of each run
    fusable = {rid for rid, run in fused.runs.items() if run.kind == "distill" and run.spec.student in SUPPORTED_ARCHS}
    assert len(fusable) == 4  # resnet8: kd and fitnet × 2 seeds (the probed experiment's kd is main's seed 0)
    for rid, run in fused.runs.items():
        plain_id = by_spec[rid]
        assert plain_id.rsplit("-", 1)[1] == old_hash(plain.runs[plain_id].spec)  # unfused: the pre-fusion hash
        if rid in fusable:
            assert run.spec.execution.fuse and rid != plain_id, rid
            assert rid.rsplit("-", 1)[1] == old_hash(plain.runs[plain_id].spec, {"fuse": True})
        elif run.kind == "probe" and run.spec.init_id in fusable:  # probing a fused model: a new id, as it reads one
            assert not run.spec.execution.fuse and rid != plain_id and run.needs[0] in fusable
        else:  # teachers, plain students, ShuffleV2 (not fusable) distillations: same runs, same ids
            assert not run.spec.execution.fuse and rid == plain_id, rid
    # fused and unfused runs never share a pack (execution options differ), and every fused pack is fused
    for pack in fused.packs(2).values():
        assert len({fused.runs[r].spec.execution.fuse for r in pack}) == 1


def test_fuse_is_hashed_like_bf16_and_round_trips():
    spec = RunSpec("cifar100", "/data", "resnet8", "kd", 0, "resnet8", ("/t.pt",), ("t",))
    fused = replace(spec, execution=Execution(fuse=True))
    assert Execution().hashed() == {} and Execution(fuse=True).hashed() == {"fuse": True}
    assert Execution(fuse=True, precision="bf16").hashed() == {"precision": "bf16", "fuse": True}
    assert spec.config_hash() == old_hash(spec) != fused.config_hash() == old_hash(spec, {"fuse": True})
    assert RunSpec.from_dict(fused.to_dict()) == fused and RunSpec.from_dict(fused.to_dict()).config_hash() == fused.config_hash()
    with pytest.raises(ValueError, match="execution.fuse: expected true or false"):
        Execution(fuse="yes")


def test_fusion_is_decided_by_the_suite_never_by_a_snakemake_override(tmp_path):
    plain, fused = suites(tmp_path)
    assert fused.pack_options({}) == {"size": 2, "fuse": True}
    assert fused.pack_options({"pack_size": 8, "pack_fuse": "true"}) == {"size": 8, "fuse": True}
    assert plain.pack_options({"pack_size": 8, "pack_fuse": "false"}) == {"size": 8, "fuse": False}
    for suite, over in ((plain, {"pack_size": 2, "pack_fuse": "true"}), (fused, {"pack_fuse": False}),
                        (fused, {"pack_size": 1})):
        with pytest.raises(SuiteError, match=r"fusion is part of the run ids.*pack: \{size: N, fuse: true\}"):
            suite.pack_options(over)
    one = load_suite(write_suite(tmp_path / "one.yaml", tmp_path / "data", pack={"fuse": True}))
    with pytest.raises(SuiteError, match="fusion is part of the run ids"):
        one.pack_options({})


def test_pack_command_refuses_to_fuse_runs_whose_ids_say_unfused(tmp_path):
    plain, _ = suites(tmp_path)
    kd = [r for r, x in plain.runs.items() if x.kind == "distill" and x.spec.student == "resnet8"][:2]
    with pytest.raises(SystemExit, match="name unfused runs"):
        pack_main(["--suite", str(plain.path), "--fuse", *sum((["--run", r] for r in kd), [])])


def test_tables_say_which_runs_were_fused(tmp_path):
    plain, fused = suites(tmp_path)
    assert fusion_note(plain, ["main", "probe"]) == ""
    note = fusion_note(fused, ["main"])
    assert note.startswith("Fused: 4 of these 12 runs (distilled resnet8 students)"), note
    for suite, out in ((plain, tmp_path / "plain_out"), (fused, tmp_path / "fused_out")):
        aggregate(suite, out)  # no run finished: the tables list the runs as missing, with their caption
    assert "Fused:" not in (tmp_path / "plain_out/main.md").read_text()
    assert note in (tmp_path / "fused_out/main.md").read_text()
