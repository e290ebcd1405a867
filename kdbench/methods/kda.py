"""KDA: knowledge distillation by approximated kernel transfer (Qian, Li & Hu, arXiv 2009.14416;
v2 "Improved Knowledge Distillation via Full Kernel Matrix Transfer", SDM 2022).

The full kernel K = F Fᵀ of a layer is approximated with the Nyström method; with the L class
centroids as landmarks D the partial kernel is C = F Dᵀ (B×L), and ‖K_S − K_T‖_F is bounded by
O(‖C_S − C_T‖_F) (paper Corollary 2). The term follows the official code (idstcv/KDA ``loss.py``,
``main_kda.py``), the only exact specification:

    C_S = f_s · D_sᵀ,   C_T = f_t · D_tᵀ,   L_KDA = smooth_l1(C_S, C_T; sum, beta) / ‖C_T‖_F

* D_s, D_t are per-class means of each network's *own* features (never the classifier weights)
  accumulated over the previous training epoch in train mode, frozen within an epoch, zero at
  the start. They are buffers, so a resumed run continues with the same centroids.
* Loss is off (a grad-compatible zero) while ``batch.epoch <= warmup_epochs`` (official: 5);
  the centroids are accumulated in every epoch, warm-up included.
* Choices where the code is silent or unusable here: class counts are taken per epoch (equal to
  the official first-epoch counts when every epoch visits every sample once; correct if a loader
  drops its last batch); a class never seen in an epoch keeps a zero centroid (official: NaN);
  ‖C_T‖_F is clamped at 1e-12, so the loss is exactly 0 before any centroids exist; sums use a
  one-hot matmul (deterministic on GPU, unlike index_add_); float32 with autocast disabled.
* The v1 paper's loss form and its "after FC" landmarks are unknown (methods.md §5.1); "after
  FC" here is the same loss on the logits with logit centroids. α = 0.04 is the official value
  at batch 256 and 100 classes; the summed loss scales like √(B·L) in its L1 regime.

``layer`` picks ``"pooled"`` (before the last FC) or ``"logits"`` (after it). A method holds
one instance per term name, so "Combo" (both layers) uses the second name ``kda_logits``,
the same class with ``layer="logits"`` by default.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.core import distributed
from kdbench.core.features import Features
from kdbench.methods.base import Batch, DistillLoss, MethodContext, register_loss, register_method

LAYERS = ("pooled", "logits")


@register_loss("kda")
class KDA(DistillLoss):
    default_layer = "pooled"
    needs_labels = True  # class centroids

    @classmethod
    def needs_for(cls, params: dict) -> frozenset[str]:
        return frozenset({params.get("layer", cls.default_layer)})

    def __init__(self, ctx: MethodContext, layer: str | None = None, warmup_epochs: int = 5,
                 beta: float = 1.0):
        super().__init__(ctx)
        layer = layer or self.default_layer
        if layer not in LAYERS:
            raise ValueError(f"KDA layer {layer!r} is not one of {LAYERS}")
        if ctx.teacher is None:
            raise ValueError("KDA needs a teacher")
        self.layer, self.warmup_epochs, self.beta = layer, int(warmup_epochs), float(beta)
        self.teacher_needs = self.needs_for({"layer": layer})
        n = ctx.num_classes
        d_s = math.prod(getattr(ctx.student, layer))
        d_t = math.prod(getattr(ctx.teacher, layer))
        # landmarks used in the current epoch, and the sums/counts that become the next ones
        self.register_buffer("center_s", torch.zeros(n, d_s))
        self.register_buffer("center_t", torch.zeros(n, d_t))
        self.register_buffer("sum_s", torch.zeros(n, d_s))
        self.register_buffer("sum_t", torch.zeros(n, d_t))
        self.register_buffer("count", torch.zeros(n))

    @torch.no_grad()
    def accumulate(self, f_s: Tensor, f_t: Tensor, y: Tensor) -> None:
        onehot_T = F.one_hot(y, self.count.numel()).float().t()  # L×B; a matmul is deterministic
        self.sum_s += onehot_T @ f_s
        self.sum_t += onehot_T @ f_t
        self.count += onehot_T.sum(1)

    def on_epoch_end(self, epoch: int) -> None:
        # under DDP: centroids of the whole epoch, equal on every rank
        for buf in (self.sum_s, self.sum_t, self.count):
            distributed.all_reduce_sum(buf)
        n = self.count.clamp_min(1).unsqueeze(1)
        self.center_s.copy_(self.sum_s / n)
        self.center_t.copy_(self.sum_t / n)
        for buf in (self.sum_s, self.sum_t, self.count):
            buf.zero_()

    def forward(self, s: Features, t: Features, batch: Batch) -> Tensor:
        with torch.autocast(batch.y.device.type, enabled=False):
            f_s = getattr(s, self.layer).float().flatten(1)
            f_t = getattr(t, self.layer).float().flatten(1).detach()
            if self.training:
                self.accumulate(f_s.detach(), f_t, batch.y)
            if batch.epoch <= self.warmup_epochs:
                return f_s.sum() * 0.0
            c_s = f_s @ self.center_s.t()
            c_t = f_t @ self.center_t.t()
            loss = F.smooth_l1_loss(c_s, c_t, reduction="sum", beta=self.beta)
            return loss / torch.linalg.matrix_norm(c_t).clamp_min(1e-12)


@register_loss("kda_logits")
class KDALogits(KDA):
    """KDA after the FC layer: the second term of "Combo"."""

    default_layer = "logits"


PAPER = "Qian, Li & Hu, arXiv 2009.14416 (official code idstcv/KDA)"
_KDA = {"kda": 0.04}
_KDA_AFTER = {"kda_logits": 0.04}
register_method("kda_before", ce=1.0, terms=_KDA, paper=PAPER,
                doc="CE + 0.04·KDA on the pooled features (official code: α 0.04, 5 warm-up epochs).")
register_method("kda_after", ce=1.0, terms=_KDA_AFTER, paper=PAPER,
                doc="CE + 0.04·KDA on the logits (v1 'After FC'; landmark form assumed, methods.md §5.1).")
register_method("kda_combo", ce=1.0, terms={**_KDA, **_KDA_AFTER}, paper=PAPER,
                doc="v1 'Combo': KDA before and after the FC, each weighted 0.04 (v1 weights unknown).")
# "+KD": RepDistiller's +KD convention (CRD+KD is -r 1 -a 1 -b β): CE 1, KD 1 at T = 4, KDA 0.04.
# The KDA paper's own KD weight and temperature are unknown (methods.md §5.1); override freely.
for _name, _terms in (("kda_before", _KDA), ("kda_after", _KDA_AFTER), ("kda_combo", {**_KDA, **_KDA_AFTER})):
    register_method(f"{_name}_kd", ce=1.0, terms={"kd": 1.0, **_terms}, params={"kd": {"T": 4.0}},
                    paper=PAPER, doc=f"{_name} + KD (weight 1, T 4; RepDistiller's +KD convention, assumed).")
