"""Confidence intervals over seeds."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class MeanCI:
    n: int
    mean: float
    std: float  # sample standard deviation (ddof=1)
    lo: float
    hi: float

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2


def mean_ci(values, level: float = 0.95) -> MeanCI:
    """Mean and two-sided Student-t interval: mean ± t_{(1+level)/2, n-1} · s/√n.

    With n = 1 the interval is undefined (NaN bounds); with n = 0 everything is NaN.
    """
    x = np.asarray([v for v in values if v is not None], dtype=float)
    n = len(x)
    if n == 0:
        return MeanCI(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n == 1:
        return MeanCI(1, mean, math.nan, math.nan, math.nan)
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
    return MeanCI(n, mean, sd, mean - half, mean + half)
