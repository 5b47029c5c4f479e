"""The GPU path's layers as C++ autograd ops, built at first use: `torch.ops.harness.deform_layer` (the
per-tap layer) and `torch.ops.harness.deform_sample` (the shared layout's sampling step).

At the benchmark's sizes a deformable layer on a GPU is bound by the host: the GPU finishes each
kernel before Python has issued the next. Written in Python the per-tap layer costs about 40
dispatcher calls and 25 autograd nodes per forward and backward; harness/kernels/csrc/deform_layer.cpp makes
the same ATen calls (grid_sample columns kept for backward, batched matmuls, the same arithmetic and
results) from C++, one call and one autograd node. It has no CUDA code of its own, so it needs only a C++20
compiler and the headers that ship in the torch wheel, no CUDA toolkit. Built like `harness.kernels.native`:
the first time it is needed, cached under ~/.cache/harness (or the `cache_dir` switch, see harness.settings)
by source, torch version and compiler. Without a compiler, or with the `cpp` switch off, the GPU keeps the
Python version.
"""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

import torch

from harness import settings
from harness.kernels import native

SOURCE = Path(__file__).parent / "csrc" / "deform_layer.cpp"
FLAGS = ["-O2", "-std=c++20", "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]

_status = "not loaded yet"


def _arguments() -> list[str]:
    torch_dir = Path(torch.__file__).parent  # the wheel's own headers and libraries (after the source)
    include, lib = torch_dir / "include", torch_dir / "lib"
    return [*FLAGS, f"-I{include}", f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10", "-ltorch_cpu", "-ltorch"]


def available() -> bool:
    """Whether `torch.ops.harness.deform_layer` is there to use (the `cpp` switch, see harness.settings,
    turns it off)."""
    return not _switched_off() and _load()


def _switched_off() -> bool:
    return not settings.current().cpp


@cache
def _load() -> bool:
    """Build (once) and load the op; False, with `_status` saying why, when it cannot be used here."""
    global _status
    if not sys.platform.startswith("linux"):
        _status = f"not built on {sys.platform} (Linux only)"
        return False
    # 10-60 s the first time
    loaded, _status = native.build_and_open("the GPU layer's C++ op", "the Python version", "CXX", ("c++", "g++"),
                                            SOURCE, _arguments(), "deform_layer", (torch.__version__,), _open)
    return loaded is not None


def _open(path: str) -> str:
    # registers torch.ops.harness.*; a second library registering them (another cache directory) would abort
    if not hasattr(torch.ops.harness, "deform_layer"):
        torch.ops.load_library(path)
    return path


def status() -> str:
    """Whether the C++ op is in use, and why not."""
    if _switched_off():
        return f"disabled by {settings.variable('cpp')}=0"
    _load()
    return _status
