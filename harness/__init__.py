"""Benchmark and ablation harness for deformable convolution."""

from harness.errors import HarnessError

__version__ = "0.1.0"
__all__ = ["HarnessError", "__version__"]
