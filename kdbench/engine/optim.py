"""SGD with momentum and L2 weight decay, step for step what ``torch.optim.SGD`` computes
(dampening 0, no Nesterov — RepDistiller's optimiser):

    d = g + wd·p;   b = d (first step) or momentum·b + d;   p = p − lr·b

computed with multi-tensor operations: on CUDA PyTorch's fused SGD kernel (``torch._fused_sgd_``,
the kernel behind ``torch.optim.SGD(fused=True)``: one launch per step for all parameters, where
a loop issues ~3 small kernels per parameter — a large share of a step's time at batch 64; its
rounding may differ from the loop's by an ulp, like a cuDNN algorithm choice), elsewhere
``torch._foreach_*`` operations, which round exactly like the per-tensor loop (PyTorch's CPU
fused kernel does not when weight decay is 0). The fused kernel is private: :func:`fused_sgd_kernel`
looks it up, and a torch without it takes the ``_foreach`` path on CUDA too; ``SGD.kernel`` says
which path ran (recorded in metrics.json, ``used.sgd_kernel``).

Why not ``torch.optim.SGD``: building any ``torch.optim`` optimiser imports ``torch._dynamo``
(~1 s per process), which is most of a smoke-suite job's overhead. A test checks the two agree
bit for bit.

:meth:`SGD.make_capturable` switches to a mode a CUDA graph can capture (the fast path,
``kdbench/engine/fast.py``): the lr lives in a device tensor (setting ``opt.lr`` writes it
without a host sync, so a per-step schedule needs no re-capture), and the momentum buffers are
allocated up front (the same zeros the first step would create). A test checks both modes
agree bit for bit with each other and with ``torch.optim.SGD`` on CPU.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def fused_sgd_kernel() -> bool:
    """Whether this torch has the fused SGD kernel with both overloads kdbench calls (float lr, and
    the tensor lr a CUDA graph captures): ``torch._fused_sgd_`` is private, so it is looked up,
    not assumed; without it every device takes the ``_foreach`` path (same maths)."""
    if not hasattr(torch, "_fused_sgd_"):
        return False
    try:
        schemas = [str(s) for s in torch._C._jit_get_schemas_for_operator("aten::_fused_sgd_")]
    except (AttributeError, RuntimeError):
        return False
    return any("float lr" in s for s in schemas) and any("Tensor lr" in s for s in schemas)


class SGD:
    #: devices whose parameters are stepped by PyTorch's fused kernel (elsewhere: ``_foreach`` ops)
    fused_kernel_devices: tuple[str, ...] = ("cuda",) if fused_sgd_kernel() else ()

    def __init__(self, params: Iterable[nn.Parameter], lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        self.params = [p for p in params]
        self._lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)
        self.lr_tensor: torch.Tensor | None = None  # set by make_capturable()

    @property
    def kernel(self) -> str | None:
        """The path the steps take (``fused``, ``foreach``, or both joined by ``+``), for the run record:
        decided by the parameters' devices, so a run resumed after its last step records the same."""
        devices = {p.device.type for p in self.params}
        return "+".join(sorted({"fused" if d in self.fused_kernel_devices else "foreach" for d in devices})) or None

    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = float(value)
        if self.lr_tensor is not None:
            self.lr_tensor.fill_(self._lr)  # an asynchronous device write, no host sync

    @property
    def capturable(self) -> bool:
        return self.lr_tensor is not None

    def make_capturable(self) -> "SGD":
        """Device-tensor lr and preallocated momentum buffers (idempotent)."""
        if self.lr_tensor is None and self.params:
            self.lr_tensor = torch.tensor(self._lr, dtype=torch.float32, device=self.params[0].device)
        if self.momentum:
            self.buffers = [torch.zeros_like(p) if b is None else b for b, p in zip(self.buffers, self.params)]
        return self

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One step over the parameters that have a gradient (the others are left untouched),
        as a few multi-tensor operations per device and dtype (see the module docstring).
        Momentum buffers start as zeros (``0·m + d = d``: the first step equals ``clone(d)``)."""
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(self.params):
            if p.grad is not None:
                groups.setdefault((p.device, p.dtype), []).append(i)
                if self.momentum and self.buffers[i] is None:
                    self.buffers[i] = torch.zeros_like(p)
        lr = self.lr_tensor if self.lr_tensor is not None else self._lr
        for (device, _), idx in groups.items():
            params, grads = [self.params[i] for i in idx], [self.params[i].grad for i in idx]
            buffers = [self.buffers[i] for i in idx] if self.momentum else []
            if device.type in self.fused_kernel_devices:
                torch._fused_sgd_(params, grads, buffers, weight_decay=self.weight_decay, momentum=self.momentum,
                                  lr=lr, dampening=0.0, nesterov=False, maximize=False, is_first_step=False)
            else:
                self._foreach_step(params, grads, buffers, lr)

    def _foreach_step(self, params, grads, buffers, lr) -> None:
        """The step as per-tensor-exact ``torch._foreach_*`` operations (on CPU: loops)."""
        d = torch._foreach_add(grads, params, alpha=self.weight_decay) if self.weight_decay else grads
        if self.momentum:
            torch._foreach_mul_(buffers, self.momentum)
            torch._foreach_add_(buffers, d)
            d = buffers
        if isinstance(lr, torch.Tensor):
            torch._foreach_addcmul_(params, d, [lr] * len(params), value=-1)
        else:
            torch._foreach_add_(params, d, alpha=-lr)

    def state_dict(self) -> dict:
        return {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay, "buffers": list(self.buffers)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["buffers"]) != len(self.params):
            raise ValueError(f"optimizer state has {len(state['buffers'])} buffers for {len(self.params)} parameters")
        self.lr, self.momentum, self.weight_decay = state["lr"], state["momentum"], state["weight_decay"]
        buffers = [None if b is None else b.to(p.device) for b, p in zip(state["buffers"], self.params)]
        if self.capturable:  # keep the captured buffers' addresses
            for i, (b, p) in enumerate(zip(buffers, self.params)):
                if self.buffers[i] is not None:
                    self.buffers[i].copy_(b if b is not None else torch.zeros_like(p))
                else:
                    self.buffers[i] = b
        else:
            self.buffers = buffers
