"""Where a run's checkpoints live, and how they are written and read: tensors and plain data only.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts (the resolved config among them),
read with `torch.load(weights_only=True)`, so a crafted file cannot run code. Each run keeps two:
`last.pt` and the one before it, `previous.pt`; a new one is written to a temporary file and renamed
into place, so a crash leaves one of them whole. A file that cannot be read is moved aside with a
warning and the run resumes from the other, or from scratch. Paths are built only from validated
names: the ablation's and a 12-hex-digit config hash.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from harness.errors import HarnessError, HarnessWarning, one_line

CHECKPOINT_DIR = "checkpoints"
LAST, PREVIOUS = "last.pt", "previous.pt"
HASH_PATTERN = re.compile(r"^[0-9a-f]{12}$")
ABLATION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


class CheckpointWarning(HarnessWarning):
    """A checkpoint could not be read and was moved aside."""


def checkpoint_path(results_dir: Path, ablation: str, config_hash: str) -> Path:
    """`<results>/checkpoints/<ablation>/<config hash>/last.pt`: one ablation's run never touches
    another's, even with the same config. A HarnessError for a name or hash of any other form."""
    if not isinstance(config_hash, str) or not HASH_PATTERN.match(config_hash):
        raise HarnessError(f"not a config hash: {config_hash!r} (expected 12 hex digits)")
    if not isinstance(ablation, str) or not ABLATION_PATTERN.match(ablation) or ablation in (".", ".."):
        raise HarnessError(f"not an ablation name: {ablation!r}")
    return Path(results_dir) / CHECKPOINT_DIR / ablation / config_hash / LAST


def find_checkpoint(results_dir: Path, ablation: str, config_hash: str) -> Path:
    """The run's last checkpoint for reading: `checkpoint_path`, or where versions that kept one directory
    for every ablation put it (`<results>/checkpoints/<config hash>/last.pt`) when only that exists."""
    path = checkpoint_path(results_dir, ablation, config_hash)
    shared = Path(results_dir) / CHECKPOINT_DIR / config_hash / LAST
    return shared if not path.is_file() and shared.is_file() else path


def previous_path(path: Path) -> Path:
    return path.with_name(PREVIOUS)


def exists(path: Path) -> bool:
    """Whether the run has a checkpoint to resume from (its last one or the one before)."""
    return path.exists() or previous_path(path).exists()


def remove(path: Path) -> None:
    """Delete a run's checkpoints (a checkpoint without its MLflow run cannot be resumed honestly)."""
    for candidate in (path, previous_path(path)):
        candidate.unlink(missing_ok=True)


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write `state` as the run's last checkpoint, keeping the one before as previous.pt.

    The temporary file is removed whatever happens; a full disk is a one-line HarnessError.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        if path.exists():
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise HarnessError(f"cannot write checkpoint {path}: {exc.strerror}") from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The state saved at `path`, read without unpickling code (`weights_only=True`)."""
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or "epoch" not in state:
        raise HarnessError(f"{path} is not a harness checkpoint")
    return state


def _move_aside(path: Path, exc: BaseException) -> None:
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.replace(path, aside)
    reason = one_line(exc, with_type=False).removeprefix("Weights only load failed. ")[:200]
    warnings.warn(CheckpointWarning(f"checkpoint {path} cannot be read ({reason}); moved aside to {aside.name}"),
                  stacklevel=3)


def load_resumable(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The newest readable checkpoint of a run (last.pt, else previous.pt), or None to start from scratch.

    An unreadable file (truncated, corrupt, or holding objects that weights_only refuses) is moved aside
    with a CheckpointWarning naming it.
    """
    for candidate in (path, previous_path(path)):
        if not candidate.exists():
            continue
        try:
            return load_checkpoint(candidate, map_location)
        except Exception as exc:  # any failure to read: this file is not a resumable checkpoint
            _move_aside(candidate, exc)
    return None


def saved_epoch(path: Path) -> int:
    """The last epoch the run's checkpoints hold; 0 when there is none readable."""
    for candidate in (path, previous_path(path)):
        if candidate.exists():
            with contextlib.suppress(Exception):
                return int(load_checkpoint(candidate)["epoch"])
    return 0
