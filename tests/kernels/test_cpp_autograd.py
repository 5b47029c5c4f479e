"""The GPU path's C++ autograd ops, forced onto the CPU (the ATen calls are the same on any device).

Their values and gradients against torchvision, over every geometry, are in tests/ops/ (the
`cpp-kept` kernel); here: that a layer really is one autograd node, which gradients each backward
computes, repeated backward passes, and the switch and fallbacks when the op cannot be built.
"""

from __future__ import annotations

import shutil
import sys

import pytest
import torch
from torchvision.ops import deform_conv2d as tv_deform_conv2d

from harness import settings
from harness.kernels import cpp_autograd, native
from harness.ops import cuda, deform_conv2d, deform_conv2d_shared, expand_shared_offset
from harness.ops.cuda import MIN_SPLIT_CHANNELS, channel_split


@pytest.fixture
def gpu_path_on_cpu(monkeypatch, harness_env):
    """The GPU path (columns kept for backward, the C++ op when built), run on the CPU."""
    monkeypatch.setattr(native, "available", lambda: False)
    monkeypatch.setattr(cuda, "keeps_columns", lambda *_: True)
    monkeypatch.setattr(cuda, "runs_cpp_op", lambda _: cpp_autograd.available())
    harness_env(cpp=None)


@pytest.fixture
def built(gpu_path_on_cpu):
    if not cpp_autograd.available():
        pytest.skip(f"C++ op unavailable: {cpp_autograd.status()}")


@pytest.fixture
def fresh_build(harness_env, tmp_path):
    """A fresh `_load()` with its own cache directory; the normal one is restored afterwards."""
    harness_env(cache_dir=str(tmp_path), cpp=None)
    cpp_autograd._load.cache_clear()
    yield tmp_path
    cpp_autograd._load.cache_clear()


def _case(bias: bool, mask: bool, stride: int = 1, dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 9, 11, generator=g, dtype=dtype)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=dtype)  # two conv groups
    b = torch.randn(4, generator=g, dtype=dtype) if bias else None
    ho, wo = (9 - 1) // stride + 1, (11 - 1) // stride + 1
    offset = torch.randn(2, 36, ho, wo, generator=g, dtype=dtype) * 2  # two offset groups
    m = torch.rand(2, 18, ho, wo, generator=g, dtype=dtype) if mask else None
    return x, offset, w, b, m, stride


def test_builds_wherever_there_is_a_compiler(harness_env):
    """Every other test here skips when the op is unavailable, so a source that stops compiling must fail
    this one (CI has a compiler). The cache is keyed by the source: a changed source is built afresh."""
    if not sys.platform.startswith("linux") or not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler on this machine")
    harness_env(cpp=None)
    assert cpp_autograd.available(), cpp_autograd.status()
    assert cpp_autograd.status().startswith("in use")


def test_a_layer_is_one_autograd_node(built):
    x, offset, w, b, m, s = _case(bias=True, mask=True)
    out = deform_conv2d(x.requires_grad_(), offset, w, b, s, 1, 1, m)
    assert "DeformLayer" in out.grad_fn.name()
    shared = deform_conv2d_shared(x, torch.randn(2, 2, 9, 11, dtype=x.dtype), torch.randn(4, 6, 3, 3, dtype=x.dtype),
                                  b, 1, 1, 1)
    assert "DeformSample" in shared.grad_fn.name()


SUBSETS = [(bias, mask, wanted) for bias in (True, False) for mask in (True, False)
           for wanted in (("offset",), ("mask",), ("x", "bias"), ("weight", "mask"), ("bias",))
           if any(name in ("x", "offset", "weight") or (bias if name == "bias" else mask) for name in wanted)]


@pytest.mark.parametrize(("bias", "mask", "wanted"), SUBSETS)
def test_each_gradient_alone_matches_torchvision(built, bias, mask, wanted):
    """The op's backward maps autograd's edges (bias and mask only when given) to its inputs."""
    x, offset, w, b, m, s = _case(bias, mask, stride=2)
    tensors = {"x": x, "offset": offset, "weight": w, "bias": b, "mask": m}
    leaves = [name for name in wanted if tensors[name] is not None]
    for name in leaves:
        tensors[name] = tensors[name].clone().requires_grad_()
    args = [tensors[k] for k in ("x", "offset", "weight", "bias")]
    ours = deform_conv2d(*args, s, 1, 1, tensors["mask"])
    theirs = tv_deform_conv2d(*args, (s, s), (1, 1), (1, 1), tensors["mask"])
    grad = torch.linspace(-1, 1, ours.numel(), dtype=ours.dtype).view_as(ours)
    for a, b_ in zip(torch.autograd.grad(ours, [tensors[k] for k in leaves], grad),
                     torch.autograd.grad(theirs, [tensors[k] for k in leaves], grad), strict=True):
        torch.testing.assert_close(a, b_, atol=1e-10, rtol=0)


def test_backward_twice_with_a_retained_graph(built):
    x, offset, w, b, m, s = _case(bias=True, mask=True)
    leaves = [t.requires_grad_() for t in (x, offset, w, b, m)]
    for layout in ("per_tap", "shared"):
        if layout == "per_tap":
            out = deform_conv2d(x, offset, w, b, s, 1, 1, m)
        else:
            out = deform_conv2d_shared(x, offset[:, :4], w, b, s, 1, 1)
        first = torch.autograd.grad(out.square().sum(), [t for t in leaves if layout == "per_tap" or t is not m],
                                    retain_graph=True)
        second = torch.autograd.grad(out.square().sum(), [t for t in leaves if layout == "per_tap" or t is not m])
        for a, b_ in zip(first, second, strict=True):
            torch.testing.assert_close(a, b_, atol=0, rtol=0)


def test_shared_sample_matches_the_per_tap_layer(built):
    x, offset, w, b, _, s = _case(bias=True, mask=False, stride=2)
    shared = offset[:, :4].clone().requires_grad_()
    ours = deform_conv2d_shared(x, shared, w.repeat(1, 2, 1, 1)[:, :6], b, s, 1, 1)
    theirs = tv_deform_conv2d(x, expand_shared_offset(shared, 9), w.repeat(1, 2, 1, 1)[:, :6], b, (s, s), (1, 1))
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=0)
    torch.testing.assert_close(*(torch.autograd.grad(t.sum(), shared)[0] for t in (ours, theirs)), atol=1e-10, rtol=0)


@pytest.mark.parametrize(("bias", "mask", "stride"), [(True, True, 1), (False, False, 2), (True, False, 1)])
def test_channels_sampled_in_slices_give_the_same_layer(built, monkeypatch, bias, mask, stride):
    """The `split` switch's slices (here 3: one channel each of the 3 per offset group) change how grid_sample's
    threads are laid out, not the result: values and every gradient as torchvision's."""
    monkeypatch.setattr(cuda, "channel_split", lambda device, points, channels: 3)
    x, offset, w, b, m, s = _case(bias, mask, stride)
    leaves = [t.requires_grad_() for t in (x, offset, w, b, m) if t is not None]
    ours = deform_conv2d(x, offset, w, b, s, 1, 1, m)
    theirs = tv_deform_conv2d(x, offset, w, b, (s, s), (1, 1), (1, 1), m)
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=0)
    grad = torch.linspace(-1, 1, ours.numel(), dtype=ours.dtype).view_as(ours)
    for a, b_ in zip(torch.autograd.grad(ours, leaves, grad), torch.autograd.grad(theirs, leaves, grad), strict=True):
        torch.testing.assert_close(a, b_, atol=1e-10, rtol=0)


def test_shared_sample_in_slices(built, monkeypatch):
    x, offset, w, b, _, s = _case(bias=True, mask=False, stride=2)
    shared = offset[:, :2].clone().requires_grad_()  # one offset group: the sample's 4 channels in 4 slices
    weight = w.repeat(1, 2, 1, 1).clone().requires_grad_()
    expected = deform_conv2d_shared(x, shared, weight, b, s, 1, 1)
    monkeypatch.setattr(cuda, "channel_split", lambda device, points, channels: 4)
    sliced = deform_conv2d_shared(x, shared, weight, b, s, 1, 1)
    assert "DeformSample" in sliced.grad_fn.name()
    torch.testing.assert_close(sliced, expected, atol=1e-12, rtol=0)
    for a, b_ in zip(torch.autograd.grad(sliced.square().sum(), [shared, weight]),
                     torch.autograd.grad(expected.square().sum(), [shared, weight]), strict=True):
        torch.testing.assert_close(a, b_, atol=1e-10, rtol=0)


def test_a_split_that_does_not_divide_the_channels_is_refused(built):
    x, offset, w, b, m, s = _case(bias=True, mask=False)
    base, scale = cuda.normalised_tap_grid((3, 3), (1, 1), (1, 1), (1, 1), (9, 11), (16, 16), x.dtype, x.device)
    with pytest.raises(RuntimeError, match="split 2 must divide the 3 channels per offset group"):
        torch.ops.harness.deform_layer(x, offset, w, b, m, base, scale, 2, 2, 9, 11, x.dtype, 2)


def test_channel_split_only_on_request_and_where_the_gpu_would_be_part_empty(monkeypatch, harness_env):
    gpu = torch.device("cuda")
    monkeypatch.setattr(cuda, "resident_threads", lambda device: 1000)
    harness_env(split=None)
    assert channel_split(gpu, 100, 64) == 1  # off by default
    harness_env(split="1")
    assert channel_split(torch.device("cpu"), 100, 64) == 1  # grid_sample's CPU kernels are another story
    assert channel_split(gpu, 100, 64) == 64 // MIN_SPLIT_CHANNELS  # 800 threads, within 2 x 1000
    assert channel_split(gpu, 300, 64) == 4  # 1200; 8 slices would be 2400 threads
    assert channel_split(gpu, 1500, 64) == 1  # already fills it
    assert channel_split(gpu, 100, 12) == 1  # 6 channels a slice would be too few
    assert channel_split(gpu, 100, 48) == 4  # 12 channels a slice; 8 slices would leave 6


def test_switched_off_the_python_version_runs(gpu_path_on_cpu, harness_env):
    harness_env(cpp="0")
    assert not cpp_autograd.available()
    assert cpp_autograd.status() == f"disabled by {settings.variable('cpp')}=0"
    x, offset, w, b, m, s = _case(bias=True, mask=True)
    out = deform_conv2d(x.requires_grad_(), offset, w, b, s, 1, 1, m)
    assert "DeformLayer" not in out.grad_fn.name()
    torch.testing.assert_close(out, tv_deform_conv2d(x, offset, w, b, mask=m, padding=(1, 1)), atol=1e-10, rtol=0)


def test_no_compiler_warns_and_falls_back(fresh_build, gpu_path_on_cpu, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        assert not cpp_autograd.available()
    x, offset, w, b, m, s = _case(bias=False, mask=False)
    torch.testing.assert_close(deform_conv2d(x, offset, w, None, s, 1, 1),
                               tv_deform_conv2d(x, offset, w, padding=(1, 1)), atol=1e-10, rtol=0)


def test_a_failed_build_warns_and_says_why(fresh_build, monkeypatch):
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.warns(RuntimeWarning, match="C\\+\\+ op is unavailable"):
        assert not cpp_autograd.available()
    assert cpp_autograd.status().startswith("build failed") and "false failed" in cpp_autograd.status()
    assert not list(fresh_build.glob("*.so"))
