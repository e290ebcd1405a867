"""The ``linear_probe`` transfer protocol (CRD Table 4; DKD's transfer table).

A student distilled on CIFAR-100 is **frozen** — its weights *and* its BatchNorm running
statistics: it stays in eval mode and its weights take no gradient — and only a new linear layer on its
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

A probe is a run like any other (:class:`ProbeRun`, a :class:`~kdbench.engine.run.TrainingRun`
whose student is the frozen backbone with the new layer and whose objective is CE): trained by
:func:`kdbench.engine.fit.fit` through the one loop, inside its run folder's lock. Outputs (same
schema as any run): ``metrics.json`` (status, acc_last, acc_best, curve, provenance, spec, plus
``probe`` — the frozen file, its SHA-256, feature size), ``model.pt`` (the frozen backbone with the
new layer) and a per-epoch ``checkpoint.pt`` from which a killed probe resumes (it restarts if the
probed model file changed).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kdbench.engine.checkpoint import CheckpointError, load_model
from kdbench.methods import Objective, resolve_method
from kdbench.core.io import file_sha256
from kdbench.core.seeding import derive_seed
from kdbench.engine.run import TrainingRun, sgd

PROBE_LR_ARCH = "linear"  # Recipe.lr_at(…, arch): not a small-lr architecture, so recipe.lr applies


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


class ProbeRun(TrainingRun):
    """A ``linear_probe`` run: the student is the frozen model of ``spec.init_ckpt`` with a new
    linear layer (:func:`frozen_backbone`), the objective plain CE, the optimizer over the new layer
    only; its one stage is named ``probe`` and keeps the whole model in eval mode (the backbone's
    BN statistics stay the distilled student's; the frozen weights get no gradient, so the step's
    forward pass builds no graph through them)."""

    main_stage = "probe"

    def _build_models(self) -> None:
        spec, dev = self.spec, self.device
        self.student, self.head = frozen_backbone(spec.init_ckpt, self.data.num_classes, dev, spec.seed)
        if spec.student and getattr(self.student, "arch", spec.student) != spec.student:
            raise CheckpointError(f"{spec.init_ckpt}: holds a {self.student.arch!r} model, but the run names "
                                  f"{spec.student!r}")
        self.teacher = None
        self.objective = Objective(resolve_method("student"), None).to(dev)  # CE: no term reads the context
        self.lr_arch = PROBE_LR_ARCH
        self.base_lr = spec.recipe.base_lr(PROBE_LR_ARCH)
        self.optimizer = sgd(list(self.head.parameters()), self.base_lr, spec.recipe)
        self.execution.prepare(self.student)
        self.execution_used = spec.execution

    def inputs(self) -> dict:
        return {**super().inputs(), "init": file_sha256(self.spec.init_ckpt)}

    def stage_train_modules(self, term) -> list:
        return []  # nothing in train mode

    def epoch_stats(self) -> dict:
        stats = super().epoch_stats()
        # as the probe has always computed it: 100·correct/n (the run's: 100·(correct/n), another rounding)
        stats["train_acc"] = 100 * self.sums[-1].item() / self.train_loader.num_samples
        return stats

    def record(self) -> dict:
        spec = self.spec
        return dict(protocol="linear_probe", loss="CE (new linear layer on the frozen pooled feature)",
                    resolved_method={"name": "linear_probe", "ce": 1.0, "terms": {}, "params": {}},
                    probe={"init_ckpt": str(spec.init_ckpt), "init_sha256": self.read["init"], "init_id": spec.init_id,
                           "feature_dim": self.head.in_features, "image_size": self.data.info.image_size,
                           "frozen": "weights and BN statistics (eval mode)"})

    def model_meta(self) -> dict:
        return {"probe_of": str(self.spec.init_ckpt)}
