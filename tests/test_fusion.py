"""Horizontal fusion (kdbench/engine/fusion.py): the fused model must behave exactly as its K
members trained separately. The reference is always each member's own forward/backward/SGD,
run independently on copies of the members."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from kdbench.engine.fusion import SUPPORTED_ARCHS, fuse
from kdbench.engine.optim import SGD
from kdbench.models import build_model

from conftest import assert_states_close

K, B, NC = 3, 4, 10
ARCHS = ["resnet8", "resnet8x4", "wrn_16_1", "vgg8"]


def members(arch: str, dtype=torch.float64, k: int = K) -> list[torch.nn.Module]:
    """K members with different weights and non-trivial BN affine parameters and running stats."""
    out = []
    for i in range(k):
        torch.manual_seed(100 + i)
        m = build_model(arch, NC).to(dtype)
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.weight.uniform_(0.5, 1.5), mod.bias.normal_(0, 0.1)
                    mod.running_mean.normal_(0, 0.1), mod.running_var.uniform_(0.5, 2.0)
        out.append(m)
    return out


def batches(dtype=torch.float64, k: int = K, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, 3, 32, 32, generator=g, dtype=dtype) for _ in range(k)]
    ys = [torch.randint(0, NC, (B,), generator=g) for _ in range(k)]
    return xs, ys


def feature_tensors(f):
    return [*f.stages, *f.preact, f.pooled, f.logits]


def member_loss(f, y):
    """CE plus a term on every stage map, so that every output of the forward carries gradient."""
    return F.cross_entropy(f.logits, y) + sum((s ** 2).mean() for s in [*f.stages, *f.preact])


def fused_with_copies(arch: str, train: bool = True, dtype=torch.float64):
    """K members, untouched copies of them to run separately, their fused model and one batch each."""
    ms = members(arch, dtype)
    refs = copy.deepcopy(ms)
    xs, ys = batches(dtype)
    return ms, refs, fuse(ms).train(train), xs, ys


def max_diff(a: dict, b: dict) -> float:
    assert list(a) == list(b)
    return max((a[n].double() - b[n].double()).abs().max().item() for n in a)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("train", [True, False])
def test_forward_equals_members(arch, train):
    _, refs, fused, xs, _ = fused_with_copies(arch, train)
    out = fused(xs)
    assert len(out) == K
    for ref, x, f in zip(refs, xs, out):
        r = ref.train(train)(x)
        for a, b in zip(feature_tensors(r), feature_tensors(f), strict=True):
            assert a.shape == b.shape
            torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    # the fused input may also be given stacked along channels
    torch.testing.assert_close(fused.eval()(torch.cat(xs, 1))[1].logits, refs[1].eval()(xs[1]).logits, rtol=0, atol=1e-12)


@pytest.mark.parametrize("arch", ["resnet8", "wrn_16_1", "vgg8"])
def test_running_stats_after_train_forward(arch):
    ms, refs, fused, xs, _ = fused_with_copies(arch)
    for _ in range(2):
        fused(xs)
        for ref, x in zip(refs, xs):
            ref.train()(x)
    for ref, sd in zip(refs, fused.unfuse()):
        assert max_diff(sd, ref.state_dict()) < 1e-12
        assert all(int(sd[n]) == 2 for n in sd if n.endswith("num_batches_tracked"))
    # and the members themselves were not touched by fusing
    assert all(int(v) == 0 for m in ms for n, v in m.state_dict().items() if n.endswith("num_batches_tracked"))


@pytest.mark.parametrize("arch", ["resnet8x4", "wrn_16_1", "vgg8"])
def test_gradients_of_summed_losses(arch):
    _, refs, fused, xs, ys = fused_with_copies(arch)
    sum(member_loss(f, y) for f, y in zip(fused(xs), ys)).backward()
    grads = fused.unfuse_tensors({n: p.grad for n, p in fused.net.named_parameters()})
    for ref, x, y, g in zip(refs, xs, ys, grads):
        member_loss(ref.train()(x), y).backward()
        ref_grads = {n: p.grad for n, p in ref.named_parameters()}
        assert set(g) == set(ref_grads)
        assert max_diff({n: g[n] for n in ref_grads}, ref_grads) < 1e-12


@pytest.mark.parametrize("arch", ARCHS)
def test_float32_forward_and_gradients(arch):
    """The fused float32 path: features and gradients of one pass within FLOAT32_PASS_RTOL (conftest)
    of the members' own; the maths is tested in float64 above."""
    _, refs, fused, xs, ys = fused_with_copies(arch, dtype=torch.float32)
    out = fused(xs)
    sum(member_loss(f, y) for f, y in zip(out, ys)).backward()
    grads = fused.unfuse_tensors({n: p.grad for n, p in fused.net.named_parameters()})
    for ref, x, y, f, g in zip(refs, xs, ys, out, grads):
        r = ref.train()(x)
        assert_states_close(dict(enumerate(feature_tensors(f))), dict(enumerate(feature_tensors(r))))
        member_loss(r, y).backward()
        ref_grads = {n: p.grad for n, p in ref.named_parameters()}
        assert_states_close({n: g[n] for n in ref_grads}, ref_grads)


def _train_separately(refs, data, lr=0.05):
    opts = [SGD(m.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4) for m in refs]
    for xs, ys in data:
        for m, opt, x, y in zip(refs, opts, xs, ys):
            opt.zero_grad()
            member_loss(m.train()(x), y).backward()
            opt.step()
    return opts


@pytest.mark.parametrize("arch", ARCHS)
def test_three_sgd_steps_one_fused_optimizer(arch):
    """The same maths as the members trained separately: within 1e-12 after 3 steps, in float64
    (in float32 the steps amplify a chance ReLU-kink flip, see FLOAT32_PASS_RTOL in conftest)."""
    dtype = torch.float64
    ms = members(arch, dtype)
    refs = copy.deepcopy(ms)
    data = [batches(dtype, seed=s) for s in range(3)]  # each member sees its own batches
    ref_opts = _train_separately(refs, data)
    fused = fuse(ms)
    opt = SGD(fused.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for xs, ys in data:
        opt.zero_grad()
        sum(member_loss(f, y) for f, y in zip(fused.train()(xs), ys)).backward()
        opt.step()
    names = [n for n, _ in fused.named_parameters()]
    momenta = fused.unfuse_tensors(dict(zip(names, opt.buffers)))
    for ref, ref_opt, sd, mom in zip(refs, ref_opts, fused.unfuse(), momenta):
        assert max_diff(sd, ref.state_dict()) < 1e-12
        ref_mom = {n: b for (n, _), b in zip(ref.named_parameters(), ref_opt.buffers)}
        assert max_diff({n: mom[n] for n in ref_mom}, ref_mom) < 1e-12
    # writing back gives members whose own forward is the fused one
    fused.write_back(ms)
    xs, _ = batches(dtype, seed=9)
    for m, x, f in zip(ms, xs, fused.eval()(xs)):
        torch.testing.assert_close(m.eval()(x).logits, f.logits, rtol=0, atol=1e-12)


def test_bind_members_keep_their_own_optimizers():
    ms = members("resnet8", torch.float64)
    refs = copy.deepcopy(ms)
    data = [batches(seed=s) for s in range(3)]
    _train_separately(refs, data)
    fused = fuse(ms)
    fused.bind(ms)
    opts = [SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4) for m in ms]
    for xs, ys in data:
        for o in opts:
            o.zero_grad()
        fused.zero_grad(set_to_none=True)
        sum(member_loss(f, y) for f, y in zip(fused.train()(xs), ys)).backward()
        fused.sync_members(ms)
        for o in opts:
            o.step()  # in place on views of the fused storage
    for m, ref in zip(ms, refs):  # the members' own state dicts (BN stats and counters included)
        assert max_diff(m.state_dict(), ref.state_dict()) < 1e-12
    for sd, ref in zip(fused.unfuse(), refs):
        assert max_diff(sd, ref.state_dict()) < 1e-12


def test_member_batch_counters_keep_their_offsets():
    ms = members("resnet8", k=2)
    ms[1].bn1.num_batches_tracked.fill_(7)
    fused = fuse(ms).train()
    fused(batches(k=2)[0])
    sds = fused.unfuse()
    assert int(sds[0]["bn1.num_batches_tracked"]) == 1 and int(sds[1]["bn1.num_batches_tracked"]) == 8
    assert int(sds[1]["layer1.0.bn1.num_batches_tracked"]) == 1


def test_refuses_what_it_cannot_fuse():
    with pytest.raises(ValueError, match="supported: .*resnet8x4.*wrn_40_2.*vgg19"):
        fuse([build_model("MobileNetV2", NC), build_model("MobileNetV2", NC)])
    with pytest.raises(ValueError, match="share one architecture.*resnet14"):
        fuse([build_model("resnet8", NC), build_model("resnet14", NC)])
    with pytest.raises(ValueError, match="state dict"):
        fuse([build_model("resnet8", NC), build_model("resnet8", 5)])
    with pytest.raises(ValueError, match="at least one"):
        fuse([])
    fused = fuse(members("resnet8", k=2))
    with pytest.raises(ValueError, match="expected 2 member batches"):
        fused(batches(k=3)[0])
    assert "resnet32x4" in SUPPORTED_ARCHS and "wrn_16_2" in SUPPORTED_ARCHS
