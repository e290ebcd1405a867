"""kdbench's SGD on a torch without the private fused kernel (issue 16: the device's torch may
differ from the one kdbench is developed with): it is looked up, the ``_foreach`` path is taken
instead, and the path that ran is recorded."""

import torch

from kdbench.engine.optim import SGD, fused_sgd_kernel


def step_twice(opt_devices, monkeypatch):
    monkeypatch.setattr(SGD, "fused_kernel_devices", opt_devices)
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    opt = SGD([p], lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(2):
        p.grad = torch.ones_like(p)
        opt.step()
    return p.detach(), opt.kernel


def test_without_the_private_kernel_the_lookup_says_so(monkeypatch):
    assert fused_sgd_kernel() == hasattr(torch, "_fused_sgd_")
    monkeypatch.delattr(torch, "_fused_sgd_", raising=False)
    assert fused_sgd_kernel() is False


def test_the_path_that_ran_is_recorded_and_both_paths_agree(monkeypatch):
    foreach, kernel = step_twice((), monkeypatch)
    assert kernel == "foreach"
    # by hand: d = g + wd·p; b1 = d1; b2 = 0.9·b1 + d2; p ← p − lr·b
    torch.manual_seed(0)
    p = torch.randn(5, 3, dtype=torch.float64)
    b = None
    for _ in range(2):
        d = 1 + 5e-4 * p
        b = d if b is None else 0.9 * b + d
        p = p - 0.1 * b
    torch.testing.assert_close(foreach, p, rtol=0, atol=1e-15)
    if fused_sgd_kernel():  # the fused kernel on the CPU, where this torch has one
        fused, kernel = step_twice(("cpu",), monkeypatch)
        assert kernel == "fused"
        torch.testing.assert_close(fused, p, rtol=1e-12, atol=1e-14)

