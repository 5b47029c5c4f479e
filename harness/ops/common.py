"""What every backend of `deform_conv2d` shares: the profiler scope around sampling, the matmuls' dtype, and
the cut of a batch into chunks that bounds the transient column buffers."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor
from torch.profiler import record_function

# Profiler scope around every deformable sampling step (forward and backward), so that the share of
# time spent sampling can be measured apart from the convolutions and matmuls.
SAMPLING_SCOPE = "harness::deform_sampling"

# Columns are sampled for this many bytes' worth of images at a time (at least one image per thread),
# so the transient column buffers of a layer stay bounded whatever the batch size. 4 MiB keeps peak
# memory under torchvision's on every benchmark shape and costs at most ~5 % speed against 16 MiB.
COLUMN_CHUNK_BYTES = 4 * 2**20
# On a GPU small chunks only add launches (each kernel must fill the device); the bound is there so
# that a large training batch does not need gigabytes of columns at once.
CUDA_COLUMN_CHUNK_BYTES = 256 * 2**20


def sampling_scope() -> AbstractContextManager[object]:
    """SAMPLING_SCOPE while a profiler records; nothing otherwise (on a GPU each scope is two more
    dispatcher calls in a layer that is launch-bound at small sizes)."""
    return record_function(SAMPLING_SCOPE) if torch.autograd.profiler._is_profiler_enabled else nullcontext()


def gemm_dtype(input: Tensor, weight: Tensor) -> torch.dtype:
    """The matmul's dtype: autocast's when it is on (bf16/fp16), else the inputs' common dtype."""
    device_type = input.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(input.dtype, weight.dtype)


def image_chunks(n: int, bytes_per_image: int, device: torch.device | None = None) -> list[slice]:
    """Batch slices of about COLUMN_CHUNK_BYTES of columns (CUDA_COLUMN_CHUNK_BYTES on a GPU).

    On the CPU each slice is a multiple of the thread count: grid_sample's CPU kernels parallelise
    over the batch only, so a chunk of one image would leave every other core idle (and 3 images on
    2 threads one idle a third of the time).
    """
    if device is not None and device.type == "cuda":
        step = max(1, CUDA_COLUMN_CHUNK_BYTES // max(1, bytes_per_image))
    else:
        threads = torch.get_num_threads()
        step = max(1, COLUMN_CHUNK_BYTES // max(1, bytes_per_image))
        step = max(threads, step - step % threads)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]
