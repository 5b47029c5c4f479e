"""The Triton kernels' path through `deform_conv2d`, in Triton's interpreter on machines without CUDA."""

from __future__ import annotations

import pytest
import torch

from harness.ops import common

from .conftest import CASES, assert_matches_torchvision


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_triton_kernels_match_torchvision(case, triton_interpreted):
    """The GPU path's kernels, every geometry, in fp64 (fp32 runs the same code; the CUDA tests use it)."""
    assert_matches_torchvision(case, torch.float64, 1e-10)


def test_triton_kernels_in_chunks_match_torchvision(triton_interpreted, monkeypatch):
    monkeypatch.setattr(common, "COLUMN_CHUNK_BYTES", 1)  # chunks of one image per thread
    assert_matches_torchvision(dict(n=5, c=8, o=4, groups=2, offset_groups=2), torch.float64, 1e-10)
