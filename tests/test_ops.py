"""Our deformable convolution against torchvision's kernel, and the DeformConv2d layer."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d as tv_deform_conv2d

from harness.ops import DeformConv2d, deform_conv2d, deform_conv2d_shared, expand_shared_offset


def _out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _case(
    dtype: torch.dtype, n=2, c=4, o=6, h=7, w=9, k=3, s=1, p=1, d=1, groups=1, offset_groups=1,
    mask=True, scale=2.5, seed=0,
):
    g = torch.Generator().manual_seed(seed)
    kh = kw = k
    ho, wo = _out(h, kh, s, p, d), _out(w, kw, s, p, d)
    x = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    weight = torch.randn(o, c // groups, kh, kw, generator=g, dtype=dtype)
    bias = torch.randn(o, generator=g, dtype=dtype)
    # large offsets so that many samples fall outside the image
    offset = torch.randn(n, 2 * offset_groups * kh * kw, ho, wo, generator=g, dtype=dtype) * scale
    m = torch.rand(n, offset_groups * kh * kw, ho, wo, generator=g, dtype=dtype) if mask else None
    return x, offset, weight, bias, m, (s, p, d)


def _grads(fn, tensors):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves)
    g = torch.Generator().manual_seed(1)
    # drawn in fp64 whatever the output's dtype, so that an fp32 run and its fp64 reference get the same
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
    (out * upstream).sum().backward()
    return out.detach(), [t.grad if t is not None else None for t in leaves]


def _ours_and_theirs(s, p, d):
    """Our deform_conv2d and torchvision's, each (x, offset, weight, bias, mask) at stride s, padding p,
    dilation d."""

    def ours(x, off, w, b, m):
        return deform_conv2d(x, off, w, b, stride=s, padding=p, dilation=d, mask=m)

    def theirs(x, off, w, b, m):
        return tv_deform_conv2d(x, off, w, b, stride=(s, s), padding=(p, p), dilation=(d, d), mask=m)

    return ours, theirs


CASES = [
    dict(s=s, p=p, d=d, mask=m)
    for s, p, d, m in itertools.product((1, 2), (0, 1, 2), (1, 2), (False, True))
] + [
    dict(groups=2, c=4, o=6),
    dict(offset_groups=2, c=4),
    dict(groups=2, offset_groups=4, c=8, o=4, mask=True),
    dict(k=1, p=0),
    dict(k=5, p=2, h=9, w=6),
    dict(h=5, w=11, s=2, d=2, p=2, mask=True),
    dict(scale=8.0, mask=True),
    dict(c=8, o=64, mask=True),  # >= 64 output channels: the column gradient goes through oneDNN
    # channel counts with their own loops in the compiled kernel: 3 (RGB) and 16 unrolled, >= 32 per
    # offset group one vector loop for scatter and sums
    dict(c=3, o=5, mask=True),
    dict(c=3, o=5, s=2, p=0),
    dict(c=16, o=4, mask=True, s=2),
    dict(c=32, o=4, offset_groups=2),
    dict(c=40, o=4, mask=True, d=2, p=2),
    dict(c=64, o=3, offset_groups=2, mask=True, scale=6.0),
]


@pytest.mark.parametrize("c", [3, 16, 40])
@pytest.mark.parametrize("wanted", ["x", "offset", "mask", "x+offset", "x+mask", "offset+mask", "weight"])
def test_gradients_of_any_subset_of_inputs(wanted, c, cpu_kernel):
    """Each set of inputs that need a gradient has its own loop in the compiled backward (e.g. a
    network's first layer: no input gradient); each matches torchvision's gradients."""
    ours, theirs = _subset_gradients(wanted, *_case(torch.float64, c=c, o=4, mask=True))
    for name, grad in ours.items():
        assert (grad is None) == (name not in wanted.split("+")), name
        if theirs[name] is not None:
            torch.testing.assert_close(grad, theirs[name], rtol=1e-9, atol=1e-9, msg=name)


def _subset_gradients(wanted, x, offset, weight, bias, mask, geometry, reference_dtype=None):
    """({name: gradient} of our op, the same of torchvision's) for x, offset, weight and mask, with only
    those in `wanted` ("x+offset", ...) requiring one; torchvision's side in reference_dtype if given."""
    s, p, d = geometry
    results = []
    for fn, dtype in ((deform_conv2d, x.dtype), (tv_deform_conv2d, reference_dtype or x.dtype)):
        leaves = {name: t.detach().to(dtype, copy=True).requires_grad_(name in wanted.split("+"))
                  for name, t in zip(("x", "offset", "weight", "mask"), (x, offset, weight, mask), strict=True)}
        out = fn(leaves["x"], leaves["offset"], leaves["weight"], bias.to(dtype), (s, s), (p, p), (d, d),
                 leaves["mask"])
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
        results.append({name: t.grad for name, t in leaves.items()})
    return results



def test_frozen_weight_with_many_outputs(cpu_kernel):
    """A frozen weight's backward samples no columns; at 64 or more outputs the column gradient is
    oneDNN's backward-data, which takes the (then unsampled) columns only for their shape."""
    x, offset, weight, bias, mask, (s, p, d) = _case(torch.float64, c=5, o=64, mask=True)
    results = []
    for fn in (deform_conv2d, tv_deform_conv2d):
        leaves = [t.detach().clone().requires_grad_() for t in (x, offset, mask)]
        out = fn(leaves[0], leaves[1], weight, bias, (s, s), (p, p), (d, d), leaves[2])
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
        results.append([t.grad for t in leaves])
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)

@pytest.fixture
def triton_interpreted(monkeypatch):
    """The GPU path's Triton kernels, run on the CPU by Triton's interpreter (conftest switches it on
    before triton is imported, on machines without CUDA)."""
    from harness import triton_kernels

    if triton_kernels.triton is None or not triton_kernels._interpreted():
        pytest.skip("needs triton, run by its interpreter (TRITON_INTERPRET=1, set on machines without CUDA)")
    monkeypatch.setenv("HARNESS_TRITON", "1")
    assert triton_kernels.applies(torch.device("cpu"))


# The kernels a test runs through by default; tests too slow for Triton's interpreter (a second or more a
# call) take the others only (`indirect`) and the Triton kernels get a test of their own.
COMPILED_AND_PYTORCH = ["native", "pytorch", "pytorch-kept", "cpp-kept"]
without_interpreter = pytest.mark.parametrize("cpu_kernel", COMPILED_AND_PYTORCH, indirect=True)


@pytest.fixture(params=[*COMPILED_AND_PYTORCH, "triton"])
def cpu_kernel(request, monkeypatch):
    """Run a test through the compiled kernel (harness.native), through the pure-PyTorch path, through
    its GPU variant that keeps the columns for autograd (`pytorch-kept`, forced on the CPU), through that
    variant's C++ op (`cpp-kept`, the GPU's default), and through the GPU path's Triton kernels in
    Triton's interpreter."""
    import harness.ops
    from harness import cpp_autograd, native

    if request.param == "native" and not native.available():
        pytest.skip(f"native kernel unavailable: {native.status()}")
    if request.param == "triton":
        request.getfixturevalue("triton_interpreted")
    if request.param == "cpp-kept" and not cpp_autograd.available():
        pytest.skip(f"C++ op unavailable: {cpp_autograd.status()}")
    if request.param.endswith("-kept"):
        monkeypatch.setattr(native, "available", lambda: False)
        monkeypatch.setattr(harness.ops, "_keeps_columns", lambda *_: True)
        monkeypatch.setattr(harness.ops, "_runs_cpp_op", lambda _: cpp_autograd.available())
        monkeypatch.setenv("HARNESS_CPP", "1" if request.param == "cpp-kept" else "0")
    if request.param == "pytorch":
        monkeypatch.setattr(native, "available", lambda: False)
    return request.param.split("-")[0]


def _assert_matches_torchvision(case, dtype, tol):
    x, offset, weight, bias, mask, (s, p, d) = _case(dtype, **case)
    tensors = [x, offset, weight, bias, mask]

    ours, theirs = _ours_and_theirs(s, p, d)
    out_a, grads_a = _grads(ours, tensors)
    out_b, grads_b = _grads(theirs, tensors)
    assert out_a.shape == out_b.shape
    torch.testing.assert_close(out_a, out_b, atol=tol, rtol=0)
    for name, ga, gb in zip(("input", "offset", "weight", "bias", "mask"), grads_a, grads_b, strict=True):
        if gb is None:
            continue
        torch.testing.assert_close(ga, gb, atol=tol * max(1.0, gb.abs().max().item() / 100), rtol=0, msg=name)


@without_interpreter
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-6)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_matches_torchvision_forward_and_gradients(case, dtype, tol, cpu_kernel):
    _assert_matches_torchvision(case, dtype, tol)


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_triton_kernels_match_torchvision(case, triton_interpreted):
    """The GPU path's kernels, every geometry, in fp64 (fp32 runs the same code; the CUDA tests use it)."""
    _assert_matches_torchvision(case, torch.float64, 1e-10)


def test_triton_kernels_in_chunks_match_torchvision(triton_interpreted, monkeypatch):
    import harness.ops

    monkeypatch.setattr(harness.ops, "COLUMN_CHUNK_BYTES", 1)  # chunks of one image per thread
    _assert_matches_torchvision(dict(n=5, c=8, o=4, groups=2, offset_groups=2), torch.float64, 1e-10)


# The fused kernel (fp32, outputs a multiple of 16): columns sampled and multiplied tile by tile.
# Every geometry above with 16 or 48 outputs, and the channel counts with their own loops.
FUSED_CASES = [dict(case, o=16 if i % 2 else 48) for i, case in enumerate(CASES) if "groups" not in case] + [
    dict(c=3, o=16, h=13, w=11), dict(c=16, o=32, h=13, w=11, mask=True), dict(c=32, o=16, offset_groups=2),
    dict(c=40, o=16, s=2, mask=True), dict(n=3, c=16, o=16, h=17, w=19, scale=8.0),
]


@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_fused_path_matches_torchvision(case, monkeypatch):
    """fp32 with outputs a multiple of 16 runs the fused kernel (tiles of 64 pixels that cross image
    borders in forward, tails, zero-padded column rows for 3·9 = 27 values); every value and gradient
    matches torchvision's fp64 kernel to fp32 precision."""
    from harness import native

    if not native.fused_available():
        pytest.skip(f"no fused kernel (AVX2 or AVX-512 only): {native.status()}")
    calls = _count_calls(monkeypatch, native, "conv_forward", "conv_backward")
    x, offset, weight, bias, mask, (s, p, d) = _case(torch.float32, **case)
    tensors = [x, offset, weight, bias, mask]

    ours, theirs = _ours_and_theirs(s, p, d)
    out_a, grads_a = _grads(ours, tensors)
    out_b, grads_b = _grads(theirs, [None if t is None else t.double() for t in tensors])
    assert calls == {"conv_forward": 1, "conv_backward": 1}
    torch.testing.assert_close(out_a.double(), out_b, atol=1e-4 * max(1.0, out_b.abs().max().item() / 10), rtol=0)
    for name, ga, gb in zip(("input", "offset", "weight", "bias", "mask"), grads_a, grads_b, strict=True):
        if gb is not None:
            torch.testing.assert_close(ga.double(), gb, atol=1e-4 * max(1.0, gb.abs().max().item() / 10), rtol=0,
                                       msg=name)


def _count_calls(monkeypatch, module, *names):
    calls = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(module, name)

        def counted(*args, name=name, original=original, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("c", [3, 16, 40])
@pytest.mark.parametrize("wanted", ["x", "offset", "mask", "x+offset", "weight", "offset+weight"])
def test_fused_gradients_of_any_subset_of_inputs(wanted, c):
    """The fused backward computes only what is asked for (a first layer: no input gradient; a frozen
    weight: no column products), and each gradient matches torchvision's."""
    from harness import native

    if not native.fused_available():
        pytest.skip(f"no fused kernel (AVX2 or AVX-512 only): {native.status()}")
    case = _case(torch.float32, c=c, o=16, h=12, w=13, mask=True)
    ours, theirs = _subset_gradients(wanted, *case, reference_dtype=torch.float64)
    for name, grad in ours.items():
        assert (grad is None) == (name not in wanted.split("+")), name
        if theirs[name] is not None:
            torch.testing.assert_close(grad.double(), theirs[name], rtol=0,
                                       atol=1e-4 * max(1.0, theirs[name].abs().max().item() / 10), msg=name)


def test_fused_path_takes_a_strided_bias():
    """A bias that is a view with strides (here every other element of a longer tensor) works too."""
    x, offset, weight, bias, mask, (s, p, d) = _case(torch.float32, c=4, o=16)
    strided = torch.stack([bias, torch.full_like(bias, float("nan"))], 1).reshape(-1)[::2]
    assert not strided.is_contiguous()
    got = deform_conv2d(x, offset, weight, strided, stride=s, padding=p, dilation=d, mask=mask)
    want = tv_deform_conv2d(x, offset, weight, bias, stride=(s, s), padding=(p, p), dilation=(d, d), mask=mask)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_fused_path_bounds_the_threads_weight_gradients(monkeypatch):
    """Each thread of the fused backward holds its own weight gradient; where threads x its size pass
    FUSED_WEIGHT_GRAD_BYTES the layer takes the columns path instead, with the same results."""
    from harness import native

    if not native.fused_available():
        pytest.skip(f"no fused kernel (AVX2 or AVX-512 only): {native.status()}")
    x, offset, weight, bias, mask, (s, p, d) = _case(torch.float32, c=4, o=16)
    per_thread = native.padded_columns(9, 4) * 16 * 4  # 48 padded columns x 16 outputs, fp32
    results = []
    for budget, fused in ((torch.get_num_threads() * per_thread, True), (per_thread - 1, False)):
        monkeypatch.setattr(native, "FUSED_WEIGHT_GRAD_BYTES", budget)
        calls = _count_calls(monkeypatch, native, "conv_forward", "columns_forward")
        results.append(_grads(_ours_and_theirs(s, p, d)[0], [x, offset, weight, bias, mask]))
        assert calls == {"conv_forward": int(fused), "columns_forward": int(not fused)}
        monkeypatch.undo()
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
    from harness import native

    if not native.available():
        pytest.skip(native.status())
    fused = fused and native.fused_available()  # the columns path everywhere without AVX-512
    calls = _count_calls(monkeypatch, native, "conv_forward", "columns_forward")
    x, offset, weight, bias, mask, (s, p, d) = _case(dtype, c=4, o=out_channels)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
    assert calls == {"conv_forward": int(fused), "columns_forward": int(not fused)}


SHARED_GEOMETRIES = [
    (1, 1, 1, 1, 1), (2, 1, 1, 1, 1), (1, 2, 2, 1, 1), (2, 0, 2, 1, 1), (1, 1, 1, 2, 1), (1, 1, 1, 2, 2),
    (1, 1, 1, 1, 2), (1, 2, 2, 2, 1), (1, 0, 1, 1, 1),
]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("s,p,d,offset_groups,groups", SHARED_GEOMETRIES)
def test_shared_fast_path_is_exact(s, p, d, offset_groups, groups, dtype, tol, cpu_kernel):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 10, generator=g, dtype=dtype)
    w = torch.randn(6, 4 // groups, 3, 3, generator=g, dtype=dtype)
    b = torch.randn(6, generator=g, dtype=dtype)
    ho, wo = _out(8, 3, s, p, d), _out(10, 3, s, p, d)
    # offsets large enough to leave the image (whole-pixel offsets: see test_shared_path_at_whole_pixels)
    off = torch.randn(2, 2 * offset_groups, ho, wo, generator=g, dtype=dtype) * 4

    def shared(x, off, w, b):
        return deform_conv2d_shared(x, off, w, b, s, p, d)

    def reference(x, off, w, b):
        return tv_deform_conv2d(x, expand_shared_offset(off, 9), w, b, (s, s), (p, p), (d, d))

    out_a, grads_a = _grads(shared, [x, off, w, b])
    out_b, grads_b = _grads(reference, [x, off, w, b])
    torch.testing.assert_close(out_a, out_b, atol=tol, rtol=0)
    for name, ga, gb in zip(("input", "offset", "weight", "bias"), grads_a, grads_b, strict=True):
        torch.testing.assert_close(ga, gb, atol=100 * tol * max(1.0, gb.abs().max().item() / 100), rtol=0, msg=name)


@without_interpreter
@pytest.mark.parametrize("s,p,d,offset_groups,groups", [(1, 1, 1, 1, 1), (1, 2, 2, 1, 1), (1, 1, 1, 2, 1),
                                                        (1, 1, 1, 1, 2), (2, 1, 1, 1, 1)])
def test_shared_gradcheck_fp64(s, p, d, offset_groups, groups, cpu_kernel):
    g = torch.Generator().manual_seed(5)
    h, w = 5, 6
    ho, wo = _out(h, 3, s, p, d), _out(w, 3, s, p, d)
    x = torch.randn(1, 4, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(2, 4 // groups, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(2, generator=g, dtype=torch.float64)
    # fractional offsets, several of them outside the image
    off = torch.randn(1, 2 * offset_groups, ho, wo, generator=g, dtype=torch.float64) * 2.5
    inputs = [t.requires_grad_() for t in (x, off, weight, bias)]
    assert torch.autograd.gradcheck(
        lambda *a: deform_conv2d_shared(*a, s, p, d), inputs, eps=1e-6, atol=1e-5
    )


def test_shared_native_path_samples_with_the_compiled_kernel(monkeypatch):
    """On the CPU with the compiled kernel: stride 1 samples `full` with it (no grid_sample); stride 2
    goes to the per-tap kernel through deform_conv2d."""
    import harness.ops
    from harness import native

    if not native.available():
        pytest.skip(f"native kernel unavailable: {native.status()}")

    def boom(*args, **kwargs):
        raise AssertionError("grid_sample called on the compiled path")

    monkeypatch.setattr(F, "grid_sample", boom)
    per_tap_calls: list[int] = []
    real_deform_conv2d = harness.ops.deform_conv2d

    def counting_deform_conv2d(*args, **kwargs):
        per_tap_calls.append(1)
        return real_deform_conv2d(*args, **kwargs)

    monkeypatch.setattr(harness.ops, "deform_conv2d", counting_deform_conv2d)
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    off = torch.randn(2, 4, 9, 9, requires_grad=True)
    out = deform_conv2d_shared(x, off, w, None, 1, 1, 1)
    assert out.is_contiguous(memory_format=torch.channels_last)
    out.sum().backward()
    assert not per_tap_calls and off.grad is not None and x.grad is not None

    monkeypatch.setattr(harness.ops, "_sample_shared_native", boom)
    deform_conv2d_shared(x, torch.randn(2, 2, 5, 5), w, None, 2, 1, 1).sum().backward()
    assert per_tap_calls == [1]


def test_gradcheck_fp64():
    x, offset, weight, bias, mask, (s, p, d) = _case(torch.float64, n=1, c=2, o=2, h=4, w=5, scale=1.3)
    inputs = [t.requires_grad_() for t in (x, offset, weight, bias, mask)]
    assert torch.autograd.gradcheck(
        lambda *a: deform_conv2d(*a[:4], stride=s, padding=p, dilation=d, mask=a[4]), inputs, eps=1e-6, atol=1e-5
    )


@pytest.mark.parametrize("layout", ["shared", "per_tap"])
@pytest.mark.parametrize("backend", ["native", "torchvision"])
def test_layer_equals_conv_at_initialisation(layout, backend):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 7, 3, stride=2, padding=1, dilation=1)
    layer = DeformConv2d.from_conv(conv, offset_channels=layout, backend=backend)
    x = torch.randn(2, 5, 11, 9)
    torch.testing.assert_close(layer(x), conv(x), atol=1e-5, rtol=0)
    expected_offsets = 2 * (9 if layout == "per_tap" else 1)
    assert layer.offset_predictor.out_channels == expected_offsets
    assert all((p == 0).all() for p in layer.offset_parameters())


def test_modulated_layer_starts_at_half_mask_and_trains_offsets():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
    layer = DeformConv2d.from_conv(conv, offset_channels="shared", modulated=True)
    assert layer.offset_predictor.out_channels == 2 + 9
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(layer(x), 0.5 * conv(x), atol=1e-5, rtol=0)
    layer(x).square().sum().backward()
    grads = [p.grad for p in layer.offset_parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(
    "layout,modulated", [("shared", False), ("shared", True), ("per_tap", False), ("per_tap", True)]
)
def test_native_and_torchvision_backends_agree_with_nonzero_offsets(layout, modulated, cpu_kernel):
    torch.manual_seed(1)
    a = DeformConv2d(4, 6, 3, padding=1, offset_channels=layout, modulated=modulated, offset_groups=2)
    b = DeformConv2d(4, 6, 3, padding=1, offset_channels=layout, modulated=modulated, offset_groups=2,
                     backend="torchvision")
    with torch.no_grad():
        torch.nn.init.normal_(a.offset_predictor.weight, std=0.5)
        torch.nn.init.normal_(a.offset_predictor.bias, std=0.5)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(a(x), b(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda t: {**t, "input": t["input"][0]}, r"input must be 4-D"),
        (
            lambda t: {**t, "offset": t["offset"][:, :17]},
            r"offset must have a positive multiple of 18 channels.*given 17",
        ),
        (
            lambda t: {**t, "offset": t["offset"][:, :, :3]},
            r"offset must have shape \(2, 18, 7, 9\), given \(2, 18, 3, 9\)",
        ),
        (lambda t: {**t, "mask": t["mask"][:, :5]}, r"mask must have a positive multiple of 9 channels.*given 5"),
        (lambda t: {**t, "mask": t["mask"][:1]}, r"mask must have shape \(2, 9, 7, 9\), given \(1, 9, 7, 9\)"),
        (lambda t: {**t, "weight": t["weight"][:, :3]}, r"weight expects C/groups = 3.*4 channels"),
        (lambda t: {**t, "weight": t["weight"][0]}, r"weight must be 4-D"),
        (lambda t: {**t, "bias": t["bias"][:2]}, r"bias must have shape \(6,\), given \(2,\)"),
        (lambda t: {**t, "weight": t["weight"][:5, :2]}, r"groups=2 .* must divide the 5 output channels"),
    ],
)
def test_bad_shapes_raise_value_error_naming_shapes(mutate, match):
    x, offset, weight, bias, mask, _ = _case(torch.float32)
    t = mutate({"input": x, "offset": offset, "weight": weight, "bias": bias, "mask": mask})
    with pytest.raises(ValueError, match=match):
        deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"], 1, 1, 1, t["mask"])


def test_geometry_cache_keeps_errors_and_takes_lists():
    # the validated geometry is cached by shapes: a bad call must raise every time, and a list
    # (unhashable) stride or padding must still be accepted
    x, offset, weight, bias, mask, _ = _case(torch.float32)
    for _ in range(2):
        with pytest.raises(ValueError, match=r"bias must have shape \(6,\), given \(2,\)"):
            deform_conv2d(x, offset, weight, bias[:2], 1, 1, 1, mask)
        with pytest.raises(ValueError, match="stride and dilation must be >= 1"):
            deform_conv2d(x, offset, weight, bias, [0, 1], 1, 1, mask)
    torch.testing.assert_close(deform_conv2d(x, offset, weight, bias, [1, 1], [1, 1], [1, 1], mask),
                               deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask), atol=0, rtol=0)


def test_offset_groups_must_divide_channels():
    x = torch.randn(1, 3, 5, 5)
    with pytest.raises(ValueError, match="2 offset groups, which do not divide the 3 input channels"):
        deform_conv2d(x, torch.zeros(1, 36, 5, 5), torch.randn(2, 3, 3, 3), padding=1)
    with pytest.raises(ValueError, match="offset_groups=2 must divide in_channels=3"):
        DeformConv2d(3, 4, offset_groups=2)


def test_native_path_does_not_call_torchvision(monkeypatch):
    import torchvision.ops

    def boom(*args, **kwargs):
        raise AssertionError("native path called torchvision")

    monkeypatch.setattr(torchvision.ops, "deform_conv2d", boom)
    layer = DeformConv2d(3, 4, 3, padding=1)
    layer(torch.randn(1, 3, 6, 6)).sum().backward()
    assert F.conv2d is not boom


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
def test_shared_path_at_whole_pixels_matches_values_and_a_one_sided_gradient(p, d, offset_groups, cpu_kernel):
    """Zero or whole-pixel offsets (every offset at initialisation), many of them off the image: exact
    values. The compiled kernel takes torchvision's corners, so every gradient equals torchvision's
    (the right one-sided difference), also where the sample sits exactly one pixel before the map;
    grid_sample's offset gradient is the right or the left one."""
    dtype = torch.float64
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, 7, 9, generator=g, dtype=dtype)
    w = torch.randn(4, 4, 3, 3, generator=g, dtype=dtype)
    ho, wo = _out(7, 3, 1, p, d), _out(9, 3, 1, p, d)
    off = torch.randint(-4, 5, (1, 2 * offset_groups, ho, wo), generator=g).to(dtype)

    def shared(x, o, w):
        return deform_conv2d_shared(x, o, w, None, 1, p, d)

    def reference(x, o, w):
        return tv_deform_conv2d(x, expand_shared_offset(o, 9), w, None, padding=(p, p), dilation=(d, d))

    out_a, grads_a = _grads(shared, [x, off, w])
    out_b, grads_b = _grads(reference, [x, off, w])
    torch.testing.assert_close(out_a, out_b, atol=1e-10, rtol=0)
    if cpu_kernel == "native":
        reach = 2 * d
        ys = torch.arange(ho, dtype=dtype).view(-1, 1) + (reach - p) + off[:, 0::2]
        assert bool((ys == -1).any()), "the case must put some samples exactly one pixel before the map"
        for name, ga, gb in zip(("input", "offset", "weight"), grads_a, grads_b, strict=True):
            torch.testing.assert_close(ga, gb, atol=1e-9, rtol=0, msg=name)
        return
    _, (_, gl, _) = _grads(lambda x, o, w: reference(x, o - 1e-9, w), [x, off, w])
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
    _, (ours,) = _grads(lambda o: deform_conv2d(x, o, w), [off])
    _, (theirs,) = _grads(lambda o: tv_deform_conv2d(x, o, w), [off])
    assert bool((theirs[:, axis] != 0).all())
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)


@without_interpreter
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("chunk_bytes", [1, 3000])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-8), (torch.float32, 1e-4)])
def test_chunked_columns_match_torchvision(monkeypatch, chunk_bytes, groups, dtype, tol, cpu_kernel):
    import harness.ops

    monkeypatch.setattr(harness.ops, "COLUMN_CHUNK_BYTES", chunk_bytes)  # 1 image, then a few, per chunk
    x, offset, weight, bias, mask, (s, p, d) = _case(dtype, n=5, c=8, o=4, groups=groups, offset_groups=2)
    tensors = [x, offset, weight, bias, mask]
    out_a, grads_a = _grads(lambda *t: deform_conv2d(*t[:4], stride=s, padding=p, dilation=d, mask=t[4]), tensors)
    out_b, grads_b = _grads(lambda *t: tv_deform_conv2d(*t[:4], padding=(p, p), mask=t[4]), tensors)
    torch.testing.assert_close(out_a, out_b, atol=tol, rtol=0)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(ga, gb, atol=tol * max(1.0, gb.abs().max().item() / 100), rtol=0)


@pytest.mark.parametrize("layout,modulated", [("shared", False), ("per_tap", True)])
def test_channels_last_layer_matches_contiguous(layout, modulated, cpu_kernel):
    torch.manual_seed(0)
    layer = DeformConv2d(6, 4, 3, padding=1, offset_channels=layout, modulated=modulated, offset_groups=2)
    with torch.no_grad():
        torch.nn.init.normal_(layer.offset_predictor.weight, std=0.3)
    x = torch.randn(3, 6, 10, 10)
    expected = layer(x)
    layer = layer.to(memory_format=torch.channels_last)
    out = layer(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    out.sum().backward()
    assert layer.weight.grad is not None



@pytest.mark.parametrize("layout", ["shared", "per_tap"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_input_gradient_keeps_the_inputs_layout(layout, memory_format, cpu_kernel):
    """On the compiled path, as conv2d's does: a gradient in the other layout makes every op after it
    transpose. (The PyTorch path leaves layouts to grid_sample; its values are checked all the same.)"""
    torch.manual_seed(0)
    layer = DeformConv2d(16, 8, 3, padding=1, offset_channels=layout)
    with torch.no_grad():
        torch.nn.init.normal_(layer.offset_predictor.weight, std=0.3)
    x = torch.randn(2, 16, 9, 11, requires_grad=True)
    expected = torch.autograd.grad(layer(x).square().sum(), x)[0]
    y = x.detach().contiguous(memory_format=memory_format).requires_grad_()
    grad = torch.autograd.grad(layer(y).square().sum(), y)[0]
    assert grad.is_contiguous(memory_format=memory_format) or cpu_kernel != "native"
    torch.testing.assert_close(grad, expected, atol=1e-5, rtol=0)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.fixture(params=["cpp", "pytorch", "triton"])
def cuda_path(request, monkeypatch):
    """Every CUDA path: grid_sample and batched matmuls from the C++ op (the default) or from Python,
    and the opt-in Triton kernels."""
    from harness import cpp_autograd, triton_kernels

    if request.param == "triton" and triton_kernels.triton is None:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("HARNESS_TRITON", "1" if request.param == "triton" else "0")
    monkeypatch.setenv("HARNESS_CPP", "1" if request.param == "cpp" else "0")
    if request.param == "cpp" and not cpp_autograd.available():
        pytest.skip(f"C++ op unavailable: {cpp_autograd.status()}")
    return request.param


@requires_cuda
@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_cuda_matches_torchvision_cuda_kernel(case, cuda_path):
    x, offset, weight, bias, mask, (s, p, d) = _case(torch.float32, **case)
    tensors = [t.cuda() if t is not None else None for t in (x, offset, weight, bias, mask)]
    out_a, grads_a = _grads(lambda *t: deform_conv2d(*t[:4], stride=s, padding=p, dilation=d, mask=t[4]), tensors)
    out_b, grads_b = _grads(lambda *t: tv_deform_conv2d(*t[:4], stride=(s, s), padding=(p, p), dilation=(d, d),
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
    import harness.ops

    monkeypatch.setattr(harness.ops, "CUDA_COLUMN_CHUNK_BYTES", 1)  # one image per chunk
    x, offset, weight, bias, mask, (s, p, d) = _case(torch.float64, n=5, c=8, o=4, offset_groups=2)
    tensors = [t.cuda() for t in (x, offset, weight, bias, mask)]
    out_a, grads_a = _grads(lambda *t: deform_conv2d(*t[:4], stride=s, padding=p, dilation=d, mask=t[4]), tensors)
    out_b, grads_b = _grads(lambda *t: tv_deform_conv2d(*t[:4], stride=(s, s), padding=(p, p), dilation=(d, d),
                                                        mask=t[4]), tensors)
    torch.testing.assert_close(out_a, out_b, atol=1e-8, rtol=0)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(ga, gb, atol=1e-8, rtol=0)


def test_cuda_chunks_are_large_and_cpu_chunks_follow_the_threads(monkeypatch):
    import harness.ops

    monkeypatch.setattr(harness.ops, "COLUMN_CHUNK_BYTES", 3 * 2**20)
    monkeypatch.setattr(harness.ops, "CUDA_COLUMN_CHUNK_BYTES", 100 * 2**20)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    mib = 2**20
    assert harness.ops._image_chunks(10, mib, torch.device("cuda")) == [slice(0, 10)]
    assert harness.ops._image_chunks(10, 40 * mib, torch.device("cuda")) == [slice(0, 2), slice(2, 4), slice(4, 6),
                                                                             slice(6, 8), slice(8, 10)]
    # CPU: 3 images fit, rounded down to a multiple of 2 threads
    assert harness.ops._image_chunks(5, mib, torch.device("cpu")) == [slice(0, 2), slice(2, 4), slice(4, 5)]


class _MatmulDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the dtype of every matrix product and convolution that actually runs (below autograd)."""

    HEAVY = {torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.addmm, torch.ops.aten.baddbmm,
             torch.ops.aten.convolution, torch.ops.aten.convolution_backward, torch.ops.aten.mkldnn_convolution,
             torch.ops.aten.cudnn_convolution}

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: list[tuple[str, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.HEAVY:
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            self.dtypes.append((str(func.overloadpacket), None if first is None else first.dtype))
        return func(*args, **(kwargs or {}))


def _bf16_layer_dtypes(layout: str, modulated: bool, device: str) -> list[tuple[str, torch.dtype]]:
    layer = DeformConv2d(8, 8, 3, padding=1, offset_channels=layout, modulated=modulated).to(device)
    with torch.no_grad():  # non-zero offsets, so that the sampling really interpolates
        layer.offset_predictor.weight.normal_(0, 0.1)
    x = torch.randn(2, 8, 12, 12, device=device)
    with _MatmulDtypes() as record:
        with torch.autocast(device, dtype=torch.bfloat16):
            out = layer(x)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
    return record.dtypes


@pytest.mark.parametrize("layout,modulated", [("per_tap", False), ("per_tap", True), ("shared", False)])
def test_autocast_bf16_runs_every_product_in_bf16(layout, modulated, cpu_kernel):
    """torchvision's op silently runs in fp32 under autocast; every product of ours must be bf16."""
    dtypes = _bf16_layer_dtypes(layout, modulated, "cpu")
    assert len(dtypes) >= 3  # forward, weight gradient, input gradient at least
    assert {dtype for _, dtype in dtypes} == {torch.bfloat16}, dtypes


@requires_cuda
@pytest.mark.parametrize("layout,modulated", [("per_tap", False), ("per_tap", True), ("shared", False)])
def test_cuda_autocast_bf16_runs_every_product_in_bf16(layout, modulated, cuda_path):
    dtypes = _bf16_layer_dtypes(layout, modulated, "cuda")
    assert len(dtypes) >= 3
    assert {dtype for _, dtype in dtypes} == {torch.bfloat16}, dtypes


@pytest.mark.parametrize("layout", ["per_tap", "shared"])
def test_layer_trains_after_running_under_inference_mode(layout, cpu_kernel):
    """The cached sampling grids must not be inference tensors, or the next training step could not save them."""
    import harness.ops

    harness.ops._normalised_tap_grid.cache_clear()
    layer = DeformConv2d(4, 4, 3, padding=1, offset_channels=layout)
    with torch.inference_mode():
        layer(torch.randn(1, 4, 9, 9))
    layer(torch.randn(1, 4, 9, 9)).square().sum().backward()
    assert layer.offset_predictor.weight.grad is not None and layer.offset_predictor.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("layout", ["per_tap", "shared"])
def test_sampling_scope_is_recorded_only_while_profiling(layout, cpu_kernel):
    from torch.profiler import profile

    from harness.ops import SAMPLING_SCOPE

    layer = DeformConv2d(4, 4, 3, padding=1, offset_channels=layout)
    x = torch.randn(2, 4, 9, 9)
    with profile() as prof:
        layer(x).sum().backward()
    assert sum(event.key == SAMPLING_SCOPE for event in prof.key_averages()) == 1
    with _MatmulDtypes() as record:  # any dispatch mode sees the scope's enter/exit ops
        record.HEAVY = {torch.ops.profiler._record_function_enter_new}
        layer(x).sum().backward()
    assert record.dtypes == []


def test_kernel_summary_names_the_path_and_its_switches(monkeypatch):
    """Runs record it, so that timings from different kernels are not compared unawares."""
    from harness import native
    from harness.ops import kernel_summary

    if native.available():
        monkeypatch.delenv("HARNESS_FUSED", raising=False)
        on = kernel_summary(torch.device("cpu"))
        monkeypatch.setenv("HARNESS_FUSED", "0")
        off = kernel_summary(torch.device("cpu"))
        assert on.startswith("compiled C kernel") and "HARNESS_FUSED=0" in off and on != off
    monkeypatch.setattr(native, "available", lambda: False)
    monkeypatch.setattr(native, "library", lambda: None)
    assert kernel_summary(torch.device("cpu")).startswith("pytorch (grid_sample)")
    monkeypatch.setenv("HARNESS_TRITON", "0")
    monkeypatch.setenv("HARNESS_CPP", "0")
    assert kernel_summary(torch.device("cuda")) == "pytorch (grid_sample, cuBLAS; chunked above 256 MiB of columns)"
    from harness import cpp_autograd

    if cpp_autograd._load():
        monkeypatch.setenv("HARNESS_CPP", "1")
        assert kernel_summary(torch.device("cuda")).startswith("C++ autograd op (grid_sample, cuBLAS; chunked above")
        monkeypatch.setenv("HARNESS_SPLIT", "1")
        assert kernel_summary(torch.device("cuda")).startswith("C++ autograd op (grid_sample, channel slices")
