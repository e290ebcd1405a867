"""CC — correlation congruence (Peng et al. 2019, "Correlation Congruence for Knowledge
Distillation", ICCV 2019, arXiv 1904.01802), as RepDistiller's ``Correlation`` computes it.

The paper matches the b×b correlation matrices of student and teacher embeddings,
L_CC = ‖ψ(F_t) − ψ(F_s)‖²/b², with ψ a Taylor-expanded Gaussian-RBF kernel. RepDistiller instead runs code that the first author
e-mailed to its maintainer (methods.md §4.2), which we reproduce exactly:

    e_s = W_s·pooled_s + b_s,  e_t = W_t·pooled_t + b_t          (LinearEmbed, d → 128)
    δ_i = |e_s,i − e_t,i|,     L_CC = mean_{i=1..b−1} Σ_d δ_{i,d} · δ_{i+1,d}

i.e. the product of the embedding residuals of *consecutive* samples in the batch. Both
embeddings are trainable (they are optimised with the student); the teacher's pooled feature
itself is detached. Features: ``feat[-1]`` = ``pooled``; weight β = 0.02 (``-r 1 -a 0 -b 0.02``).

Choices: ``feat_dim`` = 128 (RepDistiller's ``--feat_dim``). The ordering of the batch matters
(pairs are consecutive samples), as in the reference code. "+KD" (``cc_kd``): ``-r 1 -a 1
-b 0.02``, KD at T = 4.
"""

from __future__ import annotations

from torch import Tensor

from kdbench.core.features import Features
from kdbench.methods.adapters import LinearEmbed
from kdbench.methods.base import Batch, DistillLoss, MethodContext, register_loss, register_method


def correlation_congruence(e_s: Tensor, e_t: Tensor) -> Tensor:
    delta = (e_s - e_t).abs()
    return (delta[:-1] * delta[1:]).sum(1).mean()


@register_loss("cc")
class CC(DistillLoss):
    teacher_needs = frozenset({"pooled"})

    def __init__(self, ctx: MethodContext, feat_dim: int = 128):
        super().__init__(ctx)
        self.embed_s = LinearEmbed(ctx.student.pooled, feat_dim)
        self.embed_t = LinearEmbed(ctx.teacher.pooled, feat_dim)

    def forward(self, s: Features, t: Features, batch: Batch) -> Tensor:
        e_s = self.embed_s(s.pooled.float()).float()
        e_t = self.embed_t(t.pooled.detach().float()).float()
        return correlation_congruence(e_s, e_t)


_PAPER = "Peng et al. 2019, arXiv 1904.01802"
register_method("cc", ce=1.0, terms={"cc": 0.02}, params={"cc": {"feat_dim": 128}}, paper=_PAPER,
                doc="RepDistiller -r 1 -a 0 -b 0.02, trainable LinearEmbed(d→128) on both pooled features.")
register_method("cc_kd", ce=1.0, terms={"kd": 1.0, "cc": 0.02}, params={"kd": {"T": 4.0}, "cc": {"feat_dim": 128}},
                paper=_PAPER, doc="CC+KD: RepDistiller -r 1 -a 1 -b 0.02 (the CRD paper's '+KD' convention), T = 4.")
