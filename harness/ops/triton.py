"""The CUDA path through the opt-in Triton kernels (`harness.kernels.triton_kernels`, the `triton` switch of
harness.settings): the autograd Functions around them, with cuBLAS for the products. On the CPU they run in
Triton's interpreter, for the tests."""

from __future__ import annotations

import torch
from torch import Tensor

from harness.kernels import triton_kernels
from harness.ops.common import image_chunks, sampling_scope


class DeformColumnsTriton(torch.autograd.Function):
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
            for part in image_chunks(n, c * taps * length * gemm.itemsize, input.device):
                with sampling_scope():
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
            for part in image_chunks(n, 2 * c * taps * length * gemm.itemsize, input.device):
                go = go_all[part].to(gemm)
                mask_part = _rows_of(mask, part)
                if need_weight:
                    with sampling_scope():
                        columns = triton_kernels.columns(input[part], offset[part], mask_part, sampling, gemm)
                    part_weight = torch.matmul(go, columns.view(-1, groups, rows, length).transpose(-1, -2)).sum(0)
                    grad_weight = part_weight if grad_weight is None else grad_weight.add_(part_weight)
                    del columns
                if need_input or need_offset or need_mask:
                    grad_columns = torch.matmul(w_t, go)
                    with sampling_scope():
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


class SampleTriton(torch.autograd.Function):
    """`full` [N, C, Hf, Wf] sampled bilinearly where a 1x1 `sampling` and offset [N, 2·G, Ho, Wo] put each
    pixel: [N, C, Ho, Wo] in `full`'s dtype; the shared layout's sample on a GPU (one tap of the Triton
    column kernel, so torchvision's rule and its one-sided gradient at whole pixels)."""

    @staticmethod
    def forward(ctx, full, offset, sampling):  # type: ignore[override]
        with sampling_scope():
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
            with sampling_scope():
                triton_kernels.columns_backward(full, offset, None, grad_out.reshape(*full.shape[:2], -1).contiguous(),
                                                ctx.sampling, grad_full, grad_offset, None)
        return None if grad_full is None else grad_full.to(full.dtype), grad_offset, None

