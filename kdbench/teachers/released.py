"""Released teachers: the checkpoints the papers distilled from, fetched and imported as runs.

CRD, FKD and the OT paper's CIFAR tables used RepDistiller's released ``ckpt_epoch_240.pth``
teachers; the OT paper's ImageNet table used torchvision's ResNet-34. A suite selects them with
``teacher: released`` (``kdbench/planning/suite.py``); each becomes a run of kind ``import``, id
``<dataset>/released/<arch>/<source>-<hash>``, whose job (``kdbench fetch-teachers``, rule
``fetch_teacher`` in ``workflow/rules/teachers.smk``) runs before any distillation that needs it:

1. finds the raw file under the teachers folder (``teachers/`` by default, :attr:`ReleasedTeacher.file`),
   else downloads it: the direct URLs in order (RepDistiller's server, dead since 2022;
   torchvision's weights URL), then the archive (mdistiller's re-host ``cifar_teachers.tar``,
   from which only the member ``<arch>_vanilla/ckpt_epoch_240.pth`` is read); where none can be
   reached it says which file to put where, and the command to run next;
2. checks the raw file's SHA-256 against the pinned one (:attr:`ReleasedTeacher.sha256`), where pinned;
3. imports it with ``kdbench import-teacher``'s checks (keys, shapes, finite values,
   torchvision's hash suffix) and, when the teacher's dataset is present, its published top-1 on
   the test split (±0.1 points);
4. writes the run's ``model.pt`` and ``metrics.json`` (status, measured accuracy as ``acc_last``,
   the source, URL and the raw file's SHA-256, provenance), so the seed and paper tables show the
   teacher's row as they do a trained teacher's.

Run ids must be known before the file is fetched (the pipeline is planned first), so what enters
them is the source's identity (:meth:`ReleasedTeacher.identity`: source, dataset, architecture,
file, pinned SHA-256 or "unpinned"), not the file's content; the content's SHA-256 is verified
(where pinned) and recorded in the run's metrics.json. No SHA-256 is pinned yet: these files could
not be downloaded where this was written. Pin each once measured (that changes the ids of the runs
distilled from it, as any change of teacher must).
"""

from __future__ import annotations

import shutil
import tarfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from kdbench.engine.checkpoint import CheckpointError
from kdbench.engine.device import resolve_device
from kdbench.teachers import TEACHERS_DIR
from kdbench.teachers.imported import PUBLISHED_TOP1, import_teacher
from kdbench.core.io import atomic_file, atomic_write_json, file_sha256, provenance, remove_stale_temporaries

REPDISTILLER_URL = "http://shape2prog.csail.mit.edu/repo/{arch}_vanilla/ckpt_epoch_240.pth"
MDISTILLER_ARCHIVE = "https://github.com/megvii-research/mdistiller/releases/download/checkpoints/cifar_teachers.tar"
#: torchvision.models.ResNet34_Weights.IMAGENET1K_V1.url (tests check they agree)
TORCHVISION_RESNET34 = "https://download.pytorch.org/models/resnet34-b627a593.pth"


@dataclass(frozen=True)
class ReleasedTeacher:
    arch: str
    dataset: str
    source: str  # repdistiller | torchvision
    file: str  # where the raw file is kept, relative to the teachers folder
    urls: tuple[str, ...]  # direct downloads, tried in order
    archive: tuple[str, str] | None = None  # (URL of a tar, path suffix of the member to read)
    sha256: str | None = None  # pinned SHA-256 of the raw file; None: not measured yet

    def identity(self) -> str:
        """What run ids hash for this teacher: known before the file exists."""
        return (f"released:{self.source}:{self.dataset}:{self.arch}:{self.file}:"
                f"sha256={self.sha256 or 'unpinned'}")

    @property
    def published_top1(self) -> float:
        return PUBLISHED_TOP1[(self.dataset, self.arch)]


def _repdistiller(arch: str) -> ReleasedTeacher:
    member = f"{arch}_vanilla/ckpt_epoch_240.pth"
    return ReleasedTeacher(arch, "cifar100", "repdistiller", f"repdistiller/{member}",
                           (REPDISTILLER_URL.format(arch=arch),), (MDISTILLER_ARCHIVE, member))


#: (dataset, architecture) -> the released teacher. RepDistiller released six CIFAR-100 teachers
#: (scripts/fetch_pretrained_teachers.sh); a public script pins 22aa12e2b632… for resnet32x4's
#: file in cifar_teachers.tar, not verified here, so not pinned.
RELEASED = {
    **{("cifar100", a): _repdistiller(a) for a in ("wrn_40_2", "resnet56", "resnet110", "resnet32x4", "vgg13", "ResNet50")},
    ("imagenet", "imagenet_resnet34"): ReleasedTeacher("imagenet_resnet34", "imagenet", "torchvision",
                                                       "torchvision/resnet34-b627a593.pth", (TORCHVISION_RESNET34,)),
}


def released_teacher(dataset: str, arch: str) -> ReleasedTeacher:
    """The released teacher of ``arch`` on ``dataset``; a KeyError names the ones there are."""
    try:
        return RELEASED[(dataset, arch)]
    except KeyError:
        there = ", ".join(f"{a} ({d})" for d, a in RELEASED)
        raise KeyError(f"no released {arch} teacher for {dataset}; released teachers: {there}. Use `teacher: train` "
                       f"for this pair") from None


def by_hand(rt: ReleasedTeacher, target: Path, resume: str) -> str:
    """Where to put the file when it cannot be downloaded here."""
    if rt.archive:
        how = (f"take {rt.archive[1]} from RepDistiller's release or from mdistiller's cifar_teachers.tar "
               f"({rt.archive[0]}; the member cifar_teachers/{rt.archive[1]})")
    else:
        how = f"download {rt.urls[0]}"
    return f"{how} and put it at {target} (file name {target.name}, folder {target.parent}), then run {resume}"


def _write_whole(dest: Path, src) -> None:
    """Copy the stream ``src`` to ``dest`` through a temporary file of its own, so a reader (or
    another job fetching the same archive at the same time) never sees a partial file."""
    with atomic_file(dest) as f:
        shutil.copyfileobj(src, f, 1 << 20)


def download(url: str, dest: Path, timeout: float = 60) -> None:
    """Download ``url`` to ``dest`` (written whole or not at all). Tests replace this function."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        _write_whole(dest, r)


def _from_archive(url: str, member: str, dest: Path, cache: Path) -> None:
    """Read one member (the path ending in ``member``) out of the tar at ``url``; nothing else
    of the archive is extracted."""
    if not cache.is_file():
        download(url, cache)
    with tarfile.open(cache) as tar:
        found = [m for m in tar.getmembers() if m.isfile() and (m.name == member or m.name.endswith("/" + member))]
        if not found:
            raise CheckpointError(f"{cache}: no member {member} in the archive from {url}")
        with tar.extractfile(found[0]) as src:
            _write_whole(dest, src)


def obtain(rt: ReleasedTeacher, teachers_dir: str | Path, resume: str) -> tuple[Path, str]:
    """(path of the raw file, where it came from): already there, or downloaded. Refuses with
    what to do by hand when no source can be reached."""
    target = Path(teachers_dir) / rt.file
    remove_stale_temporaries(target)  # what a killed fetch left (the next download would too)
    if rt.archive:
        remove_stale_temporaries(Path(teachers_dir) / "archives" / Path(rt.archive[0]).name)
    if target.is_file():
        return target, "local file"
    target.parent.mkdir(parents=True, exist_ok=True)
    tried = []
    for url in rt.urls:
        print(f"fetching {rt.arch} ({rt.dataset}) from {url} ...", flush=True)  # a line while it tries
        try:
            download(url, target)
            return target, url
        except Exception as e:  # network: unreachable, 404, timeout
            tried.append(f"{url} ({type(e).__name__}: {e})")
    if rt.archive:
        url, member = rt.archive
        print(f"fetching {rt.arch} ({rt.dataset}) from {url}#{member} ...", flush=True)
        try:
            _from_archive(url, member, target, Path(teachers_dir) / "archives" / Path(url).name)
            return target, f"{url}#{member}"
        except Exception as e:
            tried.append(f"{url} ({type(e).__name__}: {e})")
    raise CheckpointError(f"the released {rt.arch} teacher ({rt.dataset}) could not be downloaded: tried "
                          f"{'; '.join(tried)}. By hand: {by_hand(rt, target, resume)}")


def import_released(rt: ReleasedTeacher, run_dir: str | Path, teachers_dir: str | Path = TEACHERS_DIR,
                    data_root: str | None = None, device: str = "auto", run_id: str | None = None,
                    resume: str = "kdbench fetch-teachers again") -> dict:
    """Obtain, check and import ``rt`` into ``run_dir`` (model.pt + metrics.json); the metrics."""
    from kdbench.data import DatasetMissingError

    start = time.time()
    raw, origin = obtain(rt, teachers_dir, resume)
    digest = file_sha256(raw)
    if rt.sha256 is not None and digest != rt.sha256:
        raise CheckpointError(f"{raw}: SHA-256 {digest} is not the released file's {rt.sha256}: it is another or a "
                              f"damaged file. Delete it; then {by_hand(rt, raw, resume)}")
    run_dir = Path(run_dir)
    meta = {"released": rt.identity(), "origin": origin, "urls": list(rt.urls) + ([rt.archive[0]] if rt.archive else [])}
    common = dict(arch=rt.arch, dataset=rt.dataset, published=rt.published_top1, device=device, **meta)
    try:
        report = import_teacher(raw, run_dir / "model.pt", check_data=data_root, **common)
    except DatasetMissingError as e:  # no test split here: import without the accuracy check
        report = import_teacher(raw, run_dir / "model.pt", **common)
        report["accuracy_check"] = f"not run (no {rt.dataset} test split: {str(e).splitlines()[0]})"
    top1, top5 = report.get("measured_top1"), report.get("measured_top5")
    metrics = {"run": run_id, "kind": "import", "status": "ok" if top1 is not None else "unevaluated",
               "acc_last": top1, "acc_best": top1, "acc5_last": top5, "acc5_best": top5, "epoch_best": None,
               "imported": report, "wall_time_s": time.time() - start,
               "provenance": provenance(resolve_device(device, say=False))}
    atomic_write_json(run_dir / "metrics.json", metrics)
    return metrics


#: what the pre-flight does about released teachers whose files are not here yet (--config fetch_teachers=)
FETCH_MODES = ("auto", "download", "never")


def sources_reachable(rt: ReleasedTeacher, timeout: float = 5.0) -> bool:
    """Whether a TCP connection to any of ``rt``'s download hosts opens within ``timeout`` seconds
    (name lookup included: it runs in a thread, as getaddrinfo has no timeout of its own)."""
    import socket
    import threading
    from urllib.parse import urlsplit

    hosts = {(u.hostname, u.port or (443 if u.scheme == "https" else 80))
             for u in map(urlsplit, [*rt.urls, *([rt.archive[0]] if rt.archive else [])])}
    found = threading.Event()

    def connect(host, port):
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            found.set()
        except OSError:
            pass

    for host, port in hosts:
        threading.Thread(target=connect, args=(host, port), daemon=True).start()
    return found.wait(timeout)


def describe(suite, run_id: str, teachers_dir: str = TEACHERS_DIR) -> str:
    """``released <raw file> sha256 <hex>`` of an import run: the SHA-256 recorded when it was
    imported, else the pinned one, else that it is not fetched yet."""
    from kdbench.core.io import read_json

    run = suite.runs[run_id]
    rt = released_teacher(run.spec.dataset, run.spec.student)
    recorded = ((read_json(Path(suite.run_dir(run_id)) / "metrics.json") or {}).get("imported") or {}).get("sha256")
    sha = recorded or (f"{rt.sha256} (pinned, not fetched yet)" if rt.sha256 else "not fetched yet (unpinned)")
    return f"released {Path(teachers_dir) / rt.file} sha256 {sha}"


def teacher_source(suite, run) -> str | None:
    """Where a run's teachers come from, for ``kdbench list-runs``: a released file with its
    SHA-256, a trained teacher's run id, or an imported file (teacher_checkpoints) with its id."""
    if run.kind == "import":
        return describe(suite, run.id)
    if run.kind != "distill":
        return None
    out = []
    for tid, path in zip(run.spec.teacher_ids, run.spec.teacher_ckpts):
        if tid in suite.runs and suite.runs[tid].kind == "import":
            out.append(describe(suite, tid))
        elif tid in suite.runs:
            out.append(f"trained {tid}")
        else:
            out.append(f"file {path} ({tid})")
    return "; ".join(out)
