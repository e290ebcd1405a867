"""CRD: golden NCE values (numpy loops), memory update, Z, gradients, the negative sampler."""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from kdbench.methods import Batch, MethodContext, build_objective
from kdbench.methods.crd import CRD, OtherClassSampler, momentum_update, nce_loss, nce_scores
from kdbench.core.features import Features, FeatureShapes


def shapes(d_pooled, n_cls=3):
    st = (torch.Size([4, 8, 8]), torch.Size([8, 4, 4]))
    return FeatureShapes(st, st, torch.Size([d_pooled]), torch.Size([n_cls]))


def feats(pooled, n_cls=3):
    B = pooled.shape[0]
    maps = [torch.randn(B, 4, 8, 8), torch.randn(B, 8, 4, 4)]
    return Features(maps, maps, pooled, torch.randn(B, n_cls))


def ctx(labels, d_s=3, d_t=3):
    return MethodContext(shapes(d_s), shapes(d_t), int(labels.max()) + 1, labels)


LABELS = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0])  # N = 8; other-class counts 5, 5, 6


def np_side_loss(v, memory, cidx, T, Z, N):
    """-(1/B) Σ_b [log P0/(P0+K/N+ε) + Σ_k log (K/N)/(Pk+K/N+ε)],  P = exp(<mem, v>/T)/Z."""
    B, K1 = cidx.shape
    m_pn, total = (K1 - 1) / N, 0.0
    for b in range(B):
        for k in range(K1):
            P = math.exp(sum(memory[cidx[b, k], d] * v[b, d] for d in range(v.shape[1])) / T) / Z
            total += math.log(P / (P + m_pn + 1e-7)) if k == 0 else math.log(m_pn / (P + m_pn + 1e-7))
    return -total / B


def np_update(memory, idx, v, m):
    out = memory.copy()
    for i, row in zip(idx, v):
        new = m * memory[i] + (1 - m) * row
        out[i] = new / np.sqrt((new ** 2).sum())
    return out


def fixed_crd(nce_k=3):
    torch.manual_seed(0)
    crd = CRD(ctx(LABELS), feat_dim=3, nce_k=nce_k, nce_t=0.5, nce_m=0.5)
    with torch.no_grad():  # identity embeddings: v = normalise(pooled)
        for e in (crd.embed_s, crd.embed_t):
            e.linear.weight.copy_(torch.eye(3))
            e.linear.bias.zero_()
    return crd


def test_nce_golden_with_fixed_indices_and_Z():
    rng = np.random.default_rng(0)
    N, D, T = 8, 3, 0.5
    mem = rng.normal(size=(N, D))
    v = rng.normal(size=(2, D))
    cidx = np.array([[1, 2, 5, 6], [4, 0, 7, 1]])
    Z = 7.5
    got = nce_loss(nce_scores(torch.tensor(v), torch.tensor(mem), torch.tensor(cidx), T) / Z, N)
    assert got.item() == pytest.approx(np_side_loss(v, mem, cidx, T, Z, N), rel=1e-10)


def test_crd_forward_golden_update_and_fixed_Z(monkeypatch):
    crd = fixed_crd()
    mem_s0, mem_t0 = crd.memory_s.double().numpy().copy(), crd.memory_t.double().numpy().copy()
    cidx = np.array([[2, 0, 1, 7], [6, 2, 3, 4]])  # own index first, then other-class samples
    monkeypatch.setattr(crd, "contrast_indices", lambda index, generator=None: torch.tensor(cidx))
    ps, pt = torch.randn(2, 3), torch.randn(2, 3)
    batch = Batch(torch.zeros(2), LABELS[[2, 6]], torch.tensor([2, 6]))
    loss = crd(feats(ps), feats(pt), batch)

    v_s = (ps / ps.norm(dim=1, keepdim=True)).double().numpy()
    v_t = (pt / pt.norm(dim=1, keepdim=True)).double().numpy()
    raw = lambda v, mem: [math.exp(mem[cidx[b, k]] @ v[b] / 0.5) for b in range(2) for k in range(4)]
    Z_s, Z_t = np.mean(raw(v_s, mem_t0)) * 8, np.mean(raw(v_t, mem_s0)) * 8  # first batch sets Z
    expected = np_side_loss(v_s, mem_t0, cidx, 0.5, Z_s, 8) + np_side_loss(v_t, mem_s0, cidx, 0.5, Z_t, 8)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert crd.Z_s.item() == pytest.approx(Z_s, rel=1e-4) and crd.Z_t.item() == pytest.approx(Z_t, rel=1e-4)
    np.testing.assert_allclose(crd.memory_s.numpy(), np_update(mem_s0, [2, 6], v_s, 0.5), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(crd.memory_t.numpy(), np_update(mem_t0, [2, 6], v_t, 0.5), rtol=1e-5, atol=1e-6)

    crd(feats(torch.randn(2, 3) * 5), feats(torch.randn(2, 3)), batch)  # Z stays fixed afterwards
    assert crd.Z_s.item() == pytest.approx(Z_s, rel=1e-4) and crd.Z_t.item() == pytest.approx(Z_t, rel=1e-4)

    crd.eval()  # no bank or Z change outside training
    before = crd.memory_s.clone()
    crd(feats(torch.randn(2, 3)), feats(torch.randn(2, 3)), batch)
    assert torch.equal(before, crd.memory_s)


def test_momentum_update_golden():
    mem = torch.randn(5, 4, dtype=torch.float64)
    v = torch.randn(2, 4, dtype=torch.float64)
    expected = np_update(mem.numpy(), [3, 1], v.numpy(), 0.3)
    momentum_update(mem, torch.tensor([3, 1]), v, 0.3)
    np.testing.assert_allclose(mem.numpy(), expected, rtol=1e-12)


def test_gradients_mismatched_dims_and_state():
    labels = torch.arange(40) % 4
    crd = CRD(ctx(labels, d_s=6, d_t=10), nce_k=16)
    s_pooled = torch.randn(5, 6, requires_grad=True)
    t_pooled = torch.randn(5, 10, requires_grad=True)  # even if it required grad, it gets none
    g = torch.Generator().manual_seed(1)
    loss = crd(feats(s_pooled.to(torch.bfloat16)), feats(t_pooled),
               Batch(torch.zeros(5), labels[:5], torch.arange(5), 1, g))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert s_pooled.grad is not None and s_pooled.grad.abs().sum() > 0
    assert t_pooled.grad is None
    for p in list(crd.embed_s.parameters()) + list(crd.embed_t.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0
    state = crd.state_dict()
    assert {"memory_s", "memory_t", "Z_s", "Z_t"} <= set(state) and not any("sampler" in k for k in state)
    assert crd.memory_s.shape == (40, 128)
    untouched = crd.memory_s[5:]  # uniform ±1/sqrt(128/3) init; rows 0-4 were updated (unit norm)
    assert untouched.abs().max() <= 1 / math.sqrt(128 / 3) and untouched.std() > 0.05
    assert torch.allclose(crd.memory_s[:5].norm(dim=1), torch.ones(5))


def repdistiller_draws_with_replacement(labels: list[int], target: int, k: int) -> bool:
    """RepDistiller ``dataset/cifar100.py`` CIFAR100InstanceSample: ``cls_negative[target]`` is every
    other-class sample, and ``np.random.choice(cls_negative[target], k, replace=k > len(...))``."""
    cls_negative = [i for i, c in enumerate(labels) if c != target]
    return k > len(cls_negative)


@pytest.mark.parametrize("k", [4, 9, 12, 16384])
def test_nce_k_kept_and_drawn_with_replacement_where_repdistiller_does(k):
    """Classes of 10, 3 and 3 samples (other-class counts 6, 13, 13): with k = 9 or 12 class 0
    draws with replacement and classes 1, 2 without; k = 16384 draws every row with replacement.
    nce_k is never reduced."""
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 3)[torch.randperm(16, generator=torch.Generator().manual_seed(0))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        crd = CRD(ctx(labels), nce_k=k)
    assert crd.nce_k == k
    idx = crd.contrast_indices(torch.tensor([0, 5]), torch.Generator().manual_seed(0))
    assert idx.shape == (2, k + 1) and idx[:, 0].tolist() == [0, 5]
    y = torch.tensor([0, 1, 2] * 300)
    draws = crd.sampler(y, min(k, 64), torch.Generator().manual_seed(1))
    k = min(k, 64)
    assert draws.shape == (900, k) and (labels[draws] != y.unsqueeze(1)).all()
    for c in range(3):
        rows, allowed = draws[y == c], (labels != c).nonzero().flatten()
        if not repdistiller_draws_with_replacement(labels.tolist(), c, k):
            assert all(len(set(r.tolist())) == k for r in rows)  # without replacement
        counts = torch.bincount(rows.flatten(), minlength=16)[allowed].numpy()
        assert counts.sum() == rows.numel() and chisquare(counts).pvalue > 1e-3


@pytest.mark.parametrize("replace", [True, False])
def test_sampler_other_classes_uniform_and_reproducible(replace):
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0] * 5 + [1] * 8 + [2] * 11 + [3] * 6)[perm]
    sampler = OtherClassSampler(labels, replace=replace, max_chunk=64)  # tiny chunks: exercise chunking
    y = torch.tensor([1, 2, 0, 3] * 500)
    draws = sampler(y, 4, torch.Generator().manual_seed(0))
    assert torch.equal(draws, sampler(y, 4, torch.Generator().manual_seed(0)))
    assert (labels[draws] != y.unsqueeze(1)).all()
    if not replace:
        assert all(len(set(r.tolist())) == 4 for r in draws)
    for c in range(4):
        hits = draws[y == c].flatten()
        allowed = (labels != c).nonzero().flatten()
        counts = torch.bincount(hits, minlength=30)[allowed].numpy()
        assert counts.sum() == hits.numel() and chisquare(counts).pvalue > 1e-3
    # drawing every other-class sample without replacement yields each exactly once
    if not replace:
        full = sampler(torch.tensor([2]), 19, torch.Generator().manual_seed(1))
        assert sorted(full[0].tolist()) == (labels != 2).nonzero().flatten().tolist()


def test_methods_build_and_run():
    labels = torch.arange(64) % 3
    c = ctx(labels, d_s=6, d_t=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("crd", "crd_kd"):
            obj = build_objective(name, c)
            b = Batch(torch.zeros(4), labels[:4], torch.arange(4))
            out = obj(feats(torch.randn(4, 6)), feats(torch.randn(4, 6)), b)
            assert set(out) == ({"ce", "crd"} if name == "crd" else {"ce", "kd", "crd"})
            assert obj.spec.terms["crd"] == 0.8 and obj.terms["crd"].nce_k == 16384


def test_forward_float32_under_autocast(monkeypatch):
    crd = fixed_crd()
    cidx = torch.tensor([[2, 0, 1, 7], [6, 2, 3, 4]])
    monkeypatch.setattr(crd, "contrast_indices", lambda index, generator=None: cidx)
    crd.eval()
    ps, pt = torch.randn(2, 3), torch.randn(2, 3)
    b = Batch(torch.zeros(2), LABELS[[2, 6]], torch.tensor([2, 6]))
    ref = crd(feats(ps), feats(pt), b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = crd(feats(ps), feats(pt), b)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(ref.item(), rel=2e-2)
