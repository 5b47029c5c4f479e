"""Which torch device a run uses: 'auto' resolved, an unavailable explicit device a one-line error."""

from __future__ import annotations

import torch

from harness.errors import HarnessError


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(name: str) -> torch.device:
    """'auto' → cuda, else mps, else cpu; an unavailable explicit device is a clear error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise HarnessError("--device cuda: no CUDA device is available on this machine")
    if name == "mps" and not mps_available():
        raise HarnessError("--device mps: MPS is not available on this machine")
    return torch.device(name)
