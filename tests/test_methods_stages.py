"""AB, FT, FSP (two-stage baselines) and DKD: golden values from plain loops, init stages,
gradients, shape-derived adapters."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from kdbench.methods import Batch, MethodContext, build_objective
from kdbench.methods.ab import AB
from kdbench.methods.dkd import DKD, dkd_loss
from kdbench.methods.fsp import FSP
from kdbench.methods.ft import FT
from kdbench.core.features import Features, FeatureShapes

N_CLS = 5


def make_feats(stage_shapes, B=3, d=8, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = [torch.randn(B, *s, generator=g).requires_grad_(grad) for s in stage_shapes]
    post = [torch.relu(p) for p in pre]
    return Features(post, pre, torch.randn(B, d, generator=g).requires_grad_(grad),
                    torch.randn(B, N_CLS, generator=g).requires_grad_(grad))


def shapes_of(f: Features) -> FeatureShapes:
    return FeatureShapes(tuple(x.shape[1:] for x in f.stages), tuple(x.shape[1:] for x in f.preact),
                         f.pooled.shape[1:], f.logits.shape[1:])


def ctx(s: Features, t: Features) -> MethodContext:
    return MethodContext(shapes_of(s), shapes_of(t), N_CLS, torch.arange(12) % N_CLS, "tiny_s", "tiny_t")


def batch(B=3, epoch=1):
    return Batch(torch.zeros(B, 3, 8, 8), torch.arange(B) % N_CLS, torch.arange(B), epoch)


class TinyNet(nn.Module):
    """stem -> stage1 -> stage2 (stride 2) -> pool -> classifier, returning Features."""

    def __init__(self, c=(4, 4, 8)):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, c[0], 3, 1, 1), nn.Conv2d(c[0], c[1], 3, 1, 1),
                                    nn.Conv2d(c[1], c[2], 3, 2, 1)])
        self.classifier = nn.Linear(c[2], N_CLS)

    def feature_modules(self):
        return nn.ModuleList([self.convs])

    def forward(self, x):
        pre, post = [], []
        for conv in self.convs:
            pre.append(conv(x if not post else post[-1]))
            post.append(torch.relu(pre[-1]))
        pooled = post[-1].mean((2, 3))
        return Features(post, pre, pooled, self.classifier(pooled))


# ---------------------------------------------------------------- DKD
def np_softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def np_dkd(zs, zt, y, alpha, beta, T):
    total = 0.0
    for b in range(len(y)):
        ps, pt = np_softmax(zs[b] / T), np_softmax(zt[b] / T)
        rest = lambda p: sum(p[i] for i in range(len(p)) if i != y[b])  # 1 - p_gt, exact where p_gt rounds to 1
        bs, bt = [ps[y[b]], rest(ps)], [pt[y[b]], rest(pt)]
        tckd = sum(q * math.log(q / p) for q, p in zip(bt, bs))
        others = [i for i in range(len(ps)) if i != y[b]]
        nckd = sum(pt[i] / bt[1] * math.log((pt[i] / bt[1]) / (ps[i] / bs[1])) for i in others)
        total += (alpha * tckd + beta * nckd) * T * T
    return total / len(y)


@pytest.mark.parametrize("epoch,ramp", [(1, 1 / 20), (10, 0.5), (20, 1.0), (240, 1.0)])
def test_dkd_golden_and_warmup(epoch, ramp):
    s, t = make_feats([(2, 4, 4)], B=4, grad=True), make_feats([(2, 4, 4)], B=4, seed=1, grad=True)
    term = DKD(ctx(s, t), alpha=1.0, beta=8.0, T=4.0, warmup=20)
    b = Batch(torch.zeros(4), torch.tensor([0, 3, 4, 3]), torch.arange(4), epoch)
    loss = term(s, t, b)
    expected = ramp * np_dkd(s.logits.detach().double().numpy(), t.logits.detach().double().numpy(),
                             [0, 3, 4, 3], 1.0, 8.0, 4.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert s.logits.grad.abs().sum() > 0 and t.logits.grad is None


def test_dkd_stays_finite_where_float32_probabilities_underflow():
    """A student that is sure (a logit gap of 600: p = e^-150 at T = 4, 0 in float32) gets the
    float64 reference's loss and a finite gradient; the log of the float32 softmax, mdistiller's
    formula, is -inf there (which made the rehearsal's DKD run NaN)."""
    torch.manual_seed(0)
    zs = torch.randn(4, 5) * 2
    zs[:, 1] += 600.0  # sure of class 1; targets 0, 3, 4 get p = 0 in float32, target 1 gets 1 - p = 0
    zs.requires_grad_(True)
    zt, y = torch.randn(4, 5) * 3, torch.tensor([0, 1, 4, 3])
    p = torch.softmax(zs.detach() / 4.0, dim=1)
    assert not torch.isfinite(torch.log(p[torch.arange(4), y])).all()
    loss = dkd_loss(zs, zt, y, 1.0, 8.0, 4.0)
    expected = np_dkd(zs.detach().double().numpy(), zt.double().numpy(), y.tolist(), 1.0, 8.0, 4.0)
    assert math.isfinite(expected) and loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert torch.isfinite(zs.grad).all() and zs.grad.abs().sum() > 0


def test_dkd_matches_float64_and_stays_finite_over_random_logit_scales():
    """200 random batches, logits scaled by 10^U(-1, 2.5) (a logit gap up to ~600 at T = 4), random
    targets and class counts: the loss equals the float64 reference and loss and gradient are finite."""
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        classes = int(torch.randint(2, 12, (1,), generator=g))
        scale = 10 ** (torch.rand(1, generator=g).item() * 3.5 - 1)
        zs = (torch.randn(6, classes, generator=g) * scale).requires_grad_(True)
        zt = torch.randn(6, classes, generator=g) * 10 ** (torch.rand(1, generator=g).item() * 2 - 1)
        y = torch.randint(0, classes, (6,), generator=g)
        loss = dkd_loss(zs, zt, y, 1.0, 8.0, 4.0)
        expected = np_dkd(zs.detach().double().numpy(), zt.double().numpy(), y.tolist(), 1.0, 8.0, 4.0)
        assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-5), (classes, scale)
        loss.backward()
        assert torch.isfinite(zs.grad).all(), (classes, scale)


def test_dkd_bf16_and_method():
    s, t = make_feats([(2, 4, 4)]), make_feats([(2, 4, 4)], seed=1)
    s.logits = s.logits.to(torch.bfloat16)
    obj = build_objective("dkd", ctx(s, t))
    out = obj(s, t, batch(epoch=40))
    assert out["dkd"].dtype == torch.float32 and obj.spec.ce == 1.0
    assert obj.terms["dkd"].beta == 8.0 and obj.terms["dkd"].warmup == 20
    over = build_objective("dkd", ctx(s, t), {"params": {"dkd": {"beta": 6.0}}})
    assert over.terms["dkd"].beta == 6.0


#: mdistiller configs/cifar100/dkd/<teacher>_<student>.yaml: DKD.BETA (CFG.DKD.BETA = 8.0 where unset),
#: in mdistiller's names (recipes.md §4)
MDISTILLER_DKD_BETA = {"res56_res20": 2.0, "res110_res32": 2.0, "res32x4_res8x4": 8.0, "wrn40_2_wrn_16_2": 6.0,
                       "wrn40_2_wrn_40_1": 6.0, "vgg13_vgg8": 6.0, "res32x4_shuv1": 8.0, "res32x4_shuv2": 8.0,
                       "wrn40_2_shuv1": 8.0, "vgg13_mv2": 6.0, "res50_mv2": 8.0}
MDISTILLER_NAMES = {"res56": "resnet56", "res20": "resnet20", "res110": "resnet110", "res32": "resnet32",
                    "res32x4": "resnet32x4", "res8x4": "resnet8x4", "wrn40_2": "wrn_40_2", "wrn_16_2": "wrn_16_2",
                    "wrn_40_1": "wrn_40_1", "vgg13": "vgg13", "vgg8": "vgg8", "shuv1": "ShuffleV1",
                    "shuv2": "ShuffleV2", "mv2": "MobileNetV2", "res50": "ResNet50"}


def test_dkd_beta_per_pair_as_mdistiller_and_overridable():
    from dataclasses import replace
    s, t = make_feats([(2, 4, 4)]), make_feats([(2, 4, 4)], seed=1)
    for config, beta in MDISTILLER_DKD_BETA.items():
        teacher, student = next((MDISTILLER_NAMES[config[:i]], MDISTILLER_NAMES[config[i + 1:]])
                                for i in range(len(config)) if config[i] == "_" and config[:i] in MDISTILLER_NAMES
                                and config[i + 1:] in MDISTILLER_NAMES)
        pair_ctx = replace(ctx(s, t), teacher_arch=teacher, student_arch=student)
        assert build_objective("dkd", pair_ctx).terms["dkd"].beta == beta, config
        over = build_objective("dkd", pair_ctx, {"params": {"dkd": {"beta": 0.5}}}).terms["dkd"]
        assert over.beta == 0.5 and over.used_params() == {"beta": 0.5}
    other = replace(ctx(s, t), teacher_arch="resnet14", student_arch="resnet8")  # not an mdistiller pair
    assert build_objective("dkd", other).terms["dkd"].beta == 8.0
    assert build_objective("dkd", replace(other, teacher_arch="resnet56", student_arch="resnet20")).terms["dkd"].beta == 2.0


# ---------------------------------------------------------------- AB
def np_ab(g_s, g_t, margin=1.0):
    n, total = len(g_s), 0.0
    for i, (s, t) in enumerate(zip(g_s, g_t)):
        layer = 0.0
        for sv, tv in zip(s.flatten().tolist(), t.flatten().tolist()):
            if sv > -margin and tv <= 0:
                layer += (sv + margin) ** 2
            if sv <= margin and tv > 0:
                layer += (sv - margin) ** 2
        total += 2.0 ** (i - n + 1) * layer / s.shape[0] * 3 / 1000
    return total


def test_ab_golden_identity_connectors_and_zero_main_stage():
    sh = [(4, 8, 8), (4, 8, 8), (8, 4, 4)]
    s, t = make_feats(sh, grad=True), make_feats(sh, seed=1)
    term = AB(ctx(s, t))
    assert all(isinstance(c, nn.Identity) for c in term.connectors) and term.init_epochs == 30
    loss = term.init_loss(s, t, batch())
    expected = np_ab([p.detach().numpy() for p in s.preact[1:]], [p.numpy() for p in t.preact[1:]])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert s.preact[1].grad.abs().sum() > 0 and s.preact[0].grad is None  # stem is not used
    assert term(s, t, batch()).item() == 0.0


def test_ab_connector_mismatched_shapes_and_init_parameters():
    s_net, t_net = TinyNet((4, 6, 6)), TinyNet((4, 4, 10))
    x = torch.randn(3, 3, 8, 8)
    s = s_net(x)
    with torch.no_grad():
        t = t_net(x)
    t.preact[-1].requires_grad_(True)
    term = AB(ctx(s, t))
    assert isinstance(term.connectors[0], nn.Module) and not isinstance(term.connectors[0], nn.Identity)
    loss = term.init_loss(s, t, batch())
    g_s = [c(f).detach().numpy() for c, f in zip(term.connectors, s.preact[1:])]
    assert loss.item() == pytest.approx(np_ab(g_s, [f.detach().numpy() for f in t.preact[1:]]), rel=1e-5)
    loss.backward()
    params = list(term.init_parameters(s_net))
    assert {id(p) for p in term.connectors.parameters()} <= {id(p) for p in params}
    assert {id(p) for p in s_net.convs.parameters()} <= {id(p) for p in params}
    assert not {id(p) for p in s_net.classifier.parameters()} & {id(p) for p in params}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in term.connectors.parameters())
    assert s_net.convs[1].weight.grad.abs().sum() > 0 and t.preact[-1].grad is None


def test_ab_methods():
    sh = [(4, 8, 8), (8, 4, 4)]
    s, t = make_feats(sh), make_feats(sh, seed=1)
    for name, terms in (("ab", {"ab"}), ("ab_kd", {"ab", "kd"})):
        obj = build_objective(name, ctx(s, t))
        assert set(obj.spec.terms) == terms and [type(x) for x in obj.init_terms()] == [AB]
        assert obj(s, t, batch())["ab"].item() == 0.0


# ---------------------------------------------------------------- FT
def np_avgpool(x, out):
    k = x.shape[-1] // out
    return x.reshape(*x.shape[:-2], out, k, out, k).mean((-3, -1))


def np_factor_loss(fs, ft):
    h = min(fs.shape[-1], ft.shape[-1])
    fs, ft = np_avgpool(fs, h), np_avgpool(ft, h)
    total = 0.0
    for b in range(fs.shape[0]):
        a_s, a_t = (fs[b] ** 2).mean(0).flatten(), (ft[b] ** 2).mean(0).flatten()
        a_s, a_t = a_s / np.sqrt((a_s ** 2).sum()), a_t / np.sqrt((a_t ** 2).sum())
        total += np.abs(a_s - a_t).sum()
    return total / (fs.shape[0] * h * h)


def test_ft_init_stage_and_golden_factor_loss_mismatched():
    s = make_feats([(4, 16, 16), (6, 8, 8)], grad=True)
    t = make_feats([(4, 16, 16), (10, 4, 4)], seed=1)
    t.stages[-1].requires_grad_(True)
    term = FT(ctx(s, t), init_lr=0.01)
    assert term.init_lr(0.05) == 0.01 and FT(ctx(s, t)).init_lr(0.05) == 0.05
    # init stage: paraphraser reconstruction MSE, only paraphraser parameters
    assert {id(p) for p in term.init_parameters(None)} == {id(p) for p in term.paraphraser.parameters()}
    rec_loss = term.init_loss(s, t, batch())
    _, rec = term.paraphraser(t.stages[-1].detach())
    assert rec_loss.item() == pytest.approx(((rec - t.stages[-1].detach()) ** 2).mean().item(), rel=1e-6)
    assert term.paraphraser.encoder[-2].out_channels == 5 and term.translator[-3].out_channels == 5
    # main stage: translator on the student, frozen paraphraser on the teacher
    loss = term(s, t, batch())
    with torch.no_grad():
        f_s = term.translator(s.stages[-1]).numpy()
        f_t = term.paraphraser.encoder(t.stages[-1]).numpy()
    assert loss.item() == pytest.approx(np_factor_loss(f_s.astype(np.float64), f_t.astype(np.float64)), rel=1e-5)
    loss.backward()
    assert s.preact[-1].grad.abs().sum() > 0 and t.stages[-1].grad is None
    assert all(p.grad is None for p in term.paraphraser.parameters())
    assert all(p.grad is not None for p in term.translator.parameters())


#: RepDistiller helper/pretrain.py: the students whose paraphraser trains at lr 0.01 (the others: base lr)
REPDISTILLER_FT_LR_001 = ['resnet8', 'resnet14', 'resnet20', 'resnet32', 'resnet44', 'resnet56', 'resnet110',
                          'resnet8x4', 'resnet32x4', 'wrn_16_1', 'wrn_16_2', 'wrn_40_1', 'wrn_40_2']


def test_ft_methods_paraphraser_lr_per_student_family():
    from dataclasses import replace

    from kdbench.models import MODELS
    sh = [(4, 8, 8), (8, 4, 4)]
    s, t = make_feats(sh), make_feats(sh, seed=1)
    assert build_objective("ft", ctx(s, t)).spec.terms == {"ft": 200.0}
    assert set(build_objective("ft_kd", ctx(s, t)).spec.terms) == {"kd", "ft"}
    for method in ("ft", "ft_kd"):
        for arch in MODELS:
            term = build_objective(method, replace(ctx(s, t), student_arch=arch)).terms["ft"]
            assert term.init_lr(0.05) == (0.01 if arch in REPDISTILLER_FT_LR_001 else 0.05), (method, arch)
    assert build_objective("ft", replace(ctx(s, t), student_arch="vgg8")).terms["ft"].init_lr(0.01) == 0.01  # its base lr
    fixed = build_objective("ft", replace(ctx(s, t), student_arch="vgg8"), {"params": {"ft": {"init_lr": 0.02}}})
    assert fixed.terms["ft"].init_lr(0.05) == 0.02


# ---------------------------------------------------------------- FSP
def np_fsp(bottom, top):
    h = min(bottom.shape[-1], top.shape[-1])
    bottom, top = np_avgpool(bottom, h), np_avgpool(top, h)
    B, cb, ct = bottom.shape[0], bottom.shape[1], top.shape[1]
    G = np.zeros((B, ct, cb))
    for b in range(B):
        for j in range(ct):
            for i in range(cb):
                G[b, j, i] = sum(bottom[b, i, p, q] * top[b, j, p, q] for p in range(h) for q in range(h)) / (h * h)
    return G


def test_fsp_golden_and_gradients():
    sh = [(3, 8, 8), (3, 8, 8), (5, 4, 4)]
    s, t = make_feats(sh, grad=True), make_feats(sh, seed=1, grad=True)
    term = FSP(ctx(s, t))
    loss = term.init_loss(s, t, batch())
    sn = [f.detach().double().numpy() for f in s.stages]
    tn = [f.detach().double().numpy() for f in t.stages]
    expected = sum(((np_fsp(sn[i], sn[i + 1]) - np_fsp(tn[i], tn[i + 1])) ** 2).mean() for i in range(2))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert all(f.grad is None for f in t.preact) and all(f.grad.abs().sum() > 0 for f in s.preact)
    assert term(s, t, batch()).item() == 0.0
    assert FSP(ctx(s, t), main_loss=True)(s, t, batch()).item() == pytest.approx(expected, rel=1e-5)


def test_fsp_init_parameters_and_channel_mismatch():
    s_net = TinyNet()
    f = s_net(torch.zeros(1, 3, 8, 8))
    params = {id(p) for p in FSP(ctx(f, f)).init_parameters(s_net)}
    assert params == {id(p) for p in s_net.convs.parameters()}
    s, t = make_feats([(4, 8, 8), (6, 4, 4)]), make_feats([(4, 8, 8), (8, 4, 4)])
    with pytest.raises(ValueError, match=r"stages\[1\]: student \(6, 4, 4\) vs teacher \(8, 4, 4\)"):
        FSP(ctx(s, t))
    with pytest.raises(ValueError, match="FSP"):
        build_objective("fsp", ctx(s, t))


def test_fsp_methods():
    sh = [(4, 8, 8), (8, 4, 4)]
    s, t = make_feats(sh), make_feats(sh, seed=1)
    obj = build_objective("fsp", ctx(s, t))
    assert [type(x) for x in obj.init_terms()] == [FSP] and obj(s, t, batch())["fsp"].item() == 0.0
    assert set(build_objective("fsp_kd", ctx(s, t)).spec.terms) == {"kd", "fsp"}


def test_fsp_matrix_float32_under_autocast():
    from kdbench.methods.fsp import fsp_matrix
    a, b = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g = fsp_matrix(a, b)
    assert g.dtype == torch.float32 and torch.allclose(g, fsp_matrix(a, b), rtol=1e-6)


# ---------------------------------------------------------------- init-stage module modes (engine)
#: RepDistiller's ``get_feat_modules()`` (models/wrn.py, models/resnet.py): the only student
#: modules its initialisation stage trains; ``helper/pretrain.py`` puts the rest in eval mode
#: (``model_s.eval(); init_modules.train()``). AB trains them with its connectors; FT trains its
#: paraphraser alone (the student stays in eval mode throughout).
REPDISTILLER_FEAT_MODULES = {"wrn_16_1": ("conv1", "block1", "block2", "block3"),
                             "resnet8": ("conv1", "bn1", "relu", "layer1", "layer2", "layer3")}


def _bn_modes_in_init_stage(tiny, tmp_path, monkeypatch, method, student_arch):
    """Run one initialisation epoch of ``method`` through the engine (``fit``): the train/eval
    modes each student BN was called in with gradients on (the training steps), and the
    student's state when built and after the stage."""
    import kdbench.engine.run as run
    import kdbench.engine.fit as train
    from kdbench.core.spec import Recipe, RunSpec

    built, modes = {}, {}
    build_model = run.build_model

    def build(arch, n):
        built["student"] = model = build_model(arch, n)
        built["names"] = {m: name for name, m in model.named_modules()}
        built["initial"] = {k: v.clone() for k, v in model.state_dict().items()}
        return model

    def hook(module, args, out):
        if torch.is_grad_enabled() and isinstance(module, nn.BatchNorm2d) and module in built.get("names", {}):
            modes.setdefault(built["names"][module], set()).add(module.training)

    monkeypatch.setattr(run, "build_model", build)
    spec = RunSpec("cifar100", str(tiny / "data"), student_arch, method, 0, "resnet8", (str(tiny / "t.pt"),),
                   method_overrides={"params": {method: {"init_epochs": 1}}},
                   recipe=Recipe.from_config({"epochs": 1, "batch_size": 16}))
    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        out = train.fit(spec, tmp_path / "run", "cpu", progress=False, stop_after_epochs=1)
    finally:
        handle.remove()
    assert out["status"] == "stopped" and out["state"]["init_curve"] and not out["state"]["curve"]
    after = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["student"]
    return modes, built["initial"], after


@pytest.mark.parametrize("method,student_arch", [("ab", "wrn_16_1"), ("ab", "resnet8"), ("ft", "wrn_16_1"),
                                                  ("ft", "resnet8"), ("fsp", "wrn_16_1"), ("fsp", "resnet8")])
def test_init_stage_module_modes_are_repdistillers(tiny, tmp_path, monkeypatch, method, student_arch):
    """AB and FSP: only RepDistiller's feature modules train (a WRN's final BN, which makes the third
    pre-activation map, normalises with its running statistics and they stay put); FT: the whole
    student is in eval mode, so none of its BN statistics move during the paraphraser stage."""
    modes, initial, after = _bn_modes_in_init_stage(tiny, tmp_path, monkeypatch, method, student_arch)
    feat = REPDISTILLER_FEAT_MODULES[student_arch] if method in ("ab", "fsp") else ()
    assert "bn1" in modes and len(modes) > 5  # every student BN was called
    for name in modes:
        trains = name.split(".")[0] in feat
        assert modes[name] == {trains}, (name, modes[name])
        for buf in ("running_mean", "running_var"):
            moved = not torch.equal(after[f"{name}.{buf}"], initial[f"{name}.{buf}"])
            assert moved == trains, (name, buf)


@pytest.mark.parametrize("method", ["ab", "ft"])
def test_init_stage_with_its_own_modes_runs_unfused_in_a_fused_pack(tiny, tmp_path, method):
    """A fused BN has one mode for all its members, so an AB/FT initialisation stage (student BN in
    eval mode) runs unfused beside a fused KD run of the same WRN student, then rejoins the fused
    model: its final BN statistics equal those of the run alone."""
    from kdbench.engine.pack import fit_packed
    from kdbench.core.spec import Recipe, RunSpec
    from kdbench.engine.fit import fit

    recipe = Recipe.from_config({"epochs": 1, "batch_size": 16})

    def spec(m, seed, **params):
        return RunSpec("cifar100", str(tiny / "data"), "wrn_16_1", m, seed, "resnet8", (str(tiny / "t.pt"),),
                       method_overrides={"params": params} if params else {}, recipe=recipe)

    specs = [spec("kd", 0), spec("kd", 1), spec(method, 0, **{method: {"init_epochs": 1}})]
    alone = fit(specs[2], tmp_path / "alone", "cpu", progress=False)
    packed = fit_packed(specs, [tmp_path / f"pack{k}" for k in range(3)], "cpu", fuse=True)[2]
    assert len(packed["init_curve"]) == 1 and packed["init_curve"][0]["loss"] == pytest.approx(alone["init_curve"][0]["loss"], rel=1e-5)
    a = torch.load(tmp_path / "alone" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "pack2" / "model.pt", weights_only=True)["state_dict"]
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-4, msg=name)
