"""The compiled C kernel's paths on the CPU: the fused fp32 layer and where it applies, and the shared layout's
sample by the kernel with one tap."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d as tv_deform_conv2d

import harness.ops.cpu
import harness.ops.dispatch
from harness.kernels import native
from harness.ops import deform_conv2d, deform_conv2d_shared, expand_shared_offset

from .conftest import CASES, count_calls, dcn_case, ours_and_theirs, subset_gradients, with_grads

# The fused kernel (fp32, outputs a multiple of 16): columns sampled and multiplied tile by tile.
# Every geometry of CASES with 16 or 48 outputs, and the channel counts with their own loops.
FUSED_CASES = [dict(case, o=16 if i % 2 else 48) for i, case in enumerate(CASES) if "groups" not in case] + [
    dict(c=3, o=16, h=13, w=11), dict(c=16, o=32, h=13, w=11, mask=True), dict(c=32, o=16, offset_groups=2),
    dict(c=40, o=16, s=2, mask=True), dict(n=3, c=16, o=16, h=17, w=19, scale=8.0),
]


@pytest.fixture(autouse=True)
def fuse_small_layers(monkeypatch):
    """The small cases here would take the columns path for speed (`native.fuses`: few output points per
    output): they exist to check the fused kernel, so it takes them all."""
    monkeypatch.setattr(native, "FUSED_MIN_POINTS_PER_OUTPUT", 0)


@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_fused_path_matches_torchvision(case, monkeypatch):
    """fp32 with outputs a multiple of 16 runs the fused kernel (tiles of 64 pixels that cross image
    borders in forward, tails, zero-padded column rows for 3·9 = 27 values); every value and gradient
    matches torchvision's fp64 kernel to fp32 precision."""
    if not native.fused_available():
        pytest.skip(f"no fused kernel (AVX2 or AVX-512 only): {native.status()}")
    calls = count_calls(monkeypatch, native, "conv_forward", "conv_backward")
    x, offset, weight, bias, mask, (s, p, d) = dcn_case(torch.float32, **case)
    tensors = [x, offset, weight, bias, mask]

    ours, theirs = ours_and_theirs(s, p, d)
    out_a, grads_a = with_grads(ours, tensors)
    out_b, grads_b = with_grads(theirs, [None if t is None else t.double() for t in tensors])
    assert calls == {"conv_forward": 1, "conv_backward": 1}
    torch.testing.assert_close(out_a.double(), out_b, atol=1e-4 * max(1.0, out_b.abs().max().item() / 10), rtol=0)
    for name, ga, gb in zip(("input", "offset", "weight", "bias", "mask"), grads_a, grads_b, strict=True):
        if gb is not None:
            torch.testing.assert_close(ga.double(), gb, atol=1e-4 * max(1.0, gb.abs().max().item() / 10), rtol=0,
                                       msg=name)


@pytest.mark.parametrize("c", [3, 16, 40])
@pytest.mark.parametrize("wanted", ["x", "offset", "mask", "x+offset", "weight", "offset+weight"])
def test_fused_gradients_of_any_subset_of_inputs(wanted, c):
    """The fused backward computes only what is asked for (a first layer: no input gradient; a frozen
    weight: no column products), and each gradient matches torchvision's."""
    if not native.fused_available():
        pytest.skip(f"no fused kernel (AVX2 or AVX-512 only): {native.status()}")
    case = dcn_case(torch.float32, c=c, o=16, h=12, w=13, mask=True)
    ours, theirs = subset_gradients(wanted, *case, reference_dtype=torch.float64)
    for name, grad in ours.items():
        assert (grad is None) == (name not in wanted.split("+")), name
        if theirs[name] is not None:
            torch.testing.assert_close(grad.double(), theirs[name], rtol=0,
                                       atol=1e-4 * max(1.0, theirs[name].abs().max().item() / 10), msg=name)


def test_fused_path_takes_a_strided_bias():
    """A bias that is a view with strides (here every other element of a longer tensor) works too."""
    x, offset, weight, bias, mask, (s, p, d) = dcn_case(torch.float32, c=4, o=16)
    strided = torch.stack([bias, torch.full_like(bias, float("nan"))], 1).reshape(-1)[::2]
    assert not strided.is_contiguous()
    got = deform_conv2d(x, offset, weight, strided, stride=s, padding=p, dilation=d, mask=mask)
    want = tv_deform_conv2d(x, offset, weight, bias, stride=(s, s), padding=(p, p), dilation=(d, d), mask=mask)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_fused_path_bounds_the_threads_weight_gradients(monkeypatch):
    """Each thread of the fused backward holds its own weight gradient; where threads x its size pass
    FUSED_WEIGHT_GRAD_BYTES the layer takes the columns path instead, with the same results."""
    if not native.fused_available():
        pytest.skip(f"no fused kernel (AVX2 or AVX-512 only): {native.status()}")
    x, offset, weight, bias, mask, (s, p, d) = dcn_case(torch.float32, c=4, o=16)
    per_thread = native.padded_columns(9, 4) * 16 * 4  # 48 padded columns x 16 outputs, fp32
    results = []
    for budget, fused in ((torch.get_num_threads() * per_thread, True), (per_thread - 1, False)):
        monkeypatch.setattr(native, "FUSED_WEIGHT_GRAD_BYTES", budget)
        calls = count_calls(monkeypatch, native, "conv_forward", "columns_forward")
        results.append(with_grads(ours_and_theirs(s, p, d)[0], [x, offset, weight, bias, mask]))
        assert calls == {"conv_forward": int(fused), "columns_forward": int(not fused)}
        monkeypatch.undo()
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=1e-4)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(ga, gb, rtol=0, atol=1e-3)


def test_fused_backward_repeats_bit_for_bit():
    """Each thread adds its images' weight gradient into its own copy: the same images go to the same thread
    on every call, so a seeded run repeats exactly (handing images to whichever thread was free varied the
    sum's order, and the gradient's last bits, from call to call)."""
    if not native.fused_available():
        pytest.skip(f"no fused kernel (AVX2 or AVX-512 only): {native.status()}")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, offset, weight, bias, mask, (s, p, d) = dcn_case(torch.float32, n=16, c=32, o=32, h=8, w=8)
        runs = [with_grads(ours_and_theirs(s, p, d)[0], [x, offset, weight, bias, mask]) for _ in range(8)]
    finally:
        torch.set_num_threads(threads)
    for out, grads in runs[1:]:
        assert torch.equal(out, runs[0][0])
        for name, grad, first in zip(("input", "offset", "weight", "bias", "mask"), grads, runs[0][1], strict=True):
            assert torch.equal(grad, first), name


@pytest.mark.parametrize("limit,value,shape", [
    ("FUSED_MIN_POINTS_PER_OUTPUT", 0.5, dict(h=4, w=4, s=2)),  # 2 images of 2 x 2 points for 48 outputs
    ("FUSED_MAX_WEIGHT_BYTES", 4096, dict(h=8, w=9)),  # 80 padded columns x 48 outputs in fp32: 15 KiB
])
def test_where_the_fused_layer_does_not_pay_the_columns_path_runs(limit, value, shape, monkeypatch):
    """A layer with fewer output points than threads x outputs / 2, or with a weight past
    FUSED_MAX_WEIGHT_BYTES, takes the columns path, where oneDNN's products beat the threads' own weight
    gradients; the results are those of the fused kernel."""
    if not native.fused_available():
        pytest.skip(f"no fused kernel (AVX2 or AVX-512 only): {native.status()}")
    x, offset, weight, bias, mask, (s, p, d) = dcn_case(torch.float32, c=8, o=48, **shape)
    results = []
    monkeypatch.setattr(native, "FUSED_MAX_WEIGHT_BYTES", 2**30)
    for setting, fused in ((0 if limit == "FUSED_MIN_POINTS_PER_OUTPUT" else 2**30, True), (value, False)):
        monkeypatch.setattr(native, limit, setting)
        with monkeypatch.context() as patch:
            calls = count_calls(patch, native, "conv_forward", "columns_forward")
            results.append(with_grads(ours_and_theirs(s, p, d)[0], [x, offset, weight, bias, mask]))
        assert calls == {"conv_forward": int(fused), "columns_forward": int(not fused)}
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=1e-4)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(ga, gb, rtol=0, atol=1e-3)


@pytest.mark.parametrize("dtype,out_channels,amp,fused", [
    (torch.float32, 16, False, True), (torch.float32, 48, False, True), (torch.float64, 16, False, False),
    (torch.float32, 20, False, False), (torch.float32, 16, True, False),
])
def test_fused_path_only_where_it_applies(dtype, out_channels, amp, fused, monkeypatch):
    """fp32 products with outputs a multiple of 16 fuse; fp64, other output counts and autocast's bf16
    products keep the columns path."""
    if not native.available():
        pytest.skip(native.status())
    fused = fused and native.fused_available()  # the columns path everywhere without AVX-512
    calls = count_calls(monkeypatch, native, "conv_forward", "columns_forward")
    x, offset, weight, bias, mask, (s, p, d) = dcn_case(dtype, c=4, o=out_channels)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
    assert calls == {"conv_forward": int(fused), "columns_forward": int(not fused)}


def test_shared_native_path_samples_with_the_compiled_kernel(monkeypatch):
    """On the CPU with the compiled kernel: stride 1 samples `full` with it (no grid_sample); stride 2
    goes to the per-tap kernel through deform_conv2d, and so does a map small enough that the full map would
    pass SHARED_AREA_RATIO times the output."""
    if not native.available():
        pytest.skip(f"native kernel unavailable: {native.status()}")
    monkeypatch.setattr(harness.ops.dispatch, "SHARED_AREA_RATIO", float("inf"))

    def boom(*args, **kwargs):
        raise AssertionError("grid_sample called on the compiled path")

    monkeypatch.setattr(F, "grid_sample", boom)
    per_tap_calls: list[int] = []
    real_deform_conv2d = harness.ops.dispatch.deform_conv2d

    def counting_deform_conv2d(*args, **kwargs):
        per_tap_calls.append(1)
        return real_deform_conv2d(*args, **kwargs)

    monkeypatch.setattr(harness.ops.dispatch, "deform_conv2d", counting_deform_conv2d)
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    off = torch.randn(2, 4, 9, 9, requires_grad=True)
    out = deform_conv2d_shared(x, off, w, None, 1, 1, 1)
    assert out.is_contiguous(memory_format=torch.channels_last)
    out.sum().backward()
    assert not per_tap_calls and off.grad is not None and x.grad is not None

    monkeypatch.setattr(harness.ops.cpu, "sample_shared_native", boom)
    deform_conv2d_shared(x, torch.randn(2, 2, 5, 5), w, None, 2, 1, 1).sum().backward()
    assert per_tap_calls == [1]
    monkeypatch.setattr(harness.ops.dispatch, "SHARED_AREA_RATIO", 1.3)  # 11 x 11 against 9 x 9: 1.49
    deform_conv2d_shared(x, off, w, None, 1, 1, 1).sum().backward()
    assert per_tap_calls == [1, 1]


@pytest.mark.parametrize("size,per_tap", [(4, True), (8, True), (16, False), (64, False)])
def test_shared_small_maps_take_the_per_tap_kernel_and_match_torchvision(monkeypatch, size, per_tap):
    """At 8 px or less a 3x3 shared layer runs the per-tap kernel on the repeated offset, with the same values
    and gradients as torchvision's kernel."""
    if not native.available():
        pytest.skip(f"native kernel unavailable: {native.status()}")
    calls: list[int] = []
    real = harness.ops.dispatch.deform_conv2d
    monkeypatch.setattr(harness.ops.dispatch, "deform_conv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 16, size, size, generator=g, requires_grad=True)
    w = torch.randn(16, 16, 3, 3, generator=g, requires_grad=True)
    off = (torch.randn(2, 2, size, size, generator=g) * 2).requires_grad_()
    out = deform_conv2d_shared(x, off, w, None, 1, 1, 1)
    assert bool(calls) == per_tap
    ref = tv_deform_conv2d(x, expand_shared_offset(off, 9), w, None, padding=(1, 1))
    torch.testing.assert_close(out, ref, atol=1e-4 * max(1.0, ref.abs().max().item() / 10), rtol=0)
    grads = torch.autograd.grad(out.sum(), (x, off, w))
    for name, ours, theirs in zip("xow", grads, torch.autograd.grad(ref.sum(), (x, off, w)), strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-4 * max(1.0, theirs.abs().max().item() / 10), rtol=0, msg=name)
