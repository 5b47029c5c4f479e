"""The opt-in Triton kernels of the CUDA path, called directly (Triton's interpreter on machines without
CUDA). Through `deform_conv2d` against torchvision they are tested in tests/ops/test_triton.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness.kernels import triton_kernels
from harness.kernels.native import Sampling

interpreted = pytest.mark.skipif(
    triton_kernels.triton is None or not triton_kernels._interpreted(),
    reason="needs triton, run by its interpreter (TRITON_INTERPRET=1, set on machines without CUDA)",
)


def test_off_unless_asked(harness_env):
    harness_env(triton=None)
    assert not triton_kernels.applies(torch.device("cuda"))
    assert "off" in triton_kernels.status() or "not installed" in triton_kernels.status()
    harness_env(triton="1")
    assert triton_kernels.applies(torch.device("cuda")) == (triton_kernels.triton is not None)
    harness_env(triton="0")
    assert not triton_kernels.applies(torch.device("cuda"))


@interpreted
@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_zero_offsets_give_unfold(stride, padding, dilation, channels_last):
    """With zero offsets the deformable columns are the ordinary ones, F.unfold's, row c·K + k."""
    x = torch.randn(2, 5, 7, 9, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = F.unfold(x, 3, dilation, padding, stride)
    ho = (7 + 2 * padding - 2 * dilation - 1) // stride + 1
    wo = (9 + 2 * padding - 2 * dilation - 1) // stride + 1
    # a non-contiguous offset (every other channel of a wider tensor): read through its strides
    offset = torch.zeros(2, 36, ho, wo, dtype=torch.float64)[:, ::2]
    sampling = Sampling((3, 3), (stride,) * 2, (padding,) * 2, (dilation,) * 2, (ho, wo))
    columns = triton_kernels.columns(x, offset, None, sampling, torch.float64)
    torch.testing.assert_close(columns, expected, atol=0, rtol=0)


@interpreted
def test_whole_pixel_shift_moves_the_columns_and_the_backward_adds_back():
    """An offset of exactly (+1, 0) reads the next row; the backward of all-ones columns counts the reads."""
    x = torch.arange(2 * 4 * 5, dtype=torch.float32).view(1, 2, 4, 5)
    sampling = Sampling((1, 1), (1, 1), (0, 0), (1, 1), (4, 5))
    offset = torch.zeros(1, 2, 4, 5)
    offset[:, 0] = 1.0  # Δy = +1 for every pixel
    columns = triton_kernels.columns(x, offset, None, sampling, torch.float32)
    shifted = torch.cat([x[:, :, 1:], torch.zeros(1, 2, 1, 5)], dim=2)
    torch.testing.assert_close(columns.view(1, 2, 4, 5), shifted)
    grad_x = torch.zeros_like(x)
    triton_kernels.columns_backward(x, offset, None, torch.ones(1, 2, 20), sampling, grad_x, None, None)
    reads = torch.ones(1, 2, 4, 5)
    reads[:, :, 0] = 0  # row 0 is nobody's next row
    torch.testing.assert_close(grad_x, reads)


COMPILE_FOR_H100 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from harness.kernels import triton_kernels as tk

constants = dict(KH=3, KW=3, HAS_MASK=True, BLOCK_C=16, BLOCK_P=tk.BLOCK_PIXELS)
flags = dict(NEED_X=True, NEED_OFFSET=True, NEED_MASK=True)
for kernel, extra, pointers in [
    (tk._im2col_kernel, {}, ["*fp32", "*fp32", "*fp32", "*bf16"]),
    (tk._col2im_kernel, flags, ["*fp32", "*fp32", "*fp32", "*bf16", "*fp32", "*fp32", "*fp32"]),
    (tk._col2im_kernel, flags, ["*fp64"] * 7),
]:
    fixed = {**constants, **extra}
    names = kernel.arg_names
    signature = {name: "constexpr" if name in fixed else (pointers[i] if i < len(pointers) else "i32")
                 for i, name in enumerate(names)}
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in fixed.items()})
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    print(kernel.__name__, "acq_rel" in ptx, ptx.count("relaxed.add"))
"""


@pytest.mark.skipif(triton_kernels.triton is None, reason="triton is not installed")
def test_kernels_compile_for_an_h100_with_relaxed_atomics(tmp_path):
    """The interpreter does not run Triton's compiler: compile for sm_90 here (no GPU needed). Triton's
    default acquire-release atomics made the backward 2x slower on an H100; they must stay relaxed."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_H100], env=env, capture_output=True, text=True,
                          timeout=240, check=False)
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip(f"no ptxas for Triton here: {done.stderr.strip()[-200:]}")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.split()
    assert lines[0::3] == ["_im2col_kernel", "_col2im_kernel", "_col2im_kernel"]
    assert lines[1::3] == ["False"] * 3  # no acquire-release atomics
    assert all(int(count) > 0 for count in lines[5::3])  # the backward's atomics are relaxed adds
