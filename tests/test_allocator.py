"""steady_heap: malloc settings applied once, and an opt-out."""

from __future__ import annotations

import sys

import pytest

from harness import allocator


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_applies_on_linux_and_is_idempotent(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", False)
    assert allocator.steady_heap() is True
    assert allocator.steady_heap() is True


def test_opt_out(monkeypatch, harness_env):
    monkeypatch.setattr(allocator, "_applied", False)
    harness_env(steady_heap="0")
    assert allocator.steady_heap() is False
