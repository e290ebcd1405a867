"""OT-KD terms (kdbench/methods/ot.py): REMD and IPOT against loops and an exact OT solver."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from kdbench.methods import METHODS, Batch, MethodContext, build_objective
from kdbench.methods.ot import IPOT, REMD, cosine_cost, ipot_plan, remd_cost
from kdbench.models import build_model, feature_shapes
from kdbench.core.features import Features, FeatureShapes
from kdbench.planning.suite import SuiteError, load_suite

from conftest import write_suite

B = 6


def shapes(d, stage):
    return FeatureShapes((torch.Size([2, 4, 4]), torch.Size(stage)), (torch.Size([2, 4, 4]), torch.Size(stage)),
                         torch.Size([d]), torch.Size([10]))


def ctx(d_s=5, d_t=5, stage_s=(3, 4, 4), stage_t=(3, 4, 4)):
    return MethodContext(shapes(d_s, stage_s), shapes(d_t, stage_t), 10, torch.zeros(8, dtype=torch.long))


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def feats(pooled, stage):
    stem = torch.zeros(pooled.shape[0], 2, 4, 4)
    return Features([stem, stage], [stem, stage], pooled, torch.zeros(pooled.shape[0], 10))


BATCH = Batch(torch.zeros(B, 3, 4, 4), torch.zeros(B, dtype=torch.long), torch.arange(B))


def loop_cost(x, y):
    return np.array([[1 - np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)) for v in y] for u in x])


def centred_cost(x, y):
    """The terms' default cost (center=True): the cosine cost of each side's rows minus their mean."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return loop_cost(x - x.mean(axis=0), y - y.mean(axis=0))


def loop_remd(c):
    b = len(c)
    rows = sum(min(c[i][j] for j in range(b)) for i in range(b))
    cols = sum(min(c[i][j] for i in range(b)) for j in range(b))
    return max(rows, cols) / b


def loop_ipot(c, beta=0.5, n_outer=50):
    """methods.md §3.1's pseudo-code with L = 1, in numpy."""
    b = len(c)
    sigma, plan, g = np.ones(b) / b, np.ones((b, b)), np.exp(-c / beta)
    for _ in range(n_outer):
        q = g * plan
        delta = (1 / b) / (q @ sigma)
        sigma = (1 / b) / (q.T @ delta)
        plan = delta[:, None] * q * sigma[None, :]
    return (plan * c).sum()


def avg_pool(m, size):
    """Average-pool a (b, C, H, W) numpy map to (size, size) by block means (H a multiple of size)."""
    b, ch, h, w = m.shape
    return m.reshape(b, ch, size, h // size, size, w // size).mean(axis=(3, 5))


def exact_ot(c):
    r, k = linear_sum_assignment(c)  # uniform equal-size marginals: OT = optimal assignment / b
    return c[r, k].mean()


def test_cost_and_remd_golden_values():
    x, y = rand(B, 5, seed=1), rand(B, 5, seed=2)
    c = cosine_cost(x, y)
    np.testing.assert_allclose(c.numpy(), loop_cost(x.numpy(), y.numpy()), rtol=1e-12, atol=1e-12)
    assert remd_cost(c).item() == pytest.approx(loop_remd(c.numpy()), rel=1e-12)
    s, t = feats(x.float(), rand(B, 3, 4, 4, seed=3).float()), feats(y.float(), rand(B, 3, 4, 4, seed=4).float())
    raw = REMD(ctx(), layers="pooled", center=False)(s, t, BATCH)  # the paper's cosine of the raw vectors
    assert raw.item() == pytest.approx(loop_remd(c.numpy()), rel=1e-5)
    centred = REMD(ctx(), layers="pooled")(s, t, BATCH)  # the default: both sides centred over the batch
    assert centred.item() == pytest.approx(loop_remd(centred_cost(x.numpy(), y.numpy())), rel=1e-5)
    assert abs(centred.item() - raw.item()) > 0.01  # the two costs differ on these inputs
    # a shift common to the batch (the mean direction post-ReLU maps share) moves the raw cost, not the centred one
    shift = torch.full((1, 5), 3.0)
    moved = feats(x.float() + shift, s.stages[1]), feats(y.float() + shift, t.stages[1])
    assert REMD(ctx(), layers="pooled")(*moved, BATCH).item() == pytest.approx(centred.item(), rel=1e-5)
    assert REMD(ctx(), layers="pooled", center=False)(*moved, BATCH).item() < raw.item() - 0.1


@pytest.mark.parametrize("seed", range(4))
def test_remd_is_a_lower_bound_of_exact_ot(seed):
    c = cosine_cost(rand(7, 4, seed=seed), rand(7, 4, seed=seed + 100)).numpy()
    assert loop_remd(c) <= exact_ot(c) + 1e-12


@pytest.mark.parametrize("seed", range(3))
def test_ipot_approaches_exact_ot(seed):
    c = cosine_cost(rand(8, 5, seed=seed), rand(8, 5, seed=seed + 50))
    exact = exact_ot(c.numpy())
    err = {(beta, n): abs((ipot_plan(c, beta, n) * c).sum().item() - exact)
           for beta in (0.5, 0.1) for n in (10, 300, 3000)}
    for beta, tols in ((0.5, (0.1, 5e-3, 1e-6)), (0.1, (0.05, 1e-4, 1e-9))):
        for n, tol in zip((10, 300, 3000), tols):  # the tolerance shrinks with N and with smaller β
            assert err[beta, n] <= tol, (beta, n, err[beta, n])
    plan = ipot_plan(c, 0.5, 300)
    torch.testing.assert_close(plan.sum(0), torch.full((8,), 1 / 8, dtype=plan.dtype))
    torch.testing.assert_close(plan.sum(1), torch.full((8,), 1 / 8, dtype=plan.dtype), rtol=1e-3, atol=1e-4)


def test_ipot_term_is_plan_times_cost_with_gradient_through_cost_only():
    x, y = rand(B, 5, seed=7).float().requires_grad_(), rand(B, 5, seed=8).float().requires_grad_()
    stage = rand(B, 3, 4, 4, seed=9).float()
    term = IPOT(ctx(), beta=0.5, n_outer=50, n_inner=1, layers="pooled")
    loss = term(feats(x, stage), feats(y, stage), BATCH)
    yc = y.detach().double() - y.detach().double().mean(0)
    c = cosine_cost(x.detach().double() - x.detach().double().mean(0), yc)
    plan = ipot_plan(c, 0.5, 50, 1)
    assert loss.item() == pytest.approx((plan * c).sum().item(), rel=1e-5)
    assert loss.item() == pytest.approx(loop_ipot(centred_cost(x.detach().numpy(), y.detach().numpy())), rel=1e-5)
    loss.backward()
    x_ = x.detach().double().requires_grad_()
    (plan * cosine_cost(x_ - x_.mean(0), yc)).sum().backward()  # the plan is a constant; the student's mean is not
    torch.testing.assert_close(x.grad.double(), x_.grad, rtol=1e-4, atol=1e-6)
    assert y.grad is None


def test_remd_gradient_flows_through_argmin_entries():
    # row minima 0.05, 0.2, 0.3 (sum 0.55) beat column minima 0.1, 0.2, 0.05 (sum 0.35)
    c = torch.tensor([[0.1, 0.5, 0.05], [0.4, 0.2, 0.8], [0.7, 0.6, 0.3]], requires_grad=True)
    remd_cost(c).backward()
    want = torch.zeros(3, 3)
    want[0, 2] = want[1, 1] = want[2, 2] = 1 / 3
    torch.testing.assert_close(c.grad, want)


def test_unequal_widths_get_a_student_side_projection_and_the_teacher_stays_raw():
    """Student 5-d pooled and (3, 4, 4) map; teacher 9-d pooled and (6, 2, 2) map: the student
    map is pooled to 2×2 and 1×1-convolved to 6 channels, the pooled vector goes through a Linear
    5 → 9; the teacher's features enter the cost as they are (its map already the smaller)."""
    c = ctx(d_s=5, d_t=9, stage_s=(3, 4, 4), stage_t=(6, 2, 2))
    term = REMD(c, layers=["pooled", "stage:1"])
    assert set(term.adapters) == {"pooled", "stage:1"} and term.teacher_needs == {"pooled", "stages"}
    lin, conv = term.adapters["pooled"].map, term.adapters["stage:1"].map
    assert (lin.in_features, lin.out_features) == (5, 9)
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (3, 6, (1, 1))
    # every trainable parameter is one of these student-side maps: none can act on the teacher
    assert {id(p) for p in term.parameters()} == {id(p) for p in (lin.weight, lin.bias, conv.weight, conv.bias)}
    x, y = rand(B, 5, seed=1).float().requires_grad_(), rand(B, 9, seed=2).float().requires_grad_()
    fs, ft = rand(B, 3, 4, 4, seed=3).float().requires_grad_(), rand(B, 6, 2, 2, seed=4).float().requires_grad_()
    loss = term(feats(x, fs), feats(y, ft), BATCH)
    # independent: W x + b on the student; 2×2 block means then a per-pixel W·v + b on the student map
    w, bias = lin.weight.detach().double().numpy(), lin.bias.detach().double().numpy()
    want = loop_remd(centred_cost(x.detach().double().numpy() @ w.T + bias, y.detach().double().numpy()))
    cw, cb = conv.weight.detach().double().numpy()[:, :, 0, 0], conv.bias.detach().double().numpy()
    pooled_s = avg_pool(fs.detach().double().numpy(), 2)
    mapped = np.einsum("oc,bchw->bohw", cw, pooled_s) + cb[None, :, None, None]
    want += loop_remd(centred_cost(mapped.reshape(B, -1), ft.detach().double().numpy().reshape(B, -1)))
    assert loss.item() == pytest.approx(want, rel=1e-5)
    loss.backward()
    assert x.grad.abs().sum() > 0 and fs.grad.abs().sum() > 0 and y.grad is None and ft.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in term.parameters())
    same = IPOT(ctx(), layers="pooled")
    assert len(same.adapters) == 0 and IPOT(ctx(), adapter="always").adapters["stage:1"].map.out_channels == 3


def test_a_larger_teacher_map_is_pooled_not_projected():
    """Equal channels, teacher map 2× larger: the teacher is average-pooled (no parameter), no adapter."""
    term = IPOT(ctx(stage_s=(3, 2, 2), stage_t=(3, 4, 4)))
    assert term.layers == ["stage:1"] and len(term.adapters) == 0 and not list(term.parameters())
    fs, ft = rand(B, 3, 2, 2, seed=5), rand(B, 3, 4, 4, seed=6)
    pooled = torch.zeros(B, 5)
    got = term(feats(pooled, fs.float()), feats(pooled, ft.float()), BATCH).item()
    want = loop_ipot(centred_cost(fs.numpy().reshape(B, -1), avg_pool(ft.numpy(), 2).reshape(B, -1)))
    assert got == pytest.approx(want, rel=1e-4)


def three_stage_shapes(widths, sizes, d):
    maps = tuple(torch.Size([c, h, h]) for c, h in zip(widths, sizes))
    return FeatureShapes(maps, maps, torch.Size([d]), torch.Size([10]))


def three_stage_feats(shape, seed):
    maps = [rand(B, *s, seed=seed + k).float() for k, s in enumerate(shape.stages)]
    return Features(maps, maps, rand(B, *shape.pooled, seed=seed + 9).float(), torch.zeros(B, 10))


@pytest.mark.parametrize("layers,names", [("stages", [1, 2, 3]), ("stages+pooled", [1, 2, 3, "pooled"]),
                                          (["pooled"], ["pooled"]), (["stage:-1", "preact:1"], [3, 1])])
@pytest.mark.parametrize("cls", [REMD, IPOT])
def test_multi_layer_sum_golden(cls, layers, names):
    """The default is the poster's Σ_l over the stage outputs after the stem (stages[1:]); the sum
    is recomputed here with loops (REMD) / the numpy IPOT iteration, each map flattened per sample
    and centred over the batch."""
    sh = three_stage_shapes((2, 3, 4, 5), (8, 8, 4, 2), 7)
    term = cls(MethodContext(sh, sh, 10, torch.zeros(8, dtype=torch.long)), layers=layers)
    s, t = three_stage_feats(sh, 30), three_stage_feats(sh, 60)
    golden = loop_remd if cls is REMD else loop_ipot
    want = 0.0
    for k in names:
        a, b = (s.pooled, t.pooled) if k == "pooled" else (s.stages[k], t.stages[k])
        want += golden(centred_cost(a.double().flatten(1).numpy(), b.double().flatten(1).numpy()))
    assert term(s, t, BATCH).item() == pytest.approx(want, rel=1e-4)
    assert REMD(MethodContext(sh, sh, 10, torch.zeros(8, dtype=torch.long))).layers == ["stage:1", "stage:2", "stage:3"]


def test_layers_validation_and_teacher_needs():
    assert REMD.needs_for({}) == {"stages"} and REMD.needs_for({"layers": "stages+pooled"}) == {"stages", "pooled"}
    assert IPOT.needs_for({"layers": ["pooled", "logits"]}) == {"pooled", "logits"}
    assert IPOT.needs_for({"layers": "preact:1"}) == {"preact"}
    from kdbench.methods import resolve_method
    for layers in ("stages", "stages+pooled", "pooled", ["logits", "preact:-1"]):  # what the suite checks = what is built
        spec = resolve_method("ipot_kd", {"params": {"ipot": {"layers": layers}}})
        assert build_objective(spec, ctx()).teacher_needs == spec.teacher_needs, layers
    for bad in (["stage"], ["stage:x"], ["feat:1"], [], "stages+", "pool"):
        with pytest.raises(ValueError, match="valid: 'stages', 'pooled'"):
            REMD(ctx(), layers=bad)
    with pytest.raises(ValueError, match="the student has 2 and the teacher 2 stage outputs"):
        REMD(ctx(), layers="stage:2")
    with pytest.raises(ValueError, match="twice"):
        REMD(ctx(), layers="stages+stage:1")
    with pytest.raises(ValueError, match="adapter='auto'"):
        REMD(ctx(d_t=9), layers="pooled", adapter="never")
    with pytest.raises(ValueError, match="valid: auto, always, never"):
        REMD(ctx(), adapter="both")


def test_stage_maps_of_the_zoo_pair_resnet32x4_shufflev2():
    """The default layers on the one CIFAR pair of unequal widths: three 1×1 projections of the
    student's stages (116, 232, 464 channels → 64, 128, 256) and the teacher's maps pooled to 16, 8, 4."""
    t_sh, s_sh = feature_shapes(build_model("resnet32x4", 100)), feature_shapes(build_model("ShuffleV2", 100))
    obj = build_objective("ipot_kd", MethodContext(s_sh, t_sh, 100, torch.zeros(8, dtype=torch.long)))
    term = obj.terms["ipot"]
    assert obj.teacher_needs == {"logits", "stages"} and term.layers == ["stage:1", "stage:2", "stage:3"]
    assert [(a.map.in_channels, a.map.out_channels) for a in term.adapters.values()] == [(116, 64), (232, 128), (464, 256)]
    assert {id(p) for p in obj.parameters()} == {id(p) for p in term.adapters.parameters()}
    s = Features([torch.randn(4, *sh) for sh in s_sh.stages], [], torch.randn(4, 1024), torch.randn(4, 100))
    t = Features([torch.randn(4, *sh) for sh in t_sh.stages], [], torch.randn(4, 256), torch.randn(4, 100))
    assert torch.isfinite(term(s, t, BATCH))


# --------------------------------------------------------------------------- the collapse experiment
# Frozen random features with the resnet32x4 → ShuffleV2 shapes: pooled 1024 (student) vs 256
# (teacher), and the last stage maps (464, 4, 4) vs (256, 8, 8), the teacher's pooled to 4×4 (d =
# 4096). Each step draws a fresh batch: student features ~ ReLU(N(0, I)) (post-ReLU, like real
# ones), teacher features ~ N(0, I), independent of the student's. Only the term's own parameters
# train (SGD, RepDistiller's lr 0.05, momentum 0.9, wd 5e-4).
#
# Floor. Any student-side map sees only the student's batch, so its outputs z_1..z_b are independent
# of the teacher's batch, and a teacher vector's direction ŷ is uniform on the sphere S^{d-1}.
# Cap bound (Ball 1997, Lemma 2.2): P(cos(z, y) ≥ t) ≤ exp(−d t²/2) for a fixed unit z; a union
# over the b student items gives E[max_i cos(z_i, y)] ≤ t + b·exp(−d t²/2) (cos ≤ 1). Both costs
# are at least the column relaxation (1/b) Σ_j min_i C_ij: REMD is the max of it and the row
# relaxation; IPOT's plan has exact column sums 1/b. Hence per layer
#     E[cost] ≥ floor(d, b) = max_t (1 − t − b·exp(−d t²/2))
# (0.7295 for d = 256, b = 64; 0.9273 for d = 4096), whatever the adapter learns. A trainable map
# on the teacher side too breaks the independence: both maps can learn to output one shared
# direction, the cost falls towards 0 (measured on the two-sided design: ~0.8 for the two layers
# after 150 steps, against this floor of 1.62).
CB = 64
S_POOLED, T_POOLED, S_MAP, T_MAP = 1024, 256, (464, 4, 4), (256, 8, 8)


def floor(d, b=CB):
    t = np.linspace(0, 1, 100001)
    return float(np.max(1 - t - b * np.exp(-d * t ** 2 / 2)))


def collapse_ctx():
    def sh(stage, d):
        return FeatureShapes((torch.Size([2, 4, 4]), torch.Size(stage)), (torch.Size([2, 4, 4]), torch.Size(stage)),
                             torch.Size([d]), torch.Size([10]))
    return MethodContext(sh(S_MAP, S_POOLED), sh(T_MAP, T_POOLED), 10, torch.zeros(8, dtype=torch.long))


def draw(g, informative=False):
    """A student and a teacher batch; ``informative``: the student's pooled feature is a fixed
    linear image of the teacher's (so a projection has something to learn)."""
    t_pooled, t_map = torch.randn(CB, T_POOLED, generator=g), torch.randn(CB, *T_MAP, generator=g)
    if informative:
        mix = torch.randn(T_POOLED, S_POOLED, generator=torch.Generator().manual_seed(99)) / T_POOLED ** 0.5
        s_pooled = t_pooled @ mix
    else:
        s_pooled = torch.randn(CB, S_POOLED, generator=g).relu()
    s_map = torch.randn(CB, *S_MAP, generator=g).relu()
    return feats(s_pooled, s_map), feats(t_pooled, t_map)


def train_own_parameters(term, steps, informative=False):
    """SGD on the term's parameters alone; the mean cost over 8 fresh batches afterwards."""
    params = list(term.parameters())
    assert params, "the unequal widths must give the term trainable adapters"
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(1)
    batch = Batch(torch.zeros(CB, 3, 4, 4), torch.zeros(CB, dtype=torch.long), torch.arange(CB))
    for _ in range(steps):
        loss = term(*draw(g, informative), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return sum(term(*draw(g, informative), batch).item() for _ in range(8)) / 8


def test_floor_is_a_lower_bound_of_the_column_relaxation():
    """The derivation checked by sampling: at t = 0.25 the bound is 0.75 − 64·e^{−8} = 0.7285 ≤
    floor(256); student items that do not depend on the teacher batch (random directions, or all
    on one direction) give column relaxations above it."""
    assert 0.7285 <= floor(256) < 0.75 and 0.92 < floor(4096) < 1
    g = torch.Generator().manual_seed(5)
    y = torch.randn(200, CB, 256, generator=g, dtype=torch.float64)
    for z in (torch.randn(CB, 256, generator=g, dtype=torch.float64), torch.ones(CB, 256, dtype=torch.float64)):
        columns = torch.stack([cosine_cost(z, yy).min(0).values.mean() for yy in y])
        assert columns.mean().item() >= floor(256)


@pytest.mark.parametrize("cls", [REMD, IPOT])
def test_adapter_parameters_alone_cannot_zero_the_cost(cls):
    """The OT term's own parameters alone must not drive it to zero: 150 steps on the adapters
    leave the cost above floor(256) + floor(4096) (the old two-sided projections: ~0.8)."""
    torch.manual_seed(0)
    term = cls(collapse_ctx(), layers=["pooled", "stage:1"])
    cost = train_own_parameters(term, 150)
    assert cost >= floor(T_POOLED) + floor(4096), cost


def test_the_projection_learns_when_the_student_carries_the_teachers_information():
    """Control for the floor test: the same adapter does reduce the cost below its floor when the
    student's pooled feature is a linear image of the teacher's (a real signal to regress)."""
    torch.manual_seed(0)
    term = REMD(collapse_ctx(), layers="pooled")
    before = train_own_parameters(term, 0, informative=True)
    after = train_own_parameters(term, 600, informative=True)  # centred, it starts slower: ~0.85 at 400 steps
    assert before > floor(T_POOLED) > after, (before, after)


# ------------------------------------------------ the collapse experiment on realistic features
# N(0, I) teacher features are zero-mean; real post-ReLU maps are not. Measured (issue 26): on real
# runs the teacher's maps have a mean pairwise cosine of 0.83–0.92. On the embedded synthetic data
# (10 classes, 300 test images; /tmp script, numbers in the issue-26 report), resnet8x4 (resnet32x4's
# stage shapes) trained 3 epochs (93% test accuracy): maps ≥ 0, 52–54% zeros, mean pairwise cosine
# 0.38–0.39 at the compared (pooled) size, between-class share of the centred variance 0.52–0.78;
# resnet32x4 at initialisation: cosine 0.75–0.82. On those real maps a ShuffleV2 student's
# projections trained alone (150 steps) took the raw cost to 0.14 (resnet32x4 at init) and 0.41
# (trained resnet8x4) of its start, the centred cost to 0.88 and 0.74 (0.60 after 2000 steps).
#
# Here: the two deepest compared layers of resnet32x4 → ShuffleV2 at their real shapes (student
# 232×8×8 and 464×4×4 through 1×1 projections onto the teacher's 128 and 256 channels), every
# map relu(common + prototype[class] + noise), a fixed per-unit common level 4·N(0, 1), class
# prototypes 1.5·N(0, 1) (10 classes), unit noise: nonnegative, ~50% zeros, mean pairwise cosine
# ~0.86, between-class share ~0.66 (checked below). The student's frozen maps come from their own
# generator with their own labels: nothing in them tells the teacher's batch apart, so whatever
# the projections gain is absorbed, not learnt.
REAL_S, REAL_T, K = ((232, 8, 8), (464, 4, 4)), ((128, 8, 8), (256, 4, 4)), 10


class PostReLU:
    """Batches of post-ReLU-like maps of ``shapes``: relu(common + prototype[label] + noise)."""

    def __init__(self, shapes, seed, common=4.0, prototype=1.5):
        g = torch.Generator().manual_seed(seed)
        self.shapes = shapes
        self.common = [common * torch.randn(torch.Size(sh).numel(), generator=g) for sh in shapes]
        self.prototypes = [prototype * torch.randn(K, torch.Size(sh).numel(), generator=g) for sh in shapes]

    def __call__(self, labels, g, prototypes=None):
        protos = self.prototypes if prototypes is None else prototypes
        return [torch.relu(c + p[labels] + torch.randn(len(labels), c.numel(), generator=g)).view(len(labels), *sh)
                for c, p, sh in zip(self.common, protos, self.shapes)]


def realistic_ctx():
    def sh(maps):
        stages = (torch.Size([2, 4, 4]), torch.Size([2, 4, 4]), *(torch.Size(m) for m in maps))
        return FeatureShapes(stages, stages, torch.Size([4]), torch.Size([K]))
    return MethodContext(sh(REAL_S), sh(REAL_T), K, torch.zeros(8, dtype=torch.long))


def map_feats(maps):
    stem = torch.zeros(len(maps[0]), 2, 4, 4)
    return Features([stem, stem, *maps], [], torch.zeros(len(maps[0]), 4), torch.zeros(len(maps[0]), K))


TEACHER_MAPS, STUDENT_MAPS = PostReLU(REAL_T, seed=11), PostReLU(REAL_S, seed=12)


def train_realistic(term, steps, student=None):
    """SGD (RepDistiller's lr 0.05, momentum 0.9, wd 5e-4) on the term's parameters for ``steps``
    fresh batches; ``student``: trainable class prototypes of the student's maps, fed the teacher's
    labels (a student that has the information) and trained too (Adam, lr 0.05: the cosine's
    gradient is ~1/‖x‖, too small for plain SGD on raw maps). Returns the mean cost over 4
    fresh batches before and after."""
    opt = torch.optim.SGD(term.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    s_opt = torch.optim.Adam(student, lr=0.05) if student else None
    g = torch.Generator().manual_seed(3)
    batch = Batch(torch.zeros(CB, 3, 4, 4), torch.zeros(CB, dtype=torch.long), torch.arange(CB))

    def draw():
        y = torch.randint(0, K, (CB,), generator=g)
        y_s = y if student else torch.randint(0, K, (CB,), generator=g)
        return map_feats(STUDENT_MAPS(y_s, g, student)), map_feats(TEACHER_MAPS(y, g))

    def mean_cost():
        with torch.no_grad():
            return sum(term(*draw(), batch).item() for _ in range(4)) / 4

    before = mean_cost()
    for _ in range(steps):
        loss = term(*draw(), batch)
        opt.zero_grad()
        if s_opt:
            s_opt.zero_grad()
        loss.backward()
        opt.step()
        if s_opt:
            s_opt.step()
    return before, mean_cost()


def test_realistic_maps_have_the_statistics_of_post_relu_maps():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, K, (256,), generator=g)
    for maps in (TEACHER_MAPS(y, g), STUDENT_MAPS(y, g)):
        for m in maps:
            flat = m.flatten(1)
            v = torch.nn.functional.normalize(flat, dim=1)
            cos = ((v @ v.t()).sum() - len(v)) / (len(v) ** 2 - len(v))
            c = flat - flat.mean(0)
            between = sum((c[y == k].mean(0) ** 2).sum() * (y == k).sum() for k in range(K)) / (c ** 2).sum()
            zeros = (flat == 0).float().mean()
            assert flat.min() >= 0 and 0.4 < zeros < 0.6 and 0.8 <= cos < 0.95 and 0.5 < between < 0.8, (cos, between, zeros)


@pytest.mark.parametrize("cls", [REMD, IPOT])
def test_projection_alone_cannot_absorb_the_cost_of_realistic_maps(cls):
    """Issue 26's acceptance: the OT term's own parameters (the student-side projections) trained
    alone on frozen, uninformative realistic maps keep ≥ 50% of the initial cost (measured: REMD
    0.64, IPOT 0.77 after 150 steps; REMD 0.51 after 600). The raw cosine (``center=False``, the
    design before) lets them absorb it: below 30% within 60 steps (measured 0.14–0.15 at 150)."""
    torch.manual_seed(0)
    term = cls(realistic_ctx(), layers=["stage:2", "stage:3"])
    assert [(a.map.in_channels, a.map.out_channels) for a in term.adapters.values()] == [(232, 128), (464, 256)]
    before, after = train_realistic(term, 150)
    assert 1.8 < before < 2.05 and after >= 0.5 * before, (before, after)
    torch.manual_seed(0)
    raw_before, raw_after = train_realistic(cls(realistic_ctx(), layers=["stage:2", "stage:3"], center=False), 60)
    assert raw_after < 0.3 * raw_before, (raw_before, raw_after)


@pytest.mark.parametrize("cls", [REMD, IPOT])
def test_training_a_student_that_has_the_information_lowers_the_cost(cls):
    """The centred cost is not stuck at a floor: a student whose maps follow the teacher's labels,
    trained with the projections, takes it well below what the projections alone reach (measured:
    0.36 / 0.40 of the initial cost for REMD / IPOT)."""
    torch.manual_seed(0)
    student = [torch.nn.Parameter(p.clone()) for p in STUDENT_MAPS.prototypes]
    before, after = train_realistic(cls(realistic_ctx(), layers=["stage:2", "stage:3"]), 150, student)
    assert after < 0.5 * before, (before, after)


def test_center_is_validated_and_ot_run_ids_hash_it(tmp_path):
    """``center`` enters every OT run's hashed overrides (OTLoss.hashed_defaults), so OT runs made
    before it (raw cosine) are not reused; other methods' runs keep their ids, and writing the
    default explicitly names the same run."""
    with pytest.raises(ValueError, match="valid: true"):
        REMD(ctx(), center="yes")
    exp = {"name": "main", "dataset": "cifar100", "pairs": [["resnet8", "resnet8"]], "seeds": [0],
           "methods": ["kd", "remd", "ipot_crd_kd"]}
    suite = load_suite(write_suite(tmp_path / "s.yaml", tmp_path / "data", experiments=[exp]))
    explicit = load_suite(write_suite(tmp_path / "e.yaml", tmp_path / "data", experiments=[exp],
                                      term_params={"remd": {"center": True}}))
    raw = load_suite(write_suite(tmp_path / "r.yaml", tmp_path / "data", experiments=[exp],
                                 term_params={"remd": {"center": False}}))
    distill = {r.spec.method: r for r in suite.runs.values() if r.kind == "distill"}
    assert distill["kd"].spec.method_overrides == {}
    assert distill["remd"].spec.method_overrides == {"params": {"remd": {"center": True}}}
    assert distill["ipot_crd_kd"].spec.method_overrides == {"params": {"ipot": {"center": True}}}
    assert set(explicit.runs) == set(suite.runs)
    changed = set(suite.runs) ^ set(raw.runs)
    assert {raw.runs.get(r, suite.runs.get(r)).spec.method for r in changed} == {"remd"}
    # the pre-centring id of a run is the one of its spec without the filled-in default
    old = replace(distill["remd"].spec, method_overrides={})
    assert distill["remd"].id.endswith(distill["remd"].spec.config_hash()) and old.config_hash() != distill["remd"].spec.config_hash()


def test_ot_on_stages_is_refused_for_teacher_ensembles(tmp_path):
    """Default OT reads stage maps, which an ensemble has not: refused at suite load, as AT/NST;
    ``layers: pooled`` is accepted."""
    exp = {"name": "main", "dataset": "cifar100", "pairs": [["resnet8", "resnet8"]], "seeds": [0],
           "teacher_seeds": [0, 1]}
    for method in ("remd", "ipot_kd"):
        with pytest.raises(SuiteError, match=f"{method} read the teacher's stage features"):
            load_suite(write_suite(tmp_path / "bad.yaml", tmp_path / "data", experiments=[{**exp, "methods": [method]}]))
    load_suite(write_suite(tmp_path / "ok.yaml", tmp_path / "data", term_params={"remd": {"layers": "pooled"}},
                           experiments=[{**exp, "methods": ["remd"]}]))


def test_method_presets():
    assert METHODS.get("remd").terms == {"remd": 1.0} and METHODS.get("ipot").ce == 1.0
    assert METHODS.get("ipot_kd").terms == {"kd": 1.0, "ipot": 1.0}
    assert METHODS.get("ipot_kd").params["kd"] == {"T": 4.0}
    assert METHODS.get("ipot_crd").terms == {"ipot": 1.0, "crd": 0.8}
    assert METHODS.get("ipot_crd_kd").terms == {"kd": 1.0, "ipot": 1.0, "crd": 0.8}
    obj = build_objective("remd_kd", ctx(), {"params": {"remd": {"layers": ["stage:1"]}}})
    assert obj.teacher_needs == {"logits", "stages"}


def test_loss_is_float32_under_autocast():
    x, y = rand(B, 5, seed=21).float(), rand(B, 5, seed=22).float()
    stage = rand(B, 3, 4, 4, seed=23).float()
    for term in (REMD(ctx()), IPOT(ctx()), REMD(ctx(), layers="stages+pooled")):
        plain = term(feats(x, stage), feats(y, stage), BATCH)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = term(feats(x, stage), feats(y, stage), BATCH)
        assert auto.dtype == torch.float32 and auto.item() == plain.item()


def test_each_ot_table_weighs_its_kd_term_one_way():
    """Issue 11.3: every column of an OT table that has a KD term weighs CE and KD the same way
    (the ImageNet table had KD at CE 0.5 + KD 0.9 beside IPOT+KD and CRD+KD at CE 1 + KD 1)."""
    from kdbench.methods import resolve_method
    from kdbench.planning.suite import load_suite

    from conftest import REPO

    suite = load_suite(REPO / "workflow/suites/ot.yaml")
    for exp, ids in suite.experiment_runs.items():
        weights = {(m.ce, m.terms["kd"]) for m in (resolve_method(r.spec.method, r.spec.method_overrides)
                                                    for r in (suite.runs[i] for i in ids)) if "kd" in m.terms}
        if exp.startswith("ot_imagenet"):
            assert weights == {(0.5, 0.9)}, (exp, weights)
        assert len(weights) <= 2, (exp, weights)  # CIFAR/SVHN: RepDistiller's KD (0.1/0.9) and its +KD (1/1)
