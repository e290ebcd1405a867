"""``kdbench bench``: what a user compares — whole runs and steady-state steps of a RepDistiller-style
loop vs kdbench's engine, and a packed grid vs the same runs one after another.

On one device, in one invocation, for one teacher→student pair, on CIFAR-shaped synthetic data
(``make_synthetic``, 100 classes, 32×32 uint8 images):

(a) **reference** — the loop as RepDistiller's ``train_student.py`` writes it: start-up (student,
    objective, teacher read from its file, ``DataLoader`` of uint8 HWC images with PIL
    ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` and worker
    processes, the teacher's test accuracy), then each epoch: steps in eager fp32, the teacher
    under ``no_grad``, ``torch.optim.SGD``, ``loss.item()`` every step (RepDistiller's meters), a
    test pass (``validate``: a test ``DataLoader``, ``.item()`` per batch), a checkpoint
    (``torch.save``); at the end a metrics file. CRD samples its negatives per image in the dataset
    with ``np.random.choice`` (``CIFAR100InstanceSample``) and its memory reads the normalising
    constants back with ``.item()`` each step (``ContrastMemory``). The loss maths is kdbench's (the
    same terms), so only the execution differs.
(b) **engine** — kdbench's own runs (:class:`kdbench.engine.run.TrainingRun` through the engine's one
    loop, driven by :class:`kdbench.engine.pack.Lockstep` as ``kdbench pack`` drives it), timed from
    their construction (loaders, student, teacher read from its file, objective) to their
    ``metrics.json``: every epoch's test pass and checkpoint, ``model.pt``. Execution configs:
    ``plain`` (eager fp32), ``fast`` (bf16 autocast + channels_last + whole-step CUDA graphs; on
    CPU: channels_last only), ``fast+cache`` (``fast`` with the exact teacher-output cache, whose
    build is part of its run).
(c) **grid** — K runs (``--pack``; seeds 0..K-1 cycling through ``--grid-methods``) trained together
    in one ``Lockstep`` (one teacher forward per step for all K; ``pack+fuse``: the K students fused
    into one model where the student is fusable — resnet, wrn, vgg), against **the same K runs one
    after another by kdbench** (measured) and against the K reference runs one after another
    (measured). The packed runs' final weights are compared with the sequential runs' in the same
    invocation (``identity``: ‖Δw‖ / ‖w‖ over all parameters;
    unfused packing equals the runs alone up to the teacher's convolutions rounding differently at
    the larger batch, fused packing up to grouped vs plain convolutions: ``--tolerance``).

**Epochs.** Every run (both loops) trains ``--epochs`` epochs of ``--epoch-steps`` steps each
(default warm-up + timed steps + 1): an epoch is cut to its first steps (:class:`EpochSlice`) so
that whole runs stay short on any data size, while CRD's memory and negatives cover the whole
training set. **CRD runs at ``--nce-k``** (default 16384, RepDistiller's): the synthetic training
set is sized so that every image has that many other-class images (100 classes of
``ceil(nce_k / 99)`` images: 16600 at 16384).

**Figures.** *Per run*: seconds from construction to the metrics file. *Per step*: steps/s over
``--steps`` steps after ``--warmup`` steps (worker start-up, cuDNN autotuning, graph capture) inside
the first epoch, the device synchronised at both ends. Every measurement is repeated ``--repeat``
times round-robin and printed as min / median / max; a ratio is taken within each round (the
reference and the engine measured minutes apart, under the same load) and its min / median / max
over rounds printed. Model-FLOP utilisation = FLOPs per step (teacher forward + student forward and
backward, ``FlopCounterMode``) × median steps/s ÷ the device's dense bf16 peak (a table by device
name, or ``--peak-tflops``; none on CPU unless given). Figures from different devices are not
comparable: each is printed with the device name.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kdbench.commands.bench_cli import CONFIGS, parser

#: dense bf16 tensor peak (TFLOP/s) by device-name substring, most specific first (performance.md §6.2)
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0), ("V100", 125.0))
#: relative final-weight difference allowed between packed and sequential runs (see the docstring)
TOLERANCE = {"pack": 1e-4, "pack+fuse": 1e-4}


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    from kdbench.core.io import cpu_name
    return f"CPU {cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((p for key, p in PEAK_TFLOPS if key in name), None)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def spread(values: list[float]) -> dict:
    """min / median / max (and the values, in the order measured)."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "values": list(values)}


def show(s: dict, fmt: str = ".2f") -> str:
    return f"{s['median']:{fmt}} [{s['min']:{fmt}}–{s['max']:{fmt}}]"


# ---------------------------------------------------------------- shared set-up

class EpochSlice:
    """A training loader whose epochs are its first ``steps`` batches (the same order and
    augmentation as the whole epoch's start); everything else (labels: CRD's memory and
    negatives, the teacher cache) is the whole loader's."""

    def __init__(self, loader, steps: int):
        self.loader, self.steps = loader, min(steps, len(loader))

    def __len__(self) -> int:
        return self.steps

    @property
    def num_samples(self) -> int:
        return min(self.steps * self.loader.batch_size, self.loader.num_samples)

    def batches(self, generator=None, views: bool = False):
        return itertools.islice(self.loader.batches(generator, views=views), self.steps)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def crd_images(nce_k: int, classes: int = 100) -> int:
    """Training images of a balanced set in which every image has ``nce_k`` other-class images."""
    return classes * math.ceil(nce_k / (classes - 1))


class Setup:
    """Data, the teacher's file and the constructors both loops use. ``args``: ``images``,
    ``pair``, ``batch``; optional ``epoch_steps`` (None: whole epochs, and the engine gets one
    batch more than ``images``, so that steps timed up to ``images`` stay inside its epoch),
    ``nce_k`` (default 16384, at most what the data allows), ``test_per_class`` (default 1)."""

    def __init__(self, args, dev: torch.device, pair: tuple[str, str] | None = None):
        from kdbench.data import DATASETS, LoadedDataset
        from kdbench.data.cifar import CIFAR100_MEAN, CIFAR100_STD, ImageSet
        from kdbench.data.synthetic import make_synthetic
        from kdbench.engine.checkpoint import save_model
        from kdbench.models import build_model

        self.args, self.dev = args, dev
        self.epoch_steps = getattr(args, "epoch_steps", None)
        self.nce_k = getattr(args, "nce_k", None) or 16384
        self.mean, self.std = CIFAR100_MEAN, CIFAR100_STD
        n = args.images + (args.batch if self.epoch_steps is None else 0)
        train, test = make_synthetic(classes=100, train_per_class=math.ceil(n / 100),
                                     test_per_class=getattr(args, "test_per_class", 1), seed=0)
        self.images, self.labels = train.images[:args.images], train.labels[:args.images]
        self.test = test
        self.data = LoadedDataset(DATASETS.get("cifar100"), ImageSet(train.images[:n], train.labels[:n], train.classes),
                                  test)
        self.t_arch, self.s_arch = pair or args.pair
        torch.manual_seed(12345)
        self.teacher = build_model(self.t_arch, 100).to(dev).eval()  # random weights: speed does not depend on them
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.folder = tempfile.TemporaryDirectory(prefix="kdbench-bench-")  # the teacher's file, the runs' folders
        self.teacher_file = str(Path(self.folder.name) / "teacher.pt")
        save_model(self.teacher_file, self.teacher, self.t_arch, 100, "cifar100")

    def loaders(self):
        train, test = self.data.loaders(self.args.batch, 256, self.dev)
        return (train if self.epoch_steps is None else EpochSlice(train, self.epoch_steps)), test

    def runs(self, methods: list[str], execution, seeds: list[int] | None = None, epochs: int = 1) -> list:
        """Engine runs (:class:`~kdbench.engine.run.TrainingRun`) of ``methods`` (seeds ``seeds``,
        default 0, 1, ...) under ``execution`` on this data, each with its own copy of the teacher,
        sharing one pair of loaders (built here), in a folder of their own."""
        from kdbench.core import distributed
        from kdbench.core.spec import Recipe, RunSpec
        from kdbench.engine.fast import execution_for
        from kdbench.engine.run import TrainingRun
        folder = Path(tempfile.mkdtemp(dir=self.folder.name))
        recipe = Recipe.from_config({"epochs": epochs, "milestones": [], "batch_size": self.args.batch})
        loaders = self.loaders()
        runs = []
        for k, m in enumerate(methods):
            seed = seeds[k] if seeds else k
            spec = RunSpec("cifar100", self.folder.name, self.s_arch, m, seed, self.t_arch, (self.teacher_file,),
                           method_overrides=self.overrides(m), recipe=recipe, execution=execution)
            runs.append(TrainingRun(spec, folder / f"run{k}", distributed.init(self.dev),
                                    execution=execution_for(execution, self.dev), data=self.data,
                                    loaders=loaders, progress=False, log_prefix=f"bench {m} s{seed}"))
        return runs

    def crd_k(self) -> int:
        """CRD's negatives: ``nce_k``, at most the other-class samples of the smallest class's complement."""
        return min(self.nce_k, len(self.labels) - int(np.bincount(self.labels).max()))

    def overrides(self, method: str) -> dict:
        from kdbench.methods import METHODS
        if "crd" not in METHODS.get(method).terms:
            return {}
        return {"params": {"crd": {"nce_k": self.crd_k()}}}

    def loader(self):
        from kdbench.data.loader import TensorLoader
        return TensorLoader(self.images, self.labels, self.mean, self.std, self.args.batch, True, self.dev)

    def member(self, method: str, seed: int, teacher=None):
        """(student, objective, params, make kdbench SGD) for ``method``, initialised from ``seed``."""
        from kdbench.engine.optim import SGD
        from kdbench.methods import METHODS, MethodContext, build_objective
        from kdbench.models import build_model, feature_shapes

        labels = torch.as_tensor(self.labels, device=self.dev)
        torch.manual_seed(seed)
        student = build_model(self.s_arch, 100).to(self.dev)
        spec = METHODS.get(method).with_overrides(self.overrides(method))
        ctx = MethodContext(feature_shapes(student), feature_shapes(teacher or self.teacher), 100, labels,
                            self.s_arch, self.t_arch)
        objective = build_objective(spec, ctx).to(self.dev)
        params = list(student.parameters()) + list(objective.parameters())
        return student, objective, params, lambda: SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


# ---------------------------------------------------------------- (a) the reference loop

class RefDataset(torch.utils.data.Dataset):
    """RepDistiller's CIFAR100Instance / CIFAR100InstanceSample: PIL transforms per image."""

    def __init__(self, images, labels, mean, std, crd_k: int | None = None):
        from torchvision import transforms
        self.images, self.labels, self.crd_k = images, labels, crd_k
        self.transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                             transforms.ToTensor(), transforms.Normalize(mean, std)])
        if crd_k:
            classes = int(labels.max()) + 1
            self.cls_negative = [np.flatnonzero(labels != c) for c in range(classes)]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image
        img = self.transform(Image.fromarray(self.images[i]))
        target = int(self.labels[i])
        if not self.crd_k:
            return img, target, i
        neg = self.cls_negative[target]
        neg_idx = np.random.choice(neg, self.crd_k, replace=self.crd_k > len(neg))
        return img, target, i, np.hstack(([i], neg_idx))


def _ref_crd(term, s, t, index, contrast_idx):
    """The CRD loss as RepDistiller's CRDLoss/ContrastMemory computes it: negatives from the
    data loader, normalising constants read back to the host every step."""
    from kdbench.methods.crd import momentum_update, nce_loss, nce_scores
    v_s, v_t = term.embed_s(s.pooled), term.embed_t(t.pooled.detach())
    out_s = nce_scores(v_s, term.memory_t, contrast_idx, term.nce_t)
    out_t = nce_scores(v_t, term.memory_s, contrast_idx, term.nce_t)
    for z, out in ((term.Z_s, out_s), (term.Z_t, out_t)):
        if z.item() < 0:  # ContrastMemory: `Z_v1 = self.params[2].item()`, set once from the first batch
            z.fill_((out.mean() * term.n_data).item())
    loss = nce_loss(out_s / term.Z_s.item(), term.n_data) + nce_loss(out_t / term.Z_t.item(), term.n_data)
    momentum_update(term.memory_s, index, v_s, term.nce_m)
    momentum_update(term.memory_t, index, v_t, term.nce_m)
    return loss


class RefTestDataset(torch.utils.data.Dataset):
    """RepDistiller's test set: ``ToTensor`` + ``Normalize`` per image."""

    def __init__(self, images, labels, mean, std):
        from torchvision import transforms
        self.images, self.labels = images, labels
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def _ref_validate(model, loader, dev) -> float:
    """RepDistiller's ``validate``: eval mode, the loss and accuracy read back per batch."""
    model.eval()
    correct = n = 0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(dev), y.to(dev)
            logits = model(x).logits
            torch.nn.functional.cross_entropy(logits, y).item()
            correct += int((logits.argmax(1) == y).sum().item())
            n += len(y)
    return 100.0 * correct / n


def reference_run(setup: Setup, method: str, seed: int, epochs: int) -> dict:
    """One whole run of the RepDistiller-style loop: ``run_s`` (start-up to the metrics file),
    ``step_s`` (the timed steps of epoch 1)."""
    from kdbench.engine.teachers import load_teacher
    from kdbench.methods import Batch
    dev, args = setup.dev, setup.args
    folder = Path(tempfile.mkdtemp(dir=setup.folder.name))
    sync(dev)
    t0 = time.perf_counter()
    teacher = load_teacher((setup.teacher_file,), setup.t_arch, 100, dev)
    student, objective, params, _ = setup.member(method, seed, teacher)
    crd = objective.terms["crd"] if "crd" in objective.terms else None
    data = RefDataset(setup.images, setup.labels, setup.mean, setup.std, crd.nce_k if crd is not None else None)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=True, num_workers=args.workers)
    test = torch.utils.data.DataLoader(RefTestDataset(setup.test.images, setup.test.labels, setup.mean, setup.std),
                                       batch_size=256, shuffle=False, num_workers=args.workers)
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    curve = [{"teacher_acc": _ref_validate(teacher, test, dev)}]  # train_student.py checks the teacher first
    epoch_steps = min(setup.epoch_steps or len(loader), len(loader))
    step_s = None
    for epoch in range(epochs):
        student.train()
        objective.train()
        meters = []
        for i, batch in enumerate(loader):  # a new epoch: new workers, as RepDistiller
            if i == epoch_steps:
                break
            if epoch == 0 and i == args.warmup:
                sync(dev)
                t1 = time.perf_counter()
            x, y, index = (b.to(dev) for b in batch[:3])
            s = student(x)
            with torch.no_grad():
                t = teacher(x)
            b = Batch(x, y, index)
            loss = objective.spec.ce * torch.nn.functional.cross_entropy(s.logits, y)
            for name, term in objective.terms.items():
                value = _ref_crd(term, s, t, index, batch[3].to(dev)) if term is crd else term(s, t, b)
                loss = loss + objective.spec.terms[name] * value
            loss_value = loss.item()  # RepDistiller: losses.update(loss.item(), input.size(0))
            meters.append((s.logits.argmax(1) == y).float().mean())  # RepDistiller's accuracy meter (a tensor)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if not math.isfinite(loss_value):
                raise RuntimeError(f"reference loop: non-finite loss at step {i}")
            if epoch == 0 and i == args.warmup + args.steps - 1:
                sync(dev)
                step_s = time.perf_counter() - t1
        curve.append({"epoch": epoch + 1, "loss": loss_value, "acc": _ref_validate(student, test, dev)})
        torch.save({"epoch": epoch + 1, "model": student.state_dict(), "optimizer": optimizer.state_dict()},
                   folder / "ckpt.pth")
    (folder / "metrics.json").write_text(json.dumps(curve))
    sync(dev)
    return {"run_s": time.perf_counter() - t0, "step_s": step_s}


# ---------------------------------------------------------------- (b) the engine

def config_execution(config: str, dev: torch.device, compile_mode: str | None):
    from kdbench.core.spec import Execution
    if config == "plain":
        return Execution()
    cuda = dev.type == "cuda"
    ex = dict(channels_last=True, precision="bf16" if cuda else "fp32",
              compile=compile_mode or ("graph" if cuda else "none"))
    if config == "fast+cache":
        ex["teacher_cache"] = "fp32"
    return Execution(**ex)


def take_rounds(lockstep, n: int | None) -> list:
    """``n`` steps of each of ``lockstep``'s runs (:class:`kdbench.engine.pack.Lockstep`; None: to
    their end); the first error of a run is raised. The runs' results."""
    results = lockstep.run(n)
    errors = [r for r in results if isinstance(r, Exception)]
    if errors:
        raise errors[0]
    return results


def engine_run(setup: Setup, methods: list[str], execution, epochs: int, seeds: list[int] | None = None,
               fuse: bool = False) -> dict:
    """The engine runs of ``methods`` trained together (one run: alone) from construction to their
    ``metrics.json``: ``run_s``, ``step_s`` (the timed steps of epoch 1, all runs), ``finals``
    (each run's final student and objective parameters)."""
    from kdbench.engine.pack import Lockstep, fusion_groups
    args = setup.args
    sync(setup.dev)
    t0 = time.perf_counter()
    runs = setup.runs(methods, execution, seeds, epochs)
    lockstep = Lockstep(runs, fuse_keys=fusion_groups([r.spec for r in runs]) if fuse else None)
    take_rounds(lockstep, args.warmup)
    sync(setup.dev)
    t1 = time.perf_counter()
    take_rounds(lockstep, args.steps)
    sync(setup.dev)
    step_s = time.perf_counter() - t1
    results = take_rounds(lockstep, None)
    sync(setup.dev)
    run_s = time.perf_counter() - t0
    bad = [m.get("failure") for m in results if m.get("status") != "ok"]
    if bad or not all((r.out / "metrics.json").exists() for r in runs):
        raise RuntimeError(f"bench: an engine run did not finish: {bad}")
    finals = [[p.detach().float().clone() for p in (*r.student.parameters(), *r.objective.parameters())] for r in runs]
    return {"run_s": run_s, "step_s": step_s, "finals": finals}


def max_rel_diff(a: list, b: list) -> float:
    """How far two runs' parameters are apart: ‖a − b‖ / ‖a‖ over all of them (a parameter that
    starts at zero, a BN bias, is not judged by its own tiny scale)."""
    num = sum(float(((x.double() - y.double()) ** 2).sum()) for x, y in zip(a, b, strict=True))
    return (num / max(sum(float((x.double() ** 2).sum()) for x in a), 1e-300)) ** 0.5


def flops_per_step(setup: Setup, method: str) -> tuple[float, float]:
    """FLOPs of one plain step: (teacher forward, student forward/backward + the loss)."""
    from torch.utils.flop_counter import FlopCounterMode

    from kdbench.engine.step import step_names, train_step
    from kdbench.methods import Batch
    student, objective, params, make_opt = setup.member(method, 0)
    loader = setup.loader()
    x, y, idx = next(loader.batches(torch.Generator(setup.dev).manual_seed(0)))
    names = step_names(objective)
    sums = torch.zeros(len(names) + 1, device=setup.dev, dtype=torch.float64)
    with FlopCounterMode(display=False) as teacher_count, torch.no_grad():
        t = setup.teacher(x)
    with FlopCounterMode(display=False) as student_count:
        train_step(student, objective, make_opt(), Batch(x, y, idx), t, None, names, sums)
    return float(teacher_count.get_total_flops()), float(student_count.get_total_flops())


# ---------------------------------------------------------------- the command

def defaults(args, dev: torch.device) -> None:
    """Fill the device-dependent defaults (CPU: small enough to finish in ~3 minutes on 2 cores)."""
    cuda = dev.type == "cuda"
    args.pair = args.pair or ("resnet32x4", "resnet8x4")
    args.grid_pair = args.grid_pair or (args.pair if cuda else ("resnet20", "resnet8"))
    args.methods = args.methods or ["kd", "crd"]
    args.grid_methods = args.grid_methods or args.methods[:1]
    args.steps = args.steps or (200 if cuda else 1)
    args.warmup = args.warmup if args.warmup is not None else (20 if cuda else 1)
    args.epochs = args.epochs or (2 if cuda else 1)
    args.epoch_steps = args.epoch_steps or args.warmup + args.steps + 1
    args.repeat = args.repeat or 3
    args.workers = args.workers if args.workers is not None else (8 if cuda else 2)
    args.pack = args.pack if args.pack is not None else (12 if cuda else 3)
    args.configs = args.configs or (list(CONFIGS) if cuda else ["plain"])
    args.pack_config = args.pack_config or ("fast" if cuda else "plain")
    crd = any("crd" in _terms(m) for m in [*args.methods, *args.grid_methods])
    need = max(args.epoch_steps * args.batch, crd_images(args.nce_k) if crd else 0)
    args.images = args.images or max(50000 if cuda else 0, need)
    if args.epoch_steps <= args.warmup + args.steps:
        raise SystemExit(f"--epoch-steps {args.epoch_steps} must exceed --warmup + --steps = "
                         f"{args.warmup + args.steps} (the timed steps end inside the first epoch)")
    if args.epoch_steps * args.batch > args.images:
        raise SystemExit(f"--images {args.images} is fewer than --epoch-steps × batch = "
                         f"{args.epoch_steps * args.batch}: raise --images or lower --steps")


def _terms(method: str):
    from kdbench.methods import METHODS
    return METHODS.get(method).terms


def run_bench(args) -> dict:
    from kdbench.engine.device import resolve_device
    from kdbench.engine.fusion import SUPPORTED_ARCHS
    dev = resolve_device(args.device)
    defaults(args, dev)
    say = (lambda *a: print(*a, flush=True)) if not args.quiet else (lambda *a: None)
    name = device_name(dev)
    peak = peak_tflops(name, args.peak_tflops)
    setup = Setup(args, dev)
    gsetup = setup if tuple(args.grid_pair) == tuple(args.pair) else Setup(args, dev, args.grid_pair)
    common = {"device": str(dev), "device_name": name, "torch": torch.__version__, "batch": args.batch,
              "steps": args.steps, "warmup": args.warmup, "epochs": args.epochs, "epoch_steps": args.epoch_steps,
              "repeat": args.repeat, "workers": args.workers, "images": args.images, "peak_tflops": peak}
    say(f"kdbench bench on {name} ({dev}), batch {args.batch}, {args.images} CIFAR-shaped synthetic images: every run "
        f"{args.epochs} epoch(s) of {args.epoch_steps} steps (each ending with a test pass and a checkpoint); steps/s "
        f"over {args.steps} steps after {args.warmup}; {args.repeat} repeats round-robin, shown as median [min–max]")

    members = [args.grid_methods[k % len(args.grid_methods)] for k in range(args.pack)]
    seeds = list(range(args.pack))
    pack_ex = config_execution(args.pack_config, dev, args.compile)
    grids = ["pack", "pack+fuse"] if args.fuse and gsetup.s_arch in SUPPORTED_ARCHS and args.pack > 1 else ["pack"]
    jobs = {}
    for m in args.methods:
        jobs[("reference", m)] = lambda m=m: reference_run(setup, m, 0, args.epochs)
        for c in args.configs:
            jobs[("engine", m, c)] = lambda m=m, c=c: engine_run(setup, [m], config_execution(c, dev, args.compile),
                                                                args.epochs)
    if args.pack:
        def sequential(run):
            parts = [run(k) for k in range(args.pack)]
            return {"run_s": sum(p["run_s"] for p in parts), "step_s": sum(p["step_s"] for p in parts),
                    "finals": [f for p in parts for f in p.get("finals", [])]}
        jobs[("sequential",)] = lambda: sequential(lambda k: engine_run(gsetup, [members[k]], pack_ex, args.epochs, [k]))
        jobs[("sequential_reference",)] = lambda: sequential(lambda k: reference_run(gsetup, members[k], k, args.epochs))
        for g in grids:
            jobs[(g,)] = lambda g=g: engine_run(gsetup, members, pack_ex, args.epochs, seeds, fuse=g == "pack+fuse")
    samples: dict[tuple, list[dict]] = {key: [] for key in jobs}
    for r in range(args.repeat):
        for key, job in jobs.items():
            samples[key].append(job())
            say(f"  (repeat {r + 1}/{args.repeat}) {' '.join(key)}: {samples[key][-1]['run_s']:.1f} s")

    def figures(key, steps_per_round: int) -> dict:
        rows = samples[key]
        out = {"run_s": spread([x["run_s"] for x in rows])}
        if all(x["step_s"] for x in rows):
            out["sps"] = spread([steps_per_round / x["step_s"] for x in rows])
        return out

    def ratios(slow_key, fast_key, into: dict, label: str) -> None:
        """Per round: the slow one's time / the fast one's (run and step)."""
        slow, fast = samples[slow_key], samples[fast_key]
        into[f"run_ratio_vs_{label}"] = spread([s["run_s"] / f["run_s"] for s, f in zip(slow, fast)])
        if all(s["step_s"] for s in slow) and all(f["step_s"] for f in fast):  # the same run-steps on both sides
            into[f"step_ratio_vs_{label}"] = spread([s["step_s"] / f["step_s"] for s, f in zip(slow, fast)])

    out = {**common, "methods": {}}
    for m in args.methods:
        t_flops, s_flops = flops_per_step(setup, m)
        mfu = (lambda sps, cached=False: None if peak is None else
               (s_flops if cached else t_flops + s_flops) * sps / (peak * 1e12))
        res = {**common, "pair": list(args.pair), "method": m,
               "gflop_per_step": {"teacher_forward": t_flops / 1e9, "student": s_flops / 1e9}}
        if "crd" in _terms(m):
            res["nce_k"] = setup.crd_k()
        res["reference"] = ref = figures(("reference", m), args.steps)
        ref["mfu"] = mfu(ref["sps"]["median"]) if "sps" in ref else None
        say(f" {m} {args.pair[0]}→{args.pair[1]}" + (f" (nce_k {res['nce_k']})" if "nce_k" in res else "") + ":")
        say(f"  reference loop ({args.workers} workers, PIL, fp32, .item() per step): run {show(ref['run_s'], '.1f')} s, "
            f"{show(ref['sps'])} steps/s" + (f"   MFU {100 * ref['mfu']:.2f}%" if peak else ""))
        res["engine"], res["agreement"] = {}, {}
        for c in args.configs:
            ex = config_execution(c, dev, args.compile)
            row = {"execution": ex.__dict__, **figures(("engine", m, c), args.steps)}
            ratios(("reference", m), ("engine", m, c), row, "reference")
            row["mfu"] = mfu(row["sps"]["median"], ex.teacher_cache != "none")
            res["engine"][c] = row
            say(f"  engine {c:10s} run {show(row['run_s'], '.1f')} s  ×{show(row['run_ratio_vs_reference'])} per run;"
                f"  {show(row['sps'])} steps/s  ×{show(row['step_ratio_vs_reference'])} per step"
                + (f"   MFU {100 * row['mfu']:.2f}%" if peak else ""))
            if c != "plain" and "plain" in args.configs:
                d = max(max_rel_diff(p["finals"][0], q["finals"][0])
                        for p, q in zip(samples[("engine", m, "plain")], samples[("engine", m, c)]))
                res["agreement"][c] = {"rel_param_diff": d}
                say(f"  final weights, plain vs {c}: relative parameter difference {d:.2e}")
        say(f"  (FLOPs/step {(t_flops + s_flops) / 1e9:.2f} G = teacher forward {t_flops / 1e9:.2f} G + student "
            f"{s_flops / 1e9:.2f} G" + (f"; peak {peak} TFLOP/s bf16 dense)" if peak else ")"))
        out["methods"][m] = res
    if args.pack:
        grid = {"k": args.pack, "methods": members, "pair": list(args.grid_pair), "config": args.pack_config,
                "execution": pack_ex.__dict__, "sequential": figures(("sequential",), args.pack * args.steps),
                "sequential_reference": figures(("sequential_reference",), args.pack * args.steps)}
        say(f" grid of {args.pack} runs ({', '.join(dict.fromkeys(members))} seeds 0–{args.pack - 1}, "
            f"{args.grid_pair[0]}→{args.grid_pair[1]}, {args.pack_config}):")
        say(f"  one after another, kdbench:   {show(grid['sequential']['run_s'], '.1f')} s, "
            f"{show(grid['sequential']['sps'])} run-steps/s")
        say(f"  one after another, reference: {show(grid['sequential_reference']['run_s'], '.1f')} s, "
            f"{show(grid['sequential_reference']['sps'])} run-steps/s")
        for g in grids:
            row = {"fused": g == "pack+fuse", **figures((g,), args.pack * args.steps)}
            ratios(("sequential",), (g,), row, "sequential")
            ratios(("sequential_reference",), (g,), row, "reference")
            d = max(max(max_rel_diff(a, b) for a, b in zip(p["finals"], q["finals"]))
                    for p, q in zip(samples[("sequential",)], samples[(g,)]))
            row["identity"] = {"rel_param_diff": d, "tolerance": TOLERANCE[g], "within": d <= TOLERANCE[g]}
            grid[g] = row
            say(f"  {'packed, students fused' if row['fused'] else 'packed':22s}  {show(row['run_s'], '.1f')} s: "
                f"×{show(row['run_ratio_vs_sequential'])} per run vs kdbench one after another, "
                f"×{show(row['run_ratio_vs_reference'])} vs reference; {show(row['sps'])} run-steps/s: "
                f"×{show(row['step_ratio_vs_sequential'])} per step vs kdbench one after another")
            say(f"    final weights vs the same runs one after another: relative difference ‖Δ‖/‖w‖ {d:.2e} "
                f"({'within' if row['identity']['within'] else 'OUTSIDE'} the stated rounding {TOLERANCE[g]:g})")
        out["grid"] = grid
    return out


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    for name in ("pair", "grid_pair"):
        if getattr(args, name) is not None and len(getattr(args, name)) != 2:
            p.error(f"--{name.replace('_', '-')} takes TEACHER,STUDENT")
    from kdbench.methods import METHODS
    from kdbench.models import MODELS
    for m in [*(args.methods or []), *(args.grid_methods or [])]:
        METHODS.get(m)  # unknown names raise with the valid choices
    for a in [*(args.pair or ()), *(args.grid_pair or ())]:
        MODELS.get(a)
    if args.threads:
        torch.set_num_threads(args.threads)
    if any(c not in CONFIGS for c in args.configs or []):
        p.error(f"--configs: valid configs are {', '.join(CONFIGS)}")
    for name in ("steps", "epochs", "epoch_steps", "repeat", "nce_k"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} takes a whole number >= 1")
    out = run_bench(args)
    if args.json:
        from kdbench.core.io import atomic_write_json
        atomic_write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
