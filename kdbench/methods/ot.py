"""OT-KD: "Model Compression Using Optimal Transport" (Lohit & Jones, WACV 2022, arXiv 2012.03907).

For a batch of b samples and a layer, C_ij = 1 − cos(x_i, y_j) between student item i and
teacher item j; L_OT = min_{T ≥ 0, T1 = Tᵀ1 = 1/b} Σ T_ij C_ij, summed over layers (poster
eq. for L). Two relaxations (poster "Relaxations of OT for KD"):

* ``remd``: relaxed EMD (Kusner et al. 2015), each relaxation keeps one marginal:
      L_REMD = (1/b) · max(Σ_i min_j C_ij, Σ_j min_i C_ij)   (a lower bound of L_OT)
  closed form, gradient through the arg-min entries.
* ``ipot``: inexact proximal-point OT (Xie et al., UAI 2019): N outer proximal steps, each with L
  Sinkhorn steps on G ⊙ T, G = exp(−C/β); the plan is computed without gradient and the loss is
  Σ T ⊙ C (gradient through C only). It converges to the exact OT plan as N grows.

Layers (``layers``): ``"pooled"``, ``"logits"``, ``"stage:K"`` or ``"preact:K"`` (``Features
.stages[K]`` / ``.preact[K]``, K may be negative, each sample's map flattened to a vector).
Where student and teacher dimensions differ at a layer, both go through a trainable, shape-derived
``Embed`` (Linear → ``embed_dim`` + L2 norm, CRD's); ``embed="always"`` forces it, ``"never"``
forbids it. On a flattened stage map that Linear is large (ShuffleV2 stage 1: 29,696 → 128).
Costs and plans are computed in float32 (plan: float64) with autocast disabled.

Unknown in the paper (methods.md §5.3), chosen here and overridable: layers = pooled only (one
survey says "penultimate layer"); β, N, L = 0.5, 50, 1 (reference IPOT code); the OT weight
α = 1 (RepDistiller's weights put a feature term at O(1) at the start; the cosine cost of
post-ReLU pooled features starts around 0.2–0.5, so 1–3 is the plausible range: tune it);
the KD weight γ = 1 at T = 4 (RepDistiller's +KD convention, which the paper's CRD+KD baseline
rows come from); CRD keeps its own weight 0.8 in the +CRD rows.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.features import Features
from .adapters import Embed
from .base import Batch, DistillLoss, MethodContext, register_loss, register_method


def cosine_cost(x: Tensor, y: Tensor) -> Tensor:
    """C_ij = 1 − cos(x_i, y_j) for row vectors x (b×d) and y (b'×d)."""
    return 1.0 - F.normalize(x, dim=1) @ F.normalize(y, dim=1).t()


def remd_cost(c: Tensor) -> Tensor:
    """(1/b)·max(Σ_i min_j C_ij, Σ_j min_i C_ij) for a square b×b cost."""
    return torch.maximum(c.min(1).values.sum(), c.min(0).values.sum()) / c.shape[0]


@torch.no_grad()
def ipot_plan(c: Tensor, beta: float = 0.5, n_outer: int = 50, n_inner: int = 1) -> Tensor:
    """IPOT transport plan for uniform marginals (Xie et al. 2019, Algorithm 1), in float64."""
    c = c.detach().double()
    n, m = c.shape
    mu = torch.full((n,), 1.0 / n, dtype=c.dtype, device=c.device)
    nu = torch.full((m,), 1.0 / m, dtype=c.dtype, device=c.device)
    sigma = nu.clone()
    plan = torch.ones_like(c)
    g = torch.exp(-c / beta)
    for _ in range(n_outer):
        q = g * plan
        for _ in range(n_inner):
            delta = mu / (q @ sigma)
            sigma = nu / (q.t() @ delta)
        plan = delta[:, None] * q * sigma[None, :]
    return plan


FIELDS = {"pooled": "pooled", "logits": "logits", "stage": "stages", "preact": "preact"}


def pick(record, layer: str):
    """The entry of a ``Features`` or ``FeatureShapes`` named by ``layer`` ("stage:K" = stages[K])."""
    kind, _, k = layer.partition(":")
    value = getattr(record, FIELDS[kind])
    return value[int(k)] if k else value


class OTLoss(DistillLoss):
    """Sum over ``layers`` of an OT cost between the student's and the teacher's batch."""

    @classmethod
    def needs_for(cls, params: dict) -> frozenset[str]:
        layers = params.get("layers", ("pooled",))
        layers = [layers] if isinstance(layers, str) else layers
        return frozenset(FIELDS[f] for f in (la.partition(":")[0] for la in layers) if f in FIELDS)

    def __init__(self, ctx: MethodContext, layers=("pooled",), embed: str = "auto", embed_dim: int = 128):
        super().__init__(ctx)
        self.layers = [layers] if isinstance(layers, str) else list(layers)
        if embed not in ("auto", "always", "never"):
            raise ValueError(f"embed={embed!r}; valid: auto, always, never")
        bad = [la for la in self.layers if not re.fullmatch(r"pooled|logits|(stage|preact):-?\d+", la)]
        if bad or not self.layers:
            raise ValueError(f"OT layers {bad or self.layers!r}; valid: 'pooled', 'logits', 'stage:K', 'preact:K' (K an integer)")
        self.teacher_needs = self.needs_for({"layers": self.layers})
        self.embed_s, self.embed_t = nn.ModuleDict(), nn.ModuleDict()
        for layer in self.layers:
            d_s, d_t = math.prod(pick(ctx.student, layer)), math.prod(pick(ctx.teacher, layer))
            if embed == "always" or (embed == "auto" and d_s != d_t):
                self.embed_s[layer] = Embed(d_s, embed_dim)
                self.embed_t[layer] = Embed(d_t, embed_dim)
            elif d_s != d_t:
                raise ValueError(f"OT layer {layer!r}: student dim {d_s} != teacher dim {d_t}; use embed='auto'")

    def cost(self, c: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, s: Features, t: Features, batch: Batch) -> Tensor:
        total = 0.0
        with torch.autocast(s.pooled.device.type, enabled=False):
            for layer in self.layers:
                x = pick(s, layer).float().flatten(1)
                y = pick(t, layer).float().flatten(1).detach()
                if layer in self.embed_s:
                    x, y = self.embed_s[layer](x), self.embed_t[layer](y)
                total = total + self.cost(cosine_cost(x, y))
        return total


@register_loss("remd")
class REMD(OTLoss):
    def cost(self, c: Tensor) -> Tensor:
        return remd_cost(c)


@register_loss("ipot")
class IPOT(OTLoss):
    def __init__(self, ctx: MethodContext, beta: float = 0.5, n_outer: int = 50, n_inner: int = 1, **kw):
        super().__init__(ctx, **kw)
        self.beta, self.n_outer, self.n_inner = float(beta), int(n_outer), int(n_inner)

    def cost(self, c: Tensor) -> Tensor:
        plan = ipot_plan(c, self.beta, self.n_outer, self.n_inner).to(c.dtype)
        return (plan * c).sum()


PAPER = "Lohit & Jones, WACV 2022, arXiv 2012.03907"
ALPHA, GAMMA = 1.0, 1.0  # unknown in the paper: see the module docstring
_KD_T = {"kd": {"T": 4.0}}
for _ot in ("remd", "ipot"):
    register_method(_ot, ce=1.0, terms={_ot: ALPHA}, paper=PAPER,
                    doc=f"CE + α·{_ot.upper()} on the pooled features (α = 1 chosen, not published).")
    register_method(f"{_ot}_kd", ce=1.0, terms={"kd": GAMMA, _ot: ALPHA}, params=_KD_T, paper=PAPER,
                    doc=f"CE + γ·KD (T 4) + α·{_ot.upper()} (α = γ = 1 chosen, not published).")
register_method("ipot_crd", ce=1.0, terms={"ipot": ALPHA, "crd": 0.8}, paper=PAPER,
                doc="CE + α·IPOT + 0.8·CRD (CRD at RepDistiller's weight; α chosen).")
register_method("ipot_crd_kd", ce=1.0, terms={"kd": GAMMA, "ipot": ALPHA, "crd": 0.8}, params=_KD_T, paper=PAPER,
                doc="CE + γ·KD (T 4) + α·IPOT + 0.8·CRD (α = γ = 1 chosen).")
