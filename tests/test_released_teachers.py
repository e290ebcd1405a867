"""Released teachers (``teacher: released``, ``kdbench fetch-teachers``): import runs in suites,
fetching from a mocked network (nothing is downloaded), the by-hand instructions, provenance,
list-runs, the seed tables' teacher row, and the pipeline's order."""

import io
import re
import subprocess
import sys
import tarfile

import pytest
import torch
import yaml

from conftest import REPO, write_suite
from kdbench.data.cifar import CIFAR100_MEAN, CIFAR100_STD, read_cifar
from kdbench.data.synthetic_files import ensure_synthetic
from kdbench.teachers import imported as it
from kdbench.commands.teachers import fetch_teachers_main
from kdbench.teachers import released
from kdbench.engine.checkpoint import CheckpointError, load_model
from kdbench.core.io import file_sha256, read_json
from kdbench.models import build_model
from kdbench.planning.suite import SuiteError, load_suite
from test_import_teacher import repdistiller_ckpt

SYNTH = {"classes": 5, "train_per_class": 4, "test_per_class": 6, "seed": 0}


def suite_file(tmp_path, teacher="released", pairs=(("resnet8", "resnet8"),), **exp):
    experiment = {"name": "main", "dataset": "cifar100", "pairs": [list(p) for p in pairs],
                  "methods": ["student", "kd"], "seeds": [0, 1], **exp}
    if teacher is not None:
        experiment["teacher"] = teacher
    return write_suite(tmp_path / "s.yaml", tmp_path / "data", experiments=[experiment],
                       datasets={"cifar100": {"root": str(tmp_path / "data"), "synthetic": SYNTH}})


def accuracy(model, root):
    """Top-1 % of ``model`` on the synthetic test split, computed here from the files."""
    test = read_cifar(root, "cifar100", "test")
    x = (torch.from_numpy(test.images).permute(0, 3, 1, 2).float() / 255 - torch.tensor(CIFAR100_MEAN)[:, None, None]) \
        / torch.tensor(CIFAR100_STD)[:, None, None]
    with torch.no_grad():
        return 100 * float((model.eval()(x).logits.argmax(1).numpy() == test.labels).mean())


@pytest.fixture
def small_release(monkeypatch):
    """A released resnet8 (a stand-in for RepDistiller's six, in their format and URLs)."""
    rt = released._repdistiller("resnet8")
    monkeypatch.setitem(released.RELEASED, ("cifar100", "resnet8"), rt)
    monkeypatch.setitem(it.PUBLISHED_TOP1, ("cifar100", "resnet8"), 50.0)
    return rt


def test_table_names_the_papers_teachers_and_torchvision_url():
    import torchvision

    cifar = {a for d, a in released.RELEASED if d == "cifar100"}
    assert cifar == {"wrn_40_2", "resnet56", "resnet110", "resnet32x4", "vgg13", "ResNet50"}
    rt = released.RELEASED[("cifar100", "resnet32x4")]
    assert rt.urls == ("http://shape2prog.csail.mit.edu/repo/resnet32x4_vanilla/ckpt_epoch_240.pth",)
    assert rt.archive[1] == "resnet32x4_vanilla/ckpt_epoch_240.pth" and rt.published_top1 == 79.42
    tv = released.RELEASED[("imagenet", "imagenet_resnet34")]
    assert tv.urls == (torchvision.models.ResNet34_Weights.IMAGENET1K_V1.url,)
    assert tv.published_top1 == pytest.approx(73.314)


def test_released_teacher_is_an_import_run_every_distillation_needs(tmp_path, small_release):
    suite = load_suite(suite_file(tmp_path))
    imports = [r for r in suite.runs.values() if r.kind == "import"]
    assert len(imports) == 1 and re.fullmatch(r"cifar100/released/resnet8/repdistiller-[0-9a-f]{8}", imports[0].id)
    kd = [r for r in suite.runs.values() if r.kind == "distill"]
    assert kd and all(r.needs == (imports[0].id,) and r.spec.teacher_ids == (imports[0].id,) for r in kd)
    assert all(r.spec.teacher_ckpts == (f"{suite.runs_dir}/{imports[0].id}/model.pt",) for r in kd)
    assert [c.run for c in suite.cells if c.column == "teacher"] == [imports[0].id]
    assert suite.trained_teacher_experiments() == set()
    # the id hashes the source's identity: a pinned SHA-256 changes it, the file's presence does not
    (tmp_path / "teachers" / small_release.file).parent.mkdir(parents=True)
    (tmp_path / "teachers" / small_release.file).write_bytes(b"x")
    assert load_suite(suite_file(tmp_path)).runs.keys() == suite.runs.keys()
    released.RELEASED[("cifar100", "resnet8")] = released.ReleasedTeacher(**{**small_release.__dict__, "sha256": "ab" * 32})
    assert imports[0].id not in load_suite(suite_file(tmp_path)).runs


def test_teacher_train_is_todays_behaviour_and_per_pair_mapping(tmp_path, small_release):
    default = load_suite(suite_file(tmp_path, teacher=None))
    trained = load_suite(suite_file(tmp_path, teacher="train"))
    assert default.runs.keys() == trained.runs.keys()
    assert {r.kind for r in trained.runs.values()} == {"train", "distill"}
    assert trained.trained_teacher_experiments() == {"main"}
    mixed = load_suite(suite_file(tmp_path, teacher={"resnet8": "released"},
                                  pairs=(("resnet8", "resnet8"), ("resnet14", "resnet8"))))
    teachers = {c.teacher: mixed.runs[c.run].kind for c in mixed.cells if c.column == "teacher"}
    assert teachers == {"resnet8": "import", "resnet14": "train"}


@pytest.mark.parametrize("teacher, extra, message", [
    ("released", {"pairs": [("vgg8", "resnet8")]}, r"no released vgg8 teacher for cifar100; released teachers: .*"
                                                   r"resnet32x4 \(cifar100\).*teacher: train"),
    ("released", {"teacher_seeds": [0, 1]}, "teacher_seeds .* applies with teacher: train"),
    ({"vgg13": "released"}, {}, r"names \['vgg13'\], which are no teachers"),
    ("downloaded", {}, "is not valid"),
    ("released", {"teacher_checkpoints": {"resnet8": "t.pt"}}, r"both give the resnet8 teacher.*teacher: \{resnet8: train\}"),
])
def test_bad_teacher_settings_are_refused(tmp_path, small_release, teacher, extra, message):
    with pytest.raises(SuiteError, match=message):
        load_suite(suite_file(tmp_path, teacher=teacher, **extra))


def tar_with(member: str, src) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(src, arcname=member)
    return buf.getvalue()


def test_fetch_from_the_archive_imports_checks_and_records(tmp_path, small_release, monkeypatch, capsys):
    root = tmp_path / "data"
    ensure_synthetic("cifar100", str(root), SYNTH)
    torch.manual_seed(7)
    model = build_model("resnet8", 5)
    raw = repdistiller_ckpt(tmp_path / "upstream/resnet8_vanilla/ckpt_epoch_240.pth", model)
    expected = accuracy(model, root)
    monkeypatch.setitem(it.PUBLISHED_TOP1, ("cifar100", "resnet8"), expected)
    archive = tar_with("cifar_teachers/resnet8_vanilla/ckpt_epoch_240.pth", raw)
    calls = []

    def fake_download(url, dest, timeout=60):
        calls.append(url)
        if url != released.MDISTILLER_ARCHIVE:
            raise OSError("404 Not Found")  # RepDistiller's server is gone
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(archive)

    monkeypatch.setattr(released, "download", fake_download)
    path = suite_file(tmp_path)
    teachers = tmp_path / "teachers"
    assert fetch_teachers_main(["--suite", str(path), "--dir", str(teachers), "--device", "cpu"]) == 0
    assert calls == [small_release.urls[0], released.MDISTILLER_ARCHIVE]
    suite = load_suite(path)
    rid = next(r for r, run in suite.runs.items() if run.kind == "import")
    m = read_json(f"{suite.run_dir(rid)}/metrics.json")
    got = teachers / "repdistiller/resnet8_vanilla/ckpt_epoch_240.pth"
    assert got.read_bytes() == raw.read_bytes()
    assert m["status"] == "ok" and m["acc_last"] == pytest.approx(expected, abs=1e-9)
    assert m["imported"]["sha256"] == file_sha256(raw) and m["imported"]["accuracy_check"] == "passed"
    assert m["imported"]["origin"] == f"{released.MDISTILLER_ARCHIVE}#resnet8_vanilla/ckpt_epoch_240.pth"
    assert m["imported"]["released"] == small_release.identity() and "provenance" in m
    assert torch.equal(load_model(f"{suite.run_dir(rid)}/model.pt").state_dict()["fc.weight"], model.state_dict()["fc.weight"])

    from kdbench.commands.cli import main as cli
    capsys.readouterr()
    assert cli(["list-runs", "--suite", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    kd = [ln for ln in lines if ln.startswith("distill")]
    assert kd and all(f"teacher: released teachers/repdistiller/resnet8_vanilla/ckpt_epoch_240.pth sha256 "
                      f"{file_sha256(raw)}" in ln for ln in kd)

    from kdbench.report.aggregate import aggregate
    aggregate(suite, tmp_path / "results")
    row = next(ln for ln in (tmp_path / "results/main.md").read_text().splitlines() if ln.startswith("| teacher"))
    assert f"{expected:.2f} (n=1)" in row

    # a second fetch finds the file and downloads nothing
    calls.clear()
    assert fetch_teachers_main(["--suite", str(path), "--dir", str(teachers), "--device", "cpu"]) == 0
    assert calls == []


def test_no_network_says_exactly_where_to_put_the_file(tmp_path, small_release, monkeypatch):
    def offline(url, dest, timeout=60):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(released, "download", offline)
    with pytest.raises(CheckpointError) as e:
        released.import_released(small_release, tmp_path / "run", tmp_path / "teachers", resume="NEXT-COMMAND")
    target = tmp_path / "teachers/repdistiller/resnet8_vanilla/ckpt_epoch_240.pth"
    msg = str(e.value)
    assert "could not be downloaded" in msg and "Network is unreachable" in msg
    assert (f"put it at {target} (file name ckpt_epoch_240.pth, folder {target.parent}), then run NEXT-COMMAND"
            in msg)
    assert "cifar_teachers/resnet8_vanilla/ckpt_epoch_240.pth" in msg
    # put there by hand: imported without any download; no data here, so the accuracy is not checked
    repdistiller_ckpt(target, build_model("resnet8", 100))
    m = released.import_released(small_release, tmp_path / "run", tmp_path / "teachers", data_root=str(tmp_path / "nodata"),
                                 device="cpu")
    assert m["status"] == "unevaluated" and m["acc_last"] is None
    assert m["imported"]["accuracy_check"].startswith("not run (no cifar100 test split")
    assert m["imported"]["origin"] == "local file"


def test_pinned_sha256_is_verified(tmp_path, monkeypatch):
    rt = released.ReleasedTeacher(**{**released._repdistiller("resnet8").__dict__, "sha256": "0" * 64})
    target = tmp_path / "teachers" / rt.file
    repdistiller_ckpt(target, build_model("resnet8", 100))
    with pytest.raises(CheckpointError, match=f"SHA-256 {file_sha256(target)} is not the released file's 0000"):
        released.import_released(rt, tmp_path / "run", tmp_path / "teachers")
    assert not (tmp_path / "run/model.pt").exists()


def test_imported_teacher_file_fills_the_teacher_row_of_seed_and_paper_tables(tmp_path):
    root = tmp_path / "data"
    ensure_synthetic("cifar100", str(root), SYNTH)
    torch.manual_seed(8)
    model = build_model("resnet8", 5)
    raw = repdistiller_ckpt(tmp_path / "resnet8_vanilla/ckpt_epoch_240.pth", model)
    expected = accuracy(model, root)
    it.import_teacher(raw, tmp_path / "t.pt", check_data=str(root), published=expected, device="cpu")
    path = suite_file(tmp_path, teacher=None, teacher_checkpoints={"resnet8": str(tmp_path / "t.pt")})
    from kdbench.report.aggregate import aggregate
    aggregate(load_suite(path), tmp_path / "results")
    row = next(ln for ln in (tmp_path / "results/main.md").read_text().splitlines() if ln.startswith("| teacher"))
    assert f"{expected:.2f} (n=1)" in row
    # and the paper-layout table's Teacher row, on top-1 and on an error metric
    from kdbench.report import paper_tables as pt
    cfg = yaml.safe_load(path.read_text())
    for metric, want in (("acc_last", expected), ("err_best", 100 - expected)):
        cfg["tables"] = [{"name": "t", "experiments": ["main"], "metric": metric,
                          "rows": {"Teacher": "teacher", "Student": "student", "KD": "kd"}}]
        path.write_text(yaml.safe_dump(cfg))
        suite = load_suite(path)
        spec, = pt.table_specs(suite)
        cell = pt.compute(spec, suite).cell("Teacher", spec.groups[0].label)
        assert cell.values == {0: pytest.approx(want)}
        assert cell.n_expected == 1 and cell.run_ids == (str(tmp_path / "t.pt"),)


def test_pipeline_plans_the_teacher_import_before_distillations(tmp_path):
    suite = write_suite(tmp_path / "s.yaml", tmp_path / "data", experiments=[
        {"name": "main", "dataset": "cifar100", "pairs": [["resnet32x4", "resnet8x4"]], "methods": ["kd"], "seeds": [0],
         "teacher": "released"}])
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--workflow-profile", "none", "-d", str(tmp_path), "-n",
                           "--cores", "1", "--config", f"suite_file={suite}", "teachers_dir=tt"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", out, flags=re.M))
    assert jobs["fetch_teacher"] == "1" and "fit" in jobs
    fetch = re.search(r"rule fetch_teacher:.*?output: (\S+)", out, flags=re.S).group(1)
    fit = re.search(r"rule fit:\s+input: ([^\n]+)\n\s+output: (\S+/kd/\S+)", out)
    assert fit and fetch in fit.group(1)


def test_captions_say_when_the_suite_trains_its_teachers(tmp_path, small_release):
    from kdbench.report.paper_tables import TRAINED_TEACHER_NOTE, table_specs

    def caption(teacher):
        path = suite_file(tmp_path, teacher=teacher)
        import yaml
        cfg = yaml.safe_load(path.read_text())
        cfg["tables"] = [{"name": "main", "experiments": ["main"], "caption": "Own words.",
                          "rows": {"Teacher": "teacher", "KD": "kd"}, "groups": [{"pair": ["resnet8", "resnet8"]}]}]
        path.write_text(yaml.safe_dump(cfg))
        return table_specs(load_suite(path))[0].caption

    assert caption("train") == f"Own words. {TRAINED_TEACHER_NOTE}"
    assert caption("released") == "Own words."


def test_download_writes_the_whole_file_or_nothing(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 5000)
    released.download(src.as_uri(), tmp_path / "out/dest.bin")
    assert (tmp_path / "out/dest.bin").read_bytes() == src.read_bytes()
    with pytest.raises(OSError):
        released.download((tmp_path / "absent.bin").as_uri(), tmp_path / "out/none.bin")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dest.bin"]  # no partial or temporary file


def test_list_runs_shows_every_paper_distillations_teacher_source(capsys, tmp_path, monkeypatch):
    from kdbench.commands.cli import main as cli

    monkeypatch.chdir(tmp_path)  # runs/ here holds no fetched teacher
    assert cli(["list-runs", "--suite", str(REPO / "workflow/suites/paper.yaml")]) == 0
    lines = capsys.readouterr().out.splitlines()
    distill = [ln for ln in lines if ln.startswith("distill")]
    assert distill and all(re.search(r"  teacher: (released teachers/\S+ sha256 \S+|trained \S+)", ln) for ln in distill)
    imports = [ln for ln in lines if ln.startswith("import")]
    assert len(imports) == 7 and all("sha256 not fetched yet (unpinned)" in ln for ln in imports)
    ot_imagenet = [ln for ln in distill if ln.split()[1].startswith("imagenet/")]
    assert ot_imagenet and all("released teachers/torchvision/resnet34-b627a593.pth" in ln for ln in ot_imagenet)
    kda = [ln for ln in distill if "/ResNet34--" in ln.split()[1]]
    assert kda and all("teacher: trained " in ln for ln in kda)  # the KDA code's teachers were not released
