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

Layers (``layers``, the poster's l = 1..l_max, which it does not name): a string or a list of
items, "+" joining items in a string: ``"stages"`` (every stage output after the stem,
``Features.stages[1:]`` = RepDistiller's ``feat[1:-1]``, paired from the first as AT and NST
do), ``"pooled"``, ``"logits"``, ``"stage:K"`` or ``"preact:K"`` (``.stages[K]`` / ``.preact[K]``,
K may be negative). Default ``"stages"``; ``"stages+pooled"`` adds the penultimate feature under
the same α. The losses of the layers are summed. A stage map becomes one vector per sample:
where the two maps' sizes differ, the larger is average-pooled to the smaller (H, W)
(``pool_to_smaller``, as AT/NST/VID), then each sample's C·H·W values are flattened, so the
cosine compares whole maps position by position.

Adapters: the teacher's features are never transformed by a trained parameter. Where the
student's width differs from the teacher's (channels C of a map, or the vector length), a
student-side projection (1×1 convolution for maps, Linear for vectors) maps the student onto the
teacher's width. A trainable map on *both* sides could send every sample to one shared unit
vector and make the cost 0 without learning anything (OT has no negatives to prevent it).
``adapter="auto"`` projects only where widths differ, ``"always"`` at every layer, ``"never"``
refuses unequal widths.

Projection (``projection``, default ``"fixed"``; issue 26): the projection is a fixed random
semi-orthogonal matrix (orthonormal rows where the student is wider, orthonormal columns where
it is narrower; no bias), drawn once from the run's seed and kept as a buffer, never trained, so
the term has no parameters of its own that could lower its cost while the student learns
nothing. A full-rank fixed map loses nothing the student could not make up: any target in the
teacher's width is reached by some student feature. ``"trained"`` is the FitNet-style regressor
(a ``Projection`` trained with the student). Why not trained: on the maps of a real resnet32x4
teacher (briefly trained on the embedded data) and a ShuffleV2 student at initialisation, a
trained projection alone, the networks frozen, lowers even the centred cost to 0.50 (REMD) and
0.54 (IPOT) of its start after 2000 steps: a frozen random student's maps of the same images
allow a linear read-out of much of the teacher's, which the projection absorbs instead of the
student being taught (tests/test_methods_ot.py, the collapse test on real networks' maps).

Centring (``center``, default True; issue 26): before the cosine cost, each side's vectors are
centred over the batch, x_i − mean_k x_k and y_j − mean_k y_k (the teacher's mean is a constant;
the student's is differentiated through). Post-ReLU maps are nonnegative and share a common
direction (mean pairwise cosine 0.83–0.92 on trained CIFAR teachers), so with raw vectors a
student-side projection, or the student itself, that outputs that one direction scores well
against every teacher item with no per-sample signal (resnet32x4 → ShuffleV2, a trained
projection alone on frozen networks: REMD 2.93 → 0.24). Centring removes the batch's common
direction from both sides, so a constant output has zero vectors (cost 1) and only the
per-sample variation is compared; the cost stays the paper's 1 − cos, with uniform marginals, on
centred features. ``center=False`` is the literal cosine of the raw vectors. A batch of one
sample has zero centred vectors: cost 1, no gradient.
Costs and plans are computed in float32 (plan: float64) with autocast disabled.

Unknown in the paper (methods.md §3.2), chosen here and overridable: layers = stage outputs
(the poster sums L_OT over layers and solves OT "at intermediate layers"; which ones is not
said); the student-side projection, fixed; centring over the batch; β, N, L = 0.5, 50, 1 (reference IPOT code); the OT weight
α = 1 (RepDistiller's weights put a feature term at O(1) at the start: tune it, tune_ot.yaml);
the KD weight γ = 1 at T = 4 (RepDistiller's +KD convention, which the paper's CRD+KD baseline
rows come from); CRD keeps its own weight 0.8 in the +CRD rows.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.core.features import Features
from kdbench.methods.adapters import Projection, pool_to_smaller
from kdbench.methods.base import Batch, DistillLoss, MethodContext, register_loss, register_method


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


class FixedProjection(nn.Module):
    """A student-side projection that is not trained: a semi-orthogonal (t_width × s_width) weight
    from ``nn.init.orthogonal_`` (the run's seed), a buffer, no bias; 1×1 for maps, linear for vectors."""

    def __init__(self, s_width: int, t_width: int):
        super().__init__()
        weight = torch.empty(t_width, s_width)
        nn.init.orthogonal_(weight)
        self.register_buffer("weight", weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight[:, :, None, None]) if x.dim() == 4 else F.linear(x, self.weight)


PROJECTIONS = ("fixed", "trained")
FIELDS = {"pooled": "pooled", "logits": "logits", "stage": "stages", "preact": "preact", "stages": "stages"}
DEFAULT_LAYERS = "stages"
LAYER_CHOICES = "'stages', 'pooled', 'logits', 'stage:K', 'preact:K' (K an integer), joined by '+' or listed"


def layer_items(layers) -> list[str]:
    """The items of a ``layers`` value: a string ("+" joins items) or a list of such strings."""
    parts = [layers] if isinstance(layers, str) else list(layers)
    items = [item.strip() for part in parts for item in str(part).split("+")]
    bad = [item for item in items if not re.fullmatch(r"stages|pooled|logits|(stage|preact):-?\d+", item)]
    if bad or not items:
        raise ValueError(f"OT layers {layers!r}: {bad or 'empty'}; valid: {LAYER_CHOICES}")
    return items


def resolve_layers(layers, n_stages: int) -> list[str]:
    """Explicit layer names, "stages" expanded to stage:1 .. stage:n_stages-1; repeats refused."""
    out = []
    for item in layer_items(layers):
        out += [f"stage:{k}" for k in range(1, n_stages)] if item == "stages" else [item]
    if not out:
        raise ValueError(f"OT layers {layers!r}: the models have no stage output after the stem; use layers: pooled")
    repeated = sorted({la for la in out if out.count(la) > 1})
    if repeated:
        raise ValueError(f"OT layers {layers!r} name {repeated} twice; valid: {LAYER_CHOICES}")
    return out


def pick(record, layer: str):
    """The entry of a ``Features`` or ``FeatureShapes`` named by ``layer`` ("stage:K" = stages[K])."""
    kind, _, k = layer.partition(":")
    value = getattr(record, FIELDS[kind])
    return value[int(k)] if k else value


def compared_shapes(s_shape, t_shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-sample shapes after ``pool_to_smaller`` (maps) as ``OTLoss.forward`` compares them."""
    s_shape, t_shape = tuple(int(v) for v in s_shape), tuple(int(v) for v in t_shape)
    if len(s_shape) == 3 and len(t_shape) == 3:
        size = (min(s_shape[1], t_shape[1]), min(s_shape[2], t_shape[2]))
        return (s_shape[0], *size), (t_shape[0], *size)
    return s_shape, t_shape


class OTLoss(DistillLoss):
    """Sum over ``layers`` of an OT cost between the student's and the teacher's batch."""

    #: defaults written into every OT run's hashed overrides (kdbench.planning.suite): ``center``
    #: and ``projection`` came after runs were named and change the loss, so OT runs get new ids
    #: and old ones are not reused
    hashed_defaults = {"center": True, "projection": "fixed"}

    @classmethod
    def needs_for(cls, params: dict) -> frozenset[str]:
        return frozenset(FIELDS[item.partition(":")[0]] for item in layer_items(params.get("layers", DEFAULT_LAYERS)))

    def __init__(self, ctx: MethodContext, layers=DEFAULT_LAYERS, adapter: str = "auto", center: bool = True,
                 projection: str = "fixed"):
        super().__init__(ctx)
        if adapter not in ("auto", "always", "never"):
            raise ValueError(f"OT adapter={adapter!r}; valid: auto, always, never")
        if projection not in PROJECTIONS:
            raise ValueError(f"OT projection={projection!r}; valid: fixed (not trained, the default), trained")
        if not isinstance(center, bool):
            raise ValueError(f"OT center={center!r}; valid: true (centre each side over the batch), false")
        self.center = center
        self.teacher_needs = self.needs_for({"layers": layers})
        self.layers = resolve_layers(layers, min(len(ctx.student.stages), len(ctx.teacher.stages)))
        self.adapters = nn.ModuleDict()  # student side only: see the module docstring
        for layer in self.layers:
            try:
                s_shape, t_shape = compared_shapes(pick(ctx.student, layer), pick(ctx.teacher, layer))
            except IndexError:
                raise ValueError(f"OT layer {layer!r}: the student has {len(ctx.student.stages)} and the teacher "
                                 f"{len(ctx.teacher.stages)} stage outputs (stage:0 is the stem)") from None
            if len(s_shape) != len(t_shape) or s_shape[1:] != t_shape[1:]:
                raise ValueError(f"OT layer {layer!r}: student {s_shape} and teacher {t_shape} cannot be compared")
            if adapter == "always" or (adapter == "auto" and s_shape[0] != t_shape[0]):
                self.adapters[layer] = (FixedProjection(s_shape[0], t_shape[0]) if projection == "fixed"
                                        else Projection(s_shape, t_shape))
            elif s_shape[0] != t_shape[0]:
                raise ValueError(f"OT layer {layer!r}: student width {s_shape[0]} != teacher width {t_shape[0]}; "
                                 f"use adapter='auto' (a student-side projection)")

    def cost(self, c: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, s: Features, t: Features, batch: Batch) -> Tensor:
        total = 0.0
        with torch.autocast(s.pooled.device.type, enabled=False):
            for layer in self.layers:
                x, y = pick(s, layer).float(), pick(t, layer).float().detach()
                if x.dim() == 4:
                    x, y = pool_to_smaller(x, y)
                if layer in self.adapters:
                    x = self.adapters[layer](x)
                x, y = x.flatten(1), y.flatten(1)
                if self.center:
                    x, y = x - x.mean(0, keepdim=True), y - y.mean(0, keepdim=True)
                total = total + self.cost(cosine_cost(x, y))
        return total


@register_loss("remd")
class REMD(OTLoss):
    def cost(self, c: Tensor) -> Tensor:
        return remd_cost(c)


@register_loss("ipot")
class IPOT(OTLoss):
    def __init__(self, ctx: MethodContext, layers=DEFAULT_LAYERS, adapter: str = "auto", center: bool = True,
                 projection: str = "fixed", beta: float = 0.5, n_outer: int = 50, n_inner: int = 1):
        super().__init__(ctx, layers, adapter, center, projection)
        self.beta, self.n_outer, self.n_inner = float(beta), int(n_outer), int(n_inner)

    def cost(self, c: Tensor) -> Tensor:
        plan = ipot_plan(c, self.beta, self.n_outer, self.n_inner).to(c.dtype)
        return (plan * c).sum()


PAPER = "Lohit & Jones, WACV 2022, arXiv 2012.03907"
ALPHA, GAMMA = 1.0, 1.0  # unknown in the paper: see the module docstring
_KD_T = {"kd": {"T": 4.0}}
for _ot in ("remd", "ipot"):
    register_method(_ot, ce=1.0, terms={_ot: ALPHA}, paper=PAPER,
                    doc=f"CE + α·{_ot.upper()} summed over the stage outputs (α = 1 chosen, not published).")
    register_method(f"{_ot}_kd", ce=1.0, terms={"kd": GAMMA, _ot: ALPHA}, params=_KD_T, paper=PAPER,
                    doc=f"CE + γ·KD (T 4) + α·{_ot.upper()} (α = γ = 1 chosen, not published).")
register_method("ipot_crd", ce=1.0, terms={"ipot": ALPHA, "crd": 0.8}, paper=PAPER,
                doc="CE + α·IPOT + 0.8·CRD (CRD at RepDistiller's weight; α chosen).")
register_method("ipot_crd_kd", ce=1.0, terms={"kd": GAMMA, "ipot": ALPHA, "crd": 0.8}, params=_KD_T, paper=PAPER,
                doc="CE + γ·KD (T 4) + α·IPOT + 0.8·CRD (α = γ = 1 chosen).")
