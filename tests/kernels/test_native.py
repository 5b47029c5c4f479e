"""The compiled CPU kernel: built once into the cache, optional, and a clean fallback when it can't be."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import deform_conv2d as tv_deform_conv2d

from harness import settings
from harness.kernels import native
from harness.ops import deform_conv2d


@pytest.fixture
def fresh_library(harness_env, tmp_path):
    """A fresh `native.library()` with its own cache directory; the normal one is restored afterwards."""
    harness_env(cache_dir=str(tmp_path))
    native.library.cache_clear()
    yield tmp_path
    native.library.cache_clear()


def _parity_case():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, 9, generator=g, requires_grad=True)
    offset = (torch.randn(2, 18, 8, 9, generator=g) * 3).requires_grad_()
    weight = torch.randn(3, 5, 3, 3, generator=g, requires_grad=True)
    return x, offset, weight


def test_builds_into_the_cache_and_is_used(fresh_library):
    if not native.available():
        pytest.skip(native.status())
    assert native.status().startswith("in use")
    assert list(fresh_library.glob("deform_columns-*.so"))
    x, offset, weight = _parity_case()
    ours = deform_conv2d(x, offset, weight, padding=1)
    torch.testing.assert_close(ours, tv_deform_conv2d(x, offset, weight, padding=(1, 1)), atol=1e-4, rtol=0)
    # the compiled path returns a channels-last result (the kernel's row layout), same values
    assert ours.permute(0, 2, 3, 1).is_contiguous()


def test_disabled_by_environment(fresh_library, harness_env):
    harness_env(native="0")
    assert not native.available()
    assert f"{settings.variable('native')}=0" in native.status()
    x, offset, weight = _parity_case()
    torch.testing.assert_close(deform_conv2d(x, offset, weight, padding=1),
                               tv_deform_conv2d(x, offset, weight, padding=(1, 1)), atol=1e-4, rtol=0)


@pytest.mark.parametrize("compiler", ["/bin/false", "/nonexistent/cc"])
def test_failed_build_warns_once_and_falls_back(fresh_library, monkeypatch, compiler):
    monkeypatch.setenv("CC", compiler)
    with pytest.warns(RuntimeWarning, match="native DCN kernel is unavailable"):
        assert not native.available()
    assert native.status().startswith("build failed")
    assert not list(fresh_library.glob("*.so"))
    x, offset, weight = _parity_case()
    out = deform_conv2d(x, offset, weight, padding=1)
    out.sum().backward()
    assert x.grad is not None and offset.grad is not None


def test_rejects_what_the_kernel_cannot_take():
    if not native.available():
        pytest.skip(native.status())
    sampling = native.Sampling((3, 3), (1, 1), (1, 1), (1, 1), (4, 4))
    x = torch.zeros(1, 4, 4, 2, dtype=torch.float16)
    offset = torch.zeros(1, 18, 4, 4, dtype=torch.float16)
    with pytest.raises(TypeError, match="float32/float64"):
        native.columns_forward(x, offset, None, torch.empty(1, 16, 9, 2, dtype=torch.float16), sampling)
    with pytest.raises(TypeError, match="float32"):  # every tensor in x's dtype
        native.columns_forward(x.float(), offset, None, torch.empty(1, 16, 9, 2), sampling)
    x = torch.zeros(1, 2, 4, 4).permute(0, 2, 3, 1)  # not contiguous
    with pytest.raises(ValueError, match="contiguous"):
        native.columns_forward(x, offset.float(), None, torch.empty(1, 16, 9, 2), sampling)
    x = torch.zeros(1, 4, 4, 2)
    for channels in (16, 0):  # 3x3 taps need 18 channels per group
        with pytest.raises(ValueError, match="offset"):
            native.columns_forward(x, torch.zeros(1, channels, 4, 4), None, torch.empty(1, 16, 9, 2), sampling)
    with pytest.raises(ValueError, match="mask"):
        native.columns_forward(x, offset.float(), torch.ones(1, 8, 4, 4), torch.empty(1, 16, 9, 2), sampling)
    with pytest.raises(ValueError, match="as many elements"):  # the backward's columns: grad_cols' size
        native.columns_backward(x, offset.float(), None, torch.zeros(16, 18), sampling, None,
                                torch.empty(1, 18, 4, 4), None, torch.empty(16, 17))
    # corner offsets are 32-bit: an image of 2^31 elements (here a 0-stride view, no memory) is refused
    huge = torch.zeros(1, 1, 1, 2).expand(1, 2**15, 2**15, 2)
    big = native.Sampling((3, 3), (1, 1), (1, 1), (1, 1), (2**15, 2**15))
    with pytest.raises(ValueError, match="2\\^31"):  # (checked where the kernel's geometry is built)
        native._geometry(huge, torch.zeros(1, 18, 1, 1).expand(1, 18, 2**15, 2**15), None, big)
    native._geometry(huge[:, :, : 2**15 - 1], torch.zeros(1, 18, 1, 1).expand(1, 18, 2**15, 2**15 - 1), None,
                     native.Sampling((3, 3), (1, 1), (1, 1), (1, 1), (2**15, 2**15 - 1)))  # just under: taken


def test_a_tile_buffer_that_cannot_be_allocated_is_a_memory_error():
    """Each thread allocates its tile buffer (TILE pixels x taps); if any fails, none works and the
    call raises MemoryError. 2^40 taps ask for petabytes; the tensors are 0-stride views."""
    if not native.available():
        pytest.skip(native.status())
    taps = 2**40
    x = torch.zeros(1, 1, 1, 1)
    offset = torch.zeros(1, 1, 1, 1).expand(1, 2 * taps, 1, 1)
    sampling = native.Sampling((2**20, 2**20), (1, 1), (0, 0), (1, 1), (1, 1))
    with pytest.raises(MemoryError, match="tile"):
        native.columns_forward(x, offset, None, torch.empty(0), sampling)
    with pytest.raises(MemoryError, match="tile"):
        native.columns_backward(x, offset, None, torch.empty(0), sampling, torch.empty_like(x), None, None)

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reads_and_writes_offsets_in_any_layout(dtype):
    """The kernel takes the offset and mask where the predictor left them: a channels-last or a sliced
    offset gives the same values and gradients as a contiguous one, without a copy (in fp32 with AVX-512
    a channels-last tile moves in 16 x 16 register transposes: 18 offset channels are one block and 2 rows)."""
    if not native.available():
        pytest.skip(native.status())
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 9, 9, generator=gen, dtype=dtype)
    weight = torch.randn(4, 5, 3, 3, generator=gen, dtype=dtype)
    wide = torch.randn(2, 40, 9, 9, generator=gen, dtype=dtype) * 2
    mask_wide = torch.rand(2, 20, 9, 9, generator=gen, dtype=dtype)
    pick_offset, pick_mask = (slice(None), slice(3, 21)), (slice(None), slice(5, 14))
    # each layout: the leaves (input, offset source, mask source) and how to view offset and mask in them
    layouts = {
        "contiguous": (wide[pick_offset].contiguous(), mask_wide[pick_mask].contiguous(), lambda t, _: t),
        "channels_last": (wide[pick_offset].contiguous(memory_format=torch.channels_last),
                          mask_wide[pick_mask].contiguous(memory_format=torch.channels_last), lambda t, _: t),
        "sliced": (wide, mask_wide, lambda t, pick: t[pick]),  # views into wider tensors
    }
    results = {}
    for name, (offset_source, mask_source, view) in layouts.items():
        leaves = [t.detach().clone(memory_format=torch.preserve_format).requires_grad_()
                  for t in (x, offset_source, mask_source)]
        offset, mask = view(leaves[1], pick_offset), view(leaves[2], pick_mask)
        assert offset.stride() == view(offset_source, pick_offset).stride()
        out = deform_conv2d(leaves[0], offset, weight, padding=1, mask=mask)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out))
        results[name] = [out.detach(), leaves[0].grad, view(leaves[1].grad, pick_offset),
                         view(leaves[2].grad, pick_mask)]
    assert layouts["channels_last"][0].stride()[1] == 1 and layouts["sliced"][0][pick_offset].stride()[1] == 81
    reference = tv_deform_conv2d(x, wide[pick_offset], weight, padding=(1, 1), mask=mask_wide[pick_mask])
    torch.testing.assert_close(results["contiguous"][0], reference)
    for name in ("channels_last", "sliced"):
        for got, want in zip(results[name], results["contiguous"], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("channels,groups", [(3, 1), (16, 1), (40, 1), (6, 2)])
@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("with_input_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_writes_the_forwards_columns(channels, groups, modulated, with_input_grad, dtype):
    """The backward pass can also write the columns (for the weight's gradient, instead of a second
    forward pass), into their own buffer or over their gradient: the same values as the forward, and
    the same gradients as without them, on every loop the kernel has (3 channels, 16 and 32 in blocks
    of 16, 40, several groups)."""
    if not native.available():
        pytest.skip(native.status())
    gen = torch.Generator().manual_seed(channels)
    sampling = native.Sampling((3, 3), (1, 1), (1, 1), (1, 1), (9, 11))
    x = torch.randn(3, 9, 11, channels, generator=gen, dtype=dtype)
    offset = torch.randn(3, 18 * groups, 9, 11, generator=gen, dtype=dtype) * 4  # many samples leave the image
    mask = torch.rand(3, 9 * groups, 9, 11, generator=gen, dtype=dtype) if modulated else None
    columns = torch.empty(3, 99, 9, channels, dtype=dtype)
    native.columns_forward(x, offset, mask, columns, sampling)
    grad_columns = torch.randn(3 * 99, 9 * channels, generator=gen, dtype=dtype)
    results = []
    # no columns, columns into their own buffer, columns over their gradient (in place)
    for cols in ("none", "separate", "in_place"):
        grad_in = grad_columns.clone()
        cols = {"none": None, "separate": torch.full_like(columns, float("nan")), "in_place": grad_in}[cols]
        grads = [torch.empty_like(x) if with_input_grad else None, torch.empty_like(offset),
                 None if mask is None else torch.empty_like(mask)]
        native.columns_backward(x, offset, mask, grad_in, sampling, *grads, cols)
        results.append((cols, grads))
    for cols, grads in results[1:]:
        torch.testing.assert_close(cols.view_as(columns), columns, rtol=0, atol=0)
        for without, with_columns in zip(results[0][1], grads, strict=True):
            if without is not None:
                torch.testing.assert_close(with_columns, without, rtol=0, atol=0)


def _close_in_fp32(got, want, name):
    """got (fp32) equals want (fp64) to fp32's precision at want's largest magnitude."""
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6 * max(1.0, want.abs().max().item()), msg=name)


@pytest.mark.parametrize("channels,groups,out_channels", [(3, 1, 16), (16, 1, 16), (32, 1, 32), (40, 1, 48),
                                                       (6, 2, 16)])
@pytest.mark.parametrize("modulated", [False, True])
def test_fused_convolution_is_the_columns_times_the_weight(channels, groups, out_channels, modulated):
    """conv_forward/conv_backward (sampling and products tile by tile) give what the columns kernel and
    plain matmuls give: the output, the input's, offset's, mask's and weight's gradients (the weight's
    from every thread's slice). 143 pixels per image: tiles of 64 with a tail, crossing images in
    forward; 27 or 54 column values padded to 32 or 64."""
    if not native.fused_available():
        pytest.skip(f"no fused kernel (AVX2 or AVX-512 only): {native.status()}")
    gen = torch.Generator().manual_seed(channels)
    sampling = native.Sampling((3, 3), (1, 1), (1, 1), (1, 1), (13, 11))
    taps, rows = 9, 3 * 143
    x = torch.randn(3, 13, 11, channels, generator=gen)
    offset = torch.randn(3, 18 * groups, 13, 11, generator=gen) * 4  # many samples leave the image
    mask = torch.rand(3, 9 * groups, 13, 11, generator=gen) if modulated else None
    weight = torch.randn(out_channels, taps * channels, generator=gen)  # [O, K·C], tap-major
    bias = torch.randn(out_channels, generator=gen)
    grad_out = torch.randn(rows, out_channels, generator=gen)
    kcp = native.padded_columns(taps, channels)
    padded = torch.zeros(out_channels, kcp)
    padded[:, : taps * channels] = weight

    columns = torch.empty(3, 143, taps, channels, dtype=torch.float64)
    native.columns_forward(x.double(), offset.double(), None if mask is None else mask.double(), columns, sampling)
    columns = columns.view(rows, -1)
    grad_columns = grad_out.double() @ weight.double()
    want = [torch.empty(x.shape, dtype=torch.float64), torch.empty(offset.shape, dtype=torch.float64),
            None if mask is None else torch.empty(mask.shape, dtype=torch.float64)]
    native.columns_backward(x.double(), offset.double(), None if mask is None else mask.double(), grad_columns,
                            sampling, *want)

    out = native.conv_forward(x, offset, mask, padded.t().contiguous(), bias, sampling)
    _close_in_fp32(out, columns @ weight.double().t() + bias.double(), "output")
    got = [torch.full_like(x, float("nan")), torch.full_like(offset, float("nan")),
           None if mask is None else torch.full_like(mask, float("nan"))]
    grad_weight = native.conv_backward(x, offset, mask, padded, grad_out, sampling, *got, need_weight=True)
    assert grad_weight.shape == (out_channels, taps * channels)
    _close_in_fp32(grad_weight, grad_out.double().t() @ columns, "weight")
    for name, g, w in zip(("x", "offset", "mask"), got, want, strict=True):
        if w is not None:
            _close_in_fp32(g, w, name)
    # the weight's gradient alone (a frozen everything else): only the columns are sampled
    alone = native.conv_backward(x, offset, mask, padded, grad_out, sampling, None, None, None, need_weight=True)
    _close_in_fp32(alone, grad_weight.double(), "weight alone")
    assert native.conv_backward(x, offset, mask, padded, grad_out, sampling, None, None, None, False) is None


def test_fused_convolution_rejects_what_it_cannot_take():
    if not native.fused_available():
        pytest.skip(f"no fused kernel (AVX2 or AVX-512 only): {native.status()}")
    sampling = native.Sampling((3, 3), (1, 1), (1, 1), (1, 1), (4, 4))
    x, offset = torch.zeros(1, 4, 4, 3), torch.zeros(1, 18, 4, 4)
    assert native.padded_columns(9, 3) == 32 and native.padded_columns(9, 16) == 144
    with pytest.raises(ValueError, match="weight_t"):  # 27 rows: not padded to 32
        native.conv_forward(x, offset, None, torch.zeros(27, 16), None, sampling)
    with pytest.raises(ValueError, match="weight_t"):  # 20 outputs: not a multiple of 16
        native.conv_forward(x, offset, None, torch.zeros(32, 20), None, sampling)
    with pytest.raises(ValueError, match="bias"):
        native.conv_forward(x, offset, None, torch.zeros(32, 16), torch.zeros(8), sampling)
    with pytest.raises(TypeError, match="float32"):  # every tensor in x's dtype
        native.conv_forward(x, offset, None, torch.zeros(32, 16, dtype=torch.float64), None, sampling)
    with pytest.raises(ValueError, match="fp32"):
        native.conv_forward(x.double(), offset.double(), None, torch.zeros(32, 16, dtype=torch.float64), None,
                            sampling)
    with pytest.raises(ValueError, match="grad_out"):
        native.conv_backward(x, offset, None, torch.zeros(16, 32), torch.zeros(15, 16), sampling, None, None, None,
                             True)
    with pytest.raises(ValueError, match="grad_offset"):
        native.conv_backward(x, offset, None, torch.zeros(16, 32), torch.zeros(16, 16), sampling, None,
                             torch.zeros(1, 18, 4, 3), None, True)


@pytest.mark.skipif(__import__("platform").machine() != "x86_64", reason="x86 flags")
@pytest.mark.parametrize("flags,fused", [(["-mno-avx512f"], True), (["-mno-avx512f", "-mno-avx2"], False)])
def test_narrower_vector_units_build_what_they_run_well(fresh_library, monkeypatch, flags, fused):
    """Built for a CPU without AVX-512 (here by -mno-avx512f), the library keeps the fused kernel in
    8-float vectors (AVX2) and leaves out the 16-lane loops, which GCC splits badly there (5-35x
    slower); without AVX2 either, it has no fused kernel and deform_conv2d takes the columns path.
    Either way the results are the same."""
    monkeypatch.setattr(native, "FLAGS", [*native.FLAGS, *flags])
    assert native.available() and native.fused_available() == fused
    assert ("fused fp32 layer: on (AVX2, 8-float vectors)" in native.status()) == fused
    x, offset, _ = _parity_case()
    weight = torch.randn(16, 5, 3, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert native.fuses(native.to_channels_last(x), 16, 9, 2 * 8 * 9) == fused
    if not fused:
        with pytest.raises(RuntimeError, match="no fused DCN kernel here: .*neither AVX2 nor AVX-512"):
            native.conv_forward(native.to_channels_last(x.detach()), offset.detach(), None, torch.zeros(48, 16),
                                None, native.Sampling((3, 3), (1, 1), (1, 1), (1, 1), (8, 9)))
    out = deform_conv2d(x, offset, weight, padding=1)
    out.square().sum().backward()
    reference = [t.detach().double().requires_grad_() for t in (x, offset, weight)]
    tv_deform_conv2d(*reference, padding=(1, 1)).square().sum().backward()
    for ours, theirs in zip((x, offset, weight), reference, strict=True):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=0, atol=1e-3)


def test_fused_layer_can_be_turned_off(harness_env):
    """The `fused` switch off keeps the compiled kernel but runs the columns path (to compare the two); the
    results agree."""
    if not native.fused_available():
        pytest.skip(f"no fused kernel (AVX2 or AVX-512 only): {native.status()}")
    assert "fused fp32 layer: on" in native.status()
    x, offset, _ = _parity_case()
    weight = torch.randn(16, 5, 3, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    results = []
    for setting in ("1", "0"):
        harness_env(fused=setting)
        assert native.fuses(native.to_channels_last(x), 16, 9, 2 * 8 * 9) == (setting == "1")
        leaves = [t.detach().clone().requires_grad_() for t in (x, offset, weight)]
        out = deform_conv2d(*leaves, padding=1)
        out.square().sum().backward()
        results.append([out.detach(), *(t.grad for t in leaves)])
    assert f"fused fp32 layer: off ({settings.variable('fused')}=0)" in native.status()
    for fused, columns in zip(*results, strict=True):
        torch.testing.assert_close(fused, columns, rtol=1e-5, atol=1e-4)


def test_no_compiler_warns_and_falls_back(fresh_library, monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        assert not native.available()
    x, offset, weight = _parity_case()
    torch.testing.assert_close(deform_conv2d(x, offset, weight, padding=1),
                               tv_deform_conv2d(x, offset, weight, padding=(1, 1)), atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 33, 17, 16), (2, 16, 32, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pad", [(0, 0), (1, 1), (2, 0), (0, 3)])
def test_to_channels_last_is_a_padded_transpose(shape, dtype, pad):
    if not native.available():
        pytest.skip(native.status())
    x = torch.randn(*shape, dtype=dtype)
    want = torch.nn.functional.pad(x, (pad[1], pad[1], pad[0], pad[0])).permute(0, 2, 3, 1)
    for source in (x, x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
        out = native.to_channels_last(source, *pad)
        assert out.is_contiguous()
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    already = x.contiguous(memory_format=torch.channels_last)
    assert native.to_channels_last(already).data_ptr() == already.data_ptr()  # no copy
    back = native.from_channels_last(native.to_channels_last(x, *pad), *pad)
    assert back.is_contiguous()
    torch.testing.assert_close(back, x, rtol=0, atol=0)
