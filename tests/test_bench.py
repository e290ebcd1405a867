"""`kdbench bench` on CPU with tiny settings: every figure printed and written, the ratios the
figures they are made of, the packed grid checked against the same runs one after another."""

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
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


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    import io
    from contextlib import redirect_stdout
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert bench.main(["--device", "cpu", "--pair", "resnet8,resnet8", "--grid-pair", "resnet8,resnet8",
                           "--methods", "kd,crd", "--nce-k", "300", "--steps", "2", "--warmup", "1", "--epochs", "2",
                           "--repeat", "2", "--workers", "0", "--pack", "2", "--configs", "plain,fast",
                           "--peak-tflops", "1.0", "--threads", "1", "--json", str(out)]) == 0
    return buf.getvalue(), json.loads(out.read_text())


def test_prints_every_figure_with_its_spread(result):
    text, _ = result
    for key in ("reference loop", "engine plain", "engine fast", "per run", "per step", "steps/s", "MFU", "CPU",
                "crd resnet8→resnet8 (nce_k 300)", "grid of 2 runs", "one after another, kdbench",
                "one after another, reference", "packed, students fused", "final weights vs the same runs",
                "final weights, plain vs fast"):
        assert key in text, key
    assert "[" in text and "–" in text  # median [min–max]


def test_spreads_and_ratios_are_made_of_the_measurements(result):
    _, r = result
    for m in ("kd", "crd"):
        res = r["methods"][m]
        ref, eng = res["reference"], res["engine"]["plain"]
        for fig in (ref["run_s"], ref["sps"], eng["run_s"], eng["sps"]):
            v = fig["values"]
            assert len(v) == 2 and fig["min"] == min(v) and fig["max"] == max(v)
            assert fig["median"] == pytest.approx(statistics.median(v))
        # per round: the reference's time / the engine's
        want = [a / b for a, b in zip(ref["run_s"]["values"], eng["run_s"]["values"])]
        assert eng["run_ratio_vs_reference"]["values"] == pytest.approx(want)
        want = [b / a for a, b in zip(ref["sps"]["values"], eng["sps"]["values"])]
        assert eng["step_ratio_vs_reference"]["values"] == pytest.approx(want)
        assert res["agreement"]["fast"]["rel_param_diff"] < 1e-5  # channels_last on CPU: the same maths
    assert r["methods"]["crd"]["nce_k"] == 300 and r["epochs"] == 2 and r["epoch_steps"] == 4
    g = r["grid"]
    for kind in ("pack", "pack+fuse"):
        row = g[kind]
        want = [a / b for a, b in zip(g["sequential"]["run_s"]["values"], row["run_s"]["values"])]
        assert row["run_ratio_vs_sequential"]["values"] == pytest.approx(want)
        want = [a / b for a, b in zip(g["sequential_reference"]["run_s"]["values"], row["run_s"]["values"])]
        assert row["run_ratio_vs_reference"]["values"] == pytest.approx(want)
        assert row["identity"]["within"] and row["identity"]["rel_param_diff"] < 1e-4
    # a sequential kdbench run of the grid takes about as long as the single engine run of the same method
    assert g["sequential"]["run_s"]["median"] > 0


def test_flops_and_mfu(result):
    _, r = result
    kd = r["methods"]["kd"]
    fwd = forward_flops(build_model("resnet8", 100), 64)
    assert kd["gflop_per_step"]["teacher_forward"] * 1e9 == pytest.approx(fwd, rel=1e-6)
    assert 2.5 * fwd < kd["gflop_per_step"]["student"] * 1e9 < 3.1 * fwd
    flops = sum(kd["gflop_per_step"].values()) * 1e9
    assert kd["engine"]["plain"]["mfu"] == pytest.approx(flops * kd["engine"]["plain"]["sps"]["median"] / 1e12)


def test_crd_data_is_sized_for_nce_k():
    """Every image of the balanced synthetic set has nce_k other-class images (16384: 16600 images)."""
    assert bench.crd_images(16384) == 16600
    for k in (1, 98, 99, 100, 16384, 5000):
        n = bench.crd_images(k)
        assert n - n // 100 >= k and (n - 100) - (n - 100) // 100 < k  # the smallest such set


def test_epoch_slice_keeps_the_epoch_start_and_the_whole_labels():
    from kdbench.data.loader import TensorLoader
    images = np.random.default_rng(0).integers(0, 255, (10 * 8, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(80) % 10
    loader = TensorLoader(images, labels, (0.5,) * 3, (0.5,) * 3, 8, True, "cpu")
    cut = bench.EpochSlice(loader, 3)
    full = list(loader.batches(torch.Generator().manual_seed(1)))
    part = list(cut.batches(torch.Generator().manual_seed(1)))
    assert len(cut) == 3 and cut.num_samples == 24 and len(part) == 3 and len(full) == 10
    for a, b in zip(part, full):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(cut.labels, loader.labels)  # CRD's memory: the whole training set
    assert len(bench.EpochSlice(loader, 99)) == 10


def test_bench_crd_reference_samples_negatives_in_the_dataset():
    """The reference CRD dataset draws K other-class negatives per image, RepDistiller's way."""
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
        bench.main(["--device", "cpu", "--methods", "nope"])
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--configs", "turbo"])
    assert "valid configs are plain, fast, fast+cache" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="raise --images"):
        bench.main(["--device", "cpu", "--pair", "resnet8,resnet8", "--methods", "kd", "--steps", "5",
                    "--images", "64"])
    with pytest.raises(SystemExit, match="must exceed"):
        bench.main(["--device", "cpu", "--methods", "kd", "--steps", "5", "--epoch-steps", "3"])
