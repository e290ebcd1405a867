"""Horizontal fusion (HFTA, Wang et al. MLSys'21; ``performance.md`` §5) of K same-architecture students.

:func:`fuse` turns K models of one architecture into one :class:`FusedModel` that trains them
as one wide network, operator by operator:

- every ``Conv2d`` (C_in → C_out, g groups) becomes one conv K·C_in → K·C_out with K·g groups,
  whose weight (and bias) is the members' concatenated along the output channels: channel group
  k sees only member k's input channels;
- every ``BatchNorm2d`` over C channels becomes one over K·C channels: statistics are per
  channel, so each member's batch statistics and running statistics are exactly its own;
- the classifier ``Linear`` (d → n) becomes a batched linear, weight ``[K, n, d]``, computed as
  one ``baddbmm`` over ``[K, B, d]``;
- everything else in these architectures (ReLU, residual sums, max/average pooling) acts per
  channel and is kept, so the member's own ``forward`` code runs unchanged on the fused modules.

The fused input is the K members' batches stacked along channels, ``[B, K·3, H, W]`` (each
member sees its own images; the K batches must have the same size). ``forward`` returns K
:class:`~kdbench.core.features.Features`, one per member, whose tensors are channel slices
(views) of the fused ones — equal to each member's own forward up to the rounding of grouped
versus plain kernels (``tests/test_fusion.py``: within 1e-12 in float64, forward, gradients and
3 SGD steps; in float32 ~1e-7, except that a pre-activation within rounding of a ReLU kink may
fall on the other side, as it may between two thread counts of the unfused model).

Parameters map 1:1 (each fused tensor is the K members' tensors concatenated or stacked along
dim 0), so with a loss that is the *sum* of the members' losses each member's slice of a fused
gradient is exactly that member's gradient, and SGD with momentum and weight decay — elementwise
— gives the same update on the fused tensor as on the K members separately. Two ways to train:

1. one optimizer over ``fused.parameters()``, then :meth:`FusedModel.unfuse` (or
   :meth:`FusedModel.write_back`) to get each member's own state dict (``model.pt`` stays the
   member's), and :meth:`FusedModel.unfuse_tensors` to split per-parameter optimizer state
   (momentum buffers) the same way;
2. :meth:`FusedModel.bind`: each member's parameters and BN buffers become views of the fused
   storage, so each run keeps its *own* optimizer, checkpoint and evaluation code untouched;
   after each backward pass :meth:`FusedModel.sync_members` points the members' ``.grad`` at
   their slices of the fused gradients (no copy) and updates their BN batch counters. (Saving a
   view with ``torch.save`` writes the whole fused storage: clone before saving.)

BN ``num_batches_tracked``: the fused BN counts from member 0's value; members whose counters
differ keep their offset (only the saved counter depends on it, since every zoo BN uses
``momentum=0.1``; with ``momentum=None`` the counters must be equal).

Supported: RepDistiller's CIFAR ResNets (resnet8…110, resnet8x4, resnet32x4), Wide ResNets
(wrn_16_1/16_2/40_1/40_2) and BN VGGs (vgg8…19) — architectures whose forward is only
conv/BN/linear and per-channel operations. MobileNetV2 and the ShuffleNets (channel shuffle,
views over channels) and the ImageNet ResNets are refused: their forward would mix members.
"""

from __future__ import annotations

import copy
import torch
from torch import Tensor, nn

from kdbench.core.features import Features
from kdbench.models.resnet import CifarResNet
from kdbench.models.vgg import CFG as VGG_CFG, VGG
from kdbench.models.wrn import WideResNet

SUPPORTED_ARCHS: tuple[str, ...] = (
    *(f"resnet{d}" for d in (8, 14, 20, 32, 44, 56, 110)), "resnet8x4", "resnet32x4",
    "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", *VGG_CFG,
)
_SUPPORTED_TYPES = (CifarResNet, WideResNet, VGG)
_FUSED_TYPES = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)
_PER_CHANNEL_TYPES = (nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Identity)


class BatchedLinear(nn.Module):
    """K independent ``Linear(d, n)`` layers on a ``[B, K·d]`` input → ``[B, K·n]`` output.

    ``weight [K, n, d]``, ``bias [K, n]``: member k's rows are its own Linear's."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, x: Tensor) -> Tensor:
        k, n, d = self.weight.shape
        xk = x.reshape(x.shape[0], k, d).transpose(0, 1)  # [K, B, d]
        if self.bias is None:
            out = torch.bmm(xk, self.weight.transpose(1, 2))
        else:
            out = torch.baddbmm(self.bias.unsqueeze(1), xk, self.weight.transpose(1, 2))
        return out.transpose(0, 1).reshape(x.shape[0], k * n)  # [B, K·n], member-major

    def extra_repr(self) -> str:
        k, n, d = self.weight.shape
        return f"members={k}, in_features={d}, out_features={n}, bias={self.bias is not None}"


def _fuse_conv(convs: list[nn.Conv2d]) -> nn.Conv2d:
    c, k = convs[0], len(convs)
    fused = nn.Conv2d(k * c.in_channels, k * c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation,
                      groups=k * c.groups, bias=c.bias is not None, padding_mode=c.padding_mode,
                      device=c.weight.device, dtype=c.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([m.weight for m in convs]))
        if c.bias is not None:
            fused.bias.copy_(torch.cat([m.bias for m in convs]))
    return fused


def _fuse_bn(bns: list[nn.BatchNorm2d]) -> nn.BatchNorm2d:
    b, k = bns[0], len(bns)
    ref = b.weight if b.affine else b.running_mean
    fused = nn.BatchNorm2d(k * b.num_features, b.eps, b.momentum, b.affine, b.track_running_stats,
                           device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(b, name) is not None:
                getattr(fused, name).copy_(torch.cat([getattr(m, name) for m in bns]))
        if b.track_running_stats:
            fused.num_batches_tracked.copy_(b.num_batches_tracked)
    return fused


def _fuse_linear(linears: list[nn.Linear]) -> BatchedLinear:
    with torch.no_grad():
        w = torch.stack([m.weight for m in linears]).clone()
        bias = None if linears[0].bias is None else torch.stack([m.bias for m in linears]).clone()
    return BatchedLinear(w, bias)


def check_fusable(models: list[nn.Module]) -> None:
    """Refuse what :func:`fuse` cannot fuse exactly, saying why."""
    if not models:
        raise ValueError("nothing to fuse: give at least one model")
    first = models[0]
    arch = getattr(first, "arch", type(first).__name__)
    if not isinstance(first, _SUPPORTED_TYPES) or (hasattr(first, "arch") and arch not in SUPPORTED_ARCHS):
        raise ValueError(f"horizontal fusion does not support architecture {arch!r}; supported: "
                         f"{', '.join(SUPPORTED_ARCHS)} (pack other students without fusion)")
    ref = {k: (v.shape, v.dtype, v.device) for k, v in first.state_dict().items()}
    for i, m in enumerate(models[1:], start=1):
        other = getattr(m, "arch", type(m).__name__)
        if type(m) is not type(first) or other != arch:
            raise ValueError(f"fused models must share one architecture: model 0 is {arch!r}, model {i} is {other!r}")
        mine = {k: (v.shape, v.dtype, v.device) for k, v in m.state_dict().items()}
        if mine != ref:
            diff = sorted(set(mine.items()) ^ set(ref.items()))[:3]
            raise ValueError(f"model {i} differs from model 0 in its state dict (e.g. {diff}); "
                             "fused models need identical shapes, dtypes and devices")
        for (name, a), (_, b) in zip(first.named_modules(), m.named_modules()):
            if a.extra_repr() != b.extra_repr():
                raise ValueError(f"module {name!r} of model {i} is configured differently: {b.extra_repr()} vs "
                                 f"{a.extra_repr()}")
    for name, mod in first.named_modules():
        if not isinstance(mod, _FUSED_TYPES + _PER_CHANNEL_TYPES) and (mod._parameters or mod._buffers):
            raise ValueError(f"cannot fuse module {name!r} ({type(mod).__name__}): it holds its own tensors")
        if isinstance(mod, nn.BatchNorm2d) and mod.momentum is None and mod.track_running_stats:
            counts = {int(dict(m.named_modules())[name].num_batches_tracked) for m in models}
            if len(counts) > 1:
                raise ValueError(f"BN {name!r} uses a cumulative average (momentum=None) and the members have "
                                 f"seen different numbers of batches {sorted(counts)}; they cannot share one counter")


class FusedModel(nn.Module):
    """K same-architecture models as one (see the module docstring). ``net`` is the fused network;
    ``forward`` takes ``[B, K·C, H, W]`` or a list of K ``[B, C, H, W]`` batches."""

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        check_fusable(models)
        self.k = len(models)
        self.arch = getattr(models[0], "arch", type(models[0]).__name__)
        self.member_state_keys = list(models[0].state_dict().keys())
        self.net = copy.deepcopy(models[0])
        member_modules = [dict(m.named_modules()) for m in models]
        self._counter_offsets: dict[str, list[int]] = {}  # member state key -> per-member offset
        for name, mod in list(self.net.named_modules()):
            if not isinstance(mod, _FUSED_TYPES):
                continue
            parts = [mm[name] for mm in member_modules]
            if isinstance(mod, nn.Conv2d):
                new = _fuse_conv(parts)
            elif isinstance(mod, nn.BatchNorm2d):
                new = _fuse_bn(parts)
                if mod.track_running_stats:
                    base = int(parts[0].num_batches_tracked)
                    key = f"{name}.num_batches_tracked"
                    self._counter_offsets[key] = [int(p.num_batches_tracked) - base for p in parts]
            else:
                new = _fuse_linear(parts)
            parent_name, _, child = name.rpartition(".")
            setattr(self.net.get_submodule(parent_name) if parent_name else self.net, child, new)
        self.train(models[0].training)

    # ---- forward -------------------------------------------------------------------------
    def stack_inputs(self, xs: list[Tensor]) -> Tensor:
        """K member batches ``[B, C, H, W]`` → the fused input ``[B, K·C, H, W]``."""
        if len(xs) != self.k:
            raise ValueError(f"expected {self.k} member batches, got {len(xs)}")
        if len({x.shape for x in xs}) > 1:
            raise ValueError(f"fused members need batches of one shape, got {sorted({tuple(x.shape) for x in xs})}")
        return torch.cat(xs, dim=1)

    def split(self, f: Features) -> list[Features]:
        """Fused Features (member-major channels) → K members' Features (views)."""
        def cut(t: Tensor) -> tuple[Tensor, ...]:
            return t.chunk(self.k, dim=1)

        stages, preact = [cut(t) for t in f.stages], [cut(t) for t in f.preact]
        pooled, logits = cut(f.pooled), cut(f.logits)
        return [Features([s[k] for s in stages], [p[k] for p in preact], pooled[k], logits[k])
                for k in range(self.k)]

    def forward(self, x: Tensor | list[Tensor]) -> list[Features]:
        if isinstance(x, (list, tuple)):
            x = self.stack_inputs(list(x))
        return self.split(self.net(x))

    # ---- un-fusing ----------------------------------------------------------------------------
    def _member_key(self, fused_key: str) -> str:
        return fused_key[len("net."):] if fused_key.startswith("net.") else fused_key

    def unfuse_tensors(self, named: dict[str, Tensor]) -> list[dict[str, Tensor]]:
        """Split tensors shaped like fused parameters/buffers (keys: ``net``'s state-dict names,
        with or without the ``net.`` prefix — e.g. momentum buffers) into K per-member dicts
        keyed by the members' state-dict names. Returns clones (contiguous, own storage)."""
        out: list[dict[str, Tensor]] = [{} for _ in range(self.k)]
        for key, t in named.items():
            mkey = self._member_key(key)
            if t is None:  # e.g. a parameter without a gradient
                for part in out:
                    part[mkey] = None
                continue
            if mkey.endswith("num_batches_tracked"):
                for k, off in enumerate(self._counter_offsets.get(mkey, [0] * self.k)):
                    out[k][mkey] = (t + off).clone()
                continue
            # a BatchedLinear tensor is stacked [K, ...]; everything else is concatenated on dim 0
            parts = t.unbind(0) if isinstance(self._owner(mkey), BatchedLinear) else t.chunk(self.k, dim=0)
            for k, p in enumerate(parts):
                out[k][mkey] = p.detach().clone()
        return out

    def _owner(self, member_key: str) -> nn.Module:
        return self.net.get_submodule(member_key.rpartition(".")[0])

    def unfuse(self) -> list[dict[str, Tensor]]:
        """Each member's own state dict (same keys and order as the members'; cloned tensors)."""
        parts = self.unfuse_tensors(self.net.state_dict())
        return [{key: p[key] for key in self.member_state_keys} for p in parts]

    @torch.no_grad()
    def write_back(self, models: list[nn.Module]) -> None:
        """Load each member's slice of the fused state into ``models[k]`` (in place)."""
        for m, sd in zip(models, self.unfuse(), strict=True):
            m.load_state_dict(sd)

    # ---- shared storage: members train with their own optimizers ---------------------------------
    def _member_slices(self, models: list[nn.Module]):
        """Yield (member module, tensor name, is_param, fused tensor, member k's index into it)."""
        for k, m in enumerate(models):
            member_modules = dict(m.named_modules())
            for name, fmod in self.net.named_modules():
                if not isinstance(fmod, _FUSED_TYPES + (BatchedLinear,)):
                    continue
                for tname, t in [*fmod._parameters.items(), *fmod._buffers.items()]:
                    if t is None or tname == "num_batches_tracked":
                        continue
                    n = t.shape[0] // self.k
                    idx = k if isinstance(fmod, BatchedLinear) else slice(k * n, (k + 1) * n)
                    yield member_modules[name], tname, tname in fmod._parameters, t, idx

    @torch.no_grad()
    def bind(self, models: list[nn.Module]) -> None:
        """Make every parameter and BN running statistic of ``models[k]`` a view of its slice of the
        fused storage (member values are first written into the fused model). Afterwards an
        in-place update of a member (its optimizer's step, ``load_state_dict``) updates the fused
        model and vice versa; call :meth:`sync_members` after each fused backward pass."""
        if len(models) != self.k:
            raise ValueError(f"bind needs the {self.k} fused members, got {len(models)}")
        for mod, tname, is_param, t, idx in self._member_slices(models):
            sl = t.data[idx] if is_param else t[idx]
            sl.copy_(getattr(mod, tname))
            if is_param:
                getattr(mod, tname).data = sl
            else:
                mod._buffers[tname] = sl

    @torch.no_grad()
    def sync_members(self, models: list[nn.Module]) -> None:
        """After a fused backward: ``models[k]``'s ``.grad`` = views of its slices of the fused
        gradients; BN batch counters = the fused counters plus each member's offset (device ops,
        no host synchronisation)."""
        for mod, tname, is_param, t, idx in self._member_slices(models):
            if is_param:
                getattr(mod, tname).grad = None if t.grad is None else t.grad[idx]
        for key, offsets in self._counter_offsets.items():
            owner = key.rpartition(".")[0]
            fused_count = self.net.get_submodule(owner).num_batches_tracked
            for m, off in zip(models, offsets):
                m.get_submodule(owner).num_batches_tracked.copy_(fused_count + off)


def fuse(models: list[nn.Module]) -> FusedModel:
    """Fuse K same-architecture models (see the module docstring); the members are not modified."""
    return FusedModel(list(models))
