"""`kdbench bench` runs on CPU with tiny settings and reports every figure (no timing assertions)."""

import argparse
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from kdbench.commands import bench
from kdbench.models import build_model


def forward_flops(model: nn.Module, batch: int) -> float:
    """2·MACs of every convolution and linear layer, from their shapes (hooks), for one forward."""
    total = []

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            total.append(2 * out.numel() * (m.in_channels // m.groups) * kh * kw)
        elif isinstance(m, nn.Linear):
            total.append(2 * out.numel() * m.in_features)
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model.eval()(torch.zeros(batch, 3, 32, 32))
    for h in handles:
        h.remove()
    return float(sum(total))


def test_bench_cpu_prints_and_writes_every_figure(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--pair", "resnet8,resnet8", "--steps", "2", "--warmup", "1",
                       "--workers", "1", "--pack", "2", "--configs", "plain,fast", "--verify", "2",
                       "--peak-tflops", "1.0", "--threads", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for key in ("reference loop", "engine plain", "engine fast", "packed grid of 2 runs", "packed grid, students fused",
                "steps/s", "MFU",
                "agreement plain vs fast", "CPU"):
        assert key in text, key
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and "CPU" in r["device_name"] and r["pair"] == ["resnet8", "resnet8"]
    assert r["reference_sps"] > 0 and r["engine"]["plain"]["sps"] > 0 and r["engine"]["fast"]["sps"] > 0
    assert r["engine"]["plain"]["ratio"] == pytest.approx(r["engine"]["plain"]["sps"] / r["reference_sps"])
    assert r["pack"]["k"] == 2 and r["pack"]["ratio"] == pytest.approx(r["pack"]["sps"] / r["pack"]["sequential_reference_sps"])
    assert r["pack+fuse"]["fused"] and not r["pack"]["fused"] and r["pack+fuse"]["sps"] > 0
    assert r["engine"]["fast"]["execution"]["channels_last"] is True
    assert r["agreement"]["fast"]["max_rel_param_diff"] < 1e-4  # channels_last on CPU: the same maths
    # FLOPs: the teacher's forward equals a count from the layer shapes; fwd+bwd ≈ 3 forwards
    fwd = forward_flops(build_model("resnet8", 100), 64)
    assert r["gflop_per_step"]["teacher_forward"] * 1e9 == pytest.approx(fwd, rel=1e-6)
    assert 2.5 * fwd < r["gflop_per_step"]["student"] * 1e9 < 3.1 * fwd
    flops = sum(r["gflop_per_step"].values()) * 1e9
    assert r["engine"]["plain"]["mfu"] == pytest.approx(flops * r["engine"]["plain"]["sps"] / 1e12)


def test_bench_crd_reference_samples_negatives_in_the_dataset():
    """The reference CRD dataset draws K other-class negatives per image, RepDistiller's way."""
    import numpy as np
    labels = np.arange(40) % 4
    ds = bench.RefDataset(np.zeros((40, 32, 32, 3), dtype=np.uint8), labels, (0.5,) * 3, (0.5,) * 3, crd_k=20)
    np.random.seed(0)
    img, target, i, idx = ds[7]
    assert img.shape == (3, 32, 32) and idx[0] == 7 and len(idx) == 21
    assert (labels[idx[1:]] != target).all() and len(set(idx[1:])) == 20  # without replacement (20 < 30)


def test_lockstep_rounds_take_exactly_n_steps_of_each_run():
    """bench times ``Lockstep.run(n)``: n steps of every run (each student's BN counts its forward
    passes), then the runs wait, mid-epoch, for the next call; fused runs the same."""
    from kdbench.core.spec import Execution
    from kdbench.engine.pack import Lockstep
    args = argparse.Namespace(images=64 * 6, pair=("resnet8", "resnet8"), batch=64)
    setup = bench.Setup(args, torch.device("cpu"))
    for fuse in (None, ["resnet8"] * 2):
        runs = setup.runs(["kd", "crd"], Execution())
        lockstep = Lockstep(runs, fuse_keys=fuse)
        bench.take_rounds(lockstep, 3)
        assert [int(r.student.bn1.num_batches_tracked) for r in runs] == [3, 3]
        bench.take_rounds(lockstep, 2)
        assert [int(r.student.bn1.num_batches_tracked) for r in runs] == [5, 5]  # 5 of the epoch's 7 (bench: one batch more)
        assert [r.steps_done for r in runs] == [5, 5] and lockstep.results == runs  # unfinished: no metrics yet
        assert not list(Path(setup.folder.name).rglob("checkpoint.pt"))  # no epoch ended: nothing written


def test_bad_arguments_name_the_valid_choices(capsys):
    from kdbench.core.registry import UnknownNameError
    with pytest.raises(UnknownNameError, match="kd"):
        bench.main(["--device", "cpu", "--method", "nope"])
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--configs", "turbo"])
    assert "valid configs are plain, fast, fast+cache" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="raise --images"):
        bench.main(["--device", "cpu", "--pair", "resnet8,resnet8", "--steps", "5", "--images", "64"])
