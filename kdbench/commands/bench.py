"""``kdbench bench``: training throughput of a RepDistiller-style loop vs kdbench's engine.

On one device, in one invocation, for the same teacher→student pair and method, on CIFAR-shaped
synthetic data (``make_synthetic``, 100 classes, 32×32 uint8 images):

(a) **reference** — the loop as RepDistiller's ``train_student.py`` writes it: a torch
    ``Dataset`` of uint8 HWC images with PIL ``RandomCrop(32, padding=4)``,
    ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` in a ``DataLoader`` with worker
    processes (shuffle, no pinned memory), eager fp32, batch 64, the teacher under ``no_grad``,
    ``torch.optim.SGD``, and ``loss.item()`` every step (RepDistiller's meters). CRD samples its
    16384 negatives per image in the dataset with ``np.random.choice`` (``CIFAR100InstanceSample``:
    without replacement unless K exceeds the other-class samples), and its memory reads the
    normalising constants back with ``.item()`` each step (``ContrastMemory``). The loss maths is
    kdbench's (the same terms), so only the execution differs.
(b) **engine** — kdbench's own training: engine runs (:class:`kdbench.engine.run.TrainingRun`, on
    this data and teacher, in a temporary folder) going through the engine's one loop, driven
    by :class:`kdbench.engine.pack.Lockstep` as ``kdbench pack`` drives it (device-resident data,
    batched augmentation, no host sync per step), under one or more execution configurations:
    ``plain`` (eager fp32), ``fast`` (bf16 autocast + channels_last + whole-step CUDA graphs;
    on CPU: channels_last only), ``fast+cache`` (``fast`` with the exact teacher-output cache; its
    one-off build time is reported separately — it is shared by every run with that teacher).
(c) **packed grid** — K runs (``--pack``; seeds × ``--grid-methods``) trained together in one
    ``Lockstep`` (one teacher forward per step for all K), against running the same K
    runs one after another with the reference loop; measured twice where the student is fusable
    (resnet, wrn, vgg): the K students as K models, and fused into one model (``pack+fuse``:
    grouped convolutions, one kernel sequence for all K; ``--no-fuse`` skips it).

Each timing skips ``--warmup`` steps (worker start-up, cuDNN autotuning, graph capture), then
times ``--steps`` steps with the device synchronised at both ends, inside the runs' first epoch
(the engine runs get one batch more than ``--images``: a step's turn of the loop ends by preparing
the next batch, or, after the epoch's last one, by evaluating, which is not timed); figures are steps/s (of one
run; the grid's is K runs' steps per second). Model-FLOP utilisation = FLOPs per step (teacher
forward + student forward and backward, counted once with ``FlopCounterMode``: convolutions and
matmuls) × steps/s ÷ the device's dense bf16 peak (a table by device name, or
``--peak-tflops``); on CPU there is no peak unless given. Every figure is printed with the
device name; figures from different devices (H100 vs H200, CPU) are not comparable.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

#: dense bf16 tensor peak (TFLOP/s) by device-name substring, most specific first (performance.md §6.2)
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0), ("V100", 125.0))
CONFIGS = ("plain", "fast", "fast+cache")


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


# ---------------------------------------------------------------- shared set-up

class Setup:
    """Data, teacher and the constructors both loops use."""

    def __init__(self, args, dev: torch.device):
        from kdbench.data import DATASETS, LoadedDataset
        from kdbench.data.cifar import CIFAR100_MEAN, CIFAR100_STD, ImageSet
        from kdbench.data.synthetic import make_synthetic
        from kdbench.engine.checkpoint import save_model
        from kdbench.models import build_model

        self.args, self.dev = args, dev
        self.mean, self.std = CIFAR100_MEAN, CIFAR100_STD
        per_class = math.ceil((args.images + args.batch) / 100)
        train, test = make_synthetic(classes=100, train_per_class=per_class, test_per_class=1, seed=0)
        self.images, self.labels = train.images[:args.images], train.labels[:args.images]
        n = args.images + args.batch  # the engine runs': one batch more (the timed steps end inside the epoch)
        self.data = LoadedDataset(DATASETS.get("cifar100"), ImageSet(train.images[:n], train.labels[:n], train.classes),
                                  test)
        self.t_arch, self.s_arch = args.pair
        torch.manual_seed(12345)
        self.teacher = build_model(self.t_arch, 100).to(dev).eval()  # random weights: speed does not depend on them
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.folder = tempfile.TemporaryDirectory(prefix="kdbench-bench-")  # the teacher's file, the runs' folders
        self.teacher_file = str(Path(self.folder.name) / "teacher.pt")
        save_model(self.teacher_file, self.teacher, self.t_arch, 100, "cifar100")
        self.loaders = self.data.loaders(args.batch, 256, dev)

    def runs(self, methods: list[str], execution) -> list:
        """Engine runs (:class:`~kdbench.engine.run.TrainingRun`) of ``methods`` (seeds 0, 1, ...)
        under ``execution`` on this data, each with its own copy of the teacher, sharing one pair of
        loaders, in run folders of their own (the timed steps stay inside the first epoch, which
        writes no file; ``--verify`` may train past it)."""
        from kdbench.core import distributed
        from kdbench.core.spec import Recipe, RunSpec
        from kdbench.engine.fast import execution_for
        from kdbench.engine.run import TrainingRun
        folder = Path(tempfile.mkdtemp(dir=self.folder.name))
        recipe = Recipe.from_config({"epochs": 1, "milestones": [], "batch_size": self.args.batch})
        runs = []
        for k, m in enumerate(methods):
            spec = RunSpec("cifar100", self.folder.name, self.s_arch, m, k, self.t_arch, (self.teacher_file,),
                           method_overrides=self.overrides(m), recipe=recipe, execution=execution)
            runs.append(TrainingRun(spec, folder / f"run{k}", distributed.init(self.dev),
                                    execution=execution_for(execution, self.dev), data=self.data,
                                    loaders=self.loaders, progress=False, log_prefix=f"bench {m} s{k}"))
        return runs

    def overrides(self, method: str) -> dict:
        """The method overrides of a bench run: CRD's K negatives need K other-class samples
        (CIFAR-100: 16384 of 49500)."""
        from kdbench.methods import METHODS
        if "crd" not in METHODS.get(method).terms:
            return {}
        return {"params": {"crd": {"nce_k": min(16384, len(self.labels) - int(np.bincount(self.labels).max()))}}}

    def loader(self):
        from kdbench.data.loader import TensorLoader
        return TensorLoader(self.images, self.labels, self.mean, self.std, self.args.batch, True, self.dev)

    def member(self, method: str, seed: int, loader=None):
        """(student, objective, kdbench SGD) for ``method``, initialised from ``seed``."""
        from kdbench.engine.optim import SGD
        from kdbench.methods import METHODS, MethodContext, build_objective
        from kdbench.models import build_model, feature_shapes

        labels = torch.as_tensor(self.labels, device=self.dev)
        torch.manual_seed(seed)
        student = build_model(self.s_arch, 100).to(self.dev)
        spec = METHODS.get(method).with_overrides(self.overrides(method))
        ctx = MethodContext(feature_shapes(student), feature_shapes(self.teacher), 100, labels, self.s_arch, self.t_arch)
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


def reference_sps(setup: Setup, method: str, steps: int, warmup: int, workers: int) -> float:
    """Steps/s of the RepDistiller-style loop."""
    from kdbench.methods import Batch
    dev, args = setup.dev, setup.args
    student, objective, params, _ = setup.member(method, 0)
    crd = objective.terms["crd"] if "crd" in objective.terms else None
    data = RefDataset(setup.images, setup.labels, setup.mean, setup.std, crd.nce_k if crd is not None else None)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=True, num_workers=workers)
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    teacher = setup.teacher
    student.train()
    objective.train()
    it = iter(loader)
    t0, meters = None, []
    for i in range(warmup + steps):
        if i == warmup:
            sync(dev)
            t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:  # a new epoch (new workers, as RepDistiller)
            it = iter(loader)
            batch = next(it)
        x, y, index = (b.to(dev) for b in batch[:3])
        x = x.float()
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
    sync(dev)
    return steps / (time.perf_counter() - t0)


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


def take_rounds(lockstep, n: int) -> None:
    """``n`` steps of each of ``lockstep``'s runs (:class:`kdbench.engine.pack.Lockstep`); the first
    error of a run is raised."""
    results = lockstep.run(n)
    errors = [r for r in results if isinstance(r, Exception)]
    if errors:
        raise errors[0]


def engine_sps(setup: Setup, method: str, execution, steps: int, warmup: int, pack: list[str] | None = None,
               fuse: bool = False):
    """Steps/s of kdbench's loop for one run (or, with ``pack`` = methods of the K members, the
    packed grid's total steps/s; ``fuse``: with the students fused into one model), and the set-up
    time of the runs when they use the teacher cache (its build, or finding it built; else None)."""
    from kdbench.engine.pack import Lockstep, fusion_groups
    t0 = time.perf_counter()
    runs = setup.runs(pack or [method], execution)
    sync(setup.dev)
    build_s = time.perf_counter() - t0 if runs[0].execution.cache is not None else None
    lockstep = Lockstep(runs, fuse_keys=fusion_groups([r.spec for r in runs]) if fuse else None)
    take_rounds(lockstep, warmup)
    sync(setup.dev)
    t0 = time.perf_counter()
    take_rounds(lockstep, steps)
    sync(setup.dev)
    return len(runs) * steps / (time.perf_counter() - t0), build_s


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


# ---------------------------------------------------------------- (optional) fast vs plain agreement

def agreement(setup: Setup, method: str, execution, steps: int) -> dict:
    """Train ``steps`` steps from the same state, data and draws with the plain and the given
    execution; the largest parameter difference relative to the parameter's scale."""
    from kdbench.engine.pack import Lockstep
    finals = []
    for ex in (config_execution("plain", setup.dev, None), execution):
        [run] = setup.runs([method], ex)
        take_rounds(Lockstep([run]), steps)
        finals.append([p.detach().float().clone() for p in [*run.student.parameters(), *run.objective.parameters()]])
    rel = max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)) for a, b in zip(*finals))
    return {"steps": steps, "max_rel_param_diff": rel}


# ---------------------------------------------------------------- the command

def run_bench(args) -> dict:
    from kdbench.engine.device import resolve_device
    dev = resolve_device(args.device)
    cuda = dev.type == "cuda"
    args.pair = args.pair or (("resnet32x4", "resnet8x4") if cuda else ("resnet20", "resnet8"))
    args.steps = args.steps or (300 if cuda else 24)
    args.warmup = args.warmup if args.warmup is not None else (30 if cuda else 3)
    args.workers = args.workers if args.workers is not None else (8 if cuda else 2)
    args.pack = args.pack or (12 if cuda else 3)
    args.images = args.images or (50000 if cuda else (args.warmup + args.steps) * args.batch)
    configs = args.configs or (list(CONFIGS) if cuda else ["plain", "fast"])
    grid = args.grid_methods or [args.method]
    if (args.warmup + args.steps) * args.batch > args.images:
        raise SystemExit(f"--images {args.images} is fewer than (warmup + steps) × batch = "
                         f"{(args.warmup + args.steps) * args.batch}: raise --images or lower --steps")
    setup = Setup(args, dev)
    name = device_name(dev)
    peak = peak_tflops(name, args.peak_tflops)
    out = {"device": str(dev), "device_name": name, "torch": torch.__version__, "pair": list(args.pair),
           "method": args.method, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
           "workers": args.workers, "images": args.images, "peak_tflops": peak}
    say = (lambda *a: print(*a, flush=True)) if not args.quiet else (lambda *a: None)
    say(f"kdbench bench on {name} ({dev}): {args.pair[0]}→{args.pair[1]}, {args.method}, batch {args.batch}, "
        f"{args.steps} timed steps after {args.warmup} warm-up steps, {args.images} CIFAR-shaped images")
    teacher_flops, student_flops = flops_per_step(setup, args.method)
    flops = teacher_flops + student_flops
    out["gflop_per_step"] = {"teacher_forward": teacher_flops / 1e9, "student": student_flops / 1e9}

    def mfu(sps: float, cached: bool = False) -> float | None:
        """Executed model FLOPs / peak (a cached teacher's forward is not executed, so not counted)."""
        return None if peak is None else (student_flops if cached else flops) * sps / (peak * 1e12)

    members = [grid[k % len(grid)] for k in range(args.pack)]
    pack_config = args.pack_config or ("fast" if cuda else "plain")
    # every measurement, repeated round-robin --repeat times; the best of each is kept (robust to
    # other load on the machine, which only ever slows a measurement down)
    jobs = {("reference", m): lambda m=m: (reference_sps(setup, m, args.steps, args.warmup, args.workers), None)
            for m in dict.fromkeys([args.method, *grid])}
    jobs.update({("engine", c): lambda c=c: engine_sps(setup, args.method, config_execution(c, dev, args.compile),
                                                       args.steps, args.warmup) for c in configs})
    from kdbench.engine.fusion import SUPPORTED_ARCHS
    grids = ["pack", "pack+fuse"] if args.fuse and setup.s_arch in SUPPORTED_ARCHS else ["pack"]
    for g in grids:
        jobs[(g, pack_config)] = lambda g=g: engine_sps(setup, args.method, config_execution(pack_config, dev, args.compile),
                                                        args.steps, args.warmup, pack=members, fuse=g == "pack+fuse")
    best: dict[tuple, tuple] = {}
    for _ in range(args.repeat):
        for key, job in jobs.items():
            sps, build_s = job()
            # the cache is built once per process (later repeats find it): keep the first build time
            first_build = best[key][1] if key in best else build_s
            if key not in best or sps > best[key][0]:
                best[key] = (sps, first_build)
    ref = {m: best[("reference", m)][0] for m in dict.fromkeys([args.method, *grid])}
    out["repeat"] = args.repeat
    out["reference_sps"] = ref[args.method]
    out["reference_sps_by_method"] = ref
    out["reference_mfu"] = mfu(ref[args.method])
    say(f"  reference loop ({args.workers} workers, PIL, fp32, .item() per step): {ref[args.method]:8.2f} steps/s"
        + (f"   MFU {100 * mfu(ref[args.method]):.2f}%" if peak else ""))
    out["engine"] = {}
    for config in configs:
        ex = config_execution(config, dev, args.compile)
        sps, build_s = best[("engine", config)]
        row = {"execution": ex.__dict__, "sps": sps, "ratio": sps / ref[args.method], "mfu": mfu(sps, build_s is not None),
               "cache_build_s": build_s}
        out["engine"][config] = row
        say(f"  engine {config:11s} {sps:8.2f} steps/s  ×{row['ratio']:.2f} vs reference"
            + (f"   MFU {100 * row['mfu']:.2f}%" if peak else "") + (f"   (cache built in {build_s:.1f} s)" if build_s else ""))
    ex = config_execution(pack_config, dev, args.compile)
    sequential = len(members) / sum(1 / ref[m] for m in members)  # one reference run after another
    for g in grids:
        grid_sps, build_s = best[(g, pack_config)]
        out[g] = {"k": len(members), "methods": members, "execution": ex.__dict__, "config": pack_config,
                  "fused": g == "pack+fuse", "sps": grid_sps, "sequential_reference_sps": sequential,
                  "ratio": grid_sps / sequential,
                  "mfu": mfu(grid_sps, build_s is not None) if set(members) == {args.method} else None,
                  "cache_build_s": build_s}
        label = "packed grid" + (", students fused" if g == "pack+fuse" else "")
        say(f"  {label} of {len(members)} runs ({pack_config}): {grid_sps:8.2f} run-steps/s vs "
            f"{sequential:.2f} one reference run after another: ×{grid_sps / sequential:.2f}"
            + (f"   MFU {100 * out[g]['mfu']:.2f}%" if peak and out[g]["mfu"] else ""))
    if args.verify:
        out["agreement"] = {c: agreement(setup, args.method, config_execution(c, dev, args.compile), args.verify)
                            for c in configs if c != "plain"}
        for c, a in out["agreement"].items():
            say(f"  agreement plain vs {c} after {a['steps']} steps: max relative parameter difference "
                f"{a['max_rel_param_diff']:.2e}")
    say(f"  (device: {name}; FLOPs/step {flops / 1e9:.2f} G = teacher forward {teacher_flops / 1e9:.2f} G + student "
        f"{student_flops / 1e9:.2f} G" + (f"; peak {peak} TFLOP/s bf16 dense)" if peak else ")"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="kdbench bench",
        description="Throughput of a RepDistiller-style training loop vs kdbench's engine (single run, each "
                    "execution config, and a packed grid) on one device, on CIFAR-shaped synthetic data. "
                    "Prints steps/s, ratios and model-FLOP utilisation with the device name.")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--pair", type=lambda s: tuple(s.split(",")),
                   help="TEACHER,STUDENT architectures (default resnet32x4,resnet8x4 on GPU; resnet20,resnet8 on CPU, "
                        "where resnet32x4 takes ~1.5 s a step on 2 cores)")
    p.add_argument("--method", default="kd", help="distillation method (default kd; e.g. crd, fitnet)")
    p.add_argument("--steps", type=int, help="timed steps per measurement (default 300 on GPU, 24 on CPU)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 30 on GPU, 3 on CPU)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64, RepDistiller's)")
    p.add_argument("--workers", type=int, help="reference DataLoader workers (default 8 on GPU, 2 on CPU)")
    p.add_argument("--images", type=int, help="training images (default 50000 on GPU, (warmup+steps)×batch on CPU)")
    p.add_argument("--configs", type=lambda s: s.split(","),
                   help=f"engine configs, comma-separated from {', '.join(CONFIGS)} "
                        "(default all on GPU, plain,fast on CPU; fast = bf16 + channels_last + CUDA graphs on GPU, "
                        "channels_last on CPU)")
    p.add_argument("--compile", choices=["none", "graph", "compile"], help="override the fast configs' compile mode")
    p.add_argument("--pack", type=int, help="runs in the packed grid (default 12 on GPU, 3 on CPU)")
    p.add_argument("--pack-config", choices=CONFIGS, help="engine config of the packed grid (default fast on GPU, plain on CPU)")
    p.add_argument("--no-fuse", dest="fuse", action="store_false",
                   help="measure the packed grid only without horizontal fusion (by default it is measured both ways "
                        "when the student is fusable: resnet, wrn, vgg)")
    p.add_argument("--grid-methods", type=lambda s: s.split(","),
                   help="methods the grid cycles through (default: --method); seeds differ per run")
    p.add_argument("--verify", type=int, default=0, metavar="N",
                   help="also train N steps with plain and each fast config from the same state and report how far "
                        "the parameters drift apart")
    p.add_argument("--repeat", type=int, default=1, help="repeat every measurement R times round-robin and keep "
                   "the best (default 1; use 3 on a shared machine)")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: bf16 dense peak by device name)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", help="also write every figure to this JSON file")
    p.add_argument("--quiet", action="store_true", help="print nothing (use with --json)")
    args = p.parse_args(argv)
    if args.pair is not None and len(args.pair) != 2:
        p.error("--pair takes TEACHER,STUDENT")
    from kdbench.methods import METHODS
    from kdbench.models import MODELS
    for m in [args.method, *(args.grid_methods or [])]:
        METHODS.get(m)  # unknown names raise with the valid choices
    for a in args.pair or ():
        MODELS.get(a)
    if args.threads:
        torch.set_num_threads(args.threads)
    if any(c not in CONFIGS for c in args.configs or []):
        p.error(f"--configs: valid configs are {', '.join(CONFIGS)}")
    out = run_bench(args)
    if args.json:
        from kdbench.core.io import atomic_write_json
        atomic_write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
