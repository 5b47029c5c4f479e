"""The compiled CPU kernel behind `deform_conv2d`: channels-last bilinear columns, built at first use.

grid_sample's CPU kernel samples one channel at a time and scatters its input gradient one element
at a time; that was about 70 % of a per-tap layer's time. harness/csrc/deform_columns.c does the same
arithmetic with the channels innermost, so every gather, scatter and dot product is a vector loop.
It is plain C with OpenMP (no Python or torch headers), compiled with the system's C compiler the
first time it is needed, like torch.compile does, and cached under ~/.cache/harness (or
$HARNESS_CACHE_DIR) by source, compiler and CPU. Without a compiler, or with HARNESS_NATIVE=0, the
op keeps its pure-PyTorch path; `status()` says which one is in use and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).parent / "csrc" / "deform_columns.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared"]

_status = "not loaded yet"


def cache_dir() -> Path:
    return Path(os.environ.get("HARNESS_CACHE_DIR") or Path.home() / ".cache" / "harness")


def _cpu_identity() -> str:
    """The CPU model and flags: -march=native code must not run on another CPU sharing the cache."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(wanted))


def _compile(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        done = subprocess.run([compiler, *FLAGS, "-o", str(built), str(SOURCE.resolve())],
                              capture_output=True, text=True, timeout=300, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(built, target)  # atomic: concurrent processes (DDP ranks) may build it at once


@cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, compiling it if needed; None when it cannot be used here."""
    global _status
    if os.environ.get("HARNESS_NATIVE", "1") == "0":
        _status = "disabled by HARNESS_NATIVE=0"
        return None
    if not sys.platform.startswith("linux"):
        _status = f"not built on {sys.platform} (Linux only)"
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        _status = "no C compiler (cc/gcc) found, using the PyTorch path"
        warnings.warn("harness: no C compiler (cc/gcc) for the native DCN kernel; using the slower PyTorch path",
                      RuntimeWarning, stacklevel=2)
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
        key = hashlib.sha256(
            "\0".join([SOURCE.read_text(), compiler, version, " ".join(FLAGS), _cpu_identity()]).encode()
        ).hexdigest()[:16]
        target = cache_dir() / f"deform_columns-{key}.so"
        if not target.exists():
            _compile(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as error:
        _status = f"build failed, using the PyTorch path: {error}"
        warnings.warn(f"harness: the native DCN kernel is unavailable ({error}); using the slower PyTorch path",
                      RuntimeWarning, stacklevel=2)
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    for suffix in ("f32", "f64"):
        forward = getattr(lib, f"deform_columns_forward_{suffix}")
        forward.argtypes = [pointer] * 4 + [size] * 7 + [ctypes.c_int]
        backward = getattr(lib, f"deform_columns_backward_{suffix}")
        backward.argtypes = [pointer] * 7 + [size] * 7 + [ctypes.c_int]
        forward.restype = backward.restype = None
    _status = f"in use ({target})"
    return lib


def status() -> str:
    """Which kernel `deform_conv2d` uses on the CPU, and why."""
    library()
    return _status


def available() -> bool:
    return library() is not None


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _suffix(x: Tensor) -> str:
    if x.dtype not in (torch.float32, torch.float64) or x.device.type != "cpu":
        raise TypeError(f"native DCN kernel takes CPU float32/float64, given {x.dtype} on {x.device}")
    return "f32" if x.dtype == torch.float32 else "f64"


def _dims(x: Tensor, pos: Tensor) -> list[int]:
    n, h, w, c = x.shape
    _, length, groups, taps, _ = pos.shape
    return [n, h, w, c, length, groups, taps]


def _check(*tensors: Tensor | None) -> None:
    for t in tensors:
        if t is not None and not t.is_contiguous():
            raise ValueError("native DCN kernel needs contiguous tensors")


def columns_forward(x: Tensor, pos: Tensor, mask: Tensor | None, cols: Tensor) -> None:
    """cols [N, L, K, C] ← bilinear samples of x [N, H, W, C] at pos [N, L, G, K, 2] (times mask)."""
    lib = library()
    assert lib is not None
    _check(x, pos, mask, cols)
    fn = getattr(lib, f"deform_columns_forward_{_suffix(x)}")
    fn(_ptr(x), _ptr(pos), _ptr(mask), _ptr(cols), *_dims(x, pos), torch.get_num_threads())


def columns_backward(
    x: Tensor, pos: Tensor, mask: Tensor | None, grad_cols: Tensor,
    grad_x: Tensor | None, grad_pos: Tensor | None, grad_mask: Tensor | None,
) -> None:
    """Scatter grad_cols into grad_x (must be zeroed) and write grad_pos / grad_mask; None skips one."""
    lib = library()
    assert lib is not None
    _check(x, pos, mask, grad_cols, grad_x, grad_pos, grad_mask)
    fn = getattr(lib, f"deform_columns_backward_{_suffix(x)}")
    fn(_ptr(x), _ptr(pos), _ptr(mask), _ptr(grad_cols), _ptr(grad_x), _ptr(grad_pos), _ptr(grad_mask),
       *_dims(x, pos), torch.get_num_threads())
