"""What a job shows and how it fails (issue 14): a run that asked for a GPU and sees none stops at
once saying why (kdbench/engine/device.py); every epoch writes one progress line, in packed jobs
too, prefixed by the run (kdbench/engine/run.py)."""

import re

import pytest
import torch

from kdbench.engine import device as device_module
from kdbench.engine.device import NoGpuError, resolve_device
from kdbench.engine.pack import fit_packed
from kdbench.engine.run import epoch_line
from kdbench.core.spec import Recipe, RunSpec
from kdbench.engine.fit import fit

RECIPE = Recipe.from_config({"epochs": 2, "batch_size": 16})
LINE = re.compile(r"^(?P<prefix>\S+) main (?P<epoch>\d)/2 lr \S+ loss \S+ kd \S+ ce \S+ train \d+\.\d\d test \d+\.\d\d "
                  r"\d+\.\d s/epoch ETA \d+:\d\d:\d\d$")


def spec(tiny, seed=0):
    return RunSpec("cifar100", str(tiny / "data"), "resnet8", "kd", seed, "resnet8", (str(tiny / "t.pt"),), recipe=RECIPE)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("KDBENCH_REQUIRE_GPU", raising=False)
    return monkeypatch


@pytest.mark.parametrize("cuda_version,says", [(None, r"CPU-only build \(torch.version.cuda is None\).*pip install torch=="),
                                               ("12.8", r"built for CUDA 12.8.*nvidia-smi")])
def test_a_run_that_asked_for_a_gpu_and_sees_none_fails_saying_why(no_gpu, cuda_version, says):
    no_gpu.setattr(torch.version, "cuda", cuda_version)
    with pytest.raises(NoGpuError, match="device 'cuda'.*" + says):
        resolve_device("cuda")
    with pytest.raises(NoGpuError, match="device 'cuda:1'"):
        resolve_device("cuda:1")
    no_gpu.setenv("KDBENCH_REQUIRE_GPU", "1")
    with pytest.raises(NoGpuError, match="KDBENCH_REQUIRE_GPU=1 .*" + says):
        resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")  # an explicit cpu is honoured


def test_auto_says_what_it_chose(no_gpu, capsys):
    assert resolve_device("auto") == torch.device("cpu")
    assert capsys.readouterr().err == "kdbench: device auto -> cpu (no GPU visible)\n"
    resolve_device("cpu")
    assert capsys.readouterr().err == ""


def test_fit_stops_before_reading_anything(no_gpu, tiny, tmp_path, monkeypatch):
    no_gpu.setenv(device_module.REQUIRE_GPU, "1")
    with pytest.raises(NoGpuError):
        fit(spec(tiny), tmp_path / "run", "auto", progress=False)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_the_cli_reports_no_gpu_as_an_error(no_gpu, tiny_suite, capsys):
    from kdbench.commands.cli import main
    from kdbench.planning.suite import load_suite
    run = next(r for r in load_suite(tiny_suite).runs.values() if r.kind == "train")
    assert main(["train-teacher", "--suite", str(tiny_suite), "--run", run.id, "--device", "cuda"]) == 2
    assert "kdbench: error: this run asked for a GPU (device 'cuda')" in capsys.readouterr().err


def test_epoch_line_golden():
    stats = {"epoch": 3, "lr": 0.005, "loss": 1.23456, "kd": 0.5, "ce": 0.73456, "train_acc": 61.2, "test_acc": 58.3,
             "test_acc5": 90.0, "test_loss": 1.5}
    line = epoch_line("cifar100/x/kd/seed0", "main", 3, 240, 3, 240, stats, [10.0, 12.0, 14.0])
    # mean 12 s/epoch, 237 epochs left: 2844 s = 0:47:24
    assert line == ("cifar100/x/kd/seed0 main 3/240 lr 0.005 loss 1.235 kd 0.5 ce 0.7346 train 61.20 test 58.30 "
                    "12.0 s/epoch ETA 0:47:24")
    init = epoch_line("r", "init:ab", 1, 30, 1, 270, {"epoch": 1, "lr": 0.05, "loss": 2.0, "init": 2.0, "train_acc": 10.0},
                      [1.0])
    assert init == "r init:ab 1/30 lr 0.05 loss 2 init 2 train 10.00 1.0 s/epoch ETA 0:04:29"


def test_one_line_per_epoch_alone_and_per_run_in_a_pack(tiny, tmp_path, capsys):
    fit(spec(tiny), tmp_path / "alone", "cpu", run_id="alone-run", progress=True)  # no terminal: no bar
    lines = capsys.readouterr().err.splitlines()
    assert [LINE.match(ln)["epoch"] for ln in lines] == ["1", "2"] and all(ln.startswith("alone-run ") for ln in lines)
    fit_packed([spec(tiny, 0), spec(tiny, 1)], [tmp_path / "p0", tmp_path / "p1"], "cpu", run_ids=["p0", "p1"])
    lines = [LINE.match(ln) for ln in capsys.readouterr().err.splitlines()]
    assert all(lines) and sorted((m["prefix"], m["epoch"]) for m in lines) == [("p0", "1"), ("p0", "2"), ("p1", "1"),
                                                                              ("p1", "2")]
