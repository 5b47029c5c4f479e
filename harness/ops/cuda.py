"""The grid_sample path: sampling by `grid_sample`, products by batched matmuls (cuBLAS on a GPU).

It is the GPU's path, where it runs as the C++ autograd op of `harness.kernels.cpp_autograd` once that is
built (a small layer there is bound by the host's dispatch time) and can sample in channel slices; a batch
whose columns fit in one CUDA chunk keeps them for backward. It is also the CPU's fallback without the
compiled kernel, as the chunked Function that samples the columns again in backward.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from harness import settings
from harness.kernels import cpp_autograd
from harness.ops import common
from harness.ops.common import gemm_dtype, image_chunks, sampling_scope

# The sampling geometry: kernel, stride, padding, dilation and output size, each (y, x)
SamplingGeometry = tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]]

# At least this many channels per slice when `channel_split` cuts them: below it the per-point setup
# (corners, weights, bounds) would be repeated for too little work.
MIN_SPLIT_CHANNELS = 8


def runs_cpp_op(input: Tensor) -> bool:
    """On a GPU the layer's Python steps run as one C++ autograd op (`harness.kernels.cpp_autograd`) once it is
    built: there a small layer is bound by the host's dispatch time, not by the GPU."""
    return input.device.type == "cuda" and cpp_autograd.available()


def channel_split(device: torch.device, points: int, channels: int) -> int:
    """Into how many slices the C++ op cuts each offset group's `channels` on `device` (opt-in, the `split`
    switch of harness.settings; 1 otherwise).

    grid_sample's CUDA kernels give each of a layer's `points` (samples per channel) a thread that loops
    over all channels, so few points and many channels leave the GPU part-empty and its backward slows
    per channel (docs/benchmarks.md, the GPU section). The largest power of two
    that keeps the threads within twice what the GPU holds at once and MIN_SPLIT_CHANNELS channels per
    slice. It costs one more kernel per backward (the grid gradient's sum over slices), so it pays only
    where the GPU, not the host, sets the time.
    """
    if device.type != "cuda" or not split_requested():
        return 1
    target = 2 * resident_threads(device)
    split = 1
    while (channels % (2 * split) == 0 and channels // (2 * split) >= MIN_SPLIT_CHANNELS
           and points * 2 * split <= target):
        split *= 2
    return split


def split_requested() -> bool:
    """Whether the `split` switch (see harness.settings) asks for channel slices."""
    return settings.current().split


@lru_cache(maxsize=8)
def resident_threads(device: torch.device) -> int:
    """How many threads `device` runs at once: multiprocessors × threads per multiprocessor."""
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count * getattr(props, "max_threads_per_multi_processor", 2048)


def keeps_columns(input: Tensor, column_bytes: int) -> bool:
    """On a GPU, a batch whose columns fit in one chunk keeps them for backward (`sample_then_matmul`)."""
    return input.device.type == "cuda" and column_bytes <= common.CUDA_COLUMN_CHUNK_BYTES


def _next_power_of_two(size: int) -> int:
    return 1 << (size - 1).bit_length()


def _normalise(coords: Tensor, size: int) -> Tensor:
    """Pixel coordinates → grid_sample's [-1, 1] frame (align_corners=False; exact for size 1 too)."""
    return (2.0 * coords + 1.0) / size - 1.0



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
def normalised_tap_grid(
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


def deform_conv2d_grid(
    input: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor | None,
    geometry: SamplingGeometry, groups: int, offset_groups: int,
) -> Tensor:
    """`deform_conv2d` by grid_sample and batched matmuls, once the arguments are checked and the offset is in
    its coordinate dtype: through the C++ op on a GPU when the columns are kept, else in Python."""
    n, c, h, w = input.shape
    out_channels, _, kh, kw = weight.shape
    taps = kh * kw
    out_hw = geometry[-1]
    ho, wo = out_hw
    base, scale = normalised_tap_grid(
        *geometry, (_next_power_of_two(h), _next_power_of_two(w)), offset.dtype, offset.device
    )
    kept = keeps_columns(input, n * c * taps * ho * wo * offset.element_size())
    if kept and runs_cpp_op(input):  # the lines below and sample_then_matmul, in C++
        split = channel_split(input.device, n * offset_groups * taps * ho * wo, c // offset_groups)
        return torch.ops.harness.deform_layer(
            input, offset, weight, bias, mask, base, scale, groups, offset_groups, ho, wo, gemm_dtype(input, weight),
            split,
        )
    # (Δy, Δx) per tap → grid_sample's (x, y): one flip and one fused multiply-add
    delta = offset.reshape(n, offset_groups, taps, 2, ho, wo).permute(0, 1, 2, 4, 5, 3).flip(-1)
    grid = torch.addcmul(base, delta, scale).reshape(n * offset_groups, taps * ho, wo, 2)
    if kept:
        out = sample_then_matmul(input, grid, weight, mask, groups, offset_groups, out_hw)
    else:
        out = _DeformColumnsMatmul.apply(input, grid, weight, mask, groups, offset_groups, out_hw)
    if bias is not None:
        out = out + bias.view(1, out_channels, 1, 1).to(out.dtype)
    return out


def sample_shared_cpp(
    full: Tensor, offset: Tensor, bias: Tensor | None, geometry: SamplingGeometry, offset_groups: int
) -> Tensor:
    """The shared layout's sample of the convolution's output `full` [N, G·O, Hf, Wf] where a 1x1 `geometry` and
    offset [N, 2·G, Ho, Wo] put each pixel, summed over the G offset groups, plus the bias: [N, O, Ho, Wo],
    as one C++ autograd op (`runs_cpp_op` must hold)."""
    n, channels, full_h, full_w = full.shape
    ho, wo = geometry[-1]
    base, scale = normalised_tap_grid(*geometry, (full_h, full_w), offset.dtype, offset.device)
    split = channel_split(full.device, n * offset_groups * ho * wo, channels // offset_groups)
    return torch.ops.harness.deform_sample(full, offset, bias, base, scale, offset_groups, ho, wo, split)


def sample_shared(full: Tensor, offset: Tensor, geometry: SamplingGeometry, offset_groups: int) -> Tensor:
    """`sample_shared_cpp`'s sample in Python, before the sum over offset groups and the bias: [N·G, O, Ho, Wo]
    in `full`'s dtype, one fused bilinear sample of the (unpadded) map by grid_sample."""
    n, channels, full_h, full_w = full.shape
    ho, wo = geometry[-1]
    base, scale = normalised_tap_grid(*geometry, (full_h, full_w), offset.dtype, offset.device)
    delta = offset.reshape(n, offset_groups, 2, ho, wo).permute(0, 1, 3, 4, 2).flip(-1)
    grid = torch.addcmul(base, delta, scale).reshape(n * offset_groups, ho, wo, 2)
    sampling = torch.float64 if full.dtype == torch.float64 else torch.float32
    # contiguous NCHW: grid_sample reads one channel plane at a time (see _sample_columns)
    map_dtype = full.dtype  # autocast's under autocast
    full = full.to(sampling).reshape(n * offset_groups, channels // offset_groups, full_h, full_w).contiguous()
    with sampling_scope():
        # At exactly whole-pixel positions grid_sample's coordinate round trip may pick the left instead of the
        # right corner pair: same value, the other one-sided derivative (torchvision always takes the right one).
        return F.grid_sample(full, grid.to(sampling), mode="bilinear", padding_mode="zeros",
                             align_corners=False).to(map_dtype)


def _sample_columns(input: Tensor, grid: Tensor, offset_groups: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Bilinear samples of every tap at every output pixel [N·G, C/G, K·Ho, Wo], and the padded source."""
    n, c, h, w = input.shape
    # contiguous NCHW: grid_sample reads one channel plane at a time, so channels-last input would
    # make every read strided
    source = _pad_to_power_of_two(input.to(dtype).reshape(n * offset_groups, c // offset_groups, h, w).contiguous())
    columns = F.grid_sample(source, grid.to(dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
    return columns, source



def sample_then_matmul(
    input: Tensor, grid: Tensor, weight: Tensor, mask: Tensor | None, groups: int, offset_groups: int,
    out_hw: tuple[int, int],
) -> Tensor:
    """`_DeformColumnsMatmul`'s computation in differentiable PyTorch ops, for a GPU.

    At the benchmark's sizes a GPU layer is bound by the host, not the device: this version's backward
    runs in autograd's C++ engine with no Python, and reuses the columns instead of sampling them
    again. The price is
    that the columns (at most CUDA_COLUMN_CHUNK_BYTES, else the chunked Function is used) stay alive
    until backward.
    """
    n, c = input.shape[:2]
    out_channels, per_group, kh, kw = weight.shape
    taps, length = kh * kw, out_hw[0] * out_hw[1]
    sampling = torch.float64 if input.dtype == torch.float64 else torch.float32
    gemm = gemm_dtype(input, weight)
    with torch.autocast(input.device.type, enabled=False):
        with sampling_scope():
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
        gemm = gemm_dtype(input, weight)
        g = offset_groups
        out = torch.empty(n, out_channels, length, dtype=gemm, device=input.device)
        with torch.autocast(input.device.type, enabled=False):
            w = weight.to(gemm).reshape(groups, out_channels // groups, per_group * taps)
            for part in image_chunks(n, c * taps * length * torch.finfo(sampling).bits // 8, input.device):
                m = part.stop - part.start
                rows = slice(part.start * g, part.stop * g)
                with sampling_scope():
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
        chunks = image_chunks(n, 2 * c * taps * length * torch.finfo(sampling).bits // 8, input.device)
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
                with sampling_scope():
                    raw, source = _sample_columns(input[part], grid[rows], g, sampling)
                raw = raw.view(m, g, c // g, taps, length)
                go = grad_out[part].reshape(m, groups, out_channels // groups, length).to(gemm)
                grad_columns = torch.matmul(w_t, go).to(sampling).view(m, g, c // g, taps, length)
                with sampling_scope():
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
                    with sampling_scope():
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

