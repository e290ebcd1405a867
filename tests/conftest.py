import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]

#: Relative tolerance (on the norm of all tensors together) for ONE float32 forward/backward pass
#: computed two mathematically equal ways (fused vs separate kernels, another thread count or
#: ATEN_CPU_CAPABILITY). float32's unit roundoff is 6e-8; a sum of n terms is off by ~sqrt(n)
#: of it, and the longest sums here (BN over 4·32·32 = 4096 values, 3x3 convs over 9·64 inputs)
#: give ~4e-6 per layer at worst: 1e-5. Measured 7e-7 to 9e-7 for the gradients of resnet8,
#: resnet8x4, wrn_16_1 and vgg8 under default, avx2 and avx512. Not for several SGD steps: with
#: a few images per model a pre-activation within rounding of a ReLU kink falls on either side
#: by chance and the gradient jumps by its share, which the following steps amplify (measured:
#: vgg8's momenta 2.3% apart after 3 steps under avx512; resnet8's conv1 9e-5 apart, which failed
#: a 1e-6 check on AMD EPYC). Over steps, exactness is tested in float64, and float32 runs are
#: bounded by the same run at another thread count (test_pack.py).
FLOAT32_PASS_RTOL = 1e-5

#: The numerically sensitive tests: each compares two computations of the same maths closely
#: (fused or packed vs alone, fast path vs plain, cached vs online teacher, DDP vs one process,
#: kdbench's SGD vs torch.optim.SGD, a killed and resumed run vs an uninterrupted one), so the
#: CPU's kernel paths can move them. They get the ``numerics`` marker, which .ci/run runs under
#: each ATEN_CPU_CAPABILITY (default, avx2, avx512). File name: "*" (all its tests) or the names
#: of its tests.
NUMERICS = {
    "test_fusion.py": "*", "test_pack.py": "*", "test_fast_path.py": "*", "test_teacher_cache.py": "*",
    "test_ddp.py": "*", "test_sgd_kernel.py": "*",
    "test_engine.py": ("test_killed_run_resumes_to_identical_metrics", "test_sgd_matches_torch_optim_bit_for_bit",
                       "test_same_seed_same_result_different_seed_differs"),
}


def pytest_collection_modifyitems(items):
    for item in items:
        chosen = NUMERICS.get(item.path.name, ())
        if chosen == "*" or item.originalname in chosen:
            item.add_marker(pytest.mark.numerics)
        reasons = " ".join(m.kwargs.get("reason", "") for m in item.iter_markers("skipif")).lower()
        if "gpu" in reasons or "cuda" in reasons:  # skipped without a GPU: benchmarks/gpu_check.sh runs them there
            item.add_marker(pytest.mark.cuda)


def relative_difference(got: dict, want: dict) -> float:
    """‖got − want‖ / ‖want‖ (Frobenius) over the floating tensors of two dicts of tensors together;
    their keys, shapes and dtypes must match and their integer tensors be equal."""
    assert list(got) == list(want)
    num = den = 0.0
    for k in want:
        a, b = got[k], want[k]
        assert a.shape == b.shape and a.dtype == b.dtype, k
        if not b.is_floating_point():
            assert torch.equal(a, b), k
            continue
        num += ((a.double() - b.double()) ** 2).sum().item()
        den += (b.double() ** 2).sum().item()
    return (num / den) ** 0.5 if den else num ** 0.5


def assert_states_close(got: dict, want: dict, rtol: float = FLOAT32_PASS_RTOL) -> None:
    rel = relative_difference(got, want)
    assert rel <= rtol, f"relative difference {rel:.3g} > {rtol:.3g}"



def write_suite(path: Path, data_root: Path, **overrides) -> Path:
    """A tiny suite (resnet8 → resnet8, 5 synthetic classes, 2 epochs) for tests."""
    cfg = {
        "name": "tiny",
        "device": "cpu",
        "threads": 1,
        "runs_dir": str(path.parent / "runs"),
        "datasets": {"cifar100": {"root": str(data_root),
                                  "synthetic": {"classes": 5, "train_per_class": 20, "test_per_class": 10, "seed": 0}}},
        "recipe": {"epochs": 2},
        "experiments": [{"name": "main", "dataset": "cifar100", "pairs": [["resnet8", "resnet8"]],
                         "methods": ["student", "kd"], "seeds": [0, 1]}],
        "tables": [{"name": "main", "experiments": ["main"]}],
    }
    for k, v in overrides.items():
        cfg[k] = v
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """5-class synthetic CIFAR-format data (``tiny/data``) and a random resnet8 teacher (``tiny/t.pt``)."""
    from kdbench.data.synthetic_files import ensure_synthetic
    from kdbench.engine.checkpoint import save_model
    from kdbench.models import build_model

    root = tmp_path_factory.mktemp("tiny")
    ensure_synthetic("cifar100", str(root / "data"), {"classes": 5, "train_per_class": 8, "test_per_class": 4})
    torch.manual_seed(0)
    save_model(root / "t.pt", build_model("resnet8", 5), "resnet8", 5, "cifar100")
    return root


@pytest.fixture
def tiny_suite(tmp_path):
    return write_suite(tmp_path / "tiny.yaml", tmp_path / "data")


def kdbench_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "kdbench.commands.cli", *args]


def child_env() -> dict:
    """The environment of a kdbench/snakemake child process: this checkout first on PYTHONPATH, one thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture
def subprocess_env():
    return child_env()


class FakeGraphs:
    """A CPU stand-in for CUDA graphs with their semantics: a capture leaves no trace (state and
    generators restored), a replay runs the recorded step on the static buffers."""

    calls = {"capture": 0, "replay": 0}

    class Graph:
        fn = None

    side_stream = staticmethod(contextlib.nullcontext)
    new_graph = Graph

    @classmethod
    def capture(cls, graph, fn, state, generators):
        saved, gens = [t.detach().clone() for t in state], [g.get_state() for g in generators]
        out = fn()
        with torch.no_grad():
            for t, v in zip(state, saved):
                t.copy_(v)
        for g, st in zip(generators, gens):
            g.set_state(st)
        graph.fn = fn
        cls.calls["capture"] += 1
        return out

    @classmethod
    def replay(cls, graph, out=None):
        new = graph.fn()
        if out is not None:  # a graph writes into the tensors it returned at capture
            for dst, src in zip((*out.stages, *out.preact, out.pooled, out.logits), (*new.stages, *new.preact, new.pooled, new.logits)):
                dst.copy_(src)
        cls.calls["replay"] += 1


def second_writer_order(folder) -> list[str]:
    """Claim ``folder``'s run lock, start a second writer while holding it, release: the order in
    which the two finished (a waiting second writer gives ["first done", "second"])."""
    import threading
    import time

    from kdbench.engine import run_folder

    order = []

    def second():
        with run_folder.claim(folder, poll_s=0.01):
            order.append("second")

    with run_folder.claim(folder):
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.3)
        order.append("first done")
    t.join(5)
    return order
