"""kdbench: a benchmark reproduction suite for knowledge distillation."""

__version__ = "0.1.0"
