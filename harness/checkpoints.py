"""Where a run's checkpoint lives, and how it is written and read: tensors and plain data only.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts (the resolved config among them),
written atomically (a temporary file, then a rename) and read with `torch.load(weights_only=True)`, so
a crafted file cannot run code. The path is built only from a validated config hash.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any

import torch

from harness.errors import HarnessError

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FILE = "last.pt"
HASH_PATTERN = re.compile(r"^[0-9a-f]{12}$")


def checkpoint_path(results_dir: Path, config_hash: str) -> Path:
    """`<results>/checkpoints/<config hash>/last.pt`; a HarnessError for anything but a 12-hex-digit hash."""
    if not isinstance(config_hash, str) or not HASH_PATTERN.match(config_hash):
        raise HarnessError(f"not a config hash: {config_hash!r} (expected 12 hex digits)")
    return Path(results_dir) / CHECKPOINT_DIR / config_hash / CHECKPOINT_FILE


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write `state` to `path` atomically; the temporary file is removed whatever happens."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The state saved at `path`, read without unpickling code (`weights_only=True`)."""
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict):
        raise HarnessError(f"{path} is not a harness checkpoint (a {type(state).__name__}, not a dict)")
    return state


def saved_epoch(path: Path) -> int:
    """The last epoch a checkpoint holds; 0 when there is none or it cannot be read (fit reports why)."""
    if not path.exists():
        return 0
    try:
        return int(load_checkpoint(path)["epoch"])
    except Exception:
        return 0
