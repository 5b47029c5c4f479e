"""What the tests of harness.ops share: random cases against torchvision's kernel, and the fixtures that run a
test through each backend (`cpu_kernel` on the CPU, `cuda_path` on a GPU, `triton_interpreted`)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torchvision.ops import deform_conv2d as tv_deform_conv2d

from harness.kernels import cpp_autograd, native, triton_kernels
from harness.ops import DeformConv2d, cuda, deform_conv2d


def out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def dcn_case(
    dtype: torch.dtype, n=2, c=4, o=6, h=7, w=9, k=3, s=1, p=1, d=1, groups=1, offset_groups=1,
    mask=True, scale=2.5, seed=0,
):
    g = torch.Generator().manual_seed(seed)
    kh = kw = k
    ho, wo = out_size(h, kh, s, p, d), out_size(w, kw, s, p, d)
    x = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    weight = torch.randn(o, c // groups, kh, kw, generator=g, dtype=dtype)
    bias = torch.randn(o, generator=g, dtype=dtype)
    # large offsets so that many samples fall outside the image
    offset = torch.randn(n, 2 * offset_groups * kh * kw, ho, wo, generator=g, dtype=dtype) * scale
    m = torch.rand(n, offset_groups * kh * kw, ho, wo, generator=g, dtype=dtype) if mask else None
    return x, offset, weight, bias, m, (s, p, d)


def with_grads(fn, tensors):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves)
    g = torch.Generator().manual_seed(1)
    # drawn in fp64 whatever the output's dtype, so that an fp32 run and its fp64 reference get the same
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
    (out * upstream).sum().backward()
    return out.detach(), [t.grad if t is not None else None for t in leaves]


def ours_and_theirs(s, p, d):
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


def subset_gradients(wanted, x, offset, weight, bias, mask, geometry, reference_dtype=None):
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


@pytest.fixture
def triton_interpreted(harness_env):
    """The GPU path's Triton kernels, run on the CPU by Triton's interpreter (tests/conftest.py switches it on
    before triton is imported, on machines without CUDA)."""
    if triton_kernels.triton is None or not triton_kernels._interpreted():
        pytest.skip("needs triton, run by its interpreter (TRITON_INTERPRET=1, set on machines without CUDA)")
    harness_env(triton="1")
    assert triton_kernels.applies(torch.device("cpu"))


# The kernels a test runs through by default; tests too slow for Triton's interpreter (a second or more a
# call) take the others only (`indirect`) and the Triton kernels get a test of their own.
COMPILED_AND_PYTORCH = ["native", "pytorch", "pytorch-kept", "cpp-kept"]
without_interpreter = pytest.mark.parametrize("cpu_kernel", COMPILED_AND_PYTORCH, indirect=True)


@pytest.fixture(params=[*COMPILED_AND_PYTORCH, "triton"])
def cpu_kernel(request, monkeypatch, harness_env):
    """Run a test through the compiled kernel (harness.kernels.native), through the pure-PyTorch path, through
    its GPU variant that keeps the columns for autograd (`pytorch-kept`, forced on the CPU), through that
    variant's C++ op (`cpp-kept`, the GPU's default), and through the GPU path's Triton kernels in
    Triton's interpreter."""
    if request.param == "native" and not native.available():
        pytest.skip(f"native kernel unavailable: {native.status()}")
    if request.param == "triton":
        request.getfixturevalue("triton_interpreted")
    if request.param == "cpp-kept" and not cpp_autograd.available():
        pytest.skip(f"C++ op unavailable: {cpp_autograd.status()}")
    if request.param.endswith("-kept"):
        monkeypatch.setattr(native, "available", lambda: False)
        monkeypatch.setattr(cuda, "keeps_columns", lambda *_: True)
        monkeypatch.setattr(cuda, "runs_cpp_op", lambda _: cpp_autograd.available())
        harness_env(cpp="1" if request.param == "cpp-kept" else "0")
    if request.param == "pytorch":
        monkeypatch.setattr(native, "available", lambda: False)
    return request.param.split("-")[0]


def assert_matches_torchvision(case, dtype, tol):
    x, offset, weight, bias, mask, (s, p, d) = dcn_case(dtype, **case)
    tensors = [x, offset, weight, bias, mask]

    ours, theirs = ours_and_theirs(s, p, d)
    out_a, grads_a = with_grads(ours, tensors)
    out_b, grads_b = with_grads(theirs, tensors)
    assert out_a.shape == out_b.shape
    torch.testing.assert_close(out_a, out_b, atol=tol, rtol=0)
    for name, ga, gb in zip(("input", "offset", "weight", "bias", "mask"), grads_a, grads_b, strict=True):
        if gb is None:
            continue
        torch.testing.assert_close(ga, gb, atol=tol * max(1.0, gb.abs().max().item() / 100), rtol=0, msg=name)


def count_calls(monkeypatch, module, *names):
    calls = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(module, name)

        def counted(*args, name=name, original=original, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.fixture(params=["cpp", "pytorch", "triton"])
def cuda_path(request, harness_env):
    """Every CUDA path: grid_sample and batched matmuls from the C++ op (the default) or from Python,
    and the opt-in Triton kernels."""
    if request.param == "triton" and triton_kernels.triton is None:
        pytest.skip("triton is not installed")
    harness_env(triton="1" if request.param == "triton" else "0", cpp="1" if request.param == "cpp" else "0")
    if request.param == "cpp" and not cpp_autograd.available():
        pytest.skip(f"C++ op unavailable: {cpp_autograd.status()}")
    return request.param


class MatmulDtypes(torch.utils._python_dispatch.TorchDispatchMode):
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


def bf16_layer_dtypes(layout: str, modulated: bool, device: str) -> list[tuple[str, torch.dtype]]:
    layer = DeformConv2d(8, 8, 3, padding=1, offset_channels=layout, modulated=modulated).to(device)
    with torch.no_grad():  # non-zero offsets, so that the sampling really interpolates
        layer.offset_predictor.weight.normal_(0, 0.1)
    x = torch.randn(2, 8, 12, 12, device=device)
    with MatmulDtypes() as record:
        with torch.autocast(device, dtype=torch.bfloat16):
            out = layer(x)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
    return record.dtypes
