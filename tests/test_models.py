"""Model zoo: parameter counts to the parameter, the Features contract, preact semantics."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from kdbench.models import MODELS, Features, build_model, feature_shapes, model_names
from kdbench.core.registry import UnknownNameError

# ---------------------------------------------------------------------------------------------
# Independent parameter arithmetic from the reference layer specs (RepDistiller models/*.py,
# idstcv/KDA resnet_cifar.py, weiaicunzai/pytorch-cifar100 shufflenet.py, torchvision resnet.py).


def conv(cin, cout, k, groups=1, bias=False):
    return cin // groups * cout * k * k + (cout if bias else 0)


def bn(c):
    return 2 * c


def fc(i, o):
    return i * o + o


def basic_resnet(stem_k, widths, blocks, nc):
    """Conv-BN stem, basic blocks (two 3×3 conv-BN, 1×1 conv-BN projection on shape change)."""
    total, cin = conv(3, widths[0], stem_k) + bn(widths[0]), widths[0]
    for i, (w, n) in enumerate(zip(widths[1:], blocks)):
        for b in range(n):
            stride = (1 if i == 0 else 2) if b == 0 else 1
            total += conv(cin, w, 3) + bn(w) + conv(w, w, 3) + bn(w)
            total += conv(cin, w, 1) + bn(w) if stride != 1 or cin != w else 0
            cin = w
    return total + fc(cin, nc)


def cifar_resnet(depth, f, nc):
    return basic_resnet(3, f, [(depth - 2) // 6] * 3, nc)


def wrn(depth, k, nc):
    n, ch = (depth - 4) // 6, [16, 16 * k, 32 * k, 64 * k]
    total, cin = conv(3, 16, 3), 16
    for w in ch[1:]:
        for _ in range(n):
            total += bn(cin) + conv(cin, w, 3) + bn(w) + conv(w, w, 3) + (conv(cin, w, 1) if cin != w else 0)
            cin = w
    return total + bn(cin) + fc(cin, nc)


VGG_CFG = {"vgg8": [64, 128, 256, 512, 512], "vgg11": [64, 128, 256, 256, 512, 512, 512, 512],
           "vgg13": [64, 64, 128, 128, 256, 256, 512, 512, 512, 512],
           "vgg16": [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512],
           "vgg19": [64, 64, 128, 128] + [256] * 4 + [512] * 8}


def vgg(name, nc):
    total, cin = 0, 3
    for v in VGG_CFG[name]:
        total, cin = total + conv(cin, v, 3, bias=True) + bn(v), v
    return total + fc(512, nc)


def mobile_half(nc):
    total, cin = conv(3, 16, 3) + bn(16), 16
    for t, c, n in [(1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1)]:
        for _ in range(n):
            h, c2 = cin * t, c // 2
            total += conv(cin, h, 1) + bn(h) + conv(h, h, 3, groups=h) + bn(h) + conv(h, c2, 1) + bn(c2)
            cin = c2
    return total + conv(cin, 1280, 1) + bn(1280) + fc(1280, nc)


def shuffle_v1(nc):
    total, cin = conv(3, 24, 1) + bn(24), 24
    for out, n in [(240, 4), (480, 8), (960, 4)]:
        for b in range(n):
            o = out - cin if b == 0 else out
            mid, g1 = o // 4, 1 if cin == 24 else 3
            total += conv(cin, mid, 1, g1) + bn(mid) + conv(mid, mid, 3, mid) + bn(mid) + conv(mid, o, 1, 3) + bn(o)
            cin = out
    return total + fc(960, nc)


def shuffle_v2(nc):
    total, cin = conv(3, 24, 1) + bn(24), 24
    for out, n in [(116, 3), (232, 7), (464, 3)]:
        m = out // 2  # down unit: left dw+pw, right pw+dw+pw
        total += conv(cin, cin, 3, cin) + bn(cin) + conv(cin, m, 1) + bn(m)
        total += conv(cin, m, 1) + bn(m) + conv(m, m, 3, m) + bn(m) + conv(m, m, 1) + bn(m)
        total += n * (2 * conv(m, m, 1) + conv(m, m, 3, m) + 3 * bn(m))
        cin = out
    return total + conv(464, 1024, 1) + bn(1024) + fc(1024, nc)


def resnet50_cifar(nc):
    total, cin = conv(3, 64, 3) + bn(64), 64
    for i, (p, n) in enumerate(zip([64, 128, 256, 512], [3, 4, 6, 3])):
        for b in range(n):
            stride = (1 if i == 0 else 2) if b == 0 else 1
            total += conv(cin, p, 1) + bn(p) + conv(p, p, 3) + bn(p) + conv(p, 4 * p, 1) + bn(4 * p)
            total += conv(cin, 4 * p, 1) + bn(4 * p) if stride != 1 or cin != 4 * p else 0
            cin = 4 * p
    return total + fc(2048, nc)


def shufflenet_g3(nc):
    """weiaicunzai: every conv has a bias; bottleneck = out/4 even in the concat unit."""
    total, cin = conv(3, 24, 3, bias=True) + bn(24), 24
    for out, n in [(240, 4), (480, 8), (960, 4)]:
        for b in range(n):
            mid, o = out // 4, out - cin if b == 0 else out
            total += conv(cin, mid, 1, 3, True) + bn(mid) + conv(mid, mid, 3, mid, True) + bn(mid)
            total += conv(mid, o, 1, 3, True) + bn(o)
            cin = out
    return total + fc(960, nc)


ARITHMETIC = {
    **{f"resnet{d}": functools.partial(cifar_resnet, d, [16, 16, 32, 64]) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": functools.partial(cifar_resnet, 8, [32, 64, 128, 256]),
    "resnet32x4": functools.partial(cifar_resnet, 32, [32, 64, 128, 256]),
    **{f"wrn_{d}_{k}": functools.partial(wrn, d, k) for d in (16, 40) for k in (1, 2)},
    **{name: functools.partial(vgg, name) for name in VGG_CFG},
    "MobileNetV2": mobile_half, "ShuffleV1": shuffle_v1, "ShuffleV2": shuffle_v2, "ResNet50": resnet50_cifar,
    "ResNet18": functools.partial(basic_resnet, 3, [64, 64, 128, 256, 512], [2, 2, 2, 2]),
    "ResNet34": functools.partial(basic_resnet, 3, [64, 64, 128, 256, 512], [3, 4, 6, 3]),
    "ResNet18-0.5": functools.partial(basic_resnet, 3, [32, 32, 64, 128, 256], [2, 2, 2, 2]),
    "ShuffleNet": shufflenet_g3,
    "imagenet_resnet18": functools.partial(basic_resnet, 7, [64, 64, 128, 256, 512], [2, 2, 2, 2]),
    "imagenet_resnet34": functools.partial(basic_resnet, 7, [64, 64, 128, 256, 512], [3, 4, 6, 3]),
}

# name: (exact count, classes, published value in millions as printed, or None; where published)
EXPECTED = {
    "resnet8": (83_892, 100, None, ""),
    "resnet14": (181_108, 100, None, ""),
    "resnet20": (278_324, 100, "0.28", "CRD/DKD-era tables"),
    "resnet32": (472_756, 100, "0.47", "CRD/DKD-era tables"),
    "resnet44": (667_188, 100, None, ""),
    "resnet56": (861_620, 100, "0.86", "CRD/DKD-era tables"),
    # 1.73M as printed: truncated (1.7366M), or the CIFAR-10 head's 1,730,714
    "resnet110": (1_736_564, 100, "1.73", "CRD/DKD-era tables"),
    "resnet8x4": (1_233_540, 100, "1.23", "CRD/DKD-era tables"),
    "resnet32x4": (7_433_860, 100, "7.43", "CRD/DKD-era tables"),
    "wrn_16_1": (180_916, 100, None, ""),
    "wrn_16_2": (703_284, 100, "0.70", "CRD/DKD-era tables"),
    "wrn_40_1": (569_780, 100, "0.57", "CRD/DKD-era tables"),
    "wrn_40_2": (2_255_156, 100, "2.26", "CRD/DKD-era tables"),
    "vgg8": (3_965_028, 100, "3.97", "CRD/DKD-era tables"),
    "vgg11": (9_277_284, 100, None, ""),
    "vgg13": (9_462_180, 100, "9.46", "CRD/DKD-era tables"),
    "vgg16": (14_774_436, 100, None, ""),
    "vgg19": (20_086_692, 100, None, ""),
    "MobileNetV2": (812_836, 100, "0.81", "CRD/DKD-era tables"),
    "ShuffleV1": (949_258, 100, "0.95", "CRD/DKD-era tables"),
    "ShuffleV2": (1_355_528, 100, "1.36", "CRD/DKD-era tables"),
    "ResNet50": (23_705_252, 100, "23.71", "CRD/DKD-era tables"),
    "ResNet18": (11_220_132, 100, "11.2", "weiaicunzai/pytorch-cifar100 README"),
    "ResNet34": (21_328_292, 100, "21.3", "weiaicunzai/pytorch-cifar100 README"),
    "ResNet18-0.5": (2_820_740, 100, None, "no code released; kdbench's choice"),
    "ShuffleNet": (1_012_108, 100, "1.0", "weiaicunzai/pytorch-cifar100 README"),
    "imagenet_resnet18": (11_689_512, 1000, "11.689512", "torchvision docs (exact)"),
    "imagenet_resnet34": (21_797_672, 1000, "21.797672", "torchvision docs (exact)"),
}


@functools.lru_cache(maxsize=None)
def model(name: str, num_classes: int = 100) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, num_classes).eval()


@functools.lru_cache(maxsize=None)
def features(name: str) -> Features:
    torch.manual_seed(1)
    with torch.no_grad():
        return model(name)(torch.randn(2, 3, 32, 32))


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_every_name_is_covered():
    assert sorted(EXPECTED) == model_names() == sorted(ARITHMETIC)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parameter_count_exact(name):
    count, nc, published, _ = EXPECTED[name]
    assert ARITHMETIC[name](nc) == count
    assert n_params(model(name, nc)) == count
    if published is not None:  # agrees to the printed precision (rounded or truncated)
        assert abs(count / 1e6 - float(published)) < 10.0 ** -len(published.split(".")[1]) + 1e-9


def test_torchvision_state_dicts_load_unchanged():
    tv_models = torchvision.models
    for name, ctor in [("imagenet_resnet18", tv_models.resnet18), ("imagenet_resnet34", tv_models.resnet34)]:
        torch.manual_seed(0)
        tv = ctor().eval()
        m = build_model(name, 1000).eval()
        assert list(m.state_dict()) == list(tv.state_dict())
        m.load_state_dict(tv.state_dict())
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.allclose(m(x).logits, tv(x), atol=1e-5)
        assert m.classifier is m.fc and m.image_size == 224


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_features_contract(name):
    m, f = model(name), features(name)
    assert m.arch == name
    assert len(f.stages) == len(f.preact) >= 4
    for s, p in zip(f.stages, f.preact):
        assert s.shape == p.shape and s.shape[0] == 2 and s.dim() == 4
    assert f.pooled.shape == (2, f.stages[-1].shape[1]) or name in ("MobileNetV2", "ShuffleV2")
    assert f.logits.shape == (2, 100)
    linears = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
    assert linears == [m.classifier] and m.classifier.out_features == 100
    with torch.no_grad():
        assert torch.allclose(m.classifier(f.pooled), f.logits)
    feat_params = {id(p) for p in m.feature_modules().parameters()}
    assert not feat_params & {id(p) for p in m.classifier.parameters()}
    left_out = {n.split(".")[0] for n, p in m.named_parameters() if id(p) not in feat_params}
    # RepDistiller's get_feat_modules omits the layers after the last stage in wrn (final BN),
    # MobileNetV2 (last 1×1 conv block) and ShuffleV2 (last 1×1 conv and its BN)
    extra = {"wrn": {"bn1"}, "MobileNetV2": {"conv2"}, "ShuffleV2": {"conv2", "bn2"}}.get(name.split("_")[0], set())
    assert left_out == {n for n, mod in m.named_children() if mod is m.classifier} | extra


@pytest.mark.parametrize("name", ["resnet8", "vgg8", "MobileNetV2", "ShuffleV2", "ResNet18-0.5", "imagenet_resnet18"])
def test_classifier_can_be_replaced(name):
    m = build_model(name)
    head = nn.Linear(m.classifier.in_features, 10)
    m.classifier = head
    assert m.classifier is head and [x for x in m.modules() if isinstance(x, nn.Linear)] == [head]
    with torch.no_grad():
        assert m.eval()(torch.randn(2, 3, 32, 32)).logits.shape == (2, 10)


RELU_OF_PREACT = [n for n in EXPECTED if not n.startswith("wrn") and n not in ("MobileNetV2", "ShuffleV2")]


@pytest.mark.parametrize("name", RELU_OF_PREACT)
def test_preact_is_before_the_stage_relu(name):
    f = features(name)
    for s, p in zip(f.stages, f.preact):
        assert torch.equal(F.relu(p), s)
    assert all((p < 0).any() for p in f.preact[1:])  # genuinely pre-activation


def test_wrn_preact_is_the_next_bn():
    torch.manual_seed(0)
    m = build_model("wrn_16_2").eval()
    with torch.no_grad():
        for mod in m.modules():  # move the BNs away from identity
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-1, 1)
                mod.weight.uniform_(0.5, 2)
        f = m(torch.randn(2, 3, 32, 32))
        bns = [m.block2.layer[0].bn1, m.block3.layer[0].bn1, m.bn1]
        for bn_, s, p in zip(bns, f.stages[1:], f.preact[1:]):
            assert torch.allclose(bn_(s), p) and not torch.allclose(s, p)
    assert torch.equal(f.stages[0], f.preact[0])


def test_mobilenetv2_preact_equals_stages_and_loads_repdistiller_keys():
    f = features("MobileNetV2")
    assert all(torch.equal(s, p) for s, p in zip(f.stages, f.preact))
    m = build_model("MobileNetV2")
    sd = {k.replace("classifier.", "classifier.0."): v for k, v in m.state_dict().items()}
    build_model("MobileNetV2").load_state_dict(sd)


def test_shufflev2_preact_is_before_relu_and_shuffle():
    f = features("ShuffleV2")
    for s, p in zip(f.stages[1:], f.preact[1:]):
        n, c, h, w = p.shape
        shuffled = F.relu(p).view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        assert torch.equal(shuffled, s) and not torch.equal(F.relu(p), s)


def test_unknown_name_lists_valid_names():
    with pytest.raises(UnknownNameError) as err:
        build_model("resnet9x4")
    msg = str(err.value)
    assert "resnet8x4" in msg and "ShuffleV2" in msg and "imagenet_resnet18" in msg
    assert "resnet8x4" in MODELS


def shapes(name: str):
    f = features(name)
    return [tuple(x.shape[1:]) for x in f.stages], [tuple(x.shape[1:]) for x in f.preact], tuple(f.pooled.shape[1:])


def test_feature_shapes_helper_matches_forward():
    fs = feature_shapes(model("resnet8"))
    assert ([tuple(x) for x in fs.stages], [tuple(x) for x in fs.preact], tuple(fs.pooled)) == shapes("resnet8")
    assert tuple(fs.logits) == (100,)


@pytest.mark.parametrize("teacher,student", [("wrn_40_2", "wrn_16_2"), ("resnet110", "resnet20"),
                                             ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"),
                                             ("ResNet34", "ResNet18"), ("imagenet_resnet34", "imagenet_resnet18")])
def test_same_family_pairs_share_feature_shapes(teacher, student):
    assert shapes(teacher) == shapes(student)  # methods.md §3.2: no projection needed


def test_resnet32x4_and_shufflev2_shapes_differ():
    (t_stages, _, t_pooled), (s_stages, _, s_pooled) = shapes("resnet32x4"), shapes("ShuffleV2")
    assert t_stages[1:] == [(64, 32, 32), (128, 16, 16), (256, 8, 8)]
    assert s_stages[1:] == [(116, 16, 16), (232, 8, 8), (464, 4, 4)]
    assert t_pooled == (256,) and s_pooled == (1024,)


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2",
                                  "ShuffleNet", "ResNet18-0.5"])
def test_gradients_flow_through_every_returned_tensor(name):
    torch.manual_seed(0)
    m = build_model(name).train()
    f = m(torch.randn(2, 3, 32, 32))
    loss = f.logits.sum() + f.pooled.sum() + sum(s.mean() + p.mean() for s, p in zip(f.stages, f.preact))
    loss.backward()  # would fail had an in-place ReLU overwritten a returned tensor
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("name", ["vgg8", "resnet8", "wrn_16_1", "MobileNetV2", "ShuffleV2", "ResNet18-0.5"])
def test_64px_inputs(name):
    with torch.no_grad():
        f = model(name)(torch.randn(2, 3, 64, 64))
    assert f.logits.shape == (2, 100)
    if name == "vgg8":  # RepDistiller's extra pool3 at 64 px keeps the 32 px stage-4 size
        assert f.stages[-1].shape[-1] == 4
