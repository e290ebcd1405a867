"""SGD with momentum and L2 weight decay, step for step what ``torch.optim.SGD`` computes
(dampening 0, no Nesterov — RepDistiller's optimiser):

    d = g + wd·p;   b = d (first step) or momentum·b + d;   p = p − lr·b

Why not ``torch.optim.SGD``: building any ``torch.optim`` optimiser imports ``torch._dynamo``
(~1 s per process), which is most of a smoke-suite job's overhead. A test checks the two agree
bit for bit.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


class SGD:
    def __init__(self, params: Iterable[nn.Parameter], lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        self.params = [p for p in params]
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

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
            p.add_(d, alpha=-self.lr)

    def state_dict(self) -> dict:
        return {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay, "buffers": list(self.buffers)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["buffers"]) != len(self.params):
            raise ValueError(f"optimizer state has {len(state['buffers'])} buffers for {len(self.params)} parameters")
        self.lr, self.momentum, self.weight_decay = state["lr"], state["momentum"], state["weight_decay"]
        self.buffers = [None if b is None else b.to(p.device) for b, p in zip(state["buffers"], self.params)]
