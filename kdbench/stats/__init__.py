"""Statistics over run records: pure functions, testable without training anything."""

from .ci import mean_ci

__all__ = ["mean_ci"]
