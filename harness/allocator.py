"""Keep glibc's heap in a steady state so that CPU timings measure compute, not page faults.

PyTorch's CPU tensors come from malloc. With glibc's defaults a freed block above the (adaptive) mmap
threshold goes back to the OS and the next allocation of that size faults every page in again and
zeroes it; the threshold also rises as the process runs, so the same layer gets faster over time.
So one conv2d forward+backward can take twice as long depending on what ran before it, which biases
wall-clock comparisons between ablation variants by their order.

`steady_heap()` fixes the regime for the whole process: blocks up to 32 MiB (glibc's maximum mmap
threshold) come from the heap and are reused, and the heap is only trimmed above 512 MiB of free
space. The cost is that resident memory stays near its peak, which a training or benchmark process
reaches anyway. Turn the `steady_heap` switch off (see harness.settings) to keep glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

from harness import settings

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3

MMAP_THRESHOLD = 32 * 2**20  # glibc's upper limit on 64-bit systems
TRIM_THRESHOLD = 512 * 2**20
TOP_PAD = 64 * 2**20

_applied = False


def steady_heap() -> bool:
    """Apply the steady-heap malloc settings once per process; True if they are in effect.

    A no-op (False) off Linux/glibc or with the `steady_heap` switch off.
    """
    global _applied
    if _applied:
        return True
    if not settings.current().steady_heap or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    params = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD))
    _applied = all(mallopt(param, value) == 1 for param, value in params)
    return _applied
