"""The compiled CPU kernel behind `deform_conv2d`: channels-last bilinear columns, built at first use.

grid_sample's CPU kernel samples one channel at a time and scatters its input gradient one element
at a time, which dominates a per-tap layer's time. harness/kernels/csrc/deform_columns.c does the same
arithmetic with the channels innermost, so every gather, scatter and dot product is a vector loop.
In fp32 it also fuses the whole layer (`conv_forward`, `conv_backward`): each thread samples a tile of
64 output pixels into a buffer that stays in cache and multiplies it there with register-blocked
AVX-512 (or AVX2) loops, so the 9x-larger columns never go through memory.
It is plain C with OpenMP (no Python or torch headers), compiled with the system's C compiler the
first time it is needed, like torch.compile does, and cached under ~/.cache/harness (or the `cache_dir`
switch, see harness.settings) by source, compiler and CPU. Without a compiler, or with the `native` switch
off, the op keeps its pure-PyTorch path; `status()` says which one is in use and why.
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
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor

from harness import settings

SOURCE = Path(__file__).parent / "csrc" / "deform_columns.c"
# -fno-trapping-math lets GCC vectorise floor() (the kernel never reads floating-point exception flags)
FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared"]

_status = "not loaded yet"
T = TypeVar("T")


def cache_dir() -> Path:
    """Where compiled libraries are cached: the `cache_dir` switch (see harness.settings)."""
    return settings.current().cache_dir


def _cpu_identity() -> str:
    """The CPU model and flags: -march=native code must not run on another CPU sharing the cache."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(wanted))


def cached_build(compiler: str, source: Path, arguments: list[str], name: str, *identity: str) -> Path:
    """The shared library `compiler source arguments` makes, built once into cache_dir() under a key of
    the source, the compiler (and its version), the arguments and `identity`."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256("\0".join([source.read_text(), compiler, version, *arguments, *identity]).encode())
    target = cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    print(f"harness: compiling {source.name} (once) into {target.parent}", file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        done = subprocess.run([compiler, str(source.resolve()), *arguments, "-o", str(built)],
                              capture_output=True, text=True, timeout=300, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(built, target)  # atomic: concurrent processes (DDP ranks) may build it at once
    return target


def build_and_open(what: str, fallback: str, compiler_variable: str, compilers: tuple[str, ...], source: Path,
                   arguments: list[str], name: str, identity: tuple[str, ...], opener: Callable[[str], T]) -> tuple[
                       T | None, str]:
    """Build `source` once (`cached_build`) and open the library with `opener`: (what it returns, "in use
    (path)"), or (None, why) after a RuntimeWarning when there is no compiler or the build fails, so that
    the caller runs `fallback` instead. The compiler is $compiler_variable, else the first of `compilers`."""
    compiler = os.environ.get(compiler_variable) or next(filter(None, map(shutil.which, compilers)), None)
    if compiler is None:
        language = {"CC": "C", "CXX": "C++"}.get(compiler_variable, compiler_variable)
        why = f"no {language} compiler ({'/'.join(compilers)}) found for {what}"
        warnings.warn(f"harness: {why}; using {fallback}", RuntimeWarning, stacklevel=3)
        return None, f"{why}, using {fallback}"
    try:
        target = cached_build(compiler, source, arguments, name, *identity)
        return opener(str(target)), f"in use ({target})"
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as error:
        warnings.warn(f"harness: {what} is unavailable ({error}); using {fallback}", RuntimeWarning, stacklevel=3)
        return None, f"build failed, using {fallback}: {error}"


@cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, compiling it if needed; None when it cannot be used here."""
    global _status
    if not settings.current().native:
        _status = f"disabled by {settings.variable('native')}=0"
        return None
    if not sys.platform.startswith("linux"):
        _status = f"not built on {sys.platform} (Linux only)"
        return None
    lib, _status = build_and_open("the native DCN kernel", "the slower PyTorch path", "CC", ("cc", "gcc"), SOURCE,
                                  FLAGS, "deform_columns", (_cpu_identity(),), ctypes.CDLL)
    if lib is None:
        return None
    pointer, geometry = ctypes.c_void_p, ctypes.POINTER(Geometry)
    for suffix in ("f32", "f64"):
        forward = getattr(lib, f"deform_columns_forward_{suffix}")
        forward.argtypes = [pointer] * 4 + [geometry, ctypes.c_int]
        backward = getattr(lib, f"deform_columns_backward_{suffix}")
        backward.argtypes = [pointer] * 8 + [geometry, ctypes.c_int]
        forward.restype = backward.restype = ctypes.c_int
        for name in ("to_channels_last", "from_channels_last"):
            transpose = getattr(lib, f"{name}_{suffix}")
            transpose.argtypes = [pointer] * 2 + [ctypes.c_int64] * 6 + [ctypes.c_int]
            transpose.restype = None
    lib.fused_lanes_f32.restype = ctypes.c_int
    if lib.fused_lanes_f32():  # the fused layer is built for AVX2 and AVX-512 only
        lib.deform_conv_forward_f32.argtypes = [pointer] * 6 + [ctypes.c_int64, geometry, ctypes.c_int]
        lib.deform_conv_backward_f32.argtypes = [pointer] * 9 + [ctypes.c_int64, geometry, ctypes.c_int]
        lib.deform_conv_forward_f32.restype = lib.deform_conv_backward_f32.restype = ctypes.c_int
        lib.sum_transposed_f32.argtypes = [pointer, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                           pointer, ctypes.c_int]
        lib.sum_transposed_f32.restype = None
    return lib


def status() -> str:
    """Which kernel `deform_conv2d` uses on the CPU, and why; with the fused fp32 layer's state."""
    lib = library()
    if lib is None:
        return _status
    return f"{_status}; fused fp32 layer: {_fused_state(lib)}"


def summary() -> str:
    """`status()` in a few words, for a run's tags (timings from different kernels do not compare)."""
    lib = library()
    if lib is None:
        return "pytorch (grid_sample): no compiled kernel"
    return f"compiled C kernel; fused fp32 layer {_fused_state(lib).split(';')[0]}"


def _fused_state(lib: ctypes.CDLL) -> str:
    lanes = lib.fused_lanes_f32()
    if not lanes:
        return "no: the CPU has neither AVX2 nor AVX-512; the columns path runs"
    if _fused_turned_off():
        return f"off ({settings.variable('fused')}=0); the columns path runs"
    return f"on ({'AVX-512' if lanes == 16 else 'AVX2'}, {lanes}-float vectors)"


def available() -> bool:
    return library() is not None


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _suffix(x: Tensor) -> str:
    if x.dtype not in (torch.float32, torch.float64) or x.device.type != "cpu":
        raise TypeError(f"native DCN kernel takes CPU float32/float64, given {x.dtype} on {x.device}")
    return "f32" if x.dtype == torch.float32 else "f64"


class Geometry(ctypes.Structure):
    """The kernel's `geometry_t`: shapes, stride/padding/dilation, and the offset's, mask's and their
    gradients' strides (in elements), so that they are read and written in place, in any layout."""

    _fields_ = [(name, ctypes.c_int64) for name in
                ("n", "h", "w", "c", "ho", "wo", "groups", "kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw")]
    _fields_ += [(name, ctypes.c_int64 * 4) for name in ("offset", "mask", "grad_offset", "grad_mask")]


@dataclass(frozen=True)
class Sampling:
    """Where the kernel samples: kernel size, stride, padding, dilation (each (y, x)) and output size."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    out_hw: tuple[int, int]


def _geometry(
    x: Tensor, offset: Tensor, mask: Tensor | None, sampling: Sampling,
    grad_offset: Tensor | None = None, grad_mask: Tensor | None = None,
) -> Geometry:
    n, h, w, c = x.shape
    taps = sampling.kernel[0] * sampling.kernel[1]
    groups = offset.shape[1] // (2 * taps)
    if groups < 1 or tuple(offset.shape) != (n, 2 * groups * taps, *sampling.out_hw) or c % groups:
        raise ValueError(f"offset {tuple(offset.shape)} does not fit x {tuple(x.shape)} and {sampling}")
    if mask is not None and tuple(mask.shape) != (n, groups * taps, *sampling.out_hw):
        raise ValueError(f"mask {tuple(mask.shape)} does not fit offset {tuple(offset.shape)}")
    if h * w * c >= 2**31:
        raise ValueError(f"native DCN kernel: one image of x {tuple(x.shape)} has 2^31 elements or more (its "
                         f"corner offsets are 32-bit); use {settings.variable('native')}=0 for the PyTorch path")
    geo = Geometry(n, h, w, c, *sampling.out_hw, groups, *sampling.kernel, *sampling.stride,
                   *sampling.padding, *sampling.dilation)
    for name, t in (("offset", offset), ("mask", mask), ("grad_offset", grad_offset), ("grad_mask", grad_mask)):
        if t is not None:
            setattr(geo, name, (ctypes.c_int64 * 4)(*t.stride()))
    return geo


def _backward_geometry(
    x: Tensor, offset: Tensor, mask: Tensor | None, sampling: Sampling, grad_offset: Tensor | None,
    grad_mask: Tensor | None,
) -> Geometry:
    """`_geometry` with the gradients' strides, once each gradient is checked to have its input's shape."""
    for name, grad, like in (("grad_offset", grad_offset, offset), ("grad_mask", grad_mask, mask)):
        if grad is not None and (like is None or grad.shape != like.shape):
            raise ValueError(f"{name} must have the shape of its input")
    return _geometry(x, offset, mask, sampling, grad_offset, grad_mask)


def _check(*tensors: Tensor | None) -> None:
    for t in tensors:
        if t is not None and not t.is_contiguous():
            raise ValueError("native DCN kernel needs x, the columns and grad_x contiguous")


def _same_dtype(x: Tensor, *others: Tensor | None) -> None:
    for t in others:
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise TypeError(f"native DCN kernel needs every tensor in x's {x.dtype} on {x.device}, given {t.dtype}")


def _done(status: int) -> None:
    if status:
        raise MemoryError("native DCN kernel: could not allocate its per-thread offset tile")


def columns_forward(x: Tensor, offset: Tensor, mask: Tensor | None, cols: Tensor, sampling: Sampling) -> None:
    """cols [N, Ho·Wo, K, C] ← bilinear samples of x [N, H, W, C] where `sampling` and offset
    [N, 2·G·K, Ho, Wo] (torchvision's layout, any strides) put them, times mask [N, G·K, Ho, Wo]."""
    lib = library()
    assert lib is not None
    _check(x, cols)
    _same_dtype(x, offset, mask, cols)
    fn = getattr(lib, f"deform_columns_forward_{_suffix(x)}")
    _done(fn(_ptr(x), _ptr(offset), _ptr(mask), _ptr(cols), ctypes.byref(_geometry(x, offset, mask, sampling)),
             torch.get_num_threads()))


def columns_backward(
    x: Tensor, offset: Tensor, mask: Tensor | None, grad_cols: Tensor, sampling: Sampling,
    grad_x: Tensor | None, grad_offset: Tensor | None, grad_mask: Tensor | None, cols: Tensor | None = None,
) -> None:
    """Scatter grad_cols into grad_x and write grad_offset / grad_mask (any strides), and cols (as many
    elements as grad_cols, or grad_cols itself: each value is read before its column overwrites it)
    with what `columns_forward` would write. Every one given is overwritten (grad_x need not be
    zeroed); None skips one."""
    lib = library()
    assert lib is not None
    _check(x, grad_cols, grad_x, cols)
    _same_dtype(x, offset, mask, grad_cols, grad_x, grad_offset, grad_mask, cols)
    if cols is not None and cols.numel() != grad_cols.numel():
        raise ValueError(f"cols {tuple(cols.shape)} must have as many elements as grad_cols "
                         f"{tuple(grad_cols.shape)}")
    geo = _backward_geometry(x, offset, mask, sampling, grad_offset, grad_mask)
    fn = getattr(lib, f"deform_columns_backward_{_suffix(x)}")
    _done(fn(_ptr(x), _ptr(offset), _ptr(mask), _ptr(grad_cols), _ptr(cols), _ptr(grad_x), _ptr(grad_offset),
             _ptr(grad_mask), ctypes.byref(geo), torch.get_num_threads()))


def padded_columns(taps: int, channels: int) -> int:
    """The fused kernel's column row length: K·C rounded up to a whole number of 16-float vectors."""
    return -(-taps * channels // 16) * 16


def fused_available() -> bool:
    """Whether the fused convolution is there and on: built in vectors of one register, 16 floats with
    AVX-512 or 8 with AVX2 and FMA, not for other CPUs; the `fused` switch (see harness.settings) turns it
    off (the columns path then runs everywhere, e.g. to compare the two)."""
    lib = library()
    return lib is not None and lib.fused_lanes_f32() > 0 and not _fused_turned_off()


def _fused_turned_off() -> bool:
    return not settings.current().fused


# The fused backward gives each thread its own copy of the weight's gradient: at most this many bytes
# of them in all (more threads or larger weights take the columns path, whose memory is bounded).
FUSED_WEIGHT_GRAD_BYTES = 256 * 2**20

# Below this many output points per output channel and thread the columns path is the faster one (see `fuses`).
FUSED_MIN_POINTS_PER_OUTPUT = 0.5

# Above this weight size (fp32, padded) the columns path is the faster one (see `fuses`).
FUSED_MAX_WEIGHT_BYTES = 4 * 2**20


def fuses(x: Tensor, out_channels: int, taps: int, points: int) -> bool:
    """Whether `conv_forward`/`conv_backward` take this case: fp32 x [N, H, W, C], outputs a multiple
    of 16, a library with the fused kernel, the threads' weight gradients within FUSED_WEIGHT_GRAD_BYTES,
    and where the fused layer pays: a weight of at most FUSED_MAX_WEIGHT_BYTES and at least
    FUSED_MIN_POINTS_PER_OUTPUT·threads·O output points (N·Ho·Wo) in the batch.

    Each thread of the fused backward adds every 64-pixel tile's products into its own [K·C, O] copy of
    the weight's gradient, reading the weight for each tile too; the columns path writes and reads the
    [points, K·C] columns once and leaves the products to oneDNN. With fewer points than threads·O/2
    (ResNet-18's conv5 at 64 px: 128 points, 512 outputs) the thread copies cost more than the columns:
    the columns path runs the layer step 1.3-1.5x faster on 2 threads. With a weight past a few MiB
    (256→512 channels: 4.5 MiB; 512→512: 9 MiB) neither it nor the copies stay in cache from tile to
    tile: the columns path is 1.1-1.2x faster, while at 2.25 MiB (256→256) the fused layer still is
    1.3x faster (docs/kernels.md).
    """
    threads = torch.get_num_threads()
    per_thread = padded_columns(taps, x.shape[-1]) * out_channels * 4
    return (x.dtype == torch.float32 and x.device.type == "cpu" and out_channels % 16 == 0
            and threads * per_thread <= FUSED_WEIGHT_GRAD_BYTES and per_thread <= FUSED_MAX_WEIGHT_BYTES
            and points >= FUSED_MIN_POINTS_PER_OUTPUT * threads * out_channels
            and fused_available())


def conv_forward(
    x: Tensor, offset: Tensor, mask: Tensor | None, weight_t: Tensor, bias: Tensor | None, sampling: Sampling
) -> Tensor:
    """The deformable convolution in one pass, columns sampled and multiplied tile by tile in cache:
    out [N·Ho·Wo, O] (channels-last rows) from x [N, H, W, C], weight_t [KCp, O] (row k·C + c for tap k,
    channel c; rows from K·C on zero, KCp = `padded_columns`) and bias [O] or None. fp32, O % 16 == 0."""
    lib = library()
    if not fused_available():
        raise RuntimeError(f"no fused DCN kernel here: {status()}")
    n, _, _, c = x.shape
    kcp, out_channels = weight_t.shape
    taps = sampling.kernel[0] * sampling.kernel[1]
    _check(x, weight_t, bias)
    _same_dtype(x, offset, mask, weight_t, bias)
    if x.dtype != torch.float32 or out_channels % 16 or kcp != padded_columns(taps, c):
        raise ValueError(f"fused DCN kernel takes fp32 x and weight_t [{padded_columns(taps, c)}, 16·j], "
                         f"given {x.dtype} and {tuple(weight_t.shape)}")
    if bias is not None and bias.shape != (out_channels,):
        raise ValueError(f"bias {tuple(bias.shape)} does not fit {out_channels} outputs")
    geo = _geometry(x, offset, mask, sampling)
    out = torch.empty(n * sampling.out_hw[0] * sampling.out_hw[1], out_channels, dtype=x.dtype)
    _done(lib.deform_conv_forward_f32(_ptr(x), _ptr(offset), _ptr(mask), _ptr(weight_t), _ptr(bias), _ptr(out),
                                      out_channels, ctypes.byref(geo), torch.get_num_threads()))
    return out


def conv_backward(
    x: Tensor, offset: Tensor, mask: Tensor | None, weight: Tensor, grad_out: Tensor, sampling: Sampling,
    grad_x: Tensor | None, grad_offset: Tensor | None, grad_mask: Tensor | None, need_weight: bool,
) -> Tensor | None:
    """`conv_forward`'s backward: grad_out [N·Ho·Wo, O] rows, weight [O, KCp] (`conv_forward`'s weight_t
    transposed). Overwrites grad_x, grad_offset and grad_mask (None skips one, as in `columns_backward`)
    and returns the weight's gradient [O, K·C] (tap-major rows, a channels-last weight's memory) when
    need_weight, else None."""
    lib = library()
    if not fused_available():
        raise RuntimeError(f"no fused DCN kernel here: {status()}")
    out_channels, kcp = weight.shape
    threads = torch.get_num_threads()
    _check(x, weight, grad_out, grad_x)
    _same_dtype(x, offset, mask, weight, grad_out, grad_x, grad_offset, grad_mask)
    rows = x.shape[0] * sampling.out_hw[0] * sampling.out_hw[1]
    if x.dtype != torch.float32 or out_channels % 16 or grad_out.shape != (rows, out_channels):
        raise ValueError(f"fused DCN backward takes fp32 and grad_out [{rows}, {out_channels}], "
                         f"given {x.dtype} and {tuple(grad_out.shape)}")
    geo = _backward_geometry(x, offset, mask, sampling, grad_offset, grad_mask)
    per_thread = torch.empty(threads, kcp, out_channels, dtype=x.dtype) if need_weight else None  # zeroed there
    _done(lib.deform_conv_backward_f32(_ptr(x), _ptr(offset), _ptr(mask), _ptr(weight), _ptr(grad_out),
                                       _ptr(grad_x), _ptr(grad_offset), _ptr(grad_mask), _ptr(per_thread),
                                       out_channels, ctypes.byref(geo), threads))
    if per_thread is None:
        return None
    columns = sampling.kernel[0] * sampling.kernel[1] * x.shape[-1]
    grad_weight = torch.empty(out_channels, columns, dtype=x.dtype)
    lib.sum_transposed_f32(_ptr(per_thread), threads, kcp, out_channels, columns, _ptr(grad_weight), threads)
    return grad_weight


def to_channels_last(x: Tensor, pad_y: int = 0, pad_x: int = 0) -> Tensor:
    """x [N, C, H, W] zero-padded by (pad_y, pad_x) on every side, as a contiguous [N, H', W', C] tensor
    (x's own memory, no copy, when it is channels-last already and there is no padding)."""
    nhwc = x.permute(0, 2, 3, 1)
    if not (pad_y or pad_x) and nhwc.is_contiguous():
        return nhwc
    n, c, h, w = x.shape
    out = torch.empty(n, h + 2 * pad_y, w + 2 * pad_x, c, dtype=x.dtype, device=x.device)
    lib = library() if x.device.type == "cpu" else None
    if lib is not None and x.is_contiguous() and x.dtype in (torch.float32, torch.float64):
        getattr(lib, f"to_channels_last_{_suffix(x)}")(_ptr(x), _ptr(out), n, c, h, w, pad_y, pad_x,
                                                      torch.get_num_threads())
        return out
    # other layouts (a channels-last x with padding: row by row, fast) and dtypes
    out[:, :pad_y].zero_()
    out[:, pad_y + h :].zero_()
    out[:, pad_y : pad_y + h, :pad_x].zero_()
    out[:, pad_y : pad_y + h, pad_x + w :].zero_()
    out[:, pad_y : pad_y + h, pad_x : pad_x + w].copy_(nhwc)
    return out


def from_channels_last(x: Tensor, pad_y: int = 0, pad_x: int = 0) -> Tensor:
    """The interior of x [N, H + 2·pad_y, W + 2·pad_x, C] (contiguous, channels last) as a contiguous
    NCHW [N, C, H, W] tensor: `to_channels_last` reversed, for a gradient going back to an NCHW input."""
    n, hp, wp, c = x.shape
    h, w = hp - 2 * pad_y, wp - 2 * pad_x
    lib = library() if x.device.type == "cpu" else None
    if lib is None or not x.is_contiguous() or x.dtype not in (torch.float32, torch.float64):
        return x[:, pad_y : pad_y + h, pad_x : pad_x + w].permute(0, 3, 1, 2).contiguous()
    out = torch.empty(n, c, h, w, dtype=x.dtype, device=x.device)
    getattr(lib, f"from_channels_last_{_suffix(x)}")(_ptr(x), _ptr(out), n, c, h, w, pad_y, pad_x,
                                                    torch.get_num_threads())
    return out
