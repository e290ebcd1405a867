"""SGD with momentum and L2 weight decay, step for step what ``torch.optim.SGD`` computes
(dampening 0, no Nesterov — RepDistiller's optimiser):

    d = g + wd·p;   b = d (first step) or momentum·b + d;   p = p − lr·b

Why not ``torch.optim.SGD``: building any ``torch.optim`` optimiser imports ``torch._dynamo``
(~1 s per process), which is most of a smoke-suite job's overhead. A test checks the two agree
bit for bit.

:meth:`SGD.make_capturable` switches to a mode a CUDA graph can capture (the fast path,
``kdbench/engine/fast.py``): the lr lives in a device tensor (setting ``opt.lr`` writes it
without a host sync, so a per-step schedule needs no re-capture), and the momentum buffers are
allocated up front as zeros and updated in place (``0·m + d = d``, so the first step is the same
as ``clone(d)``). ``p.addcmul_(b, lr_tensor, value=-1)`` rounds exactly like
``p.add_(b, alpha=-lr)`` (one fused multiply-add); a test checks both modes agree bit for bit on CPU.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


class SGD:
    def __init__(self, params: Iterable[nn.Parameter], lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        self.params = [p for p in params]
        self._lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)
        self.lr_tensor: torch.Tensor | None = None  # set by make_capturable()

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
        for i, p in enumerate(self.params):
            if p.grad is None:  # parameters without a gradient this step are left untouched
                continue
            d = p.grad.add(p, alpha=self.weight_decay) if self.weight_decay else p.grad
            if self.momentum:
                b = self.buffers[i]
                if b is None:
                    b = self.buffers[i] = torch.clone(d).detach()
                else:
                    b.mul_(self.momentum).add_(d)
                d = b
            if self.lr_tensor is not None:
                p.addcmul_(d, self.lr_tensor, value=-1)
            else:
                p.add_(d, alpha=-self._lr)

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
