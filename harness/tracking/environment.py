"""What a run ran on, as MLflow tags: code version, device, DCN implementation, switches, packages, host."""

from __future__ import annotations

import getpass
import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path

import torch

from harness import __version__, settings
from harness.ops import kernel_summary
from harness.tracking import names

PACKAGES = ("torchvision", "numpy", "pillow", "pycocotools", "mlflow", "optuna")


def git_commit() -> str:
    """The short commit of the harness's own checkout, or 'unknown' (an installed copy, no git)."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5, check=False,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() or "unknown"


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, check=False, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the uid (containers)
        return str(os.getuid())


def source_tags(entry_point: str, cwd: Path | None = None) -> dict[str, str]:
    """MLflow's own source tags, so the UI shows who ran what from which commit.

    The commit is that of the working directory's repository (the researcher's experiment code), not the
    installed harness; `harness.git_dirty` says whether that tree had uncommitted changes.
    """
    where = cwd or Path.cwd()
    tags = {names.MLFLOW_SOURCE_NAME: entry_point, names.MLFLOW_SOURCE_TYPE: "LOCAL", names.MLFLOW_USER: _user()}
    commit = _git(["rev-parse", "HEAD"], where)
    if commit:
        tags[names.MLFLOW_SOURCE_GIT_COMMIT] = commit
        status = _git(["status", "--porcelain", "--untracked-files=no"], where)
        tags[names.GIT_DIRTY] = "unknown" if status is None else str(bool(status)).lower()
    return tags


def package_versions() -> str:
    """The versions a result depends on, e.g. 'torchvision 0.29.1, mlflow 3.17.2, ...'."""
    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return str(device)


def environment_tags(device: torch.device, *, with_process: bool = True) -> dict[str, str]:
    """Tags every run records. `with_process=False` leaves out host and pid (a study's run outlives them)."""
    tags = {
        names.GIT_COMMIT: git_commit(),
        names.DEVICE: device_name(device),
        names.DCN_KERNEL: kernel_summary(device),
        names.SETTINGS: settings.current().switches(),
        names.TORCH: torch.__version__,
        names.CUDA: torch.version.cuda or "none",
        names.VERSION: __version__,
        names.PYTHON: platform.python_version(),
        names.PACKAGES: package_versions(),
    }
    if with_process:
        tags[names.HOST] = socket.gethostname()
        tags[names.PID] = str(os.getpid())
    return tags
