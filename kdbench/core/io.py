"""Atomic writes and provenance: a reader never sees a half-written result file."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where used: `kdbench --help` and the small commands never load it
    import torch


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class OutputError(OSError):
    """A file kdbench could not write; the message is one line: the file, the cause, the fix.
    Nothing was replaced: the previous version of the file (if any) is intact."""

    def __str__(self) -> str:
        return self.strerror


#: errno -> (cause, fix) of the write faults a user can act on
_FAULTS = {
    errno.ENOSPC: ("no space left on the device", "free space there or write to another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota or write elsewhere"),
    errno.EACCES: ("permission denied", "make the folder writable (chmod/chown) or write elsewhere"),
    errno.EPERM: ("operation not permitted", "make the folder writable (chmod/chown) or write elsewhere"),
    errno.EROFS: ("read-only file system", "write to a writable location (or remount it read-write)"),
}


def output_error(path: str | Path, e: OSError) -> OutputError:
    cause, fix = _FAULTS.get(e.errno, (e.strerror or str(e), "check the path and the disk, then run again"))
    out = OutputError(e.errno, f"cannot write {path}: {cause}; {fix}. Any previous version of the file is intact")
    out.filename = str(path)
    return out


def _temporary_pattern(path: Path) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(path.name)}\.[a-z0-9_]{{8}}$")


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporary files that killed atomic writes of ``path`` left beside it
    (``.<name>.<8 characters>``) and return them. A temporary a live writer still holds is kept:
    each writer holds an exclusive ``flock`` on its temporary until it is renamed, released when
    the writer exits or is killed, so a temporary whose lock can be taken has no writer. Every
    atomic write calls this first, and so do the commands that may start without writing (a
    file already there)."""
    path = Path(path)
    pattern, removed = _temporary_pattern(path), []
    try:
        names = [n for n in os.listdir(path.parent) if pattern.match(n)]
    except OSError:
        return removed
    for name in names:
        tmp = path.parent / name
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
        except OSError:  # held by a live writer (BlockingIOError), or no flock here: cannot tell, kept
            pass
        finally:
            os.close(fd)
    if removed:
        print(f"kdbench: removed {len(removed)} temporary file(s) a killed write of {path} left: "
              f"{', '.join(p.name for p in removed)}", file=sys.stderr, flush=True)
    return removed


@contextmanager
def atomic_file(path: str | Path):
    """A binary file object whose content replaces ``path`` whole when the block ends (written to
    ``.<name>.<8 random characters>`` in the same folder, synced, renamed; removed on error). The
    file gets the mode a plain ``open`` gives (0666 less the umask): ``tempfile.mkstemp`` creates
    0600 files, which others sharing the project's storage could not read. Temporaries of
    ``path`` left by killed writers are removed first (:func:`remove_stale_temporaries`); an
    OSError of the write (a full disk, a read-only folder) is raised as :class:`OutputError`,
    one line naming the file, the cause and the fix."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as e:
        if e.errno not in _FAULTS:
            raise
        raise output_error(path, e) from e
    try:
        with os.fdopen(fd, "wb") as f:
            try:  # ours while we write: a cleaner never removes a live temporary
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # a file system without flock (some NFS set-ups): temporaries are then kept
                pass
            os.fchmod(fd, 0o666 & ~current_umask())
            yield f
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)  # before the file closes: the lock is held until the name is gone
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OutputError) or e.errno not in _FAULTS:  # e.g. a download's network error
            raise
        raise output_error(path, e) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False, default=str) + "\n").encode())


def read_json(path: str | Path) -> dict | None:
    """A JSON file's content, or None if it is missing or unreadable (a run not finished)."""
    return read_json_state(path)[0]


def read_json_state(path: str | Path) -> tuple[dict | None, str]:
    """(content, "ok"), or (None, "missing") for no file, or (None, "corrupt") for a file that is
    not a JSON object (kdbench writes atomically, so a damaged disk or a hand edit)."""
    try:
        text = Path(path).read_bytes()
    except FileNotFoundError:
        return None, "missing"
    except OSError:
        return None, "corrupt"
    try:
        obj = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, "corrupt"
    return (obj, "ok") if isinstance(obj, dict) else (None, "corrupt")


def atomic_torch_save(path: str | Path, obj) -> None:
    # through a file object, torch names the archive's records archive/... (not after the random
    # temporary file), so equal content gives equal bytes and an equal SHA-256 (teacher checks)
    import torch

    with atomic_file(path) as f:
        torch.save(obj, f)


def atomic_save_figure(fig, path: str | Path) -> Path:
    """Write the matplotlib figure ``fig`` to the PNG ``path`` whole (no time stamp in it, so equal
    figures give equal bytes), and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:  # a reader never sees half a PNG
        fig.savefig(f, format="png", metadata={"Software": None})
    plt.close(fig)
    return path


def git_sha() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the kdbench checkout, or (None, None) outside a git tree."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode:
            return None, None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def cpu_name() -> str:
    """The CPU's model name (``platform.processor()`` is often just the architecture, e.g.
    "x86_64"): from /proc/cpuinfo on Linux, sysctl on macOS."""
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        if platform.system() == "Darwin":
            name = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True).stdout.strip()
    return name or platform.processor() or platform.machine()


def provenance(device: torch.device) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from kdbench import __version__

    try:
        tv = version("torchvision")
    except PackageNotFoundError:
        tv = None

    sha, dirty = git_sha()
    cuda = torch.cuda.is_available() and device.type == "cuda"
    return {
        "kdbench": __version__,
        "git_sha": sha,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": tv,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else f"{cpu_name()} ({os.cpu_count()} cores)",
        "threads": torch.get_num_threads(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
    }


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes: what identifies an imported teacher or a dataset file in run
    ids and provenance (paths are never hashed)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def data_fingerprint(data) -> str:
    """16 hex digits of the data a run reads (a :class:`~kdbench.data.LoadedDataset`): the decoded
    train and test images, labels and class names; for a streamed dataset (ImageNet) the files'
    last three path components (split/class/file, not the root) and labels. Recorded in a run's
    checkpoint, metrics.json and model.pt; a resume on other data is refused. Computed once per
    loaded dataset (packed runs share one): SHA-256 reads ~1 GB/s, CIFAR's arrays are 180 MB."""
    cached = getattr(data, "_kdbench_fingerprint", None)
    if cached is not None:
        return cached
    import hashlib

    h = hashlib.sha256()
    for split in (data.train, data.test):
        if hasattr(split, "images"):
            h.update(memoryview(split.images.ravel() if split.images.flags.c_contiguous else split.images.copy()))
        else:
            h.update("\n".join("/".join(Path(p).parts[-3:]) for p in split.paths).encode())
        h.update(split.labels.astype("int64").tobytes())
        h.update("\n".join(split.classes).encode())
    data._kdbench_fingerprint = h.hexdigest()[:16]
    return data._kdbench_fingerprint
