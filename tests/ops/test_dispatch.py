"""`deform_conv2d` and `deform_conv2d_shared` against torchvision's kernel through every backend (the
`cpu_kernel` fixture), and the switches `kernel_summary` reports."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import deform_conv2d as tv_deform_conv2d

from harness import settings
from harness.kernels import cpp_autograd, native
from harness.ops import (
    DeformConv2d,
    common,
    deform_conv2d,
    deform_conv2d_shared,
    dispatch,
    expand_shared_offset,
    kernel_summary,
)

from .conftest import (
    CASES,
    assert_matches_torchvision,
    bf16_layer_dtypes,
    dcn_case,
    out_size,
    subset_gradients,
    with_grads,
    without_interpreter,
)


@pytest.mark.parametrize("c", [3, 16, 40])
@pytest.mark.parametrize("wanted", ["x", "offset", "mask", "x+offset", "x+mask", "offset+mask", "weight"])
def test_gradients_of_any_subset_of_inputs(wanted, c, cpu_kernel):
    """Each set of inputs that need a gradient has its own loop in the compiled backward (e.g. a
    network's first layer: no input gradient); each matches torchvision's gradients."""
    ours, theirs = subset_gradients(wanted, *dcn_case(torch.float64, c=c, o=4, mask=True))
    for name, grad in ours.items():
        assert (grad is None) == (name not in wanted.split("+")), name
        if theirs[name] is not None:
            torch.testing.assert_close(grad, theirs[name], rtol=1e-9, atol=1e-9, msg=name)


def test_frozen_weight_with_many_outputs(cpu_kernel):
    """A frozen weight's backward samples no columns; at 64 or more outputs the column gradient is
    oneDNN's backward-data, which takes the (then unsampled) columns only for their shape."""
    x, offset, weight, bias, mask, (s, p, d) = dcn_case(torch.float64, c=5, o=64, mask=True)
    results = []
    for fn in (deform_conv2d, tv_deform_conv2d):
        leaves = [t.detach().clone().requires_grad_() for t in (x, offset, mask)]
        out = fn(leaves[0], leaves[1], weight, bias, (s, s), (p, p), (d, d), leaves[2])
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
        results.append([t.grad for t in leaves])
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)


@without_interpreter
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-6)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_matches_torchvision_forward_and_gradients(case, dtype, tol, cpu_kernel):
    assert_matches_torchvision(case, dtype, tol)


@pytest.fixture
def sample_small_maps(monkeypatch):
    """The shared layout's conv-then-sample path on the compiled kernel at every map size (the small maps of
    these tests would otherwise go to the per-tap kernel, see `dispatch.SHARED_AREA_RATIO`)."""
    monkeypatch.setattr(dispatch, "SHARED_AREA_RATIO", float("inf"))


SHARED_GEOMETRIES = [
    (1, 1, 1, 1, 1), (2, 1, 1, 1, 1), (1, 2, 2, 1, 1), (2, 0, 2, 1, 1), (1, 1, 1, 2, 1), (1, 1, 1, 2, 2),
    (1, 1, 1, 1, 2), (1, 2, 2, 2, 1), (1, 0, 1, 1, 1),
]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("s,p,d,offset_groups,groups", SHARED_GEOMETRIES)
def test_shared_fast_path_is_exact(s, p, d, offset_groups, groups, dtype, tol, cpu_kernel, sample_small_maps):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 10, generator=g, dtype=dtype)
    w = torch.randn(6, 4 // groups, 3, 3, generator=g, dtype=dtype)
    b = torch.randn(6, generator=g, dtype=dtype)
    ho, wo = out_size(8, 3, s, p, d), out_size(10, 3, s, p, d)
    # offsets large enough to leave the image (whole-pixel offsets: see test_shared_path_at_whole_pixels)
    off = torch.randn(2, 2 * offset_groups, ho, wo, generator=g, dtype=dtype) * 4

    def shared(x, off, w, b):
        return deform_conv2d_shared(x, off, w, b, s, p, d)

    def reference(x, off, w, b):
        return tv_deform_conv2d(x, expand_shared_offset(off, 9), w, b, (s, s), (p, p), (d, d))

    out_a, grads_a = with_grads(shared, [x, off, w, b])
    out_b, grads_b = with_grads(reference, [x, off, w, b])
    torch.testing.assert_close(out_a, out_b, atol=tol, rtol=0)
    for name, ga, gb in zip(("input", "offset", "weight", "bias"), grads_a, grads_b, strict=True):
        torch.testing.assert_close(ga, gb, atol=100 * tol * max(1.0, gb.abs().max().item() / 100), rtol=0, msg=name)


@without_interpreter
@pytest.mark.parametrize("s,p,d,offset_groups,groups", [(1, 1, 1, 1, 1), (1, 2, 2, 1, 1), (1, 1, 1, 2, 1),
                                                        (1, 1, 1, 1, 2), (2, 1, 1, 1, 1)])
def test_shared_gradcheck_fp64(s, p, d, offset_groups, groups, cpu_kernel, sample_small_maps):
    g = torch.Generator().manual_seed(5)
    h, w = 5, 6
    ho, wo = out_size(h, 3, s, p, d), out_size(w, 3, s, p, d)
    x = torch.randn(1, 4, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(2, 4 // groups, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(2, generator=g, dtype=torch.float64)
    # fractional offsets, several of them outside the image
    off = torch.randn(1, 2 * offset_groups, ho, wo, generator=g, dtype=torch.float64) * 2.5
    inputs = [t.requires_grad_() for t in (x, off, weight, bias)]
    assert torch.autograd.gradcheck(
        lambda *a: deform_conv2d_shared(*a, s, p, d), inputs, eps=1e-6, atol=1e-5
    )


def test_gradcheck_fp64():
    x, offset, weight, bias, mask, (s, p, d) = dcn_case(torch.float64, n=1, c=2, o=2, h=4, w=5, scale=1.3)
    inputs = [t.requires_grad_() for t in (x, offset, weight, bias, mask)]
    assert torch.autograd.gradcheck(
        lambda *a: deform_conv2d(*a[:4], stride=s, padding=p, dilation=d, mask=a[4]), inputs, eps=1e-6, atol=1e-5
    )


@without_interpreter
@pytest.mark.parametrize("layout,modulated", [("shared", False), ("per_tap", False), ("per_tap", True)])
def test_autocast_bf16_runs_in_bf16_with_fp32_positions(layout, modulated, cpu_kernel):
    torch.manual_seed(0)
    layer = DeformConv2d(8, 8, 3, padding=1, offset_channels=layout, modulated=modulated)
    with torch.no_grad():
        torch.nn.init.normal_(layer.offset_predictor.weight, std=0.3)
    x = torch.randn(2, 8, 40, 40)
    reference = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    # bf16 matmul error only: positions near 40 px stay exact (a bf16 position would be off by 0.125 px)
    assert (out.float() - reference).abs().max() < 0.05 * reference.abs().max()
    out.float().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32
    assert all(p.grad is not None for p in layer.offset_parameters())


def test_backward_recomputes_columns_instead_of_saving_them():
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    offset = torch.randn(2, 18, 16, 16, requires_grad=True)
    weight = torch.randn(8, 8, 3, 3, requires_grad=True)
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        deform_conv2d(x, offset, weight, padding=1)
    columns = 2 * 8 * 9 * 16 * 16
    assert max(saved) < columns, "the k*k-times-larger columns must not be kept for backward"


@pytest.mark.parametrize("p,d,offset_groups", [(1, 1, 1), (2, 2, 1), (1, 1, 2), (0, 1, 1)])
def test_shared_path_at_whole_pixels_matches_values_and_a_one_sided_gradient(p, d, offset_groups, cpu_kernel,
                                                                             sample_small_maps):
    """Zero or whole-pixel offsets (every offset at initialisation), many of them off the image: exact
    values. The compiled kernel takes torchvision's corners, so every gradient equals torchvision's
    (the right one-sided difference), also where the sample sits exactly one pixel before the map;
    grid_sample's offset gradient is the right or the left one."""
    dtype = torch.float64
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, 7, 9, generator=g, dtype=dtype)
    w = torch.randn(4, 4, 3, 3, generator=g, dtype=dtype)
    ho, wo = out_size(7, 3, 1, p, d), out_size(9, 3, 1, p, d)
    off = torch.randint(-4, 5, (1, 2 * offset_groups, ho, wo), generator=g).to(dtype)

    def shared(x, o, w):
        return deform_conv2d_shared(x, o, w, None, 1, p, d)

    def reference(x, o, w):
        return tv_deform_conv2d(x, expand_shared_offset(o, 9), w, None, padding=(p, p), dilation=(d, d))

    out_a, grads_a = with_grads(shared, [x, off, w])
    out_b, grads_b = with_grads(reference, [x, off, w])
    torch.testing.assert_close(out_a, out_b, atol=1e-10, rtol=0)
    if cpu_kernel == "native":
        reach = 2 * d
        ys = torch.arange(ho, dtype=dtype).view(-1, 1) + (reach - p) + off[:, 0::2]
        assert bool((ys == -1).any()), "the case must put some samples exactly one pixel before the map"
        for name, ga, gb in zip(("input", "offset", "weight"), grads_a, grads_b, strict=True):
            torch.testing.assert_close(ga, gb, atol=1e-9, rtol=0, msg=name)
        return
    _, (_, gl, _) = with_grads(lambda x, o, w: reference(x, o - 1e-9, w), [x, off, w])
    ga, gb = grads_a[1], grads_b[1]
    right, left = (ga - gb).abs() < 1e-6, (ga - gl).abs() < 1e-5
    assert bool((right | left).all())


@pytest.mark.parametrize("axis", [0, 1])
def test_offset_gradient_exactly_one_pixel_off_the_image_matches_torchvision(axis, cpu_kernel):
    """A tap exactly at y = -1 (or x = -1) reads 0, but torchvision's offset gradient there is the
    one-sided difference (row 0 minus the zero above it), not 0."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 5, 5, generator=g, dtype=torch.float64)
    w = torch.randn(2, 2, 1, 1, generator=g, dtype=torch.float64)
    off = torch.zeros(1, 2, 5, 5, dtype=torch.float64)
    along = torch.arange(5, dtype=torch.float64)
    off[0, axis] = -1.0 - (along.view(5, 1) if axis == 0 else along.view(1, 5))  # every sample at -1
    _, (ours,) = with_grads(lambda o: deform_conv2d(x, o, w), [off])
    _, (theirs,) = with_grads(lambda o: tv_deform_conv2d(x, o, w), [off])
    assert bool((theirs[:, axis] != 0).all())
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)


@without_interpreter
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("chunk_bytes", [1, 3000])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-8), (torch.float32, 1e-4)])
def test_chunked_columns_match_torchvision(monkeypatch, chunk_bytes, groups, dtype, tol, cpu_kernel):
    monkeypatch.setattr(common, "COLUMN_CHUNK_BYTES", chunk_bytes)  # 1 image, then a few, per chunk
    x, offset, weight, bias, mask, (s, p, d) = dcn_case(dtype, n=5, c=8, o=4, groups=groups, offset_groups=2)
    tensors = [x, offset, weight, bias, mask]
    out_a, grads_a = with_grads(lambda *t: deform_conv2d(*t[:4], stride=s, padding=p, dilation=d, mask=t[4]), tensors)
    out_b, grads_b = with_grads(lambda *t: tv_deform_conv2d(*t[:4], padding=(p, p), mask=t[4]), tensors)
    torch.testing.assert_close(out_a, out_b, atol=tol, rtol=0)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(ga, gb, atol=tol * max(1.0, gb.abs().max().item() / 100), rtol=0)


@pytest.mark.parametrize("layout,modulated", [("per_tap", False), ("per_tap", True), ("shared", False)])
def test_autocast_bf16_runs_every_product_in_bf16(layout, modulated, cpu_kernel):
    """torchvision's op silently runs in fp32 under autocast; every product of ours must be bf16."""
    dtypes = bf16_layer_dtypes(layout, modulated, "cpu")
    assert len(dtypes) >= 3  # forward, weight gradient, input gradient at least
    assert {dtype for _, dtype in dtypes} == {torch.bfloat16}, dtypes


def test_kernel_summary_names_the_path_and_its_switches(monkeypatch, harness_env):
    """Runs record it, so that timings from different kernels are not compared unawares."""
    if native.available():
        harness_env(fused=None)
        on = kernel_summary(torch.device("cpu"))
        harness_env(fused="0")
        off = kernel_summary(torch.device("cpu"))
        assert on.startswith("compiled C kernel") and f"{settings.variable('fused')}=0" in off and on != off
    monkeypatch.setattr(native, "available", lambda: False)
    monkeypatch.setattr(native, "library", lambda: None)
    assert kernel_summary(torch.device("cpu")).startswith("pytorch (grid_sample)")
    harness_env(triton="0", cpp="0")
    assert kernel_summary(torch.device("cuda")) == "pytorch (grid_sample, cuBLAS; chunked above 256 MiB of columns)"
    if cpp_autograd._load():
        harness_env(cpp="1")
        assert kernel_summary(torch.device("cuda")).startswith("C++ autograd op (grid_sample, cuBLAS; chunked above")
        harness_env(split="1")
        assert kernel_summary(torch.device("cuda")).startswith(
            f"C++ autograd op (grid_sample, channel slices ({settings.variable('split')}=1), cuBLAS")
