"""Every CUDA path against torchvision's CUDA kernel (on a machine with a GPU)."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import deform_conv2d as tv_deform_conv2d

from harness.ops import DeformConv2d, common, deform_conv2d

from .conftest import CASES, bf16_layer_dtypes, dcn_case, requires_cuda, with_grads


@requires_cuda
@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_cuda_matches_torchvision_cuda_kernel(case, cuda_path):
    x, offset, weight, bias, mask, (s, p, d) = dcn_case(torch.float32, **case)
    tensors = [t.cuda() if t is not None else None for t in (x, offset, weight, bias, mask)]
    out_a, grads_a = with_grads(lambda *t: deform_conv2d(*t[:4], stride=s, padding=p, dilation=d, mask=t[4]), tensors)
    out_b, grads_b = with_grads(lambda *t: tv_deform_conv2d(*t[:4], stride=(s, s), padding=(p, p), dilation=(d, d),
                                                            mask=t[4]), tensors)
    torch.testing.assert_close(out_a, out_b, atol=1e-4, rtol=0)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        if gb is not None:
            torch.testing.assert_close(ga, gb, atol=1e-4 * max(1.0, gb.abs().max().item() / 100), rtol=0)


@requires_cuda
@pytest.mark.parametrize("layout", ["shared", "per_tap"])
def test_cuda_autocast_bf16_output_is_bf16(layout, cuda_path):
    layer = DeformConv2d(8, 8, 3, padding=1, offset_channels=layout).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer(torch.randn(2, 8, 16, 16, device="cuda"))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.weight.grad is not None


@requires_cuda
def test_cuda_chunked_columns_match_torchvision(monkeypatch, cuda_path):
    monkeypatch.setattr(common, "CUDA_COLUMN_CHUNK_BYTES", 1)  # one image per chunk
    x, offset, weight, bias, mask, (s, p, d) = dcn_case(torch.float64, n=5, c=8, o=4, offset_groups=2)
    tensors = [t.cuda() for t in (x, offset, weight, bias, mask)]
    out_a, grads_a = with_grads(lambda *t: deform_conv2d(*t[:4], stride=s, padding=p, dilation=d, mask=t[4]), tensors)
    out_b, grads_b = with_grads(lambda *t: tv_deform_conv2d(*t[:4], stride=(s, s), padding=(p, p), dilation=(d, d),
                                                            mask=t[4]), tensors)
    torch.testing.assert_close(out_a, out_b, atol=1e-8, rtol=0)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(ga, gb, atol=1e-8, rtol=0)


@requires_cuda
@pytest.mark.parametrize("layout,modulated", [("per_tap", False), ("per_tap", True), ("shared", False)])
def test_cuda_autocast_bf16_runs_every_product_in_bf16(layout, modulated, cuda_path):
    dtypes = bf16_layer_dtypes(layout, modulated, "cuda")
    assert len(dtypes) >= 3
    assert {dtype for _, dtype in dtypes} == {torch.bfloat16}, dtypes
