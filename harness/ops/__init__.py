"""Deformable convolution (DCNv1 and the DCNv2 modulated form), exact against torchvision's kernel.

`deform_conv2d` takes the arguments and offset layout of `torchvision.ops.deform_conv2d`: for kernel
tap ``k = i * kw + j`` of offset group ``g``, channel ``2 * (g * kh * kw + k)`` holds Δy and the next
one Δx. It samples the k·k "columns" bilinearly (zeros outside the image, like torchvision) and
multiplies them by the weights, with a hand-written backward that recomputes the columns chunk by
chunk. On the CPU the compiled channels-last kernel of `harness.kernels.native` does it: in fp32 with
outputs a multiple of 16 sampling and products in one pass, tile by tile in cache (the columns never
reach memory), otherwise sampling with oneDNN 1x1 convolutions for the matmuls; elsewhere (CUDA, or
without a C compiler) sampling is `grid_sample` and the matmuls are batched matmuls.

`deform_conv2d_shared` is the fast path for the layout the course assignment used: one (Δy, Δx) per
offset group shared by all kernel taps. Because every tap then sees the same fractional position, the
layer equals an ordinary stride-1 convolution over the zero-padded plane followed by one bilinear
sample of its output per output pixel (on the CPU the compiled kernel with one tap, else
`grid_sample`), which costs little more than the convolution itself.

`DeformConv2d` is the layer the networks use: conv weights plus a zero-initialised offset (and mask)
predictor, so at initialisation an unmodulated layer is exactly an ordinary convolution.

The package, one backend or one job a module: `geometry` (argument and shape checks, output sizes),
`common` (the profiler scope, the matmuls' dtype, batch chunks), `cpu` (the compiled C kernel), `cuda`
(grid_sample and cuBLAS, the C++ op, channel slices; also the CPU's fallback), `triton` (the opt-in
Triton kernels), `dispatch` (the entry points, choosing among them) and `layer` (`DeformConv2d`).
Tuning constants and switches live in the module that reads them (e.g. `harness.ops.common`'s
COLUMN_CHUNK_BYTES): patch them there.
"""

from harness.ops.common import SAMPLING_SCOPE, image_chunks
from harness.ops.cpu import channels_last, columns_times_weight, columns_times_weight_backward
from harness.ops.dispatch import deform_conv2d, deform_conv2d_shared, kernel_summary
from harness.ops.geometry import IntPair, expand_shared_offset
from harness.ops.layer import Backend, DeformConv2d, OffsetLayout

__all__ = [
    "SAMPLING_SCOPE",
    "Backend",
    "DeformConv2d",
    "IntPair",
    "OffsetLayout",
    "channels_last",
    "columns_times_weight",
    "columns_times_weight_backward",
    "deform_conv2d",
    "deform_conv2d_shared",
    "expand_shared_offset",
    "image_chunks",
    "kernel_summary",
]
