"""Kernel diagnostics: how much of the teacher's kernel a student did not pick up.

KDA (Qian, Li & Hu, arXiv 2009.14416, v1 Fig. 3) plots the *untransferred fraction*

    ‖K_S − K_T‖_F / ‖K_T‖_F,   K = F Fᵀ  (the n×n linear kernel of one layer over n samples)

for the features before and after the last FC layer over the test set. K_S and K_T are n×n
even when the student and teacher feature dimensions differ. For large n the n×n matrices are
never formed: for feature matrices A (n×d_s), B (n×d_t)

    ‖AAᵀ − BBᵀ‖²_F = ‖AᵀA‖²_F + ‖BᵀB‖²_F − 2‖AᵀB‖²_F ,   ‖BBᵀ‖_F = ‖BᵀB‖_F,

and the three small Gram matrices are sums over row chunks (``KernelGap`` streams them, so the
features of a test set need not be held at once). When the feature dimension is large relative
to n (flattened feature maps), ``method="blocks"`` sums the same norms over n×n blocks of
``chunk_size`` rows instead. Everything is accumulated in float64 (the identity subtracts
nearly equal numbers when the fraction is small). Kernels are uncentred, as in the paper.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KernelGap:
    """Streaming ‖K_S − K_T‖_F and ‖K_T‖_F from chunks of (student, teacher) features."""

    def __init__(self):
        self.ss = self.tt = self.st = None
        self.n = 0

    @torch.no_grad()
    def update(self, f_s: Tensor, f_t: Tensor) -> None:
        a, b = f_s.flatten(1).double(), f_t.flatten(1).double()
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"student and teacher chunks have {a.shape[0]} and {b.shape[0]} samples")
        grams = (a.t() @ a, b.t() @ b, a.t() @ b)
        if self.ss is None:
            self.ss, self.tt, self.st = grams
        else:
            self.ss += grams[0]
            self.tt += grams[1]
            self.st += grams[2]
        self.n += a.shape[0]

    def norms(self) -> tuple[float, float]:
        """(‖K_S − K_T‖_F, ‖K_T‖_F) over every sample seen."""
        if self.ss is None:
            raise ValueError("KernelGap has seen no samples")
        sq = lambda m: float(m.pow(2).sum())  # noqa: E731
        diff2 = sq(self.ss) + sq(self.tt) - 2.0 * sq(self.st)
        return max(diff2, 0.0) ** 0.5, sq(self.tt) ** 0.5

    def fraction(self) -> float:
        diff, ref = self.norms()
        return diff / ref


@torch.no_grad()
def _by_blocks(a: Tensor, b: Tensor, chunk: int) -> tuple[float, float]:
    diff2 = ref2 = 0.0
    for i in range(0, a.shape[0], chunk):
        for j in range(0, a.shape[0], chunk):
            k_s = a[i:i + chunk] @ a[j:j + chunk].t()
            k_t = b[i:i + chunk] @ b[j:j + chunk].t()
            diff2 += float((k_s - k_t).pow(2).sum())
            ref2 += float(k_t.pow(2).sum())
    return diff2 ** 0.5, ref2 ** 0.5


def untransferred_kernel_fraction(f_s: Tensor, f_t: Tensor, chunk_size: int = 4096,
                                  method: str = "auto") -> float:
    """‖K_S − K_T‖_F / ‖K_T‖_F with K = F Fᵀ for student features f_s (n×…) and teacher f_t (n×…).

    ``method``: ``"gram"`` (the d×d identity, O(n·d²)), ``"blocks"`` (n×n blocks, O(n²·d)), or
    ``"auto"``: the cheaper of the two.
    """
    a, b = f_s.flatten(1).double(), f_t.flatten(1).double()
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"f_s has {a.shape[0]} samples but f_t has {b.shape[0]}")
    if method == "auto":
        d_s, d_t, n = a.shape[1], b.shape[1], a.shape[0]
        method = "gram" if d_s * d_s + d_t * d_t + d_s * d_t <= n * n else "blocks"
    if method == "blocks":
        diff, ref = _by_blocks(a, b, chunk_size)
        return diff / ref
    if method != "gram":
        raise ValueError(f"method={method!r}; valid: auto, gram, blocks")
    gap = KernelGap()
    for i in range(0, a.shape[0], chunk_size):
        gap.update(a[i:i + chunk_size], b[i:i + chunk_size])
    return gap.fraction()
