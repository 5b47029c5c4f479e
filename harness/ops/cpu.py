"""The CPU path through the compiled channels-last C kernel (`harness.kernels.native`): the autograd Functions
around it, the channels-last copies it needs, and the columns' products with the weights.

In fp32 with outputs a multiple of 16 the kernel does the whole layer, sampling and products tile by tile in
cache (the columns never reach memory); otherwise it samples the columns chunk by chunk and oneDNN 1x1
convolutions do the matmuls. The shared layout's sample is the same kernel with one tap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from harness.kernels import native
from harness.ops.common import gemm_dtype, image_chunks, sampling_scope


def deform_conv2d_native(
    input: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor | None,
    sampling: native.Sampling,
) -> Tensor:
    """The CPU path through the compiled channels-last kernel (harness.kernels.native); same maths, same layout.

    The kernel reads the offset and mask where the predictor wrote them (any layout) and forms the
    positions itself, and writes their gradients the same way.
    """
    dtype = offset.dtype  # sampling runs in fp32, or fp64 for fp64 inputs
    x = _ChannelsLast.apply(input.to(dtype))
    if mask is not None:
        mask = mask.to(dtype)
    return _DeformColumnsNative.apply(x, offset, weight, mask, bias, sampling, gemm_dtype(input, weight))


def channels_last(input: Tensor) -> Tensor:
    """input [N, C, H, W] in channels-last memory (the same tensor when it already is), differentiably.

    On the CPU with the compiled kernel library the copy is its blocked transpose, 10-20x faster than
    `input.contiguous(memory_format=torch.channels_last)` at the usual sizes.
    """
    if input.device.type != "cpu" or not native.available():
        return input.contiguous(memory_format=torch.channels_last)
    return _ChannelsLast.apply(input).permute(0, 3, 1, 2)


def padded_channels_last(input: Tensor, pad_y: int, pad_x: int) -> Tensor:
    """input [N, C, H, W] zero-padded by (pad_y, pad_x) on every side, in channels-last memory, differentiably:
    one copy by the compiled kernel library's blocked transpose (which must be available)."""
    return _ChannelsLast.apply(input, pad_y, pad_x).permute(0, 3, 1, 2)


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


def sample_shared_native(full: Tensor, offset: Tensor, sampling: native.Sampling, bias: Tensor | None) -> Tensor:
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
        with sampling_scope():
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
            with sampling_scope():
                native.columns_backward(x, offset, None, grad_out.to(x.dtype).contiguous(), ctx.sampling,
                                        grad_x, grad_offset, None)
        return grad_x, grad_offset, None


def _as_image(rows: Tensor, out_hw: tuple[int, int]) -> Tensor:
    """[M·Ho·Wo, F] rows → the same memory as a channels-last [M, F, Ho, Wo] tensor (no copy)."""
    return rows.view(-1, *out_hw, rows.shape[1]).permute(0, 3, 1, 2)


def columns_times_weight(columns: Tensor, w: Tensor, out_hw: tuple[int, int], bias: Tensor | None = None) -> Tensor:
    """columns [M, K·C] @ w[O, K·C].T + bias. In fp32/bf16 as a channels-last 1x1 convolution: oneDNN's
    kernel runs 2.4-2.6x faster here than the BLAS matmul (which oneDNN cannot take in fp32), and adds
    the bias as it writes the output."""
    if columns.dtype == torch.float64:
        return torch.mm(columns, w.t()) if bias is None else torch.addmm(bias, columns, w.t())
    out = F.conv2d(_as_image(columns, out_hw), w[:, :, None, None], bias)
    return out.permute(0, 2, 3, 1).reshape(columns.shape[0], w.shape[0])


def columns_times_weight_backward(
    columns: Tensor, w: Tensor, grad_out: Tensor, out_hw: tuple[int, int], need_weight: bool, need_columns: bool
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of `columns_times_weight`: (grad_w [O, K·C], grad_columns [M, K·C]) from one oneDNN 1x1
    convolution backward (fp32/bf16). Against BLAS it is 1.25-2.3x faster for the columns (1.5-1.9x at 16
    and 32 outputs: 64 px, batch 8, the backward's products 7.9 -> 5.5 ms), and as fast or faster for
    the weight while there are at least as many rows as outputs; with fewer, BLAS takes the weight's.
    """
    if columns.dtype == torch.float64:
        return (torch.mm(grad_out.t(), columns) if need_weight else None,
                torch.mm(grad_out, w) if need_columns else None)
    grad_w = None
    if need_weight and columns.dtype == torch.float32 and columns.shape[0] < w.shape[0]:
        # Fewer rows than outputs (a deep layer on a small map): oneDNN's weight gradient then runs 1.3-3.7x
        # slower than BLAS's (ResNet-18's conv5 at 64 px: 128 rows, 512 outputs, 13.2 against 3.6 ms)
        grad_w, need_weight = torch.mm(grad_out.t(), columns), False
    if not (need_weight or need_columns):
        return grad_w, None
    grad_image, grad_w_image, _ = torch.ops.aten.convolution_backward(
        _as_image(grad_out, out_hw), _as_image(columns, out_hw), w[:, :, None, None], None,
        [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [need_columns, need_weight, False],
    )
    if need_weight:
        grad_w = grad_w_image.view(w.shape)
    return grad_w, grad_image.permute(0, 2, 3, 1).reshape(columns.shape) if need_columns else None


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

    Same contract as the grid_sample path's chunked Function in `harness.ops.cuda` (columns recomputed in
    backward, batch processed in chunks of about COLUMN_CHUNK_BYTES, sampling in fp32/fp64, matmuls in
    autocast's dtype), but the columns are tap-major rows, so the output comes out channels-last and every
    sampling loop runs over contiguous channels. In fp32 with outputs a multiple of 16 the kernel also does the products
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
        ctx.fused = (gemm == torch.float32 and native.fuses(x, out_channels, taps, n * length)
                     and not is_in_torch_dispatch_mode())
        if ctx.fused:
            with torch.autocast(x.device.type, enabled=False), sampling_scope():
                w_t = _fused_weight(weight.permute(2, 3, 1, 0).reshape(taps * c, out_channels), 0)
                b = None if bias is None else bias.float().contiguous()
                out = native.conv_forward(x, offset, mask, w_t, b, sampling)
            return out.view(n, *out_hw, out_channels).permute(0, 3, 1, 2)
        chunks = image_chunks(n, length * taps * c * x.element_size())
        # one chunk: the product is the output; several: each is copied into its rows
        out = torch.empty(n * length, out_channels, dtype=gemm, device=x.device) if len(chunks) > 1 else None
        with torch.autocast(x.device.type, enabled=False):
            w = weight.to(gemm).permute(0, 2, 3, 1).reshape(out_channels, taps * c)
            b = None if bias is None else bias.to(gemm)
            for part in chunks:
                columns = torch.empty(part.stop - part.start, length, taps, c, dtype=x.dtype)
                with sampling_scope():
                    native.columns_forward(x[part], offset[part], None if mask is None else mask[part], columns,
                                           sampling)
                product = columns_times_weight(columns.view(-1, taps * c).to(gemm), w, out_hw, b)
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
            with torch.autocast(x.device.type, enabled=False), sampling_scope():
                go = native.to_channels_last(grad_out.float()).view(n * length, out_channels)
                w = _fused_weight(weight.permute(0, 2, 3, 1).reshape(out_channels, taps * c), 1)
                grad_w = native.conv_backward(x, offset, mask, w, go, sampling, grad_x, grad_offset, grad_mask,
                                              need_weight)
            grad_weight = None
            if grad_w is not None:  # [O, K·C]: a channels-last weight's own layout
                grad_weight = grad_w.view(out_channels, kh, kw, per_group).permute(0, 3, 1, 2).to(weight.dtype)
            return grad_x, grad_offset, grad_weight, grad_mask, grad_bias, None, None
        grad_w = None
        with torch.autocast(x.device.type, enabled=False):
            go = grad_out.permute(0, 2, 3, 1).reshape(n * length, out_channels).to(gemm)
            w = weight.to(gemm).permute(0, 2, 3, 1).reshape(out_channels, taps * c)
            # one column-sized buffer per chunk, as in forward: the backward kernel writes the columns over
            # their gradient once it has read it
            for part in image_chunks(n, length * taps * c * x.element_size()):
                m = part.stop - part.start
                rows = slice(part.start * length, part.stop * length)
                mk = None if mask is None else mask[part]
                shape = (m * length, taps * c)
                if need_x or need_offset or need_mask:
                    # The column gradient first (the columns' shape is all it needs): then the backward
                    # kernel, which reads every sample's corners anyway, also writes the columns that the
                    # weight's gradient needs, instead of a second forward pass computing them again.
                    like = torch.empty(shape, dtype=gemm)  # never written: its pages are never touched
                    _, columns = columns_times_weight_backward(like, w, go[rows], out_hw, False, True)
                    del like
                    columns = columns.to(x.dtype).contiguous()
                    with sampling_scope():
                        native.columns_backward(
                            x[part], offset[part], mk, columns, sampling,
                            None if grad_x is None else grad_x[part],
                            None if grad_offset is None else grad_offset[part],
                            None if grad_mask is None else grad_mask[part],
                            columns if need_weight else None,
                        )
                elif need_weight:
                    columns = torch.empty(shape, dtype=x.dtype)
                    with sampling_scope():
                        native.columns_forward(x[part], offset[part], mk, columns, sampling)
                if need_weight:
                    part_w, _ = columns_times_weight_backward(columns.to(gemm), w, go[rows], out_hw, True, False)
                    part_w = part_w.to(torch.promote_types(gemm, torch.float32))  # bf16 parts summed in fp32
                    grad_w = part_w if grad_w is None else grad_w.add_(part_w)
                columns = None
        grad_weight = None
        if need_weight:
            grad_weight = grad_w.view(out_channels, kh, kw, per_group).permute(0, 3, 1, 2).to(weight.dtype)
        return grad_x, grad_offset, grad_weight, grad_mask, grad_bias, None, None
