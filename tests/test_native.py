"""The compiled CPU kernel: built once into the cache, optional, and a clean fallback when it can't be."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import deform_conv2d as tv_deform_conv2d

from harness import native
from harness.ops import deform_conv2d


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """A fresh `native.library()` with its own cache directory; the normal one is restored afterwards."""
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path))
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


def test_disabled_by_environment(fresh_library, monkeypatch):
    monkeypatch.setenv("HARNESS_NATIVE", "0")
    assert not native.available()
    assert "HARNESS_NATIVE=0" in native.status()
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
    x = torch.zeros(1, 4, 4, 2, dtype=torch.float16)
    pos = torch.zeros(1, 16, 1, 9, 2, dtype=torch.float16)
    with pytest.raises(TypeError, match="float32/float64"):
        native.columns_forward(x, pos, None, torch.empty(1, 16, 9, 2, dtype=torch.float16))
    x = torch.zeros(1, 2, 4, 4).permute(0, 2, 3, 1)  # not contiguous
    with pytest.raises(ValueError, match="contiguous"):
        native.columns_forward(x, pos.float(), None, torch.empty(1, 16, 9, 2))


def test_no_compiler_warns_and_falls_back(fresh_library, monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        assert not native.available()
    x, offset, weight = _parity_case()
    torch.testing.assert_close(deform_conv2d(x, offset, weight, padding=1),
                               tv_deform_conv2d(x, offset, weight, padding=(1, 1)), atol=1e-4, rtol=0)
