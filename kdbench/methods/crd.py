"""CRD, contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020).

Student and teacher penultimate features are embedded (``Embed``: Linear → 128, L2-normalised)
as v_s, v_t. Each side is contrasted against a memory bank of the *other* side's embeddings
(one row per training sample) with the NCE objective of the paper (Eq. 18 as coded in
RepDistiller ``crd/criterion.py`` and ``crd/memory.py``):

    P(i | v) = exp(⟨mem[i], v⟩ / τ) / Z            (Z fixed from the first batch:
                                                     Z = mean(exp(⟨mem, v⟩/τ)) · N)
    L_side = −(1/B) Σ_b [ log P_pos/(P_pos + K/N + ε) + Σ_k log (K/N)/(P_neg_k + K/N + ε) ]
    L_CRD = L_student-anchor (teacher bank) + L_teacher-anchor (student bank),   ε = 1e-7

Contrast indices: column 0 is the sample's own index (RepDistiller mode ``exact``), then K
negatives drawn uniformly from training samples of *other classes* (``cls_negative``). After
the loss each bank row of the batch is updated: mem[i] ← normalise(m·mem[i] + (1−m)·v).

Defaults: feat_dim 128, nce_k 16384, nce_t 0.07, nce_m 0.5 (RepDistiller CIFAR-100). Choices:
- negatives are drawn on the data device with ``batch.generator``; ``replace=False`` (default)
  draws them as RepDistiller's ``np.random.choice(cls_negative[target], K, replace=K >
  len(cls_negative[target]))`` does: without replacement where the sample's class has at least K
  other-class samples (the K smallest of per-row uniform keys; rows are processed in chunks to
  bound memory for ImageNet-sized N), with replacement where it has fewer (small training sets,
  e.g. 16384 negatives from STL-10's 4,500 other-class images); ``replace=True`` draws every row
  with replacement (cheaper: O(B·K)). nce_k is never reduced;
- banks and Z are buffers (checkpointed); Z is set on the first training batch without a host
  synchronisation; banks and Z change only in training mode.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.core import distributed
from kdbench.core.features import Features
from kdbench.methods.adapters import Embed
from kdbench.methods.base import Batch, DistillLoss, MethodContext, register_loss, register_method

EPS = 1e-7


def nce_scores(v: Tensor, memory: Tensor, contrast_idx: Tensor, T: float) -> Tensor:
    """exp(⟨memory[contrast_idx[b, k]], v[b]⟩ / T)  ->  [B, K+1] (memory is not differentiated)."""
    return torch.exp(torch.bmm(memory[contrast_idx].detach(), v.unsqueeze(2)).squeeze(2) / T)


def nce_loss(P: Tensor, n_data: int) -> Tensor:
    """RepDistiller ``ContrastLoss``: column 0 is the positive, the rest are K noise samples."""
    m_pn = (P.shape[1] - 1) / n_data
    log_d1 = torch.log(P[:, 0] / (P[:, 0] + m_pn + EPS))
    log_d0 = torch.log(m_pn / (P[:, 1:] + m_pn + EPS))
    return -(log_d1.sum() + log_d0.sum()) / P.shape[0]


@torch.no_grad()
def momentum_update(memory: Tensor, idx: Tensor, v: Tensor, momentum: float) -> None:
    """mem[i] <- L2normalise(m·mem[i] + (1 − m)·v) for the rows ``idx`` of the batch."""
    new = memory[idx] * momentum + v.detach().to(memory.dtype) * (1 - momentum)
    memory.index_copy_(0, idx, F.normalize(new, dim=1))


class OtherClassSampler(torch.nn.Module):
    """Uniform draws of training indices whose label differs from a given label, on device."""

    def __init__(self, labels: Tensor, replace: bool = False, max_chunk: int = 1 << 24):
        super().__init__()
        labels = labels.long().flatten()
        counts = torch.bincount(labels)
        self.register_buffer("labels", labels, persistent=False)
        self.register_buffer("order", torch.argsort(labels, stable=True), persistent=False)  # grouped by class
        self.register_buffer("count", counts, persistent=False)
        self.register_buffer("start", torch.cumsum(counts, 0) - counts, persistent=False)
        self.replace, self.max_chunk = bool(replace), int(max_chunk)
        #: the fewest and the most other-class samples of any class present
        self.min_available = int(labels.numel() - counts.max())
        self.max_available = int(labels.numel() - counts[counts > 0].min())

    def forward(self, y: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """[len(y), k] indices of other-class samples: without replacement per row where the
        row's class has ≥ k of them and ``replace`` is off, else with replacement."""
        y = y.long()
        if self.replace or k > self.max_available:  # every row draws with replacement
            return self._with_replacement(y, k, generator)
        exact = self._without_replacement(y, k, generator)
        if k <= self.min_available:
            return exact
        short = (self.labels.numel() - self.count[y] < k).unsqueeze(1)  # RepDistiller's replace=True rows
        return torch.where(short, self._with_replacement(y, k, generator), exact)

    def _with_replacement(self, y: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
        n_other = (self.labels.numel() - self.count[y]).unsqueeze(1)  # rank r among the other classes'
        u = torch.rand(y.numel(), k, generator=generator, device=y.device, dtype=torch.float64)
        r = (u * n_other).long().clamp_max(n_other - 1)
        r = r + (r >= self.start[y].unsqueeze(1)) * self.count[y].unsqueeze(1)  # -> position in `order`
        return self.order[r]

    def _without_replacement(self, y: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
        rows = max(1, self.max_chunk // self.labels.numel())
        out = []
        for yc in y.split(rows):  # K smallest iid keys among other-class samples: a uniform K-subset
            keys = torch.rand(yc.numel(), self.labels.numel(), generator=generator, device=y.device)
            keys.masked_fill_(self.labels.unsqueeze(0) == yc.unsqueeze(1), 2.0)
            out.append(keys.topk(k, dim=1, largest=False, sorted=False).indices)
        return torch.cat(out)


@register_loss("crd")
class CRD(DistillLoss):
    teacher_needs = frozenset({"pooled"})
    needs_labels = True  # memory bank by training-set index, other-class negatives

    def __init__(self, ctx: MethodContext, feat_dim: int = 128, nce_k: int = 16384, nce_t: float = 0.07,
                 nce_m: float = 0.5, replace: bool = False):
        super().__init__(ctx)
        self.embed_s = Embed(ctx.student.pooled, feat_dim)
        self.embed_t = Embed(ctx.teacher.pooled, feat_dim)
        self.sampler = OtherClassSampler(ctx.train_labels, replace)
        self.n_data = ctx.num_train
        if self.sampler.min_available < 1:
            raise ValueError("CRD draws negatives from other classes, but some class has no other-class "
                             "training samples (the training labels hold a single class)")
        self.nce_k, self.nce_t, self.nce_m = int(nce_k), float(nce_t), float(nce_m)
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(self.n_data, feat_dim).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("memory_t", torch.rand(self.n_data, feat_dim).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("Z_s", torch.tensor(-1.0))  # < 0: not set yet
        self.register_buffer("Z_t", torch.tensor(-1.0))

    def used_params(self) -> dict:
        """The parameters as this run uses them (metrics.json ``used``): nce_k as drawn."""
        return {"nce_k": self.nce_k}

    def contrast_indices(self, index: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """[B, 1 + nce_k]: the sample's own index, then other-class negatives."""
        index = index.long()
        neg = self.sampler(self.sampler.labels[index], self.nce_k, generator)
        return torch.cat([index.unsqueeze(1), neg], dim=1)

    def _normaliser(self, Z: Tensor, scores: Tensor) -> Tensor:
        mean = scores.detach().mean()
        if distributed.current().enabled:  # the mean over the global batch, as in one process
            local = scores.detach()
            total = distributed.all_reduce_sum(torch.stack([local.sum(), local.new_full((), local.numel())]))
            mean = total[0] / total[1]
        Z_new = torch.where(Z < 0, mean * self.n_data, Z)
        if self.training:
            Z.copy_(Z_new)
        return Z_new

    def forward(self, s: Features, t: Features, batch: Batch) -> Tensor:
        v_s = self.embed_s(s.pooled.float())
        v_t = self.embed_t(t.pooled.detach().float())
        index = batch.index.long()
        # under DDP: the negatives of the whole global batch, drawn from the epoch's generator as
        # one process draws them (every rank holds the same generator), then this rank's rows
        all_index, start = distributed.all_gather_rows(index)
        idx = self.contrast_indices(all_index, batch.generator)[start:start + index.numel()]
        with torch.autocast(v_s.device.type, enabled=False):  # exp(·/0.07) needs float32 scores
            v_s, v_t = v_s.float(), v_t.float()
            e_s = nce_scores(v_s, self.memory_t, idx, self.nce_t)  # student anchor, teacher bank
            e_t = nce_scores(v_t, self.memory_s, idx, self.nce_t)  # teacher anchor, student bank
            loss = (nce_loss(e_s / self._normaliser(self.Z_s, e_s), self.n_data)
                    + nce_loss(e_t / self._normaliser(self.Z_t, e_t), self.n_data))
        if self.training:  # under DDP every rank applies the global batch's update: the banks stay equal
            v_s, v_t = (distributed.all_gather_rows(v.detach())[0] for v in (v_s, v_t))
            momentum_update(self.memory_s, all_index, v_s, self.nce_m)
            momentum_update(self.memory_t, all_index, v_t, self.nce_m)
        return loss


register_method("crd", ce=1.0, terms={"crd": 0.8},
                params={"crd": {"feat_dim": 128, "nce_k": 16384, "nce_t": 0.07, "nce_m": 0.5}},
                paper="Tian et al. ICLR 2020, arXiv 1910.10699",
                doc="RepDistiller -r 1 -a 0 -b 0.8 (mode exact, negatives from other classes).")
register_method("crd_kd", ce=1.0, terms={"kd": 1.0, "crd": 0.8},
                params={"kd": {"T": 4.0}, "crd": {"feat_dim": 128, "nce_k": 16384, "nce_t": 0.07, "nce_m": 0.5}},
                paper="Tian et al. ICLR 2020, arXiv 1910.10699",
                doc="CRD+KD: RepDistiller -r 1 -a 1 -b 0.8 (KD T 4).")
