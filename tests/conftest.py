import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


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
    return [sys.executable, "-m", "kdbench.cli", *args]


@pytest.fixture
def subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


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
