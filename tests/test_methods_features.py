"""FitNet, AT, SP, CC, VID, RKD, PKT, NST and the shared adapters.

Golden values are computed here from the papers' / RepDistiller's formulas with numpy and plain
loops in float64, never from the implementation; adapters get fixed weights or the reference is
computed from their parameters.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from kdbench.methods import LOSSES, METHODS, Batch, MethodContext, build_objective
from kdbench.methods.adapters import ConvReg, Embed, LinearEmbed, pool_to_smaller
from kdbench.core.features import Features, FeatureShapes

TERMS = ["fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "nst"]
B = 5


def make_features(stage_shapes, pooled_dim, seed, requires_grad=False, dtype=torch.float32, relu=True):
    g = torch.Generator().manual_seed(seed)
    stages = [torch.randn(B, *sh, generator=g) for sh in stage_shapes]
    if relu:  # post-ReLU maps, as models return; keep a few negatives out of AT's even power anyway
        stages = [f.relu() + 0.05 for f in stages]
    pooled = torch.randn(B, pooled_dim, generator=g).relu() + 0.01
    logits = torch.randn(B, 10, generator=g)
    ts = [t.to(dtype).requires_grad_(requires_grad) for t in stages + [pooled, logits]]
    return Features(ts[:-2], ts[:-2], ts[-2], ts[-1])


def shapes_of(f: Features) -> FeatureShapes:
    st = tuple(x.shape[1:] for x in f.stages)
    return FeatureShapes(st, st, f.pooled.shape[1:], f.logits.shape[1:])


def ctx_of(s: Features, t: Features) -> MethodContext:
    return MethodContext(shapes_of(s), shapes_of(t), num_classes=10, train_labels=torch.arange(20) % 10)


def batch() -> Batch:
    return Batch(torch.zeros(B, 3, 8, 8), torch.arange(B) % 10, torch.arange(B), 1, torch.Generator().manual_seed(0))


def np64(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


def block_mean(x: np.ndarray, size: int) -> np.ndarray:
    """Adaptive average pooling for an exact integer ratio (B, C, H, W) -> (B, C, size, size)."""
    k = x.shape[2] // size
    return x.reshape(x.shape[0], x.shape[1], size, k, size, k).mean(axis=(3, 5))


def huber(d: float) -> float:
    return 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5


# --------------------------------------------------------------------------- golden values
STUDENT = [(3, 8, 8), (4, 8, 8), (6, 4, 4), (8, 2, 2)]
TEACHER = [(5, 8, 8), (6, 16, 16), (7, 4, 4), (9, 4, 4)]  # stage 1: teacher larger; stage 3: student smaller


def pair(seed=0, **kw):
    s = make_features(STUDENT, 6, seed, **kw)
    t = make_features(TEACHER, 7, seed + 100, **kw)
    return s, t


def test_at_golden():
    s, t = pair()
    term = LOSSES.get("at")(ctx_of(s, t), p=2.0)
    expected = 0.0
    for fs, ft in zip(s.stages[1:], t.stages[1:]):
        fs, ft = np64(fs), np64(ft)
        h = min(fs.shape[2], ft.shape[2])
        fs, ft = block_mean(fs, h), block_mean(ft, h)
        acc = 0.0
        for b in range(B):
            qs = [sum(fs[b, c, i, j] ** 2 for c in range(fs.shape[1])) / fs.shape[1] for i in range(h) for j in range(h)]
            qt = [sum(ft[b, c, i, j] ** 2 for c in range(ft.shape[1])) / ft.shape[1] for i in range(h) for j in range(h)]
            ns, nt = math.sqrt(sum(v * v for v in qs)), math.sqrt(sum(v * v for v in qt))
            acc += sum((a / ns - c / nt) ** 2 for a, c in zip(qs, qt))
        expected += acc / (B * h * h)
    assert term(s, t, batch()).item() == pytest.approx(expected, rel=1e-5)


def test_sp_golden():
    s, t = pair()
    term = LOSSES.get("sp")(ctx_of(s, t))

    def sim(f):
        q = np64(f).reshape(B, -1)
        g = np.array([[float(np.dot(q[i], q[j])) for j in range(B)] for i in range(B)])
        return g / np.sqrt((g ** 2).sum(1, keepdims=True))

    expected = ((sim(t.stages[-1]) - sim(s.stages[-1])) ** 2).sum() / B ** 2
    assert term(s, t, batch()).item() == pytest.approx(expected, rel=1e-5)


def test_cc_golden_with_fixed_embeddings():
    s, t = pair()
    term = LOSSES.get("cc")(ctx_of(s, t), feat_dim=3)
    rng = np.random.default_rng(0)
    ws, bs, wt, bt = rng.normal(size=(3, 6)), rng.normal(size=3), rng.normal(size=(3, 7)), rng.normal(size=3)
    with torch.no_grad():
        for lin, w, b in [(term.embed_s.linear, ws, bs), (term.embed_t.linear, wt, bt)]:
            lin.weight.copy_(torch.tensor(w)), lin.bias.copy_(torch.tensor(b))
    es, et = np64(s.pooled) @ ws.T + bs, np64(t.pooled) @ wt.T + bt
    delta = np.abs(es - et)
    expected = sum(sum(delta[i, d] * delta[i + 1, d] for d in range(3)) for i in range(B - 1)) / (B - 1)
    assert term(s, t, batch()).item() == pytest.approx(expected, rel=1e-5)


def test_vid_golden():
    s, t = pair()
    term = LOSSES.get("vid")(ctx_of(s, t), init_var=5.0, eps=1e-5)
    for layer in term.layers:  # initial variance is exactly init_var
        assert torch.allclose(layer.variance(), torch.full_like(layer.variance(), 5.0))
        with torch.no_grad():
            layer.alpha.copy_(torch.linspace(-1.0, 2.0, layer.alpha.numel()))
    expected = 0.0
    for layer, fs, ft in zip(term.layers, s.stages[1:], t.stages[1:]):
        fs, ft = np64(fs), np64(ft)
        h = min(fs.shape[2], ft.shape[2])
        fs, ft = block_mean(fs, h), block_mean(ft, h)
        w1, w2, w3 = (np64(m.weight)[:, :, 0, 0] for m in layer.regressor if isinstance(m, nn.Conv2d))
        var = np.log1p(np.exp(np64(layer.alpha))) + 1e-5
        total, n = 0.0, 0
        for b, i, j in itertools.product(range(B), range(h), range(h)):
            mu = w3 @ np.maximum(w2 @ np.maximum(w1 @ fs[b, :, i, j], 0), 0)
            for c in range(ft.shape[1]):
                total += 0.5 * ((mu[c] - ft[b, c, i, j]) ** 2 / var[c] + math.log(var[c]))
                n += 1
        expected += total / n
    assert term(s, t, batch()).item() == pytest.approx(expected, rel=1e-5)


def test_rkd_golden():
    s, t = pair()
    term = LOSSES.get("rkd")(ctx_of(s, t), w_d=25.0, w_a=50.0)

    def potentials(f):
        x = np64(f)
        d = np.array([[math.dist(x[i], x[j]) if i != j else 0.0 for j in range(B)] for i in range(B)])
        d = d / (d.sum() / (B * (B - 1)))
        angles = []
        for i, j, k in itertools.product(range(B), repeat=3):
            u, v = x[j] - x[i], x[k] - x[i]
            nu, nv = np.linalg.norm(u), np.linalg.norm(v)
            angles.append(0.0 if nu == 0 or nv == 0 else float(u @ v) / (nu * nv))
        return d.ravel(), angles

    ds, a_s = potentials(s.pooled)
    dt, a_t = potentials(t.pooled)
    loss_d = sum(huber(a - b) for a, b in zip(ds, dt)) / B ** 2
    loss_a = sum(huber(a - b) for a, b in zip(a_s, a_t)) / B ** 3
    assert term(s, t, batch()).item() == pytest.approx(25 * loss_d + 50 * loss_a, rel=1e-5)


def test_pkt_golden():
    s, t = pair()
    term = LOSSES.get("pkt")(ctx_of(s, t), eps=1e-7)
    eps = 1e-7

    def probs(f):
        x = np64(f)
        x = x / (np.sqrt((x ** 2).sum(1, keepdims=True)) + eps)
        k = [[(float(x[i] @ x[j]) + 1) / 2 for j in range(B)] for i in range(B)]
        return [[k[i][j] / sum(k[i]) for j in range(B)] for i in range(B)]

    ps, pt = probs(s.pooled), probs(t.pooled)
    expected = sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(B) for j in range(B)) / B ** 2
    assert term(s, t, batch()).item() == pytest.approx(expected, rel=1e-4, abs=1e-9)


def test_nst_golden():
    s, t = pair()
    term = LOSSES.get("nst")(ctx_of(s, t))
    expected = 0.0
    for fs, ft in zip(s.stages[1:], t.stages[1:]):
        fs, ft = np64(fs), np64(ft)
        h = min(fs.shape[2], ft.shape[2])
        fs, ft = block_mean(fs, h), block_mean(ft, h)
        mmd = 0.0
        for b in range(B):
            S = [v / np.linalg.norm(v) for v in fs[b].reshape(fs.shape[1], -1)]
            T = [v / np.linalg.norm(v) for v in ft[b].reshape(ft.shape[1], -1)]
            k = lambda X, Y: sum(float(x @ y) ** 2 for x in X for y in Y) / (len(X) * len(Y))  # noqa: E731
            mmd += k(T, T) + k(S, S) - 2 * k(S, T)
        expected += mmd / B
    assert term(s, t, batch()).item() == pytest.approx(expected, rel=1e-5)


def test_fitnet_golden_with_identity_regressor():
    s = make_features([(3, 4, 4)] * 3, 6, 0)
    t = make_features([(3, 4, 4)] * 3, 7, 1)
    term = LOSSES.get("fitnet")(ctx_of(s, t), hint_layer=2)
    assert isinstance(term.regressor.conv, nn.Conv2d) and term.regressor.conv.kernel_size == (1, 1)
    with torch.no_grad():
        term.regressor.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        term.regressor.conv.bias.zero_()
    term.eval()  # BN with running mean 0, var 1, affine (1, 0): y = x / sqrt(1 + 1e-5)
    xs, xt = np64(s.stages[2]), np64(t.stages[2])
    expected = ((np.maximum(xs / math.sqrt(1 + 1e-5), 0) - xt) ** 2).mean()
    assert term(s, t, batch()).item() == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------- adapters
@pytest.mark.parametrize("s_shape,t_shape,kind", [
    ((4, 16, 16), (8, 8, 8), nn.Conv2d),            # student 2x larger: 3x3 stride 2
    ((4, 8, 8), (8, 16, 16), nn.ConvTranspose2d),   # student 2x smaller: 4x4 transposed stride 2
    ((4, 6, 6), (8, 4, 4), nn.Conv2d),              # otherwise valid conv with kernel 1 + s_H - t_H
    ((4, 4, 4), (8, 4, 4), nn.Conv2d),
])
def test_convreg_shapes(s_shape, t_shape, kind):
    reg = ConvReg(torch.Size(s_shape), (2,) + t_shape)  # leading batch dim accepted
    assert type(reg.conv) is kind
    assert reg(torch.randn(2, *s_shape)).shape == (2, *t_shape)


def test_convreg_rejects_unsupported_ratio():
    with pytest.raises(ValueError, match="hint layer"):
        ConvReg((4, 3, 3), (8, 8, 8))


def test_embeddings_and_pooling():
    x = torch.randn(4, 2, 3, 3)
    e = Embed((2, 3, 3), 5)
    assert e(x).shape == (4, 5) and torch.allclose(e(x).norm(dim=1), torch.ones(4))
    assert LinearEmbed(18, 5)(x).shape == (4, 5)
    a, b = pool_to_smaller(torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4))
    assert a.shape[-2:] == b.shape[-2:] == (4, 4)


# --------------------------------------------------------------------------- gradients and shapes
MISMATCHED = {  # (student stages, student pooled, teacher stages, teacher pooled)
    "student_smaller": ([(3, 8, 8), (4, 8, 8), (6, 4, 4), (8, 2, 2)], 6, [(5, 16, 16), (6, 16, 16), (7, 8, 8), (9, 4, 4)], 7),
    "student_larger": ([(3, 16, 16), (4, 16, 16), (6, 8, 8), (8, 4, 4), (8, 2, 2)], 8,
                       [(5, 8, 8), (6, 8, 8), (7, 4, 4), (9, 3, 3)], 5),
}
USES = {"fitnet": lambda f: [f.stages[2]], "at": lambda f: f.stages[1:4], "vid": lambda f: f.stages[1:4],
        "nst": lambda f: f.stages[1:4], "sp": lambda f: [f.stages[-1]], "cc": lambda f: [f.pooled],
        "rkd": lambda f: [f.pooled], "pkt": lambda f: [f.pooled]}


@pytest.mark.parametrize("config", sorted(MISMATCHED))
@pytest.mark.parametrize("name", TERMS)
def test_gradients_reach_student_and_adapters_not_teacher(name, config):
    ss, sp, ts, tp = MISMATCHED[config]
    s = make_features(ss, sp, 0, requires_grad=True)
    t = make_features(ts, tp, 1, requires_grad=True)  # would receive grads if a term forgot to detach
    term = LOSSES.get(name)(ctx_of(s, t))
    loss = term(s, t, batch())
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for f in USES[name](s):
        assert f.grad is not None and torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0
    for p in term.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(x.grad is None for x in t.stages + [t.pooled, t.logits])


@pytest.mark.parametrize("name", TERMS)
def test_bf16_features_give_float32_loss(name):
    ss, sp, ts, tp = MISMATCHED["student_smaller"]
    s = make_features(ss, sp, 0, dtype=torch.bfloat16)
    t = make_features(ts, tp, 1, dtype=torch.bfloat16)
    loss = LOSSES.get(name)(ctx_of(s, t))(s, t, batch())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# --------------------------------------------------------------------------- method presets
BETA = {"fitnet": 100, "at": 1000, "sp": 3000, "cc": 0.02, "vid": 1, "rkd": 1, "pkt": 30000, "nst": 50}
NEEDS = {"fitnet": {"stages"}, "at": {"stages"}, "sp": {"stages"}, "vid": {"stages"}, "nst": {"stages"},
         "cc": {"pooled"}, "rkd": {"pooled"}, "pkt": {"pooled"}}


@pytest.mark.parametrize("name", TERMS)
def test_method_presets_and_teacher_needs(name):
    spec, spec_kd = METHODS.get(name), METHODS.get(f"{name}_kd")
    assert spec.ce == 1 and spec.terms == {name: BETA[name]}
    assert spec_kd.ce == 1 and spec_kd.terms == {"kd": 1, name: BETA[name]} and spec_kd.params["kd"] == {"T": 4.0}
    assert LOSSES.get(name).teacher_needs == NEEDS[name]
    s, t = pair()
    objective = build_objective(f"{name}_kd", ctx_of(s, t))
    assert objective.teacher_needs == NEEDS[name] | {"logits"}
    out = objective(s, t, batch())
    assert set(out) == {"ce", "kd", name} and all(torch.isfinite(v) for v in out.values())


def test_rkd_weights_and_hint_layer_are_params():
    s, t = pair()
    assert METHODS.get("rkd").params["rkd"] == {"w_d": 25.0, "w_a": 50.0}
    assert METHODS.get("fitnet").params["fitnet"]["hint_layer"] == 2
    obj = build_objective("fitnet", ctx_of(s, t), {"params": {"fitnet": {"hint_layer": 1}}})
    assert obj.terms["fitnet"].hint_layer == 1
    with pytest.raises(ValueError, match="hint_layer"):
        LOSSES.get("fitnet")(ctx_of(s, t), hint_layer=7)


# --------------------------------------------------------------------------- FitNets hint stage
class TinyNet(nn.Module):
    """stem -> 3 stages -> pool -> classifier, returning Features (no architecture registry)."""

    def __init__(self, widths=(4, 6, 8, 10)):
        super().__init__()
        chans = (3,) + tuple(widths)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(chans[i], chans[i + 1], 3, stride=1 if i < 2 else 2, padding=1),
                          nn.BatchNorm2d(chans[i + 1]), nn.ReLU()) for i in range(4))
        self.classifier = nn.Linear(widths[-1], 10)

    def forward(self, x):
        stages = []
        for blk in self.blocks:
            x = blk(x)
            stages.append(x)
        pooled = x.mean((2, 3))
        return Features(stages, stages, pooled, self.classifier(pooled))


def test_fitnet_hint_stage_trains_guided_layers_and_regressor():
    student, teacher = TinyNet(), TinyNet((5, 7, 9, 12))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        s, t = student.eval()(x), teacher.eval()(x)
    student.train()
    term = LOSSES.get("fitnet")(ctx_of(s, t), hint_layer=2, hint_epochs=3, hint_lr=0.01, probe_input=(3, 8, 8))
    assert term.init_epochs == 3 and term.init_lr(0.05) == 0.01
    assert LOSSES.get("fitnet")(ctx_of(s, t)).init_epochs == 0  # RepDistiller default: no hint stage
    bn_stats = [b[1].running_mean.clone() for b in student.blocks]
    params = {id(p) for p in term.init_parameters(student)}
    expected = {id(p) for blk in student.blocks[:3] for p in blk.parameters()} | {id(p) for p in term.regressor.parameters()}
    assert params == expected  # W_Guided (stem, stage 1, stage 2) + W_r; not stage 3 nor the classifier
    assert student.training and all(torch.equal(a, b[1].running_mean) for a, b in zip(bn_stats, student.blocks))
    loss = term.init_loss(student(x), t, batch())
    loss.backward()
    assert student.blocks[0][0].weight.grad is not None and student.blocks[3][0].weight.grad is None


@pytest.mark.parametrize("overrides", [None, {"params": {"kda": {"layer": "logits"}}},
                                       {"params": {"remd": {"layers": ["stage:-1", "pooled"]}}},
                                       {"params": {"ipot": {"layers": "preact:1"}}}])
def test_teacher_needs_known_before_building_equal_the_built_terms(overrides):
    """What the suite and the engine check before a run starts (MethodSpec.teacher_needs, with the
    run's overrides) is what the built objective reads, for every method."""
    from kdbench.methods import resolve_method
    from kdbench.models import build_model, feature_shapes
    shapes = feature_shapes(build_model("resnet8", 5))
    ctx = MethodContext(shapes, shapes, 5, torch.arange(200) % 5, "resnet8", "resnet8")
    checked = 0
    for name in METHODS.names():
        spec = METHODS.get(name)
        own = {"params": {t: p for t, p in (overrides or {}).get("params", {}).items() if t in spec.terms}}
        if overrides and not own["params"]:
            continue
        if "crd" in spec.terms:
            own["params"]["crd"] = {"nce_k": 16}
        spec = resolve_method(name, own)
        assert build_objective(spec, ctx).teacher_needs == spec.teacher_needs, name
        checked += 1
    assert checked >= (41 if overrides is None else 1)
