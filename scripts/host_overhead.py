"""The host's share of a GPU layer, measured on the CPU: the GPU path forced onto the CPU at a tiny size
(1x4x8x8, 4 outputs, one thread), where the kernels take next to nothing and what is left is dispatch,
autograd and Python. Compares the GPU path's steps run from Python (the `cpp` switch off) with the C++ op, and
conv2d. Usage: python scripts/host_overhead.py
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

import harness.ops as ops
from harness import settings
from harness.kernels import cpp_autograd, native
from harness.ops import cuda


def microseconds(fn: Callable[[], object], reps: int = 2000) -> float:
    for _ in range(200):
        fn()
    runs = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        runs.append((time.perf_counter() - t0) / reps * 1e6)
    return statistics.median(runs)


def conv_step(x, w, b, stride) -> None:
    F.conv2d(x, w, b, stride, 1).sum().backward()


def deform_step(x, offset, w, b, stride, mask) -> None:
    ops.deform_conv2d(x, offset, w, b, stride, 1, mask=mask).sum().backward()


def main() -> None:
    native.available = lambda: False  # the GPU path, on the CPU
    cuda.keeps_columns = lambda *_: True
    cuda.runs_cpp_op = lambda _: cpp_autograd.available()
    torch.set_num_threads(1)
    print(f"C++ op: {cpp_autograd.status()}")
    g = torch.Generator().manual_seed(0)
    for stride, modulated in ((1, False), (2, False), (1, True)):
        x = torch.randn(1, 4, 8, 8, generator=g).requires_grad_()
        w = (torch.randn(4, 4, 3, 3, generator=g) * 0.05).requires_grad_()
        b = torch.zeros(4).requires_grad_()
        out = (8 - 1) // stride + 1
        offset = (torch.randn(1, 18, out, out, generator=g) * 2).requires_grad_()
        mask = torch.rand(1, 9, out, out, generator=g).requires_grad_() if modulated else None
        times = {"conv2d": microseconds(partial(conv_step, x, w, b, stride))}
        for name, switch in (("python", "0"), ("C++ op", "1")):
            os.environ[settings.variable("cpp")] = switch
            settings.reload()
            times[name] = microseconds(partial(deform_step, x, offset, w, b, stride, mask))
        print(f"stride {stride}{' modulated' if modulated else ''}: "
              + ", ".join(f"{k} {v:.0f} us" for k, v in times.items()))
    os.environ.pop(settings.variable("cpp"))
    settings.reload()


if __name__ == "__main__":
    main()
