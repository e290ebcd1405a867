"""External models and methods plug in without editing kdbench (entry points; a suite's
``imports:``), and ``kdbench export`` writes a RepDistiller-style checkpoint."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import write_suite
from kdbench.engine.checkpoint import save_model
from kdbench.teachers.imported import normalise_keys
from kdbench.commands.export import export_run
from kdbench.models import build_model
from kdbench.planning.suite import SuiteError, load_suite

PLUGIN = textwrap.dedent('''
    from kdbench.models import MODELS, register_model

    @register_model("{model}")
    def _net(num_classes=100):
        return MODELS.get("resnet8")(num_classes)

    def register_methods():
        from kdbench.methods import register_method
        register_method("{method}", ce=1.0, terms={{"kd": 0.9}}, params={{"kd": {{"T": 4.0}}}})

    {call}
''')


def check(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_entry_points_register_models_and_methods(tmp_path, subprocess_env):
    (tmp_path / "kdb_plug.py").write_text(PLUGIN.format(model="plugnet", method="plugkd", call=""))
    info = tmp_path / "kdb_plug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kdb-plug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[kdbench.models]\nplug = kdb_plug\n\n"
                                           "[kdbench.methods]\nplug = kdb_plug:register_methods\n")
    env = {**subprocess_env, "PYTHONPATH": f"{tmp_path}:{subprocess_env['PYTHONPATH']}"}
    done = check("from kdbench.models import build_model, model_names\nfrom kdbench.methods import METHODS\n"
                 "m = build_model('plugnet', 7)\nprint(m.arch, m.classifier.out_features, 'plugkd' in METHODS.names(),"
                 " 'resnet8' in model_names())", env)
    assert done.stdout.split() == ["plugnet", "7", "True", "True"], done.stderr[-2000:]
    (info / "entry_points.txt").write_text("[kdbench.models]\nbroken = kdb_missing_module\n")
    done = check("import kdbench.models", env)
    assert done.returncode != 0 and "kdbench plugin 'broken' (kdb_missing_module" in done.stderr


def test_suite_imports_register_names_before_they_are_checked(tmp_path, subprocess_env):
    (tmp_path / "kdb_suite_plug.py").write_text(
        PLUGIN.format(model="suitenet", method="suitekd", call="register_methods()"))
    exp = {"name": "main", "dataset": "cifar100", "pairs": [["suitenet", "resnet8"]], "methods": ["suitekd"],
           "seeds": [0]}
    good = write_suite(tmp_path / "good.yaml", tmp_path / "data", imports=["kdb_suite_plug"], experiments=[exp])
    plain = write_suite(tmp_path / "plain.yaml", tmp_path / "data", experiments=[exp])
    missing = write_suite(tmp_path / "missing.yaml", tmp_path / "data", imports=["kdb_nope"], experiments=[exp])
    env = {**subprocess_env, "PYTHONPATH": f"{tmp_path}:{subprocess_env['PYTHONPATH']}"}
    code = "import sys\nfrom kdbench.planning.suite import load_suite\ns = load_suite(sys.argv[1])\nprint(len(s.runs))"
    done = subprocess.run([sys.executable, "-c", code, str(good)], env=env, capture_output=True, text=True)
    assert done.stdout.strip() == "2", done.stderr[-2000:]  # the teacher and the distillation
    done = subprocess.run([sys.executable, "-c", code, str(plain)], env=env, capture_output=True, text=True)
    assert "unknown method 'suitekd'" in done.stderr and "Valid methods: ab" in done.stderr  # with the valid names
    plain_model = write_suite(tmp_path / "plain_model.yaml", tmp_path / "data",
                              experiments=[{**exp, "methods": ["kd"]}])
    done = subprocess.run([sys.executable, "-c", code, str(plain_model)], env=env, capture_output=True, text=True)
    assert "suitenet" in done.stderr and "resnet8" in done.stderr  # the unknown architecture, with the valid names
    with pytest.raises(SuiteError, match="imports: module 'kdb_nope' cannot be imported"):
        load_suite(missing)


@pytest.mark.parametrize("arch", ["resnet8", "MobileNetV2"])
def test_export_writes_a_repdistiller_checkpoint(tmp_path, arch):
    suite = load_suite(write_suite(tmp_path / "tiny.yaml", tmp_path / "data"))
    run_id = next(r for r, run in suite.runs.items() if run.kind == "train")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.manual_seed(0)
    model = build_model(arch, 5)
    save_model(run_dir / "model.pt", model, arch, 5, "cifar100")
    (run_dir / "metrics.json").write_text(json.dumps({"status": "ok", "epochs_done": 240, "acc_last": 73.5}))
    report = export_run(run_dir, tmp_path / "out/ckpt_epoch_240.pth")
    ckpt = torch.load(tmp_path / "out/ckpt_epoch_240.pth", weights_only=True)
    assert sorted(ckpt) == ["accuracy", "epoch", "model"] and (ckpt["epoch"], ckpt["accuracy"]) == (240, 73.5)
    assert report["arch"] == arch and run_id
    own = model.state_dict()
    if arch == "MobileNetV2":  # RepDistiller: self.classifier = nn.Sequential(nn.Linear(...))
        assert "classifier.0.weight" in ckpt["model"] and "classifier.weight" not in ckpt["model"]
    else:
        assert list(ckpt["model"]) == list(own)  # the zoo keeps RepDistiller's module names
    back = normalise_keys(ckpt["model"], model)  # what `kdbench import-teacher` reads it as
    assert list(back) == list(own) and all(torch.equal(back[k], own[k]) for k in own)
    (run_dir / "metrics.json").write_text(json.dumps({"status": "failed", "epochs_done": 3, "acc_last": 1.0}))
    with pytest.raises(SystemExit, match="did not finish ok"):
        export_run(run_dir, tmp_path / "x.pth")
