"""KDA term (kdbench/methods/kda.py) and the untransferred-kernel diagnostic (kdbench/stats/kernels.py).

Expected values are computed here from the formulas with numpy loops, never from the term.
"""

import numpy as np
import pytest
import torch

from kdbench.methods import METHODS, Batch, MethodContext, build_objective
from kdbench.methods.kda import KDA
from kdbench.core.features import Features, FeatureShapes
from kdbench.stats.kernels import KernelGap, untransferred_kernel_fraction

L, D_S, D_T = 3, 4, 6  # classes, student and teacher feature dims (deliberately different)


def shapes(d, classes=L):
    stem = torch.Size([2, 4, 4])
    return FeatureShapes((stem,), (stem,), torch.Size([d]), torch.Size([classes]))


def ctx():
    return MethodContext(shapes(D_S), shapes(D_T), L, torch.tensor([0, 1, 2, 0]))


def feats(pooled, logits=None):
    b = pooled.shape[0]
    logits = torch.zeros(b, L) if logits is None else logits
    stem = torch.zeros(b, 2, 4, 4)
    return Features([stem], [stem], pooled, logits)


def batch(y, epoch):
    y = torch.as_tensor(y)
    return Batch(torch.zeros(len(y), 3, 4, 4), y, torch.arange(len(y)), epoch=epoch)


def smooth_l1(a, b, beta=1.0):
    total = 0.0
    for u, v in zip(np.ravel(a), np.ravel(b)):
        d = abs(u - v)
        total += 0.5 * d * d / beta if d < beta else d - 0.5 * beta
    return total


def class_means(f, y, classes=L):
    out = np.zeros((classes, f.shape[1]))
    for c in range(classes):
        rows = [f[i] for i in range(len(y)) if y[i] == c]
        if rows:
            out[c] = np.mean(rows, axis=0)
    return out


def expected_kda(f_s, f_t, c_s, c_t):
    k_s, k_t = f_s @ c_s.T, f_t @ c_t.T
    return smooth_l1(k_s, k_t) / np.sqrt((k_t ** 2).sum())


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


def test_golden_value_with_given_centroids():
    term = KDA(ctx(), warmup_epochs=0)
    f_s, f_t = rand(5, D_S, seed=1) * 2, rand(5, D_T, seed=2) * 2  # both smooth-L1 regimes occur
    term.center_s.copy_(rand(L, D_S, seed=3))
    term.center_t.copy_(rand(L, D_T, seed=4))
    got = term(feats(f_s), feats(f_t), batch([0, 1, 2, 0, 1], epoch=1))
    want = expected_kda(f_s.double().numpy(), f_t.double().numpy(), term.center_s.double().numpy(),
                        term.center_t.double().numpy())
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_centroids_follow_the_previous_epoch_rule_and_warmup():
    term = KDA(ctx(), warmup_epochs=1)
    y1, y2 = [[0, 1, 0], [2, 0, 1]], [[1, 2, 2], [0, 1, 0]]
    e1 = [(rand(3, D_S, seed=10 + i), rand(3, D_T, seed=20 + i)) for i in range(2)]
    e2 = [(rand(3, D_S, seed=30 + i), rand(3, D_T, seed=40 + i)) for i in range(2)]
    # epoch 1 is warm-up: the loss is a differentiable zero, the centroids still accumulate
    for (f_s, f_t), y in zip(e1, y1):
        f_s.requires_grad_(True)
        loss = term(feats(f_s), feats(f_t), batch(y, epoch=1))
        assert loss.item() == 0.0
        loss.backward()
        assert f_s.grad is not None and torch.all(f_s.grad == 0)
    assert torch.all(term.center_s == 0)  # frozen within the epoch: still the initial zeros
    term.on_epoch_end(1)
    y_all = sum(y1, [])
    c_s = class_means(torch.cat([f for f, _ in e1]).detach().double().numpy(), y_all)
    c_t = class_means(torch.cat([f for _, f in e1]).double().numpy(), y_all)
    np.testing.assert_allclose(term.center_s.numpy(), c_s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(term.center_t.numpy(), c_t, rtol=1e-5, atol=1e-6)
    # epoch 2 uses the epoch-1 centroids for every batch (not the running epoch-2 sums)
    for (f_s, f_t), y in zip(e2, y2):
        got = term(feats(f_s), feats(f_t), batch(y, epoch=2)).item()
        assert got == pytest.approx(expected_kda(f_s.double().numpy(), f_t.double().numpy(), c_s, c_t), rel=1e-5)
    term.on_epoch_end(2)
    y_all = sum(y2, [])
    np.testing.assert_allclose(term.center_s.numpy(), class_means(torch.cat([f for f, _ in e2]).double().numpy(), y_all),
                               rtol=1e-5, atol=1e-6)


def test_default_warmup_is_five_epochs_and_eval_mode_does_not_accumulate():
    term = KDA(ctx())
    term.center_s.fill_(1.0)
    term.center_t.fill_(2.0)
    f_s, f_t = rand(3, D_S, seed=5), rand(3, D_T, seed=6)
    assert term(feats(f_s), feats(f_t), batch([0, 1, 2], epoch=5)).item() == 0.0
    assert term(feats(f_s), feats(f_t), batch([0, 1, 2], epoch=6)).item() > 0.0
    term.eval()
    before = term.count.clone()
    term(feats(f_s), feats(f_t), batch([0, 1, 2], epoch=6))
    assert torch.equal(term.count, before)


def test_no_centroids_yet_gives_zero_not_nan_and_unseen_class_centroid_is_zero():
    term = KDA(ctx(), warmup_epochs=0)
    f_s, f_t = rand(2, D_S, seed=7), rand(2, D_T, seed=8)
    assert term(feats(f_s), feats(f_t), batch([0, 0], epoch=1)).item() == 0.0
    term.on_epoch_end(1)
    assert torch.all(term.center_s[1:] == 0) and torch.isfinite(term.center_s).all()


def test_gradients_reach_student_not_teacher_and_resume_is_identical():
    term = KDA(ctx(), warmup_epochs=0)
    term.center_s.copy_(rand(L, D_S, seed=11))
    term.center_t.copy_(rand(L, D_T, seed=12))
    f_s, f_t = rand(4, D_S, seed=13).requires_grad_(), rand(4, D_T, seed=14).requires_grad_()
    loss = term(feats(f_s), feats(f_t), batch([0, 1, 2, 1], epoch=3))
    loss.backward()
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    assert f_t.grad is None
    resumed = KDA(ctx(), warmup_epochs=0)
    resumed.load_state_dict(term.state_dict())  # centroids, sums and counts are buffers
    for name in ("center_s", "center_t", "sum_s", "sum_t", "count"):
        assert torch.equal(getattr(resumed, name), getattr(term, name))


def test_after_fc_layer_and_methods():
    c = ctx()
    after = KDA(c, layer="logits", warmup_epochs=0)
    assert after.teacher_needs == {"logits"} and after.center_s.shape == (L, L)
    with pytest.raises(ValueError, match="pooled"):
        KDA(c, layer="stages")
    combo = build_objective("kda_combo", c)
    assert set(combo.terms) == {"kda", "kda_logits"} and combo.teacher_needs == {"pooled", "logits"}
    assert combo.terms["kda_logits"].layer == "logits" and combo.terms["kda"].layer == "pooled"
    spec = METHODS.get("kda_before_kd")
    assert spec.ce == 1.0 and spec.terms == {"kd": 1.0, "kda": 0.04} and spec.params["kd"]["T"] == 4.0
    assert METHODS.get("kda_after").terms == {"kda_logits": 0.04}
    out = combo(feats(rand(3, D_S, seed=1), rand(3, L, seed=2)), feats(rand(3, D_T, seed=3), rand(3, L, seed=4)),
                batch([0, 1, 2], epoch=1))
    assert set(out) == {"ce", "kda", "kda_logits"}


# --- the untransferred kernel fraction ---

def explicit_fraction(a, b):
    k_s, k_t = a @ a.T, b @ b.T
    return np.sqrt(((k_s - k_t) ** 2).sum()) / np.sqrt((k_t ** 2).sum())


@pytest.mark.parametrize("method", ["auto", "gram", "blocks"])
def test_untransferred_kernel_fraction_matches_explicit_kernels(method):
    a, b = rand(37, 5, seed=21), rand(37, 8, seed=22)  # different feature dims
    want = explicit_fraction(a.double().numpy(), b.double().numpy())
    assert untransferred_kernel_fraction(a, b, chunk_size=10, method=method) == pytest.approx(want, rel=1e-9)


def test_untransferred_kernel_fraction_edge_cases():
    a = rand(20, 2, 3, 3, seed=23)  # feature maps are flattened per sample
    assert untransferred_kernel_fraction(a, a) == pytest.approx(0.0, abs=1e-6)
    assert untransferred_kernel_fraction(torch.zeros(20, 4), a) == pytest.approx(1.0)
    gap = KernelGap()
    for i in range(0, 20, 7):  # streaming over chunks
        gap.update(a[i:i + 7], 2 * a[i:i + 7])
    assert gap.fraction() == pytest.approx(0.75)  # K_S = K_T / 4
    with pytest.raises(ValueError, match="samples"):
        untransferred_kernel_fraction(a, a[:3])


def test_loss_is_float32_under_autocast():
    term = KDA(ctx(), warmup_epochs=0)
    term.center_s.copy_(rand(L, D_S, seed=3))
    term.center_t.copy_(rand(L, D_T, seed=4))
    term.eval()
    f_s, f_t = rand(5, D_S, seed=1), rand(5, D_T, seed=2)
    plain = term(feats(f_s), feats(f_t), batch([0, 1, 2, 0, 1], epoch=1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = term(feats(f_s.bfloat16()), feats(f_t.bfloat16()), batch([0, 1, 2, 0, 1], epoch=1))
    assert auto.dtype == torch.float32
    assert auto.item() == pytest.approx(plain.item(), rel=2e-2)  # only the bf16 inputs are rounded
