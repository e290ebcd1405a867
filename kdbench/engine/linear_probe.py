"""The ``linear_probe`` transfer protocol (CRD Table 4; DKD's transfer table).

A student distilled on CIFAR-100 is **frozen** — its weights *and* its BatchNorm running
statistics: it stays in eval mode and runs under ``no_grad`` — and only a new linear layer on its
pooled (penultimate) feature is trained on the target dataset (STL-10 or Tiny-ImageNet, both
resized to 32 px), with **weight decay 0**. That is what the DKD maintainers prescribe
(megvii-research/mdistiller#59; recipes.md §3.4). It is not what the public re-implementation
does (giakoumoglou/distillers ``transfer_student.py`` keeps wd 5e-4, updates BN statistics in
train mode and never decays its lr).

CRD never published the probe's epochs, lr or schedule (HobbitLong/RepDistiller#44, open). The
defaults are ``PROBE_RECIPE`` (:mod:`kdbench.core.spec`): **40 epochs, SGD momentum 0.9,
lr 0.1, ×0.1 after epochs 20 and 30, batch 64, wd 0** — a schedule that converges a linear layer
on 5k–100k frozen features and actually decays. The lr is the recipe's ``lr`` for every
architecture (RepDistiller's lower lr for MobileNetV2/ShuffleNets is about training those
networks, not a linear layer on them). Choices where the sources are silent:

* the new layer has PyTorch's default ``nn.Linear`` initialisation, seeded by (seed, "probe-init");
* training images get the target dataset's usual augmentation (crop 32 of the 4-px padded image +
  flip), so pooled features are recomputed every step (the backbone's forward only);
* every epoch ends with a test-set evaluation; ``acc_last`` (CRD's statistic) and ``acc_best``
  are recorded, as for any run.

Outputs (same schema as :func:`kdbench.engine.fit.fit`): ``metrics.json`` (status, acc_last,
acc_best, curve, provenance, spec, plus ``probe`` — the frozen file, its SHA-256, feature size),
``model.pt`` (the frozen backbone with the new layer) and a per-epoch ``checkpoint.pt`` from which a
killed probe resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from kdbench.data import load_dataset
from kdbench.engine.checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_model, read_file, save_model
from kdbench.core.io import atomic_torch_save, atomic_write_json, provenance
from kdbench.engine.optim import SGD
from kdbench.core.seeding import derive_seed, generator
from kdbench.core.spec import PROBE_RECIPE, Recipe, RunSpec
from kdbench.engine.device import resolve_device
from kdbench.engine.run import run_record
from kdbench.engine.step import NonFiniteLoss, evaluate

PROBE_LR_ARCH = "linear"  # Recipe.lr_at(…, arch): not a small-lr architecture, so recipe.lr applies


def _file_sha(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def frozen_backbone(path: str | Path, num_classes: int, device, seed: int = 0) -> tuple[nn.Module, nn.Linear]:
    """Load the model file, freeze it (eval mode, no gradients) and give it a new linear layer
    (PyTorch's default init, drawn right after ``torch.manual_seed(derive_seed(seed, "probe-init"))``)."""
    model = load_model(path, device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    torch.manual_seed(derive_seed(seed, "probe-init"))
    head = nn.Linear(model.classifier.in_features, num_classes).to(device)
    model.classifier = head  # the model's logits are now the probe's (for evaluate and model.pt)
    return model, head


def _probe_epoch(model: nn.Module, head: nn.Linear, optimizer: SGD, loader, gen: torch.Generator) -> dict:
    model.eval()  # BN statistics stay the distilled student's
    sums = torch.zeros(3, device=loader.device, dtype=torch.float64)
    for x, y, _ in loader.batches(gen):
        with torch.no_grad():
            feats = model(x).pooled
        logits = head(feats)
        loss = nn.functional.cross_entropy(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        n = x.shape[0]
        sums += torch.stack([loss.detach().double() * n, (logits.detach().argmax(1) == y).sum().double(),
                             torch.tensor(n, device=sums.device, dtype=torch.float64)])
    loss, correct, n = sums.tolist()
    if not loss == loss or abs(loss) == float("inf"):
        raise NonFiniteLoss(f"non-finite probe loss ({loss})")
    return {"loss": loss / n, "ce": loss / n, "train_acc": 100 * correct / n}


def fit_probe(spec: RunSpec, out_dir: str | Path, device: str = "auto", run_id: str | None = None,
              progress: bool = True, stop_after_epochs: int | None = None) -> dict:
    """Train the linear probe of ``spec.init_ckpt`` on ``spec.dataset``; write and return metrics."""
    if not getattr(spec, "init_ckpt", None):
        raise ValueError("a linear_probe run needs init_ckpt: the distilled student's model.pt")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    recipe = spec.recipe
    data = load_dataset(spec.dataset, spec.data_root)
    train_loader, test_loader = data.loaders(recipe.batch_size, recipe.test_batch_size, dev)
    model, head = frozen_backbone(spec.init_ckpt, data.num_classes, dev, spec.seed)
    if spec.student and getattr(model, "arch", spec.student) != spec.student:
        raise CheckpointError(f"{spec.init_ckpt}: holds a {model.arch!r} model, but the run names {spec.student!r}")
    optimizer = SGD(head.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    init_sha = _file_sha(spec.init_ckpt)
    key = f"{spec.config_hash()}:{init_sha}"
    state = {"epoch": 0, "curve": [], "elapsed": 0.0}
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists():
        ck = read_file(ckpt_path, CHECKPOINT_FORMAT)
        if ck["hash"] != key:
            raise CheckpointError(f"{ckpt_path}: belongs to another probe (config or frozen model changed); delete it")
        head.load_state_dict(ck["head"])
        optimizer.load_state_dict(ck["optimizer"])
        state = ck["state"]

    prov = provenance(dev)
    t0 = time.time() - state["elapsed"]
    status, failure, done_now = "ok", None, 0
    from tqdm.auto import tqdm
    bar = tqdm(total=recipe.epochs, initial=state["epoch"], disable=not progress, unit="ep",
               desc=f"probe {spec.student} on {spec.dataset} s{spec.seed}", dynamic_ncols=True)
    try:
        for epoch in range(state["epoch"] + 1, recipe.epochs + 1):
            optimizer.lr = recipe.lr_at(epoch, PROBE_LR_ARCH)
            gen = generator(dev, derive_seed(spec.seed, "data", "probe", epoch))
            stats = {"epoch": epoch, "lr": optimizer.lr, **_probe_epoch(model, head, optimizer, train_loader, gen)}
            test = evaluate(model, test_loader)
            stats.update(test_acc=test["top1"], test_acc5=test["top5"], test_loss=test["loss"])
            state["curve"].append(stats)
            state["epoch"], state["elapsed"] = epoch, time.time() - t0
            atomic_torch_save(ckpt_path, {"format": CHECKPOINT_FORMAT, "hash": key, "state": state,
                                          "head": head.state_dict(), "optimizer": optimizer.state_dict()})
            bar.update(1)
            bar.set_postfix_str(f"acc {stats['test_acc']:.2f}")
            done_now += 1
            if stop_after_epochs is not None and done_now >= stop_after_epochs:
                return {"status": "stopped", "state": state}
    except NonFiniteLoss as e:
        status, failure = "failed", str(e)
    finally:
        bar.close()

    metrics = run_record(spec, state, status, failure, run_id, data.num_classes, time.time() - t0, prov,
                         protocol="linear_probe", loss="CE (new linear layer on the frozen pooled feature)",
                         resolved_method={"name": "linear_probe", "ce": 1.0, "terms": {}, "params": {}},
                         probe={"init_ckpt": str(spec.init_ckpt), "init_sha256": init_sha, "init_id": spec.init_id,
                                "feature_dim": head.in_features, "image_size": data.info.image_size,
                                "frozen": "weights and BN statistics (eval mode)"})
    if status == "ok":
        save_model(out / "model.pt", model, model.arch, data.num_classes, spec.dataset, run=run_id,
                   acc_last=metrics["acc_last"], hash=spec.config_hash(), probe_of=str(spec.init_ckpt))
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def default_probe_recipe() -> dict:
    return dict(PROBE_RECIPE)


def main(argv: list[str] | None = None) -> int:
    d = default_probe_recipe()
    p = argparse.ArgumentParser(
        prog="kdbench probe", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Linear probe (CRD/DKD transfer protocol): freeze a trained model (weights and BN statistics) and "
                    "train a new linear layer on its pooled feature on another dataset, weight decay 0.",
        epilog="Example:\n  kdbench probe runs/cifar100/wrn_40_2--wrn_16_2/crd/seed0-xxxx/model.pt "
               "--dataset stl10 --root data/stl10 --out runs/probes/crd-stl10")
    p.add_argument("model", help="the frozen model's file (a run's model.pt, kdbench-model/1)")
    p.add_argument("--dataset", required=True, help="target dataset (e.g. stl10, tinyimagenet; `kdbench list datasets`)")
    p.add_argument("--root", required=True, help="the target dataset's root folder")
    p.add_argument("--out", required=True, help="output folder (metrics.json, model.pt, checkpoint.pt)")
    p.add_argument("--epochs", type=int, default=d["epochs"], help=f"epochs ({d['epochs']})")
    p.add_argument("--milestones", type=int, nargs="*", default=d["milestones"],
                   help=f"lr ×0.1 after these epochs ({' '.join(map(str, d['milestones']))})")
    p.add_argument("--lr", type=float, default=d["lr"], help=f"SGD lr ({d['lr']})")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help=f"batch size ({d['batch_size']})")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"],
                   help=f"weight decay ({d['weight_decay']}, as the DKD maintainers prescribe)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    from kdbench.data import DatasetMissingError
    from kdbench.core.registry import UnknownNameError
    try:
        from kdbench.engine.checkpoint import read_file as _read
        from kdbench.engine.checkpoint import MODEL_FORMAT
        arch = _read(a.model, MODEL_FORMAT)["arch"]
        recipe = Recipe.from_config({**d, "epochs": a.epochs, "milestones": a.milestones, "lr": a.lr,
                                     "batch_size": a.batch_size, "weight_decay": a.weight_decay})
        spec = RunSpec(a.dataset, a.root, arch, "student", a.seed, recipe=recipe, protocol="linear_probe",
                       init_ckpt=a.model)
        m = fit_probe(spec, a.out, a.device, run_id=None, progress=not a.quiet)
    except (CheckpointError, DatasetMissingError, UnknownNameError, ValueError) as e:
        print(f"kdbench probe: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: m.get(k) for k in ("status", "failure", "acc_last", "acc_best", "wall_time_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
