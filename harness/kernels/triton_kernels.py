"""Triton kernels for deformable convolution on CUDA, opt-in (the `triton` switch, see harness.settings): columns
and their gradients.

On a GPU the PyTorch path needs about 25 kernels per forward + backward (the grid's flip and
multiply-add, grid_sample and its backward, copies, reductions). Here one kernel forms the positions
from the offsets where the predictor wrote them, samples every tap and writes the columns (in the
matmul's dtype, bf16 under autocast), and one kernel does the whole backward of the sampling: the
input's gradient by atomic adds, the offset's and the mask's by sums over the channels. The matmuls
stay cuBLAS's. The arithmetic is torchvision's kernel's, corner by corner, so values and gradients
follow it at whole pixels and borders too.

This path is exact and needs less memory than the PyTorch path, but is slower on the benchmark's
layers (its column kernel is slower than grid_sample's and it samples the columns twice; figures in
docs/benchmarks.md, the GPU section). So it is off by default; the `triton` switch turns it on. Triton
ships with PyTorch's CUDA wheels; without it the switch is ignored. With TRITON_INTERPRET=1 as well the
kernels run on the CPU in Triton's interpreter (slow; the test suite checks them that way on machines
without a GPU).
"""

from __future__ import annotations

import os
from functools import cache
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from harness import settings

if TYPE_CHECKING:
    from harness.kernels.native import Sampling

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only wheels of torch do not depend on triton
    triton = None


def applies(device: torch.device) -> bool:
    """Whether `deform_conv2d` uses these kernels on `device`: with the `triton` switch on (see
    harness.settings) and Triton importable, on CUDA, or on the CPU in Triton's interpreter (TRITON_INTERPRET=1)."""
    if triton is None or not settings.current().triton:
        return False
    return device.type == "cuda" or (device.type == "cpu" and _interpreted())


@cache
def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def status() -> str:
    """Which sampling `deform_conv2d` uses on a GPU, and why."""
    if triton is None:
        return "PyTorch path (grid_sample); Triton kernels: no (triton is not installed)"
    switch = settings.variable("triton")
    if not settings.current().triton:
        return f"PyTorch path (grid_sample); Triton kernels: off ({switch}=1 turns them on)"
    return f"Triton kernels (triton {triton.__version__}, {switch}=1)"


# Each program takes BLOCK_PIXELS output pixels (consecutive along a row, so loads and stores coalesce)
# of up to MAX_BLOCK_CHANNELS channels of one offset group; 128 x 16 was the fastest tile on the
# benchmark's layer shapes.
BLOCK_PIXELS = 128
MAX_BLOCK_CHANNELS = 16


def _block_channels(channels: int) -> int:
    return max(1, min(MAX_BLOCK_CHANNELS, triton.next_power_of_2(channels)))


if triton is not None:

    @triton.jit
    def _bilinear_corners(y, x, H, W):
        """torchvision's bilinear rule: the top-left corner, the fractions, whether the position is less
        than a pixel from the image (else it reads nothing) and which of the four corners lie inside.

        torchvision's offset gradient uses the corners without the first test (at exactly -1 px, where
        zero offsets and padding 1 put the border taps, it is not zero), so they come apart."""
        inside = (y > -1.0) & (y < H) & (x > -1.0) & (x < W)
        y0f = tl.floor(y)
        x0f = tl.floor(x)
        ly = y - y0f
        lx = x - x0f
        # clamped before the integer conversion; a clamped corner is outside either way
        y0 = tl.minimum(tl.maximum(y0f, -2.0), H + 1.0).to(tl.int32)
        x0 = tl.minimum(tl.maximum(x0f, -2.0), W + 1.0).to(tl.int32)
        top = (y0 >= 0) & (y0 <= H - 1)
        bottom = (y0 + 1 >= 0) & (y0 + 1 <= H - 1)
        left = (x0 >= 0) & (x0 <= W - 1)
        right = (x0 + 1 >= 0) & (x0 + 1 <= W - 1)
        return y0, x0, ly, lx, inside, top & left, top & right, bottom & left, bottom & right

    @triton.jit
    def _tap_corners(offsets, so_c, ch, k, KW, ho, wo, sh, sw, ph, pw, dh, dw, p_ok, H, W):
        """Tap k's position at each pixel (its undeformed place plus the offset in channels ch, ch + 1,
        in the offset's dtype): its corners as `_bilinear_corners` gives them, with the fractions'
        complements 1 - ly and 1 - lx after ly and lx."""
        dy = tl.load(offsets + ch * so_c, mask=p_ok, other=0.0)
        dx = tl.load(offsets + (ch + 1) * so_c, mask=p_ok, other=0.0)
        y = (ho * sh - ph + (k // KW) * dh).to(dy.dtype) + dy
        x = (wo * sw - pw + (k % KW) * dw).to(dx.dtype) + dx
        y0, x0, ly, lx, inside, m00, m01, m10, m11 = _bilinear_corners(y, x, H, W)
        return y0, x0, ly, lx, 1.0 - ly, 1.0 - lx, inside, m00, m01, m10, m11

    @triton.jit
    def _program_tile(x_ptr, sx_n, sx_c, off_ptr, so_n, so_y, so_x, C, L, WO, CG, G, K,
                      BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """This program's image n, offset group g, channels c and output pixels (row ho, column wo); which
        of the [BLOCK_C, BLOCK_P] tile's elements exist; its channels' input planes, its pixels' offsets,
        and each element's index in the columns [N, C·K, L] at tap 0."""
        pixel_blocks = tl.cdiv(L, BLOCK_P)
        channel_blocks = tl.cdiv(CG, BLOCK_C)
        pid = tl.program_id(0)
        rest = pid // pixel_blocks
        g = (rest // channel_blocks) % G
        n = (rest // channel_blocks // G).to(tl.int64)
        p = (pid % pixel_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = p < L
        cg = (rest % channel_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
        ok = (cg < CG)[:, None] & p_ok[None, :]
        c = g * CG + cg
        ho = p // WO
        wo = p % WO
        planes = x_ptr + n * sx_n + c[:, None] * sx_c
        offsets = off_ptr + n * so_n + ho * so_y + wo * so_x
        column = (n * C * K + c[:, None] * K) * L + p[None, :]
        return n, g, c, p_ok, ho, wo, ok, planes, offsets, column

    # integers are not specialised (on 1 or multiples of 16): one compilation serves every layer shape
    _SIZES = ["C", "H", "W", "WO", "L", "CG", "G", "sh", "sw", "ph", "pw", "dh", "dw",
              "sx_n", "sx_c", "sx_y", "sx_x", "so_n", "so_c", "so_y", "so_x", "sm_n", "sm_c", "sm_y", "sm_x"]

    @triton.jit(do_not_specialize=_SIZES)
    def _im2col_kernel(
        x_ptr, off_ptr, mask_ptr, col_ptr,
        C, H, W, WO, L, CG, G,
        sh, sw, ph, pw, dh, dw,
        sx_n, sx_c, sx_y, sx_x,
        so_n, so_c, so_y, so_x,
        sm_n, sm_c, sm_y, sm_x,
        KH: tl.constexpr, KW: tl.constexpr, HAS_MASK: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """Columns [N, C·KH·KW, L] (row c·K + k) of input [N, C, H, W] at the deformed taps."""
        n, g, c, p_ok, ho, wo, ok, planes, offsets, column = _program_tile(
            x_ptr, sx_n, sx_c, off_ptr, so_n, so_y, so_x, C, L, WO, CG, G, KH * KW, BLOCK_C, BLOCK_P)
        cols = col_ptr + column
        for k in range(KH * KW):  # a loop, not unrolled: a ninth of the code to compile
            ch = 2 * (g * KH * KW + k)
            y0, x0, ly, lx, hy, hx, inside, m00, m01, m10, m11 = _tap_corners(
                offsets, so_c, ch, k, KW, ho, wo, sh, sw, ph, pw, dh, dw, p_ok, H, W)
            corner = planes + (y0 * sx_y + x0 * sx_x)[None, :]
            near = ok & inside[None, :]
            v00 = tl.load(corner, mask=near & m00[None, :], other=0.0).to(ly.dtype)
            v01 = tl.load(corner + sx_x, mask=near & m01[None, :], other=0.0).to(ly.dtype)
            v10 = tl.load(corner + sx_y, mask=near & m10[None, :], other=0.0).to(ly.dtype)
            v11 = tl.load(corner + sx_y + sx_x, mask=near & m11[None, :], other=0.0).to(ly.dtype)
            val = (hy * hx)[None, :] * v00 + (hy * lx)[None, :] * v01 + (ly * hx)[None, :] * v10 \
                + (ly * lx)[None, :] * v11
            if HAS_MASK:
                mk = tl.load(mask_ptr + n * sm_n + (g * KH * KW + k) * sm_c + ho * sm_y + wo * sm_x,
                             mask=p_ok, other=0.0)
                val = val * mk[None, :].to(val.dtype)
            tl.store(cols + k * L, val.to(col_ptr.dtype.element_ty), mask=ok)

    @triton.jit(do_not_specialize=[*_SIZES, "sgx_n", "sgx_c", "sgx_y", "sgx_x", "sgo_n", "sgo_c", "sgo_y", "sgo_x",
                                   "sgm_n", "sgm_c", "sgm_y", "sgm_x"])
    def _col2im_kernel(
        x_ptr, off_ptr, mask_ptr, gcol_ptr, gx_ptr, goff_ptr, gmask_ptr,
        C, H, W, WO, L, CG, G,
        sh, sw, ph, pw, dh, dw,
        sx_n, sx_c, sx_y, sx_x,
        sgx_n, sgx_c, sgx_y, sgx_x,
        so_n, so_c, so_y, so_x,
        sm_n, sm_c, sm_y, sm_x,
        sgo_n, sgo_c, sgo_y, sgo_x,
        sgm_n, sgm_c, sgm_y, sgm_x,
        KH: tl.constexpr, KW: tl.constexpr, HAS_MASK: tl.constexpr,
        NEED_X: tl.constexpr, NEED_OFFSET: tl.constexpr, NEED_MASK: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """The sampling's backward from the columns' gradient [N, C·K, L]: the input's gradient (atomic
        adds into a zeroed [N, C, H, W]) and the offset's and mask's (sums over this program's channels,
        atomic adds into zeroed buffers, since several channel blocks share an offset group)."""
        n, g, c, p_ok, ho, wo, ok, planes, offsets, column = _program_tile(
            x_ptr, sx_n, sx_c, off_ptr, so_n, so_y, so_x, C, L, WO, CG, G, KH * KW, BLOCK_C, BLOCK_P)
        grad_planes = gx_ptr + n * sgx_n + c[:, None] * sgx_c
        gcols = gcol_ptr + column
        for k in range(KH * KW):  # a loop, not unrolled: a ninth of the code to compile
            ch = 2 * (g * KH * KW + k)
            y0, x0, ly, lx, hy, hx, inside, m00, m01, m10, m11 = _tap_corners(
                offsets, so_c, ch, k, KW, ho, wo, sh, sw, ph, pw, dh, dw, p_ok, H, W)
            grad = tl.load(gcols + k * L, mask=ok, other=0.0).to(ly.dtype)
            if HAS_MASK:
                mask_at = mask_ptr + n * sm_n + (g * KH * KW + k) * sm_c + ho * sm_y + wo * sm_x
                mk = tl.load(mask_at, mask=p_ok, other=0.0).to(ly.dtype)
                raw_grad = grad
                grad = grad * mk[None, :]
            near = ok & inside[None, :]
            if NEED_X:
                corner = grad_planes + (y0 * sgx_y + x0 * sgx_x)[None, :]
                tl.atomic_add(corner, (grad * (hy * hx)[None, :]).to(gx_ptr.dtype.element_ty),
                              mask=near & m00[None, :], sem="relaxed")
                tl.atomic_add(corner + sgx_x, (grad * (hy * lx)[None, :]).to(gx_ptr.dtype.element_ty),
                              mask=near & m01[None, :], sem="relaxed")
                tl.atomic_add(corner + sgx_y, (grad * (ly * hx)[None, :]).to(gx_ptr.dtype.element_ty),
                              mask=near & m10[None, :], sem="relaxed")
                tl.atomic_add(corner + sgx_y + sgx_x, (grad * (ly * lx)[None, :]).to(gx_ptr.dtype.element_ty),
                              mask=near & m11[None, :], sem="relaxed")
            if NEED_OFFSET or NEED_MASK:
                corner = planes + (y0 * sx_y + x0 * sx_x)[None, :]
                v00 = tl.load(corner, mask=ok & m00[None, :], other=0.0).to(ly.dtype)
                v01 = tl.load(corner + sx_x, mask=ok & m01[None, :], other=0.0).to(ly.dtype)
                v10 = tl.load(corner + sx_y, mask=ok & m10[None, :], other=0.0).to(ly.dtype)
                v11 = tl.load(corner + sx_y + sx_x, mask=ok & m11[None, :], other=0.0).to(ly.dtype)
                if NEED_OFFSET:
                    weight_y = hx[None, :] * (v10 - v00) + lx[None, :] * (v11 - v01)
                    weight_x = hy[None, :] * (v01 - v00) + ly[None, :] * (v11 - v10)
                    grad_at = goff_ptr + n * sgo_n + ho * sgo_y + wo * sgo_x
                    tl.atomic_add(grad_at + ch * sgo_c, tl.sum(grad * weight_y, axis=0).to(
                        goff_ptr.dtype.element_ty), mask=p_ok, sem="relaxed")
                    tl.atomic_add(grad_at + (ch + 1) * sgo_c, tl.sum(grad * weight_x, axis=0).to(
                        goff_ptr.dtype.element_ty), mask=p_ok, sem="relaxed")
                if HAS_MASK and NEED_MASK:
                    val = (hy * hx)[None, :] * v00 + (hy * lx)[None, :] * v01 + (ly * hx)[None, :] * v10 \
                        + (ly * lx)[None, :] * v11
                    val = tl.where(near, val, 0.0)
                    grad_mask_at = gmask_ptr + n * sgm_n + (g * KH * KW + k) * sgm_c + ho * sgm_y + wo * sgm_x
                    tl.atomic_add(grad_mask_at, tl.sum(raw_grad * val, axis=0).to(gmask_ptr.dtype.element_ty),
                                  mask=p_ok, sem="relaxed")


def _strides(t: Tensor | None) -> tuple[int, int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)  # type: ignore[return-value]


def _launch_shape(n: int, c: int, groups: int, length: int) -> tuple[int, int, tuple[int]]:
    per_group = c // groups
    block_c = _block_channels(per_group)
    programs = n * groups * triton.cdiv(per_group, block_c) * triton.cdiv(length, BLOCK_PIXELS)
    return per_group, block_c, (programs,)


def columns(
    input: Tensor, offset: Tensor, mask: Tensor | None, sampling: Sampling, dtype: torch.dtype
) -> Tensor:
    """Deformable columns [N, C·K, Ho·Wo] (row c·K + k) of input [N, C, H, W], in `dtype`.

    input, offset [N, 2·G·K, Ho, Wo] and mask [N, G·K, Ho, Wo] may have any strides (channels-last
    too); positions are computed in the offset's dtype (fp32, or fp64).
    """
    n, c, h, w = input.shape
    (kh, kw), (ho, wo) = sampling.kernel, sampling.out_hw
    groups = offset.shape[1] // (2 * kh * kw)
    length = ho * wo
    out = torch.empty(n, c * kh * kw, length, dtype=dtype, device=input.device)
    per_group, block_c, grid = _launch_shape(n, c, groups, length)
    _im2col_kernel[grid](
        input, offset, mask if mask is not None else offset, out,
        c, h, w, wo, length, per_group, groups,
        *sampling.stride, *sampling.padding, *sampling.dilation, *input.stride(),
        *offset.stride(), *_strides(mask),
        KH=kh, KW=kw, HAS_MASK=mask is not None, BLOCK_C=block_c, BLOCK_P=BLOCK_PIXELS,
    )
    return out


def columns_backward(
    input: Tensor, offset: Tensor, mask: Tensor | None, grad_columns: Tensor, sampling: Sampling,
    grad_input: Tensor | None, grad_offset: Tensor | None, grad_mask: Tensor | None,
) -> None:
    """Adds the sampling's gradients for `grad_columns` [N, C·K, Ho·Wo] (contiguous) into grad_input,
    grad_offset and grad_mask (input's, offset's and mask's shapes, any strides), each zeroed by the
    caller, or None when not wanted."""
    n, c, h, w = input.shape
    (kh, kw), (ho, wo) = sampling.kernel, sampling.out_hw
    groups = offset.shape[1] // (2 * kh * kw)
    length = ho * wo
    per_group, block_c, grid = _launch_shape(n, c, groups, length)
    dummy = grad_columns
    _col2im_kernel[grid](
        input, offset, mask if mask is not None else offset, grad_columns,
        grad_input if grad_input is not None else dummy,
        grad_offset if grad_offset is not None else dummy,
        grad_mask if grad_mask is not None else dummy,
        c, h, w, wo, length, per_group, groups,
        *sampling.stride, *sampling.padding, *sampling.dilation, *input.stride(), *_strides(grad_input),
        *offset.stride(), *_strides(mask), *_strides(grad_offset), *_strides(grad_mask),
        KH=kh, KW=kw, HAS_MASK=mask is not None,
        NEED_X=grad_input is not None, NEED_OFFSET=grad_offset is not None, NEED_MASK=grad_mask is not None,
        BLOCK_C=block_c, BLOCK_P=BLOCK_PIXELS,
    )
