"""What the backends share: the batch's chunks and the profiler's sampling scope."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import profile

from harness.ops import SAMPLING_SCOPE, DeformConv2d, common

from .conftest import MatmulDtypes


def test_cuda_chunks_are_large_and_cpu_chunks_follow_the_threads(monkeypatch):
    monkeypatch.setattr(common, "COLUMN_CHUNK_BYTES", 3 * 2**20)
    monkeypatch.setattr(common, "CUDA_COLUMN_CHUNK_BYTES", 100 * 2**20)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    mib = 2**20
    assert common.image_chunks(10, mib, torch.device("cuda")) == [slice(0, 10)]
    assert common.image_chunks(10, 40 * mib, torch.device("cuda")) == [slice(0, 2), slice(2, 4), slice(4, 6),
                                                                             slice(6, 8), slice(8, 10)]
    # CPU: 3 images fit, rounded down to a multiple of 2 threads
    assert common.image_chunks(5, mib, torch.device("cpu")) == [slice(0, 2), slice(2, 4), slice(4, 5)]


@pytest.mark.parametrize("layout", ["per_tap", "shared"])
def test_sampling_scope_is_recorded_only_while_profiling(layout, cpu_kernel):
    layer = DeformConv2d(4, 4, 3, padding=1, offset_channels=layout)
    x = torch.randn(2, 4, 9, 9)
    with profile() as prof:
        layer(x).sum().backward()
    assert sum(event.key == SAMPLING_SCOPE for event in prof.key_averages()) == 1
    with MatmulDtypes() as record:  # any dispatch mode sees the scope's enter/exit ops
        record.HEAVY = {torch.ops.profiler._record_function_enter_new}
        layer(x).sum().backward()
    assert record.dtypes == []
