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


# ---- faults and what killed writers leave (issue 24) -------------------------------------------

import errno  # noqa: E402
from pathlib import Path  # noqa: E402
import fcntl  # noqa: E402
import multiprocessing  # noqa: E402
import signal  # noqa: E402

from kdbench.core import io as kio  # noqa: E402
from kdbench.core.io import OutputError, remove_stale_temporaries  # noqa: E402


def _temporaries(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("code, cause, fix", [
    (errno.ENOSPC, "no space left on the device", "free space there"),
    (errno.EACCES, "permission denied", "make the folder writable"),
    (errno.EROFS, "read-only file system", "write to a writable location"),
])
@pytest.mark.parametrize("where", ["write", "fsync", "create"])
def test_a_write_fault_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch, code, cause, fix, where):
    """Injected where a full disk, a folder turned read-only or lost permissions would strike:
    the data written, the sync, the temporary's creation."""
    good = tmp_path / "out" / "model.pt"
    atomic_torch_save(good, {"w": torch.arange(3)})
    before = good.read_bytes()

    def fail(*a, **k):
        raise OSError(code, os.strerror(code))
    if where == "fsync":
        monkeypatch.setattr(kio.os, "fsync", fail)
    elif where == "create":
        monkeypatch.setattr(kio.tempfile, "mkstemp", fail)
    with pytest.raises(OutputError) as e:
        if where == "write":
            with kio.atomic_file(good) as f:
                f.write(b"partial")
                fail()
        else:
            atomic_torch_save(good, {"w": torch.zeros(1000)})
    msg = str(e.value)
    assert "\n" not in msg and str(good) in msg and cause in msg and fix in msg, msg
    assert good.read_bytes() == before and _temporaries(good.parent) == []


def test_a_real_full_disk_through_a_file_size_limit(tmp_path):
    """A real ENOSPC-like fault from the kernel, not an injected one: RLIMIT_FSIZE makes write()
    fail with EFBIG (SIGXFSZ ignored) in a child process; nothing good is overwritten."""
    code = f"""
import resource, signal, sys
from kdbench.core.io import atomic_write_bytes, OutputError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    atomic_write_bytes({str(tmp_path / 'f.bin')!r}, b"x" * 100000)
except OSError as e:
    print(type(e).__name__, e.errno)
"""
    (tmp_path / "f.bin").write_bytes(b"good")
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["OSError", str(errno.EFBIG)], out.stderr[-2000:]
    assert (tmp_path / "f.bin").read_bytes() == b"good" and _temporaries(tmp_path) == []


def test_network_errors_are_not_dressed_as_write_faults(tmp_path):
    with pytest.raises(ConnectionResetError):
        with kio.atomic_file(tmp_path / "a.tar") as f:
            f.write(b"half")
            raise ConnectionResetError(errno.ECONNRESET, "reset")
    assert list(tmp_path.iterdir()) == []


def _hold_temporary(path, ready, release):
    with kio.atomic_file(path) as f:
        f.write(b"live")
        ready.set()
        release.wait(30)


def test_stale_temporaries_are_removed_and_live_ones_kept(tmp_path):
    target = tmp_path / "state.json"
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_hold_temporary, args=(target, ready, release))
    child.start()
    try:
        assert ready.wait(30)
        live = [p for p in tmp_path.iterdir() if p.name.startswith(".state.json.")]
        assert len(live) == 1
        stale = tmp_path / ".state.json.abcd1234"
        stale.write_bytes(b"a killed writer's half")
        other = tmp_path / ".other.json.abcd1234"  # another file's temporary: not ours to remove
        other.write_bytes(b"x")
        assert remove_stale_temporaries(target) == [stale]
        assert live[0].exists() and other.exists()
    finally:
        release.set()
        child.join(30)
    assert target.read_bytes() == b"live" and not live[0].exists()


def test_the_writer_locks_its_temporary(tmp_path, monkeypatch):
    """What the cleaner relies on: while a write is open its temporary's flock is taken."""
    target = tmp_path / "x.bin"
    with kio.atomic_file(target) as f:
        tmp = next(p for p in tmp_path.iterdir() if p.name.startswith(".x.bin."))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        f.write(b"1")
    assert target.read_bytes() == b"1"


def test_a_killed_write_leaves_the_previous_file_and_the_next_write_cleans_up(tmp_path):
    target = tmp_path / "r.json"
    atomic_write_json(target, {"v": 1})

    def child():
        real = os.replace

        def killing(src, dst):
            if os.path.basename(dst) == "r.json":
                os.kill(os.getpid(), signal.SIGKILL)
            real(src, dst)
        os.replace = killing
        atomic_write_json(target, {"v": 2})
        os._exit(0)
    p = multiprocessing.get_context("fork").Process(target=child)
    p.start()
    p.join(60)
    assert p.exitcode == -signal.SIGKILL
    assert target.read_text().count('"v": 1') == 1 and len(_temporaries(tmp_path)) == 1
    atomic_write_json(target, {"v": 3})
    assert '"v": 3' in target.read_text() and _temporaries(tmp_path) == []


def test_a_command_that_cannot_write_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    """kdbench export into a full disk (injected): exit 2, one line, the previous export intact."""
    import json as _json

    from kdbench.commands import cli
    from kdbench.engine.checkpoint import save_model
    from kdbench.models import build_model
    from kdbench.planning.suite import load_suite
    from conftest import write_suite

    suite_path = write_suite(tmp_path / "s.yaml", tmp_path / "data")
    suite = load_suite(suite_path)
    rid = next(r for r, run in suite.runs.items() if run.kind == "train")
    run_dir = Path(suite.run_dir(rid))
    run_dir.mkdir(parents=True)
    save_model(run_dir / "model.pt", build_model("resnet8", 5), "resnet8", 5, "cifar100")
    (run_dir / "metrics.json").write_text(_json.dumps({"status": "ok", "epochs_done": 1, "acc_last": 50.0}))
    out = tmp_path / "export.pth"
    out.write_bytes(b"previous export")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(kio.os, "fsync", full)
    rc = cli.main(["export", "--suite", str(suite_path), "--run", rid, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and str(out) in err and "no space left" in err, err
    assert out.read_bytes() == b"previous export" and _temporaries(tmp_path) == []
