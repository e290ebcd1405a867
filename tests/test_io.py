"""Every file kdbench writes gets the mode a plain open() gives under the process's umask
(kdbench/core/io.py): atomic writes go through tempfile.mkstemp, which creates mode 0600."""

import io
import os
import stat

import pytest
import torch

from kdbench.teachers import released
from kdbench.core.io import atomic_torch_save, atomic_write_bytes, atomic_write_json


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")  # what open() gives: the reference
    writers = {"a.json": lambda p: atomic_write_json(p, {"a": 1}), "b.bin": lambda p: atomic_write_bytes(p, b"b"),
               "c.pt": lambda p: atomic_torch_save(p, {"t": torch.zeros(2)}),
               "d.tar": lambda p: released._write_whole(p, io.BytesIO(b"d"))}
    for name, write in writers.items():
        write(tmp_path / name)
        assert mode(tmp_path / name) == mode(plain) == 0o666 & ~mask, name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*writers, "plain"])  # no temporary left


def test_a_failed_write_leaves_nothing(tmp_path):
    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save(tmp_path / "c.pt", {"x": Boom()})
    assert list(tmp_path.iterdir()) == []
