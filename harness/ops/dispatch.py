"""The entry points: `deform_conv2d` and `deform_conv2d_shared` check their arguments and choose a backend (the
Triton kernels when switched on, the compiled C kernel on the CPU, else the grid_sample path), and
`kernel_summary` says which one runs on a device."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from harness import settings
from harness.kernels import cpp_autograd, native, triton_kernels
from harness.ops import common, cpu, cuda
from harness.ops.common import gemm_dtype
from harness.ops.geometry import IntPair, as_coordinates, check_offset, expand_shared_offset, layer_geometry
from harness.ops.triton import DeformColumnsTriton, SampleTriton


def kernel_summary(device: torch.device) -> str:
    """Which implementation `deform_conv2d` runs on `device`, in a few words. Runs record it (the
    `harness.dcn_kernel` tag, in the report's environment list): their timings compare only within one."""
    if device.type == "cuda":
        if triton_kernels.applies(device):
            return "triton kernels"
        cpp = cpp_autograd.available()
        steps = "C++ autograd op" if cpp else "pytorch"
        slices = f", channel slices ({settings.variable('split')}=1)" if cpp and cuda.split_requested() else ""
        # a layer whose columns pass CUDA_COLUMN_CHUNK_BYTES takes the chunked Function whichever it is
        return (f"{steps} (grid_sample{slices}, cuBLAS; chunked above {common.CUDA_COLUMN_CHUNK_BYTES >> 20} MiB "
                "of columns)")
    if device.type == "cpu":
        return native.summary()
    return "pytorch (grid_sample)"


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    mask: Tensor | None = None,
) -> Tensor:
    """Deformable 2-D convolution with torchvision's signature and offset layout.

    Shapes: input [N, C, H, W]; offset [N, 2·G·kh·kw, Ho, Wo] (G offset groups, inferred);
    weight [O, C/groups, kh, kw] (conv groups inferred); mask [N, G·kh·kw, Ho, Wo] (DCNv2).
    """
    (stride_, padding_, dilation_), groups, _, (kh, kw), out_hw = layer_geometry(
        input, weight, bias, stride, padding, dilation
    )
    n, c = input.shape[:2]
    taps = kh * kw
    offset_groups = check_offset("offset", offset, n, 2 * taps, c, out_hw)
    if mask is not None:
        mask_groups = check_offset("mask", mask, n, taps, c, out_hw)
        if mask_groups != offset_groups:
            raise ValueError(
                f"mask must have {offset_groups * taps} channels (offset groups x kh*kw) to match the offset, "
                f"given {mask.shape[1]}"
            )

    offset = as_coordinates(offset, input)
    geometry = ((kh, kw), stride_, padding_, dilation_, out_hw)
    if triton_kernels.applies(input.device):
        return DeformColumnsTriton.apply(
            input, offset, weight, mask, bias, native.Sampling(*geometry), gemm_dtype(input, weight)
        )
    if groups == 1 and input.device.type == "cpu" and native.available():
        return cpu.deform_conv2d_native(input, offset, weight, bias, mask, native.Sampling(*geometry))
    return cuda.deform_conv2d_grid(input, offset, weight, bias, mask, geometry, groups, offset_groups)


def deform_conv2d_shared(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
) -> Tensor:
    """Deformable convolution whose offset is shared by all kernel taps: offset [N, 2·G, Ho, Wo].

    Exact (not an approximation) and equal to `deform_conv2d` with the offset repeated over the taps:
    convolve the zero-padded input at stride 1, then bilinearly sample the result at
    stride·p0 − padding + Δp(p0). On the CPU with the compiled kernel (`harness.kernels.native`) the
    convolution runs channels-last and the sample is that kernel with one tap, so values and gradients
    follow torchvision's kernel at whole pixels too (its one-sided offset gradient); elsewhere the
    sample is `grid_sample`. With several offset groups and several
    conv groups at once, and on the compiled path at stride > 1 or where the full map is much larger than
    the output (`SHARED_AREA_RATIO`), it goes through `deform_conv2d` instead.
    """
    (stride_, padding_, dilation_), groups, out_channels, (kh, kw), out_hw = layer_geometry(
        input, weight, bias, stride, padding, dilation
    )
    n, c = input.shape[:2]
    offset_groups = check_offset("offset", offset, n, 2, c, out_hw)
    use_triton = triton_kernels.applies(input.device)
    use_native = not use_triton and input.device.type == "cpu" and native.available()
    per_tap_native = groups == 1 and use_native and _full_map_too_large(input, stride_, dilation_, (kh, kw), out_hw)
    if (offset_groups > 1 and groups > 1) or per_tap_native:
        return deform_conv2d(
            input, expand_shared_offset(offset, kh * kw), weight, bias, stride_, padding_, dilation_
        )

    full, (reach_y, reach_x) = _convolve_padded(input, weight, groups, offset_groups, dilation_, use_native)
    offset = as_coordinates(offset, input)
    # output pixel (i, j) reads `full` at (i·s + reach − padding, j·s + reach − padding) + Δ: the
    # per-tap grid of a 1x1 kernel with padding − reach
    geometry = ((1, 1), stride_, (padding_[0] - reach_y, padding_[1] - reach_x), (1, 1), out_hw)
    if use_native:
        return cpu.sample_shared_native(full, offset, native.Sampling(*geometry), bias)
    if use_triton:
        out = SampleTriton.apply(full, offset, native.Sampling(*geometry))
    elif cuda.runs_cpp_op(input):  # the sample, the group sum and the bias in C++
        return cuda.sample_shared_cpp(full, offset, bias, geometry, offset_groups)
    else:
        out = cuda.sample_shared(full, offset, geometry, offset_groups)
    out = out.view(n, offset_groups, out_channels, *out_hw)
    out = out.sum(1) if offset_groups > 1 else out.squeeze(1)
    if bias is not None:
        out = out + bias.view(1, out_channels, 1, 1).to(out.dtype)
    return out


# The conv-then-sample form convolves a (H + reach) x (W + reach) map at stride 1 and keeps Ho x Wo of it.
# Where that map is more than this many times the output (stride > 1; maps of 8 px or less with a 3x3
# kernel: 8 px 1.56x, 4 px 2.25x) the compiled per-tap kernel on the repeated offset is cheaper (at 4-8 px
# 1.2-1.8x conv2d against 1.5-2.5x; at 16 px and up the two are level or the sample is faster).
SHARED_AREA_RATIO = 1.3


def _full_map_too_large(
    input: Tensor, stride: tuple[int, int], dilation: tuple[int, int], kernel: tuple[int, int], out_hw: tuple[int, int]
) -> bool:
    """Whether the shared layout's full-resolution map would pass SHARED_AREA_RATIO times the output."""
    if stride != (1, 1):
        return True
    h, w = input.shape[-2:]
    full = (h + (kernel[0] - 1) * dilation[0]) * (w + (kernel[1] - 1) * dilation[1])
    return full > SHARED_AREA_RATIO * out_hw[0] * out_hw[1]


def _convolve_padded(
    input: Tensor, weight: Tensor, groups: int, offset_groups: int, dilation: tuple[int, int], use_native: bool
) -> tuple[Tensor, tuple[int, int]]:
    """The shared layout's convolution: `weight` over `input` zero-padded by the kernel's reach on every side, at
    stride 1, one convolution per offset group (their outputs stacked as conv groups, channel g·O + o), and
    the reach (y, x). Row i of the result is the correlation anchored at input row i - reach_y."""
    c = input.shape[1]
    out_channels, _, kh, kw = weight.shape
    reach_y, reach_x = (kh - 1) * dilation[0], (kw - 1) * dilation[1]
    # The plane is zero-padded by `reach` on every side. oneDNN's backward is much slower for a
    # padding wider than "same" (1.3-1.5x for a 3x3), so the part beyond "same" is an explicit pad.
    same_y, same_x = reach_y // 2, reach_x // 2
    extra_y, extra_x = reach_y - same_y, reach_x - same_x
    if use_native:  # channels-last, the compiled kernel's layout: oneDNN then writes `full` channels-last too
        plane = cpu.padded_channels_last(input, extra_y, extra_x)
    else:
        plane = F.pad(input, (extra_x, extra_x, extra_y, extra_y)) if extra_y or extra_x else input
    if offset_groups == 1:
        conv_weight = weight
    else:  # conv groups == 1: one convolution per offset group, stacked as conv groups (channel g·O + o)
        per = c // offset_groups
        split = weight.reshape(out_channels, offset_groups, per, kh, kw).transpose(0, 1)
        conv_weight = split.reshape(offset_groups * out_channels, per, kh, kw)
    full = F.conv2d(plane, conv_weight, None, 1, (same_y, same_x), dilation, groups * offset_groups)
    return full, (reach_y, reach_x)
