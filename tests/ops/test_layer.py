"""The DeformConv2d layer: an ordinary convolution at initialisation, its backends, layouts and inference mode."""

from __future__ import annotations

import pytest
import torch
import torchvision.ops

from harness.kernels import native
from harness.ops import DeformConv2d, cuda

from .conftest import count_calls


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


def test_native_path_does_not_call_torchvision(monkeypatch):
    calls: list[int] = []

    def boom(*args, **kwargs):
        calls.append(1)
        raise AssertionError("torchvision's deform_conv2d called")

    monkeypatch.setattr(torchvision.ops, "deform_conv2d", boom)
    x = torch.randn(1, 3, 6, 6)
    layer = DeformConv2d(3, 4, 3, padding=1)
    layer(x).sum().backward()
    assert calls == [] and layer.weight.grad is not None
    # the stand-in is what a layer would call: the torchvision backend runs into it
    with pytest.raises(AssertionError, match="torchvision's deform_conv2d called"):
        DeformConv2d(3, 4, 3, padding=1, backend="torchvision")(x)
    assert calls == [1]


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


@pytest.mark.parametrize("layout", ["per_tap", "shared"])
def test_layer_trains_after_running_under_inference_mode(layout, cpu_kernel):
    """The cached sampling grids must not be inference tensors, or the next training step could not save them."""
    cuda.normalised_tap_grid.cache_clear()
    layer = DeformConv2d(4, 4, 3, padding=1, offset_channels=layout)
    with torch.inference_mode():
        layer(torch.randn(1, 4, 9, 9))
    layer(torch.randn(1, 4, 9, 9)).square().sum().backward()
    assert layer.offset_predictor.weight.grad is not None and layer.offset_predictor.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("out_channels,size,path", [(48, 4, "columns_forward"), (16, 8, "conv_forward")])
def test_weight_is_laid_out_for_its_device(out_channels, size, path, monkeypatch):
    """On the CPU the weight is channels-last, [O, kh, kw, C] in memory, the compiled kernel's column order:
    the columns path reads it without a copy, and both paths' weight gradients arrive in the same layout
    (autograd keeps them without a copy). Moved off the CPU it is contiguous again, for the GPU's batched
    matmuls; the values and a state dict go across unchanged."""
    if not native.available():
        pytest.skip(f"native kernel unavailable: {native.status()}")
    if path == "conv_forward" and not native.fused_available():
        pytest.skip(f"no fused kernel (AVX2 or AVX-512 only): {native.status()}")
    conv = torch.nn.Conv2d(8, out_channels, 3, stride=2, padding=1)
    layer = DeformConv2d.from_conv(conv)
    assert layer.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(layer.weight, conv.weight)
    arriving = []
    layer.weight.register_hook(lambda grad: arriving.append(grad.is_contiguous(memory_format=torch.channels_last)))
    calls = count_calls(monkeypatch, native, path)
    x = torch.randn(2, 8, size, size)  # 2 x 2 x 2 points for 48 outputs take the columns path, 2 x 4 x 4 for 16 fuse
    out = layer(x)
    out.square().sum().backward()
    assert calls == {path: 1} and arriving == [True]
    expected = torch.autograd.grad(conv(x).square().sum(), conv.weight)[0]
    torch.testing.assert_close(layer.weight.grad, expected, atol=1e-4, rtol=0)

    moved = DeformConv2d(8, out_channels, 3, stride=2, padding=1).to("meta")
    assert moved.weight.is_contiguous() and not moved.weight.is_contiguous(memory_format=torch.channels_last)
    assert layer.to(torch.float64).weight.is_contiguous(memory_format=torch.channels_last)
    reloaded = DeformConv2d(8, out_channels, 3, stride=2, padding=1)
    reloaded.load_state_dict(layer.state_dict())
    assert torch.equal(reloaded.weight, layer.weight)
