"""Statistics over run records: pure functions, testable without training anything.

Submodules are imported on use (scipy alone takes ~0.7 s, and every training job imports
``kdbench.stats.kernels`` through the KDA method).
"""


def __getattr__(name):
    if name == "mean_ci":
        from kdbench.stats.ci import mean_ci
        return mean_ci
    raise AttributeError(name)


__all__ = ["mean_ci"]
