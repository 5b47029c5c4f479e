"""Deformable convolution (DCNv1 and the DCNv2 modulated form), exact against torchvision's kernel.

`deform_conv2d` takes the arguments and offset layout of `torchvision.ops.deform_conv2d`: for kernel
tap ``k = i * kw + j`` of offset group ``g``, channel ``2 * (g * kh * kw + k)`` holds Δy and the next
one Δx. It samples the k·k "columns" bilinearly (zeros outside the image, like torchvision) and
multiplies them by the weights, with a hand-written backward that recomputes the columns chunk by
chunk. On the CPU the compiled channels-last kernel of `harness.native` does it: in fp32 with outputs
a multiple of 16 sampling and products in one pass, tile by tile in cache (the columns never reach
memory), otherwise sampling with oneDNN 1x1 convolutions for the matmuls; elsewhere (CUDA, or without
a C compiler) sampling is `grid_sample` and the matmuls are batched matmuls.

`deform_conv2d_shared` is the fast path for the layout the course assignment used: one (Δy, Δx) per
offset group shared by all kernel taps. Because every tap then sees the same fractional position, the
layer equals an ordinary stride-1 convolution over the zero-padded plane followed by one bilinear
sample of its output per output pixel (on the CPU the compiled kernel with one tap, else
`grid_sample`), which costs little more than the convolution itself.

`DeformConv2d` is the layer the networks use: conv weights plus a zero-initialised offset (and mask)
predictor, so at initialisation an unmodulated layer is exactly an ordinary convolution.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from harness import cpp_autograd, native, triton_kernels

OffsetLayout = Literal["shared", "per_tap"]
Backend = Literal["native", "torchvision"]

IntPair = int | tuple[int, int]

# Profiler scope around every deformable sampling step (forward and backward), so that the share of
# time spent sampling can be measured apart from the convolutions and matmuls.
SAMPLING_SCOPE = "harness::deform_sampling"


def _sampling_scope() -> AbstractContextManager[object]:
    """SAMPLING_SCOPE while a profiler records; nothing otherwise (on a GPU each scope is two more
    dispatcher calls in a layer that is launch-bound at small sizes)."""
    return record_function(SAMPLING_SCOPE) if torch.autograd.profiler._is_profiler_enabled else nullcontext()


def kernel_summary(device: torch.device) -> str:
    """Which implementation `deform_conv2d` runs on `device`, in a few words. Runs record it (the
    `harness.dcn_kernel` tag, in the report's environment list): their timings compare only within one."""
    if device.type == "cuda":
        if triton_kernels.applies(device):
            return "triton kernels"
        cpp = cpp_autograd.available()
        steps = "C++ autograd op" if cpp else "pytorch"
        slices = ", channel slices (HARNESS_SPLIT=1)" if cpp and _split_requested() else ""
        # a layer whose columns pass CUDA_COLUMN_CHUNK_BYTES takes the chunked Function whichever it is
        return (f"{steps} (grid_sample{slices}, cuBLAS; chunked above {CUDA_COLUMN_CHUNK_BYTES >> 20} MiB of "
                "columns)")
    if device.type == "cpu":
        return native.summary()
    return "pytorch (grid_sample)"


def _pair(value: IntPair, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    pair = tuple(int(v) for v in value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, given {value!r}")
    return pair  # type: ignore[return-value]


def _output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _check_common(
    input_shape: torch.Size,
    weight_shape: torch.Size,
    bias_shape: torch.Size | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int, int, int]:
    """Validate the input, weight and bias shapes; return (groups, out_channels, kh, kw)."""
    if len(input_shape) != 4:
        raise ValueError(f"input must be 4-D [N, C, H, W], given shape {tuple(input_shape)}")
    if len(weight_shape) != 4:
        raise ValueError(f"weight must be 4-D [O, C/groups, kh, kw], given shape {tuple(weight_shape)}")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(
            f"stride and dilation must be >= 1 and padding >= 0, given stride={stride}, "
            f"padding={padding}, dilation={dilation}"
        )
    n_in = input_shape[1]
    out_channels, channels_per_group = weight_shape[:2]
    if channels_per_group == 0 or n_in % channels_per_group != 0:
        raise ValueError(
            f"weight expects C/groups = {channels_per_group} input channels per group, which does not "
            f"divide the input's {n_in} channels (weight shape {tuple(weight_shape)}, "
            f"input shape {tuple(input_shape)})"
        )
    groups = n_in // channels_per_group
    if out_channels % groups != 0:
        raise ValueError(
            f"groups={groups} (from input {n_in} / weight {channels_per_group} channels) must divide the "
            f"{out_channels} output channels of weight {tuple(weight_shape)}"
        )
    if bias_shape is not None and tuple(bias_shape) != (out_channels,):
        raise ValueError(f"bias must have shape ({out_channels},), given {tuple(bias_shape)}")
    return groups, out_channels, weight_shape[2], weight_shape[3]


Geometry = tuple[tuple[tuple[int, int], tuple[int, int], tuple[int, int]], int, int, tuple[int, int], tuple[int, int]]


def _geometry(
    input: Tensor, weight: Tensor, bias: Tensor | None, stride: IntPair, padding: IntPair, dilation: IntPair
) -> Geometry:
    """Validated (stride, padding, dilation) pairs, conv groups, output channels, kernel and output size.

    Cached by shapes: on a GPU a small layer is bound by the host, and validating from scratch was a
    quarter of the Python wrapper's time. Errors are not cached, so a bad call raises every time.
    """
    key = (input.shape, weight.shape, None if bias is None else bias.shape, stride, padding, dilation)
    try:
        return _shape_geometry(*key)
    except TypeError:  # an unhashable argument (a list): validate without the cache
        return _shape_geometry.__wrapped__(*key)


@lru_cache(maxsize=512)
def _shape_geometry(
    input_shape: torch.Size, weight_shape: torch.Size, bias_shape: torch.Size | None, stride: IntPair,
    padding: IntPair, dilation: IntPair,
) -> Geometry:
    pairs = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    groups, out_channels, kh, kw = _check_common(input_shape, weight_shape, bias_shape, *pairs)
    (sh, sw), (ph, pw), (dh, dw) = pairs
    h, w = input_shape[-2:]
    out_hw = (_output_size(h, kh, sh, ph, dh), _output_size(w, kw, sw, pw, dw))
    if min(out_hw) < 1:
        raise ValueError(
            f"input {h}x{w} is too small for kernel {kh}x{kw} with padding {pairs[1]} and dilation "
            f"{pairs[2]}: output would be {out_hw[0]}x{out_hw[1]}"
        )
    return pairs, groups, out_channels, (kh, kw), out_hw


def _check_offset(
    name: str, tensor: Tensor, batch: int, per_group: int, n_in: int, out_hw: tuple[int, int]
) -> int:
    """Validate an offset or mask tensor and return its number of offset groups."""
    if tensor.dim() != 4:
        raise ValueError(f"{name} must be 4-D [N, channels, Ho, Wo], given shape {tuple(tensor.shape)}")
    channels = tensor.shape[1]
    if channels == 0 or channels % per_group != 0:
        raise ValueError(
            f"{name} must have a positive multiple of {per_group} channels (one set per offset group), "
            f"given {channels} (shape {tuple(tensor.shape)})"
        )
    groups = channels // per_group
    if n_in % groups != 0:
        raise ValueError(
            f"{name} has {channels} channels = {groups} offset groups, which do not divide the "
            f"{n_in} input channels"
        )
    expected = (batch, channels, *out_hw)
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{name} must have shape {expected}, given {tuple(tensor.shape)}")
    return groups


def _normalise(coords: Tensor, size: int) -> Tensor:
    """Pixel coordinates → grid_sample's [-1, 1] frame (align_corners=False; exact for size 1 too)."""
    return (2.0 * coords + 1.0) / size - 1.0


def _as_coordinates(offset: Tensor, input: Tensor) -> Tensor:
    """The offset in the sampling positions' dtype, at least fp32: in bf16/fp16 (autocast) a position of 60
    is off by 0.25 px. No cast (a dispatch on a host-bound GPU layer) when it already is."""
    dtype = torch.float64 if torch.float64 in (offset.dtype, input.dtype) else torch.float32
    return offset if offset.dtype == dtype else offset.to(dtype)


def _pad_to_power_of_two(t: Tensor) -> Tensor:
    """Zero-pad H and W (bottom/right) up to powers of two.

    grid_sample maps pixel coordinates to [-1, 1] and back; with a power-of-two size both mappings
    are exact for integer coordinates, so samples at whole pixels (every sample when the offsets are
    zero) take the same corners, and the same one-sided gradient, as torchvision's kernel. The extra
    zeros read exactly like the zeros outside the image.
    """
    h, w = t.shape[-2:]
    pad_h, pad_w = (1 << (h - 1).bit_length()) - h, (1 << (w - 1).bit_length()) - w
    return F.pad(t, (0, pad_w, 0, pad_h)) if pad_h or pad_w else t


@lru_cache(maxsize=128)
def _normalised_tap_grid(
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    out_hw: tuple[int, int],
    source_hw: tuple[int, int],
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """The undeformed sampling positions of every tap at every output pixel, in grid_sample's frame on a
    source of `source_hw`: the grid [K, Ho, Wo, 2] as (x, y) in [-1, 1], and the scale (2/W, 2/H) that
    turns an offset (Δx, Δy) into that frame.

    With power-of-two sizes both are exact, so grid = base + scale·Δ is one rounding, and exact for
    whole-pixel offsets. Cached per geometry (read-only): on a GPU the few tiny kernels that build it
    cost more than the layer's own sampling at small sizes.
    """
    (kh, kw), (ho, wo) = kernel, out_hw
    opts = {"dtype": dtype, "device": device}
    with torch.inference_mode(False):  # a cached inference tensor could not be saved for backward later
        rows = torch.arange(ho, **opts) * stride[0] - padding[0]
        cols = torch.arange(wo, **opts) * stride[1] - padding[1]
        tap_rows = torch.arange(kh, **opts) * dilation[0]
        tap_cols = torch.arange(kw, **opts) * dilation[1]
        y = (tap_rows.view(kh, 1, 1, 1) + rows.view(1, 1, ho, 1)).expand(kh, kw, ho, wo).reshape(kh * kw, ho, wo)
        x = (tap_cols.view(1, kw, 1, 1) + cols.view(1, 1, 1, wo)).expand(kh, kw, ho, wo).reshape(kh * kw, ho, wo)
        base = torch.stack((_normalise(x, source_hw[1]), _normalise(y, source_hw[0])), dim=-1)
        scale = torch.tensor([2.0 / source_hw[1], 2.0 / source_hw[0]], dtype=dtype, device=device)
    return base, scale


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
    (stride_, padding_, dilation_), groups, out_channels, (kh, kw), out_hw = _geometry(
        input, weight, bias, stride, padding, dilation
    )
    n, c, h, w = input.shape
    taps = kh * kw
    offset_groups = _check_offset("offset", offset, n, 2 * taps, c, out_hw)
    if mask is not None:
        mask_groups = _check_offset("mask", mask, n, taps, c, out_hw)
        if mask_groups != offset_groups:
            raise ValueError(
                f"mask must have {offset_groups * taps} channels (offset groups x kh*kw) to match the offset, "
                f"given {mask.shape[1]}"
            )

    ho, wo = out_hw
    offset = _as_coordinates(offset, input)
    geometry = ((kh, kw), stride_, padding_, dilation_, out_hw)
    if triton_kernels.applies(input.device):
        return _DeformColumnsTriton.apply(
            input, offset, weight, mask, bias, native.Sampling(*geometry), _gemm_dtype(input, weight)
        )
    if groups == 1 and input.device.type == "cpu" and native.available():
        return _deform_conv2d_native(input, offset, weight, bias, mask, native.Sampling(*geometry))
    base, scale = _normalised_tap_grid(
        *geometry, (_next_power_of_two(h), _next_power_of_two(w)), offset.dtype, offset.device
    )
    keeps_columns = _keeps_columns(input, n * c * taps * ho * wo * offset.element_size())
    if keeps_columns and _runs_cpp_op(input):  # the lines below and _sample_then_matmul, in C++
        split = _channel_split(input.device, n * offset_groups * taps * ho * wo, c // offset_groups)
        return torch.ops.harness.deform_layer(
            input, offset, weight, bias, mask, base, scale, groups, offset_groups, ho, wo, _gemm_dtype(input, weight),
            split,
        )
    # (Δy, Δx) per tap → grid_sample's (x, y): one flip and one fused multiply-add
    delta = offset.reshape(n, offset_groups, taps, 2, ho, wo).permute(0, 1, 2, 4, 5, 3).flip(-1)
    grid = torch.addcmul(base, delta, scale).reshape(n * offset_groups, taps * ho, wo, 2)
    if keeps_columns:
        out = _sample_then_matmul(input, grid, weight, mask, groups, offset_groups, out_hw)
    else:
        out = _DeformColumnsMatmul.apply(input, grid, weight, mask, groups, offset_groups, out_hw)
    if bias is not None:
        out = out + bias.view(1, out_channels, 1, 1).to(out.dtype)
    return out


def _runs_cpp_op(input: Tensor) -> bool:
    """On a GPU the layer's Python steps run as one C++ autograd op (`harness.cpp_autograd`) once it is built:
    there a small layer is bound by the host's dispatch time, not by the GPU."""
    return input.device.type == "cuda" and cpp_autograd.available()


# At least this many channels per slice when `_channel_split` cuts them: below it the per-point setup
# (corners, weights, bounds) would be repeated for too little work.
MIN_SPLIT_CHANNELS = 8


def _channel_split(device: torch.device, points: int, channels: int) -> int:
    """Into how many slices the C++ op cuts each offset group's `channels` on `device` (opt-in,
    HARNESS_SPLIT=1; 1 otherwise).

    grid_sample's CUDA kernels give each of a layer's `points` (samples per channel) a thread that loops
    over all channels, so few points and many channels leave the GPU part-empty (its backward ran 1.3×
    slower per channel at 37k threads than at 295k on an H100, 4× at 4k). The largest power of two
    that keeps the threads within twice what the GPU holds at once and MIN_SPLIT_CHANNELS channels per
    slice. It costs one more kernel per backward (the grid gradient's sum over slices), so it pays only
    where the GPU, not the host, sets the time; it has not been measured on a GPU yet.
    """
    if device.type != "cuda" or not _split_requested():
        return 1
    target = 2 * _resident_threads(device)
    split = 1
    while (channels % (2 * split) == 0 and channels // (2 * split) >= MIN_SPLIT_CHANNELS
           and points * 2 * split <= target):
        split *= 2
    return split


def _split_requested() -> bool:
    return os.environ.get("HARNESS_SPLIT", "0") == "1"


@lru_cache(maxsize=8)
def _resident_threads(device: torch.device) -> int:
    """How many threads `device` runs at once: multiprocessors × threads per multiprocessor."""
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count * getattr(props, "max_threads_per_multi_processor", 2048)


def _next_power_of_two(size: int) -> int:
    return 1 << (size - 1).bit_length()


def _gemm_dtype(input: Tensor, weight: Tensor) -> torch.dtype:
    """The matmul's dtype: autocast's when it is on (bf16/fp16), else the inputs' common dtype."""
    device_type = input.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(input.dtype, weight.dtype)


def _sample_columns(input: Tensor, grid: Tensor, offset_groups: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Bilinear samples of every tap at every output pixel [N·G, C/G, K·Ho, Wo], and the padded source."""
    n, c, h, w = input.shape
    # contiguous NCHW: grid_sample reads one channel plane at a time, so channels-last input would
    # make every read strided
    source = _pad_to_power_of_two(input.to(dtype).reshape(n * offset_groups, c // offset_groups, h, w).contiguous())
    columns = F.grid_sample(source, grid.to(dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
    return columns, source


# Columns are sampled for this many bytes' worth of images at a time (at least one image per thread),
# so the transient column buffers of a layer stay bounded whatever the batch size. 4 MiB keeps peak
# memory under torchvision's on every benchmark shape and costs at most ~5 % speed against 16 MiB.
COLUMN_CHUNK_BYTES = 4 * 2**20
# On a GPU small chunks only add launches (each kernel must fill the device); the bound is there so
# that a large training batch does not need gigabytes of columns at once.
CUDA_COLUMN_CHUNK_BYTES = 256 * 2**20


def _image_chunks(n: int, bytes_per_image: int, device: torch.device | None = None) -> list[slice]:
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


def _keeps_columns(input: Tensor, column_bytes: int) -> bool:
    """On a GPU, a batch whose columns fit in one chunk keeps them for backward (`_sample_then_matmul`)."""
    return input.device.type == "cuda" and column_bytes <= CUDA_COLUMN_CHUNK_BYTES


def _sample_then_matmul(
    input: Tensor, grid: Tensor, weight: Tensor, mask: Tensor | None, groups: int, offset_groups: int,
    out_hw: tuple[int, int],
) -> Tensor:
    """`_DeformColumnsMatmul`'s computation in differentiable PyTorch ops, for a GPU.

    At the benchmark's sizes a GPU layer is bound by the host, not the device: this version's backward
    runs in autograd's C++ engine with no Python, and reuses the columns instead of sampling them
    again (on an H100 torchvision's time ÷ ours went from 0.54–1.00× to 0.91–1.22×). The price is
    that the columns (at most CUDA_COLUMN_CHUNK_BYTES, else the chunked Function is used) stay alive
    until backward.
    """
    n, c = input.shape[:2]
    out_channels, per_group, kh, kw = weight.shape
    taps, length = kh * kw, out_hw[0] * out_hw[1]
    sampling = torch.float64 if input.dtype == torch.float64 else torch.float32
    gemm = _gemm_dtype(input, weight)
    with torch.autocast(input.device.type, enabled=False):
        with _sampling_scope():
            columns, _ = _sample_columns(input, grid, offset_groups, sampling)
            if mask is not None:
                columns = columns.view(n, offset_groups, c // offset_groups, taps, length) * mask.to(
                    sampling).reshape(n, offset_groups, 1, taps, length)
        columns = columns.reshape(n, groups, per_group * taps, length).to(gemm)
        out = torch.matmul(weight.to(gemm).reshape(groups, out_channels // groups, per_group * taps), columns)
    return out.view(n, out_channels, *out_hw)


class _DeformColumnsMatmul(torch.autograd.Function):
    """Sampled columns times the weights, with a hand-written backward that recomputes the columns.

    Forward keeps only the input, the sampling grid, the weights and the mask: the columns (k·k times
    the input's size) are sampled again in backward instead of being held between the passes, and
    both passes work through the batch in chunks of about COLUMN_CHUNK_BYTES of columns, so a layer's
    memory stays close to an ordinary conv's. Sampling always runs in fp32 (fp64 for fp64 inputs);
    under autocast the matmuls run in autocast's dtype (bf16/fp16).
    """

    @staticmethod
    def forward(ctx, input, grid, weight, mask, groups, offset_groups, out_hw):  # type: ignore[override]
        n, c = input.shape[:2]
        out_channels, per_group, kh, kw = weight.shape
        taps, length = kh * kw, out_hw[0] * out_hw[1]
        sampling = torch.float64 if input.dtype == torch.float64 else torch.float32
        gemm = _gemm_dtype(input, weight)
        g = offset_groups
        out = torch.empty(n, out_channels, length, dtype=gemm, device=input.device)
        with torch.autocast(input.device.type, enabled=False):
            w = weight.to(gemm).reshape(groups, out_channels // groups, per_group * taps)
            for part in _image_chunks(n, c * taps * length * torch.finfo(sampling).bits // 8, input.device):
                m = part.stop - part.start
                rows = slice(part.start * g, part.stop * g)
                with _sampling_scope():
                    columns, _ = _sample_columns(input[part], grid[rows], g, sampling)
                    columns = columns.view(m, g, c // g, taps, length)
                    if mask is not None:
                        columns.mul_(mask[part].to(sampling).reshape(m, g, 1, taps, length))
                columns = columns.view(m, groups, per_group * taps, length).to(gemm)
                torch.matmul(w, columns, out=out[part].view(m, groups, out_channels // groups, length))
                del columns
        ctx.save_for_backward(input, grid, weight, mask)
        ctx.config = (groups, offset_groups, out_hw, sampling, gemm)
        return out.view(n, out_channels, *out_hw)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        input, grid, weight, mask = ctx.saved_tensors
        groups, g, out_hw, sampling, gemm = ctx.config
        n, c, h, w = input.shape
        out_channels, per_group, kh, kw = weight.shape
        taps, length = kh * kw, out_hw[0] * out_hw[1]
        need_input, need_grid, need_weight, need_mask = ctx.needs_input_grad[:4]
        chunks = _image_chunks(n, 2 * c * taps * length * torch.finfo(sampling).bits // 8, input.device)
        whole = len(chunks) == 1  # one chunk (the usual case on a GPU): gradients are the results, no copies
        grad_input = torch.empty_like(input) if need_input and not whole else None
        grad_grid = torch.empty_like(grid) if need_grid and not whole else None
        grad_mask = torch.empty_like(mask) if mask is not None and need_mask else None
        grad_weight = None
        with torch.autocast(input.device.type, enabled=False):
            w_t = weight.to(gemm).reshape(groups, out_channels // groups, per_group * taps).transpose(-1, -2)
            for part in chunks:
                m = part.stop - part.start
                rows = slice(part.start * g, part.stop * g)
                with _sampling_scope():
                    raw, source = _sample_columns(input[part], grid[rows], g, sampling)
                raw = raw.view(m, g, c // g, taps, length)
                go = grad_out[part].reshape(m, groups, out_channels // groups, length).to(gemm)
                grad_columns = torch.matmul(w_t, go).to(sampling).view(m, g, c // g, taps, length)
                with _sampling_scope():
                    if mask is not None:
                        mk = mask[part].to(sampling).reshape(m, g, 1, taps, length)
                        if grad_mask is not None:
                            grad_mask[part] = (grad_columns * raw).sum(2).view(grad_mask[part].shape)
                        raw.mul_(mk)  # the modulated columns, in place: no second column-sized buffer
                        grad_columns.mul_(mk)
                if need_weight:
                    columns = raw.view(m, groups, per_group * taps, length).to(gemm)
                    part_weight = torch.matmul(go, columns.transpose(-1, -2)).sum(0)
                    grad_weight = part_weight if grad_weight is None else grad_weight.add_(part_weight)
                    del columns
                del raw
                if need_input or need_grid:
                    with _sampling_scope():
                        grad_source, grad_part = torch.ops.aten.grid_sampler_2d_backward(
                            grad_columns.view(m * g, c // g, taps * out_hw[0], out_hw[1]),
                            source, grid[rows].to(sampling), 0, 0, False, [need_input, need_grid],
                        )
                    if need_input:
                        grad_source = grad_source[..., :h, :w].reshape(m, c, h, w)
                        if whole:
                            grad_input = grad_source
                        else:
                            grad_input[part] = grad_source
                    if need_grid:
                        if whole:
                            grad_grid = grad_part
                        else:
                            grad_grid[rows] = grad_part
                del grad_columns
        grad_weight = grad_weight.view(weight.shape).to(weight.dtype) if need_weight else None
        return grad_input, grad_grid, grad_weight, grad_mask, None, None, None


class _DeformColumnsTriton(torch.autograd.Function):
    """Columns from the Triton kernel times the weights (cuBLAS), the GPU path.

    Forward keeps the input, offset, weights and mask, not the columns: backward samples them again
    (one kernel) for the weight gradient, so a layer's memory stays close to an ordinary conv's; both
    passes go through the batch in chunks of CUDA_COLUMN_CHUNK_BYTES of columns. Columns are written
    in the matmul's dtype (bf16/fp16 under autocast) and positions computed in fp32 (fp64 for fp64).
    """

    @staticmethod
    def forward(ctx, input, offset, weight, mask, bias, sampling, gemm):  # type: ignore[override]
        n, c = input.shape[:2]
        out_channels, per_group, kh, kw = weight.shape
        groups, taps, length = c // per_group, kh * kw, sampling.out_hw[0] * sampling.out_hw[1]
        rows = per_group * taps
        with torch.autocast(input.device.type, enabled=False):
            w = weight.to(gemm).reshape(groups, out_channels // groups, rows)
            parts = []
            for part in _image_chunks(n, c * taps * length * gemm.itemsize, input.device):
                with _sampling_scope():
                    columns = triton_kernels.columns(input[part], offset[part], _rows_of(mask, part), sampling, gemm)
                parts.append(torch.matmul(w, columns.view(-1, groups, rows, length)))
                del columns
            out = parts[0] if len(parts) == 1 else torch.cat(parts)
            if bias is not None:
                out = out.view(n, out_channels, length).add_(bias.to(gemm).view(out_channels, 1))
        ctx.save_for_backward(input, offset, weight, mask)
        ctx.config = (sampling, gemm, None if bias is None else bias.dtype)
        return out.view(n, out_channels, *sampling.out_hw)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        input, offset, weight, mask = ctx.saved_tensors
        sampling, gemm, bias_dtype = ctx.config
        need_input, need_offset, need_weight, need_mask, need_bias = ctx.needs_input_grad[:5]
        n, c = input.shape[:2]
        out_channels, per_group, kh, kw = weight.shape
        groups, taps, length = c // per_group, kh * kw, sampling.out_hw[0] * sampling.out_hw[1]
        rows = per_group * taps
        need_mask = need_mask and mask is not None
        # the kernel adds into these (atomically), at the sampling's precision
        grad_input = torch.zeros_like(input, dtype=offset.dtype) if need_input else None
        grad_offset = torch.zeros_like(offset) if need_offset else None
        grad_mask = torch.zeros_like(mask, dtype=offset.dtype) if need_mask else None
        grad_weight = None
        grad_bias = grad_out.sum((0, 2, 3), dtype=torch.promote_types(grad_out.dtype, torch.float32)).to(
            bias_dtype) if need_bias and bias_dtype is not None else None
        go_all = grad_out.reshape(n, groups, out_channels // groups, length)
        with torch.autocast(input.device.type, enabled=False):
            w_t = weight.to(gemm).reshape(groups, out_channels // groups, rows).transpose(-1, -2)
            for part in _image_chunks(n, 2 * c * taps * length * gemm.itemsize, input.device):
                go = go_all[part].to(gemm)
                mask_part = _rows_of(mask, part)
                if need_weight:
                    with _sampling_scope():
                        columns = triton_kernels.columns(input[part], offset[part], mask_part, sampling, gemm)
                    part_weight = torch.matmul(go, columns.view(-1, groups, rows, length).transpose(-1, -2)).sum(0)
                    grad_weight = part_weight if grad_weight is None else grad_weight.add_(part_weight)
                    del columns
                if need_input or need_offset or need_mask:
                    grad_columns = torch.matmul(w_t, go)
                    with _sampling_scope():
                        triton_kernels.columns_backward(
                            input[part], offset[part], mask_part, grad_columns.view(-1, c * taps, length), sampling,
                            _rows_of(grad_input, part), _rows_of(grad_offset, part), _rows_of(grad_mask, part),
                        )
                    del grad_columns
        return (
            None if grad_input is None else grad_input.to(input.dtype),
            grad_offset,
            None if grad_weight is None else grad_weight.view(weight.shape).to(weight.dtype),
            None if grad_mask is None else grad_mask.to(mask.dtype),
            grad_bias, None, None,
        )


def _rows_of(t: Tensor | None, part: slice) -> Tensor | None:
    return None if t is None else t[part]


class _SampleTriton(torch.autograd.Function):
    """`full` [N, C, Hf, Wf] sampled bilinearly where a 1x1 `sampling` and offset [N, 2·G, Ho, Wo] put each
    pixel: [N, C, Ho, Wo] in `full`'s dtype; the shared layout's sample on a GPU (one tap of the Triton
    column kernel, so torchvision's rule and its one-sided gradient at whole pixels)."""

    @staticmethod
    def forward(ctx, full, offset, sampling):  # type: ignore[override]
        with _sampling_scope():
            out = triton_kernels.columns(full, offset, None, sampling, full.dtype)
        ctx.save_for_backward(full, offset)
        ctx.sampling = sampling
        return out.view(*full.shape[:2], *sampling.out_hw)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        full, offset = ctx.saved_tensors
        need_full, need_offset = ctx.needs_input_grad[:2]
        grad_full = torch.zeros_like(full, dtype=offset.dtype) if need_full else None
        grad_offset = torch.zeros_like(offset) if need_offset else None
        if need_full or need_offset:
            with _sampling_scope():
                triton_kernels.columns_backward(full, offset, None, grad_out.reshape(*full.shape[:2], -1).contiguous(),
                                                ctx.sampling, grad_full, grad_offset, None)
        return None if grad_full is None else grad_full.to(full.dtype), grad_offset, None


def _deform_conv2d_native(
    input: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor | None,
    sampling: native.Sampling,
) -> Tensor:
    """The CPU path through the compiled channels-last kernel (harness.native); same maths, same layout.

    The kernel reads the offset and mask where the predictor wrote them (any layout) and forms the
    positions itself, and writes their gradients the same way.
    """
    dtype = offset.dtype  # sampling runs in fp32, or fp64 for fp64 inputs
    x = _ChannelsLast.apply(input.to(dtype))
    if mask is not None:
        mask = mask.to(dtype)
    return _DeformColumnsNative.apply(x, offset, weight, mask, bias, sampling, _gemm_dtype(input, weight))


def channels_last(input: Tensor) -> Tensor:
    """input [N, C, H, W] in channels-last memory (the same tensor when it already is), differentiably.

    On the CPU with the compiled kernel library the copy is its blocked transpose, 10-20x faster than
    `input.contiguous(memory_format=torch.channels_last)` at the usual sizes.
    """
    if input.device.type != "cpu" or not native.available():
        return input.contiguous(memory_format=torch.channels_last)
    return _ChannelsLast.apply(input).permute(0, 3, 1, 2)


class _ChannelsLast(torch.autograd.Function):
    """input [N, C, H, W] zero-padded by (pad_y, pad_x) on every side, as a contiguous [N, H', W', C]
    tensor: one copy, by the kernel library's blocked transpose (none for an unpadded channels-last
    input). The gradient goes back in the input's own layout, as conv2d's does: a view of the padded
    gradient's interior for a channels-last input, a blocked transpose back for a contiguous NCHW one
    (left channels-last, its accumulation into an NCHW leaf's .grad took 3x conv2d's)."""

    @staticmethod
    def forward(ctx, input, pad_y=0, pad_x=0):  # type: ignore[override]
        ctx.pad = (pad_y, pad_x)
        ctx.nchw = input.is_contiguous() and not input.is_contiguous(memory_format=torch.channels_last)
        return native.to_channels_last(input, pad_y, pad_x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        (pad_y, pad_x), (_, hp, wp, _) = ctx.pad, grad.shape
        if ctx.nchw:
            return native.from_channels_last(grad.contiguous(), pad_y, pad_x), None, None
        return grad[:, pad_y : hp - pad_y, pad_x : wp - pad_x].permute(0, 3, 1, 2), None, None


def _as_image(rows: Tensor, out_hw: tuple[int, int]) -> Tensor:
    """[M·Ho·Wo, F] rows → the same memory as a channels-last [M, F, Ho, Wo] tensor (no copy)."""
    return rows.view(-1, *out_hw, rows.shape[1]).permute(0, 3, 1, 2)


def _columns_times_weight(columns: Tensor, w: Tensor, out_hw: tuple[int, int], bias: Tensor | None = None) -> Tensor:
    """columns [M, K·C] @ w[O, K·C].T + bias. In fp32/bf16 as a channels-last 1x1 convolution: oneDNN's
    kernel runs 2.4-2.6x faster here than the BLAS matmul (which oneDNN cannot take in fp32), and adds
    the bias as it writes the output."""
    if columns.dtype == torch.float64:
        return torch.mm(columns, w.t()) if bias is None else torch.addmm(bias, columns, w.t())
    out = F.conv2d(_as_image(columns, out_hw), w[:, :, None, None], bias)
    return out.permute(0, 2, 3, 1).reshape(columns.shape[0], w.shape[0])


def _columns_times_weight_backward(
    columns: Tensor, w: Tensor, grad_out: Tensor, out_hw: tuple[int, int], need_weight: bool, need_columns: bool
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of `_columns_times_weight`: (grad_w [O, K·C], grad_columns [M, K·C]), both from one
    oneDNN 1x1 convolution backward (fp32/bf16). Against BLAS it is as fast or faster for the weight
    on every benchmark shape, and for the columns 1.5-1.9x faster at 16 and 32 outputs (64 px, batch 8:
    the backward's products 7.9 -> 5.5 ms) and 1.25-2.3x at 64 or more.
    """
    if columns.dtype == torch.float64:
        return (torch.mm(grad_out.t(), columns) if need_weight else None,
                torch.mm(grad_out, w) if need_columns else None)
    if not (need_weight or need_columns):
        return None, None
    grad_image, grad_w, _ = torch.ops.aten.convolution_backward(
        _as_image(grad_out, out_hw), _as_image(columns, out_hw), w[:, :, None, None], None,
        [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [need_columns, need_weight, False],
    )
    return (grad_w.view(w.shape) if need_weight else None,
            grad_image.permute(0, 2, 3, 1).reshape(columns.shape) if need_columns else None)


def _fused_weight(w: Tensor, dim: int) -> Tensor:
    """w (taps·channels along `dim`) in fp32, contiguous, zero-padded along `dim` to the fused kernel's
    column length (`native.padded_columns`)."""
    length = w.shape[dim]
    pad = native.padded_columns(1, length) - length
    w = w.float()
    if not pad:
        return w.contiguous()
    return F.pad(w, (0, 0, 0, pad) if dim == 0 else (0, pad)).contiguous()


class _DeformColumnsNative(torch.autograd.Function):
    """Channels-last columns [N·L, K·C] from the compiled kernel, times the weights.

    Same contract as `_DeformColumnsMatmul` (columns recomputed in backward, batch processed in chunks
    of about COLUMN_CHUNK_BYTES, sampling in fp32/fp64, matmuls in autocast's dtype), but the columns
    are tap-major rows, so the output comes out channels-last and every sampling loop runs over
    contiguous channels. In fp32 with outputs a multiple of 16 the kernel also does the products
    (`native.conv_forward`/`conv_backward`): no chunks, no column buffers, the whole layer inside the
    sampling scope.
    """

    @staticmethod
    def forward(ctx, x, offset, weight, mask, bias, sampling, gemm):  # type: ignore[override]
        n, _, _, c = x.shape
        out_channels, kh, kw = weight.shape[0], weight.shape[2], weight.shape[3]
        out_hw = sampling.out_hw
        length, taps = out_hw[0] * out_hw[1], kh * kw
        ctx.save_for_backward(x, offset, weight, mask)
        ctx.config = (sampling, gemm)
        ctx.bias_dtype = None if bias is None else bias.dtype
        # Under a dispatch mode (torch's FLOP counter, a tracer) the products stay aten ops that it sees.
        ctx.fused = (gemm == torch.float32 and native.fuses(x, out_channels, taps)
                     and not is_in_torch_dispatch_mode())
        if ctx.fused:
            with torch.autocast(x.device.type, enabled=False), _sampling_scope():
                w_t = _fused_weight(weight.permute(2, 3, 1, 0).reshape(taps * c, out_channels), 0)
                b = None if bias is None else bias.float().contiguous()
                out = native.conv_forward(x, offset, mask, w_t, b, sampling)
            return out.view(n, *out_hw, out_channels).permute(0, 3, 1, 2)
        chunks = _image_chunks(n, length * taps * c * x.element_size())
        # one chunk: the product is the output; several: each is copied into its rows
        out = torch.empty(n * length, out_channels, dtype=gemm, device=x.device) if len(chunks) > 1 else None
        with torch.autocast(x.device.type, enabled=False):
            w = weight.to(gemm).permute(0, 2, 3, 1).reshape(out_channels, taps * c)
            b = None if bias is None else bias.to(gemm)
            for part in chunks:
                columns = torch.empty(part.stop - part.start, length, taps, c, dtype=x.dtype)
                with _sampling_scope():
                    native.columns_forward(x[part], offset[part], None if mask is None else mask[part], columns,
                                           sampling)
                product = _columns_times_weight(columns.view(-1, taps * c).to(gemm), w, out_hw, b)
                if out is None:
                    out = product
                else:
                    out[part.start * length : part.stop * length] = product
                del columns
        return out.view(n, *out_hw, out_channels).permute(0, 3, 1, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        x, offset, weight, mask = ctx.saved_tensors
        sampling, gemm = ctx.config
        out_hw = sampling.out_hw
        n, _, _, c = x.shape
        out_channels, per_group, kh, kw = weight.shape
        length, taps = out_hw[0] * out_hw[1], kh * kw
        need_x, need_offset, need_weight, need_mask, need_bias = ctx.needs_input_grad[:5]
        need_mask = need_mask and mask is not None
        grad_x = torch.empty_like(x) if need_x else None  # the kernel zeroes each image as it starts it
        grad_offset = torch.empty_like(offset) if need_offset else None
        grad_mask = torch.empty_like(mask) if need_mask else None
        grad_bias = grad_out.sum((0, 2, 3)).to(ctx.bias_dtype) if need_bias else None
        if ctx.fused:
            with torch.autocast(x.device.type, enabled=False), _sampling_scope():
                go = native.to_channels_last(grad_out.float()).view(n * length, out_channels)
                w = _fused_weight(weight.permute(0, 2, 3, 1).reshape(out_channels, taps * c), 1)
                grad_w = native.conv_backward(x, offset, mask, w, go, sampling, grad_x, grad_offset, grad_mask,
                                              need_weight)
            grad_weight = None
            if grad_w is not None:
                grad_weight = (grad_w[: taps * c].t().reshape(out_channels, kh, kw, per_group).permute(0, 3, 1, 2)
                               .to(weight.dtype))
            return grad_x, grad_offset, grad_weight, grad_mask, grad_bias, None, None
        grad_w = torch.zeros(out_channels, taps * c, dtype=torch.promote_types(gemm, torch.float32))
        with torch.autocast(x.device.type, enabled=False):
            go = grad_out.permute(0, 2, 3, 1).reshape(n * length, out_channels).to(gemm)
            w = weight.to(gemm).permute(0, 2, 3, 1).reshape(out_channels, taps * c)
            # one column-sized buffer per chunk, as in forward: the backward kernel writes the columns over
            # their gradient once it has read it
            for part in _image_chunks(n, length * taps * c * x.element_size()):
                m = part.stop - part.start
                rows = slice(part.start * length, part.stop * length)
                mk = None if mask is None else mask[part]
                shape = (m * length, taps * c)
                if need_x or need_offset or need_mask:
                    # The column gradient first (the columns' shape is all it needs): then the backward
                    # kernel, which reads every sample's corners anyway, also writes the columns that the
                    # weight's gradient needs, instead of a second forward pass computing them again.
                    like = torch.empty(shape, dtype=gemm)  # never written: its pages are never touched
                    _, columns = _columns_times_weight_backward(like, w, go[rows], out_hw, False, True)
                    del like
                    columns = columns.to(x.dtype).contiguous()
                    with _sampling_scope():
                        native.columns_backward(
                            x[part], offset[part], mk, columns, sampling,
                            None if grad_x is None else grad_x[part],
                            None if grad_offset is None else grad_offset[part],
                            None if grad_mask is None else grad_mask[part],
                            columns if need_weight else None,
                        )
                elif need_weight:
                    columns = torch.empty(shape, dtype=x.dtype)
                    with _sampling_scope():
                        native.columns_forward(x[part], offset[part], mk, columns, sampling)
                if need_weight:
                    grad_w_part, _ = _columns_times_weight_backward(columns.to(gemm), w, go[rows], out_hw, True, False)
                    grad_w += grad_w_part
                columns = None
        grad_weight = None
        if need_weight:
            grad_weight = grad_w.view(out_channels, kh, kw, per_group).permute(0, 3, 1, 2).to(weight.dtype)
        return grad_x, grad_offset, grad_weight, grad_mask, grad_bias, None, None


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
    stride·p0 − padding + Δp(p0). On the CPU with the compiled kernel (`harness.native`) the
    convolution runs channels-last and the sample is that kernel with one tap, so values and gradients
    follow torchvision's kernel at whole pixels too (its one-sided offset gradient); elsewhere the
    sample is `grid_sample`. With several offset groups and several
    conv groups at once, and on the compiled path at stride > 1, it goes through `deform_conv2d`
    instead.
    """
    (stride_, padding_, dilation_), groups, out_channels, (kh, kw), out_hw = _geometry(
        input, weight, bias, stride, padding, dilation
    )
    n, c, h, w = input.shape
    offset_groups = _check_offset("offset", offset, n, 2, c, out_hw)
    # At stride s the conv-then-sample form computes s*s times the outputs it keeps; the compiled
    # per-tap kernel is cheaper there (2.6x vs 4x conv2d at stride 2).
    use_triton = triton_kernels.applies(input.device)
    use_native = not use_triton and input.device.type == "cpu" and native.available()
    strided_native = stride_ != (1, 1) and groups == 1 and use_native
    if (offset_groups > 1 and groups > 1) or strided_native:
        return deform_conv2d(
            input, expand_shared_offset(offset, kh * kw), weight, bias, stride_, padding_, dilation_
        )

    reach_y, reach_x = (kh - 1) * dilation_[0], (kw - 1) * dilation_[1]
    # The plane is zero-padded by `reach` on every side. oneDNN's backward is much slower for a
    # padding wider than "same" (1.3-1.5x for a 3x3), so the part beyond "same" is an explicit pad.
    same_y, same_x = reach_y // 2, reach_x // 2
    extra_y, extra_x = reach_y - same_y, reach_x - same_x
    if use_native:  # channels-last, the compiled kernel's layout: oneDNN then writes `full` channels-last too
        plane = _ChannelsLast.apply(input, extra_y, extra_x).permute(0, 3, 1, 2)
    else:
        plane = F.pad(input, (extra_x, extra_x, extra_y, extra_y)) if extra_y or extra_x else input
    if offset_groups == 1:
        conv_weight = weight
    else:  # conv groups == 1: one convolution per offset group, stacked as conv groups (channel g·O + o)
        per = c // offset_groups
        split = weight.reshape(out_channels, offset_groups, per, kh, kw).transpose(0, 1)
        conv_weight = split.reshape(offset_groups * out_channels, per, kh, kw)
    full = F.conv2d(plane, conv_weight, None, 1, (same_y, same_x), dilation_, groups * offset_groups)
    # row i of `full` is the correlation anchored at input row i - reach_y
    full_h, full_w = full.shape[-2:]
    ho, wo = out_hw
    offset = _as_coordinates(offset, input)
    # output pixel (i, j) reads `full` at (i·s + reach − padding, j·s + reach − padding) + Δ: the
    # per-tap grid of a 1x1 kernel with padding − reach
    geometry = ((1, 1), stride_, (padding_[0] - reach_y, padding_[1] - reach_x), (1, 1), out_hw)
    if use_native:
        return _sample_shared_native(full, offset, native.Sampling(*geometry), bias)
    if use_triton:
        out = _SampleTriton.apply(full, offset, native.Sampling(*geometry))
    else:
        base, scale = _normalised_tap_grid(*geometry, (full_h, full_w), offset.dtype, offset.device)
        if _runs_cpp_op(input):  # the lines below, the group sum and the bias in C++
            split = _channel_split(input.device, n * offset_groups * ho * wo, out_channels)
            return torch.ops.harness.deform_sample(full, offset, bias, base, scale, offset_groups, ho, wo, split)
        delta = offset.reshape(n, offset_groups, 2, ho, wo).permute(0, 1, 3, 4, 2).flip(-1)
        grid = torch.addcmul(base, delta, scale).reshape(n * offset_groups, ho, wo, 2)
        sampling = torch.float64 if full.dtype == torch.float64 else torch.float32
        # contiguous NCHW: grid_sample reads one channel plane at a time (see _sample_columns)
        map_dtype = full.dtype  # autocast's under autocast
        full = full.to(sampling).reshape(n * offset_groups, out_channels, full_h, full_w).contiguous()
        with _sampling_scope():
            # One fused bilinear sample of the (unpadded) map. At exactly whole-pixel positions
            # grid_sample's coordinate round trip may pick the left instead of the right corner pair:
            # same value, the other one-sided derivative (torchvision always takes the right one).
            out = F.grid_sample(full, grid.to(sampling), mode="bilinear", padding_mode="zeros",
                                align_corners=False).to(map_dtype)
    out = out.view(n, offset_groups, out_channels, ho, wo)
    out = out.sum(1) if offset_groups > 1 else out.squeeze(1)
    if bias is not None:
        out = out + bias.view(1, out_channels, 1, 1).to(out.dtype)
    return out


def _sample_shared_native(full: Tensor, offset: Tensor, sampling: native.Sampling, bias: Tensor | None) -> Tensor:
    """`full` [N, G·O, Hf, Wf] sampled where `sampling` (a 1x1 kernel) and offset [N, 2·G, Ho, Wo] put each
    offset group's pixels, summed over the groups, plus the bias: [N, O, Ho, Wo] (channels-last memory),
    by the compiled kernel with one tap (K = 1).

    Offset group g owns channels g·O ... g·O + O - 1 of `full`, the kernel's group-contiguous channel
    convention. Sampling runs in the offset's dtype (fp32, fp64 for fp64 inputs); the result is
    returned in `full`'s (autocast's bf16/fp16 under autocast).
    """
    n, channels, _, _ = full.shape
    groups, (ho, wo) = offset.shape[1] // 2, sampling.out_hw
    x = full.to(offset.dtype).permute(0, 2, 3, 1)  # no copy when `full` is channels-last, as it comes out
    out = _SampleNative.apply(x.contiguous(), offset, sampling)  # [N, Ho, Wo, G·O]
    if groups > 1:
        out = out.view(n, ho, wo, groups, channels // groups).sum(3)
    out = out.to(full.dtype)
    if bias is not None:  # in place, over contiguous channels: `out` is a fresh tensor
        out.add_(bias.to(out.dtype))
    return out.permute(0, 3, 1, 2)


class _SampleNative(torch.autograd.Function):
    """x [N, H, W, C] (channels last) sampled bilinearly where a 1x1 `sampling` and offset [N, 2·G, Ho, Wo]
    put each pixel: [N, Ho, Wo, C].

    One tap of the compiled column kernel, so torchvision's sampling rule and its one-sided gradient at
    whole pixels.
    """

    @staticmethod
    def forward(ctx, x, offset, sampling):  # type: ignore[override]
        n, _, _, c = x.shape
        out = torch.empty(n, *sampling.out_hw, c, dtype=x.dtype, device=x.device)
        with _sampling_scope():
            native.columns_forward(x, offset, None, out, sampling)
        ctx.save_for_backward(x, offset)
        ctx.sampling = sampling
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        x, offset = ctx.saved_tensors
        need_x, need_offset = ctx.needs_input_grad[:2]
        grad_x = torch.empty_like(x) if need_x else None
        grad_offset = torch.empty_like(offset) if need_offset else None
        if need_x or need_offset:
            with _sampling_scope():
                native.columns_backward(x, offset, None, grad_out.to(x.dtype).contiguous(), ctx.sampling,
                                        grad_x, grad_offset, None)
        return grad_x, grad_offset, None


def expand_shared_offset(offset: Tensor, taps: int) -> Tensor:
    """[N, 2·G, Ho, Wo] shared offsets → torchvision's per-tap layout [N, 2·G·taps, Ho, Wo]."""
    n, channels, ho, wo = offset.shape
    groups = channels // 2
    return (
        offset.reshape(n, groups, 1, 2, ho, wo)
        .expand(n, groups, taps, 2, ho, wo)
        .reshape(n, groups * taps * 2, ho, wo)
    )


class DeformConv2d(nn.Module):
    """A convolution whose sampling grid is deformed by offsets predicted from its own input.

    The offset (and, for DCNv2, mask) predictor is a convolution with the same kernel, stride,
    padding and dilation, zero-initialised: at initialisation the offsets are 0 (and the mask 0.5),
    so an unmodulated layer is exactly ``nn.Conv2d`` with the same weights. Its parameters are
    returned by `offset_parameters()` so that an optimizer can give them their own learning rate.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair = 3,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = True,
        offset_channels: OffsetLayout = "per_tap",
        modulated: bool = False,
        offset_groups: int = 1,
        backend: Backend = "native",
    ) -> None:
        super().__init__()
        if offset_channels not in ("shared", "per_tap"):
            raise ValueError(f"offset_channels must be 'shared' or 'per_tap', given {offset_channels!r}")
        if backend not in ("native", "torchvision"):
            raise ValueError(f"backend must be 'native' or 'torchvision', given {backend!r}")
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}"
            )
        if offset_groups < 1 or in_channels % offset_groups:
            raise ValueError(f"offset_groups={offset_groups} must divide in_channels={in_channels}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        self.groups, self.offset_groups = groups, offset_groups
        self.offset_channels: OffsetLayout = offset_channels
        self.modulated, self.backend = modulated, backend

        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kh, kw))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        taps = kh * kw
        self.n_offset = 2 * offset_groups * (taps if offset_channels == "per_tap" else 1)
        self.n_mask = offset_groups * taps if modulated else 0
        self.offset_predictor = nn.Conv2d(
            in_channels, self.n_offset + self.n_mask, self.kernel_size, self.stride, self.padding,
            self.dilation, bias=True,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Conv weights as `nn.Conv2d` initialises them; the offset/mask predictor at exactly zero."""
        reference = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, groups=self.groups, bias=self.bias is not None
        )
        with torch.no_grad():
            self.weight.copy_(reference.weight)
            if self.bias is not None:
                self.bias.copy_(reference.bias)
        nn.init.zeros_(self.offset_predictor.weight)
        nn.init.zeros_(self.offset_predictor.bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **options: object) -> DeformConv2d:
        """A deformable layer with `conv`'s geometry and a copy of its weights."""
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,  # type: ignore[arg-type]
            conv.dilation, conv.groups, conv.bias is not None, **options,  # type: ignore[arg-type]
        )
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None and layer.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    def offset_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the offset/mask predictor (DCNv2 trains them at 0.1x the learning rate)."""
        return self.offset_predictor.parameters()

    def predict(self, input: Tensor) -> tuple[Tensor, Tensor | None]:
        """The offsets (in this layer's layout) and the mask (after the sigmoid) for `input`."""
        raw = self.offset_predictor(input)
        if not self.modulated:
            return raw, None
        # split, not two slices: its backward writes both gradients into one tensor in one pass (each
        # slice's backward would zero a tensor of raw's size and copy into it)
        offset, mask = raw.split([self.n_offset, self.n_mask], dim=1)
        return offset, torch.sigmoid(mask)

    def forward(self, input: Tensor) -> Tensor:
        if self.backend == "native" and self.groups == 1 and input.device.type == "cpu" and native.available():
            # One layout change for both users of the input: the compiled kernel needs it channels-last,
            # and oneDNN runs the offset predictor 1.3-1.4x faster on it (and then writes offsets in the
            # pixel-major order the kernel reads best).
            input = channels_last(input)
        offset, mask = self.predict(input)
        taps = self.kernel_size[0] * self.kernel_size[1]
        if self.backend == "torchvision":
            from torchvision.ops import deform_conv2d as tv_deform_conv2d

            if self.offset_channels == "shared":
                offset = expand_shared_offset(offset, taps)
            return tv_deform_conv2d(
                input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask
            )
        if self.offset_channels == "shared" and mask is None:
            return deform_conv2d_shared(
                input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation
            )
        if self.offset_channels == "shared":
            offset = expand_shared_offset(offset, taps)
        return deform_conv2d(input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"offset_channels={self.offset_channels}, modulated={self.modulated}, "
            f"offset_groups={self.offset_groups}, backend={self.backend}"
        )
