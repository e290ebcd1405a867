"""A run is what produced it (issue 18): run ids name the data and the teacher file, a resume on
other inputs is refused, damaged files are refused with the fix, a failed teacher fails its students."""

import json
import shutil
import struct
import zipfile

import pytest
import torch

from kdbench.data.synthetic_files import ensure_synthetic
from kdbench.engine.checkpoint import CheckpointError, load_model, save_model
from kdbench.core.io import read_json_state
from kdbench.core.spec import Recipe, RunSpec, dataset_identity
from kdbench.engine.fit import fit
from kdbench.models import build_model
from kdbench.planning.suite import SuiteError, load_suite

from conftest import write_suite

SMALL = {"classes": 5, "train_per_class": 8, "test_per_class": 4, "seed": 0}
EXP = {"name": "main", "dataset": "cifar100", "pairs": [["resnet8", "resnet8"]], "methods": ["student", "kd"], "seeds": [0]}


def synthetic(root, **params):
    return {"cifar100": {"root": str(root), "synthetic": {**SMALL, **params}}}


def teacher_file(path, seed):
    torch.manual_seed(seed)
    save_model(path, build_model("resnet8", 5), "resnet8", 5, "cifar100")
    return str(path)


def test_suites_on_different_synthetic_data_share_no_run(tmp_path):
    a = load_suite(write_suite(tmp_path / "a.yaml", tmp_path / "d", datasets=synthetic(tmp_path / "d")))
    b = load_suite(write_suite(tmp_path / "b.yaml", tmp_path / "d", datasets=synthetic(tmp_path / "d", seed=1)))
    moved = load_suite(write_suite(tmp_path / "c.yaml", tmp_path / "e", datasets=synthetic(tmp_path / "elsewhere")))
    assert len(a.runs) == len(b.runs) == 4 and not set(a.runs) & set(b.runs)
    assert set(moved.runs) == set(a.runs)  # the same data under another root: the same runs (paths are not hashed)
    assert all(r.spec.data_id == dataset_identity("cifar100", synthetic(tmp_path)["cifar100"]) for r in a.runs.values())


def test_suites_with_different_imported_teacher_files_share_no_run(tmp_path):
    t1, t2 = teacher_file(tmp_path / "t1.pt", 0), teacher_file(tmp_path / "t2.pt", 1)
    shutil.copy(t1, tmp_path / "copy.pt")
    suites = [load_suite(write_suite(tmp_path / f"s{i}.yaml", tmp_path / "d",
                                     experiments=[{**EXP, "teacher_checkpoints": {"resnet8": t}}]))
              for i, t in enumerate((t1, t2, str(tmp_path / "copy.pt")))]
    distill = [{r for r, run in s.runs.items() if run.kind == "distill"} for s in suites]
    assert len(distill[0]) == 1 and not distill[0] & distill[1]
    assert distill[2] == distill[0]  # the same content at another path: the same run
    assert set(suites[0].runs) & set(suites[1].runs) == set(suites[0].runs) - distill[0]  # the plain student is shared
    (kd,) = (suites[0].runs[r] for r in distill[0])
    assert kd.spec.teacher_ids[0].startswith("sha256:")


def test_missing_teacher_file_is_refused_with_the_fix(tmp_path):
    bad = write_suite(tmp_path / "s.yaml", tmp_path / "d",
                      experiments=[{**EXP, "teacher_checkpoints": {"resnet8": str(tmp_path / "no.pt")}}])
    with pytest.raises(SuiteError, match="not found.*kdbench import-teacher"):
        load_suite(bad)


def test_synthetic_data_of_other_settings_is_refused(tmp_path):
    root = tmp_path / "d"
    ensure_synthetic("cifar100", str(root), SMALL)
    other = dataset_identity("cifar100", {"synthetic": {**SMALL, "seed": 1}})
    spec = RunSpec("cifar100", str(root), "resnet8", recipe=Recipe.from_config({"epochs": 1}), data_id=other)
    with pytest.raises(ValueError, match="generated with other settings.*own root"):
        fit(spec, tmp_path / "run", device="cpu", progress=False)
    same = dataset_identity("cifar100", {"synthetic": SMALL})
    assert fit(RunSpec("cifar100", str(root), "resnet8", recipe=spec.recipe, data_id=same), tmp_path / "ok",
               device="cpu", progress=False)["status"] == "ok"


def test_resume_on_other_data_is_refused_and_on_a_remade_teacher_restarts(tmp_path, capfd):
    root = str(tmp_path / "d")
    ensure_synthetic("cifar100", root, SMALL)
    teacher = teacher_file(tmp_path / "t.pt", 0)
    spec = RunSpec("cifar100", root, "resnet8", "kd", 0, "resnet8", (teacher,), recipe=Recipe.from_config({"epochs": 3}))
    fit(spec, tmp_path / "run", device="cpu", progress=False, stop_after_epochs=1)
    ensure_synthetic("cifar100", root, {**SMALL, "seed": 1})  # the data changes under the run
    with pytest.raises(CheckpointError, match="other data.*Delete"):
        fit(spec, tmp_path / "run", device="cpu", progress=False)
    ensure_synthetic("cifar100", root, SMALL)
    teacher_file(tmp_path / "t.pt", 1)  # the teacher is made again (other weights): the run restarts
    restarted = fit(spec, tmp_path / "run", device="cpu", progress=False)
    assert "restarts from its first epoch" in capfd.readouterr().err
    fresh = fit(spec, tmp_path / "fresh", device="cpu", progress=False)
    assert restarted["curve"] == fresh["curve"] and restarted["teacher_sha256"] == fresh["teacher_sha256"]
    assert len(restarted["data_fingerprint"]) == 16


def test_equal_content_saves_to_equal_bytes(tmp_path):
    """A retrained teacher that equals the old one bit for bit (CPU) keeps its SHA-256, so its
    students' checkpoints stay resumable."""
    teacher_file(tmp_path / "a.pt", 0)
    teacher_file(tmp_path / "b.pt", 0)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()


def garble(path):
    """Flip one byte in the middle of the archive's largest record: still a valid zip file."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0xFF
    path.write_bytes(data)
    torch.load(path, weights_only=True)  # torch's reader does not notice


def test_garbled_model_and_checkpoint_are_refused_with_the_fix(tmp_path):
    root = str(tmp_path / "d")
    ensure_synthetic("cifar100", root, SMALL)
    spec = RunSpec("cifar100", root, "resnet8", recipe=Recipe.from_config({"epochs": 2}))
    fit(spec, tmp_path / "run", device="cpu", progress=False)
    model = tmp_path / "run" / "model.pt"
    load_model(model, "resnet8", 5)
    garble(model)
    with pytest.raises(CheckpointError, match=r"CRC-32.*delete the run's folder .*run and rerun snakemake"):
        load_model(model, "resnet8", 5)
    kd = RunSpec("cifar100", root, "resnet8", "kd", 0, "resnet8", (str(model),), recipe=spec.recipe)
    with pytest.raises(CheckpointError, match="CRC-32"):  # no student trains against a damaged teacher
        fit(kd, tmp_path / "kd", device="cpu", progress=False)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    garble(ckpt)
    (tmp_path / "run" / "metrics.json").unlink()  # as snakemake does before it reruns a job
    with pytest.raises(CheckpointError, match="CRC-32.*restarts from its first epoch"):
        fit(spec, tmp_path / "run", device="cpu", progress=False)
    loose = tmp_path / "imported.pt"
    teacher_file(loose, 0)
    garble(loose)
    with pytest.raises(CheckpointError, match="kdbench import-teacher"):
        load_model(loose)


def test_students_of_a_failed_teacher_are_failed_runs_saying_why(tmp_path):
    root = str(tmp_path / "d")
    ensure_synthetic("cifar100", root, {**SMALL, "train_per_class": 20})  # 2 steps per epoch: the 2nd diverges
    t = RunSpec("cifar100", root, "resnet8", recipe=Recipe.from_config({"epochs": 2, "lr": 1e12}))
    assert fit(t, tmp_path / "teacher", device="cpu", run_id="T", progress=False)["status"] == "failed"
    kd = RunSpec("cifar100", root, "resnet8", "kd", 0, "resnet8", (str(tmp_path / "teacher" / "model.pt"),),
                 recipe=Recipe.from_config({"epochs": 2}))
    m = fit(kd, tmp_path / "kd", device="cpu", run_id="S", progress=False)
    assert m["status"] == "failed" and m["failure"].startswith("teacher T failed: non-finite loss")
    on_disk = json.loads((tmp_path / "kd" / "metrics.json").read_text())
    assert on_disk["status"] == "failed" and on_disk["failure"] == m["failure"] and on_disk["epochs_done"] == 0
    assert not (tmp_path / "kd" / "model.pt").exists()
    probe = RunSpec("cifar100", root, "resnet8", recipe=Recipe.from_config({"epochs": 1}), protocol="linear_probe",
                    init_ckpt=str(tmp_path / "teacher" / "model.pt"), init_id="T")
    m = fit(probe, tmp_path / "probe", device="cpu", run_id="P", progress=False)
    assert m["status"] == "failed" and m["failure"].startswith("probed model T failed: non-finite loss")


def test_json_state_tells_corrupt_from_missing(tmp_path):
    assert read_json_state(tmp_path / "none.json") == (None, "missing")
    (tmp_path / "bad.json").write_text('{"status": "ok", "acc_la')
    assert read_json_state(tmp_path / "bad.json") == (None, "corrupt")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe{}")
    assert read_json_state(tmp_path / "bin.json") == (None, "corrupt")
    (tmp_path / "ok.json").write_text('{"status": "ok"}')
    assert read_json_state(tmp_path / "ok.json") == ({"status": "ok"}, "ok")


def test_truncated_dataset_pickle_names_the_file_and_the_fix(tmp_path):
    from kdbench.data import DatasetMissingError, load_dataset

    root = tmp_path / "d"
    ensure_synthetic("cifar100", str(root), SMALL)
    batch = root / "cifar-100-python" / "train"
    batch.write_bytes(batch.read_bytes()[:1000])
    with pytest.raises(DatasetMissingError, match=rf"{batch}: corrupt or truncated .*kdbench fetch cifar100 --root {root}"):
        load_dataset("cifar100", str(root))
