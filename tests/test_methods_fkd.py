"""FKD terms (kdbench/methods/fkd.py): expected values from plain loops over the paper's formulas."""

import math

import numpy as np
import pytest
import torch

from kdbench.methods import METHODS, Batch, MethodContext, build_objective
from kdbench.methods.fkd import FKD, FeatureRegularisation
from kdbench.core.features import Features, FeatureShapes

B = 5


def shapes(d, classes):
    stem = torch.Size([2, 4, 4])
    return FeatureShapes((stem,), (stem,), torch.Size([d]), torch.Size([classes]))


def ctx(d_s=4, d_t=7, classes_s=10, classes_t=100):  # different dims and label spaces
    return MethodContext(shapes(d_s, classes_s), shapes(d_t, classes_t), classes_s, torch.zeros(8, dtype=torch.long))


def feats(pooled, classes=10, members=None):
    stem = torch.zeros(pooled.shape[0], 2, 4, 4)
    return Features([stem], [stem], pooled, torch.zeros(pooled.shape[0], classes), members)


BATCH = Batch(torch.zeros(B, 3, 4, 4), torch.zeros(B, dtype=torch.long), torch.arange(B))


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


def cos(u, v):
    return float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))


def expected_fkd(h_s, rho_t):
    n = len(h_s)
    total = 0.0
    for i in range(n):
        for j in range(n):
            if i != j:
                total += (cos(h_s[i], h_s[j]) - rho_t[i][j]) ** 2
    return total / (n * (n - 1))


def cos_matrix(h):
    return [[cos(h[i], h[j]) for j in range(len(h))] for i in range(len(h))]


def test_golden_value_single_teacher():
    h_s, h_t = rand(B, 4, seed=1), rand(B, 7, seed=2).abs()
    got = FKD(ctx())(feats(h_s), feats(h_t, 100), BATCH).item()
    want = expected_fkd(h_s.double().numpy(), cos_matrix(h_t.double().numpy()))
    assert got == pytest.approx(want, rel=1e-5)
    # the correlation kernel is scale-invariant per sample
    scaled = FKD(ctx())(feats(h_s * torch.arange(1.0, B + 1)[:, None]), feats(h_t, 100), BATCH).item()
    assert scaled == pytest.approx(got, rel=1e-5)


def test_feature_regularisation_golden_values():
    h = rand(B, 4, seed=3)
    rows = h.double().numpy()
    want_sq = sum(float(np.sum(r * r)) for r in rows) / B
    want_norm = sum(math.sqrt(float(np.sum(r * r))) for r in rows) / B
    assert FeatureRegularisation(ctx())(feats(h), None, BATCH).item() == pytest.approx(want_sq, rel=1e-6)
    assert FeatureRegularisation(ctx(), squared=False)(feats(h), None, BATCH).item() == pytest.approx(want_norm, rel=1e-6)


def ensemble(seed, dims=(7, 3, 5)):
    members = [feats(rand(B, d, seed=seed + i).abs(), 100) for i, d in enumerate(dims)]
    concat = torch.cat([m.pooled for m in members], 1) / math.sqrt(len(members))
    return members, concat


def test_ensemble_kernel_mean_equals_concatenated_scaled_kernel():
    members, concat = ensemble(10)
    mean_kernel = sum(m.pooled.double() @ m.pooled.double().t() for m in members) / len(members)
    torch.testing.assert_close(concat.double() @ concat.double().t(), mean_kernel, rtol=1e-6, atol=1e-6)
    h_s = rand(B, 4, seed=20)
    with_members = FKD(ctx())(feats(h_s), feats(concat, 100, members), BATCH).item()
    from_concat = FKD(ctx())(feats(h_s), feats(concat, 100), BATCH).item()
    assert with_members == pytest.approx(from_concat, rel=1e-5)
    k = mean_kernel.numpy()
    rho_t = [[k[i, j] / math.sqrt(k[i, i] * k[j, j]) for j in range(B)] for i in range(B)]
    assert with_members == pytest.approx(expected_fkd(h_s.double().numpy(), rho_t), rel=1e-5)


def test_ensemble_correlation_mean_option():
    members, concat = ensemble(30)
    h_s = rand(B, 4, seed=40)
    mats = [cos_matrix(m.pooled.double().numpy()) for m in members]
    rho_t = [[sum(m[i][j] for m in mats) / len(mats) for j in range(B)] for i in range(B)]
    got = FKD(ctx(), ensemble="correlation_mean")(feats(h_s), feats(concat, 100, members), BATCH).item()
    assert got == pytest.approx(expected_fkd(h_s.double().numpy(), rho_t), rel=1e-5)
    with pytest.raises(ValueError, match="kernel_mean"):
        FKD(ctx(), ensemble="median")


def test_gradients_reach_student_not_teacher_through_the_method():
    h_s, h_t = rand(B, 4, seed=5).requires_grad_(), rand(B, 7, seed=6).requires_grad_()
    obj = build_objective("fkd", ctx())
    assert obj.teacher_needs == {"pooled"}
    out = obj(feats(h_s), feats(h_t, 100), BATCH)
    assert set(out) == {"ce", "fkd", "feature_reg"}
    sum(out.values()).backward()
    assert h_s.grad is not None and h_s.grad.abs().sum() > 0
    assert h_t.grad is None


def test_methods_and_bf16_inputs():
    assert METHODS.get("fkd_no_fr").terms == {"fkd": 100.0}
    assert METHODS.get("fkd").terms == {"fkd": 100.0, "feature_reg": 5e-4}
    h_s, h_t = rand(B, 4, seed=7), rand(B, 7, seed=8)
    loss = FKD(ctx())(feats(h_s.bfloat16()), feats(h_t.bfloat16(), 100), BATCH)
    assert loss.dtype == torch.float32


# ---------------------------------------------------------------- KD with a teacher ensemble (Fig. 4)
def np_softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def np_kd_to(zs, targets, T):
    """T² · mean over the batch of Σ_c p_c log(p_c / q_c), q = softmax(z_s / T)."""
    return T * T * np.mean([sum(p * math.log(p / q) for p, q in zip(pt, np_softmax(z / T)))
                            for z, pt in zip(zs, targets)])


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_ensemble_target_tempered_mean_default_and_averaged_probs_option(T):
    """Through kdbench's real ensemble record (TeacherEnsemble of 3 resnet8): the default target is
    the mean of the members' tempered softmaxes; ``averaged_probs`` is the averaged probability
    raised to 1/T and renormalised (the ensemble's logits at temperature T)."""
    from kdbench.engine.teachers import TeacherEnsemble
    from kdbench.models import build_model

    torch.manual_seed(0)
    members = [build_model("resnet8", 10).eval() for _ in range(3)]
    with torch.no_grad():
        for m in members:
            m.fc.weight.mul_(30)  # confident, disagreeing members: the two readings differ clearly
        t = TeacherEnsemble(members)(torch.randn(4, 3, 32, 32))
    z_e = np.stack([m.logits.double().numpy() for m in t.members])
    zs = rand(4, 10, seed=3).double().numpy()
    s = Features([], [], torch.zeros(4, 7), torch.from_numpy(zs).float())
    tempered = np.mean([[np_softmax(z / T) for z in ze] for ze in z_e], axis=0)
    averaged = np.mean([[np_softmax(z) for z in ze] for ze in z_e], axis=0) ** (1 / T)
    averaged /= averaged.sum(1, keepdims=True)
    c = MethodContext(shapes(7, 10), shapes(64, 10), 10, torch.zeros(8, dtype=torch.long))
    default = build_objective(METHODS.get("kd").with_overrides({"params": {"kd": {"T": T}}}), c).terms["kd"]
    legacy = build_objective("kd", c, {"params": {"kd": {"T": T, "ensemble": "averaged_probs"}}}).terms["kd"]
    got_default, got_legacy = default(s, t, BATCH).item(), legacy(s, t, BATCH).item()
    assert got_default == pytest.approx(np_kd_to(zs, tempered, T), rel=1e-4)
    assert got_legacy == pytest.approx(np_kd_to(zs, averaged, T), rel=1e-4)
    if T != 1.0:  # the two readings differ except at T = 1
        assert abs(got_default - got_legacy) > 1e-3 * got_default
    one = Features([], [], t.pooled, t.members[0].logits)  # a single teacher: both are softmax(z/T)
    assert default(s, one, BATCH).item() == pytest.approx(legacy(s, one, BATCH).item(), rel=1e-6)
    with pytest.raises(ValueError, match="tempered_mean, averaged_probs"):
        build_objective("kd", c, {"params": {"kd": {"ensemble": "mean"}}})
