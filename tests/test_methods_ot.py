"""OT-KD terms (kdbench/methods/ot.py): REMD and IPOT against loops and an exact OT solver."""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from kdbench.methods import METHODS, Batch, MethodContext, build_objective
from kdbench.methods.ot import IPOT, REMD, cosine_cost, ipot_plan, remd_cost
from kdbench.models.features import Features, FeatureShapes

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


def loop_remd(c):
    b = len(c)
    rows = sum(min(c[i][j] for j in range(b)) for i in range(b))
    cols = sum(min(c[i][j] for i in range(b)) for j in range(b))
    return max(rows, cols) / b


def exact_ot(c):
    r, k = linear_sum_assignment(c)  # uniform equal-size marginals: OT = optimal assignment / b
    return c[r, k].mean()


def test_cost_and_remd_golden_values():
    x, y = rand(B, 5, seed=1), rand(B, 5, seed=2)
    c = cosine_cost(x, y)
    np.testing.assert_allclose(c.numpy(), loop_cost(x.numpy(), y.numpy()), rtol=1e-12, atol=1e-12)
    assert remd_cost(c).item() == pytest.approx(loop_remd(c.numpy()), rel=1e-12)
    term = REMD(ctx())
    got = term(feats(x.float(), rand(B, 3, 4, 4, seed=3).float()), feats(y.float(), rand(B, 3, 4, 4, seed=4).float()), BATCH)
    assert got.item() == pytest.approx(loop_remd(c.numpy()), rel=1e-5)


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
    term = IPOT(ctx(), beta=0.5, n_outer=50, n_inner=1)
    loss = term(feats(x, stage), feats(y, stage), BATCH)
    c = cosine_cost(x.detach().double(), y.detach().double())
    plan = ipot_plan(c, 0.5, 50, 1)
    assert loss.item() == pytest.approx((plan * c).sum().item(), rel=1e-5)
    loss.backward()
    x_ = x.detach().double().requires_grad_()
    (plan * cosine_cost(x_, y.detach().double())).sum().backward()  # the plan is a constant
    torch.testing.assert_close(x.grad.double(), x_.grad, rtol=1e-4, atol=1e-6)
    assert y.grad is None


def test_remd_gradient_flows_through_argmin_entries():
    # row minima 0.05, 0.2, 0.3 (sum 0.55) beat column minima 0.1, 0.2, 0.05 (sum 0.35)
    c = torch.tensor([[0.1, 0.5, 0.05], [0.4, 0.2, 0.8], [0.7, 0.6, 0.3]], requires_grad=True)
    remd_cost(c).backward()
    want = torch.zeros(3, 3)
    want[0, 2] = want[1, 1] = want[2, 2] = 1 / 3
    torch.testing.assert_close(c.grad, want)


def test_mismatched_dims_build_embeddings_and_gradients():
    c = ctx(d_s=5, d_t=9, stage_s=(3, 4, 4), stage_t=(6, 2, 2))
    term = REMD(c, layers=["pooled", "stage:1", "stage:-1"])
    assert set(term.embed_s) == {"pooled", "stage:1", "stage:-1"}
    assert term.teacher_needs == {"pooled", "stages"}
    x, y = rand(B, 5, seed=1).float().requires_grad_(), rand(B, 9, seed=2).float().requires_grad_()
    fs, ft = rand(B, 3, 4, 4, seed=3).float().requires_grad_(), rand(B, 6, 2, 2, seed=4).float().requires_grad_()
    loss = term(feats(x, fs), feats(y, ft), BATCH)
    loss.backward()
    assert x.grad.abs().sum() > 0 and fs.grad.abs().sum() > 0
    assert y.grad is None and ft.grad is None
    for embeds in (term.embed_s, term.embed_t):
        for e in embeds.values():
            assert e.linear.weight.grad is not None and e.linear.weight.grad.abs().sum() > 0
    same = IPOT(ctx(), layers="pooled")
    assert len(same.embed_s) == 0 and IPOT(ctx(), embed="always").embed_s["pooled"].linear.out_features == 128


def test_sum_over_layers_and_validation():
    x, y = rand(B, 5, seed=11).float(), rand(B, 5, seed=12).float()
    fs, ft = rand(B, 3, 4, 4, seed=13).float(), rand(B, 3, 4, 4, seed=14).float()
    both = REMD(ctx(), layers=["pooled", "preact:1"])(feats(x, fs), feats(y, ft), BATCH).item()
    want = loop_remd(loop_cost(x.double().numpy(), y.double().numpy()))
    want += loop_remd(loop_cost(fs.flatten(1).double().numpy(), ft.flatten(1).double().numpy()))
    assert both == pytest.approx(want, rel=1e-5)
    for bad in (["stage"], ["stage:x"], ["feat:1"], []):
        with pytest.raises(ValueError, match="valid"):
            REMD(ctx(), layers=bad)
    with pytest.raises(ValueError, match="embed"):
        REMD(ctx(d_t=9), embed="never")


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
    for term in (REMD(ctx()), IPOT(ctx())):
        plain = term(feats(x, stage), feats(y, stage), BATCH)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = term(feats(x, stage), feats(y, stage), BATCH)
        assert auto.dtype == torch.float32 and auto.item() == plain.item()
