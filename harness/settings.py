"""Every environment switch of the harness, read in one place, and MLflow's client defaults, set in one place.

The `HARNESS_*` variables are read once, when this module is first imported (a process's environment is
fixed by then; torchrun ranks and Ray workers read their own copy). `reload()` reads them again, for
tests and for a caller that changed `os.environ` on purpose. Every other module asks `current()`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from harness.errors import HarnessError

PREFIX = "HARNESS_"

# MLflow's HTTP client retries for minutes by default; a harness user wants a quick answer. A server that
# answered once and then went away is retried longer by the harness itself (`tracking_retry_s`).
MLFLOW_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # no tqdm bar per small artifact
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # read when mlflow is first imported
}


@dataclass(frozen=True)
class Settings:
    """The switches; each field is read from `HARNESS_<FIELD>` (upper case)."""

    coco_root: str | None = None  # a COCO root used when neither --data-root nor data.root gives one
    optuna_storage: str | None = None  # Optuna storage URL used when --storage is not given
    cache_dir: Path = Path.home() / ".cache" / "harness"  # compiled kernels and C++ ops
    native: bool = True  # the compiled C kernel on the CPU (0: the PyTorch columns path)
    fused: bool = True  # the C kernel's fused fp32 layer (0: sampling then oneDNN matmuls)
    cpp: bool = True  # the C++ autograd op for GPU layers (0: the same steps from Python)
    triton: bool = False  # the Triton kernels on CUDA (1: on)
    split: bool = False  # GPU sampling in channel slices (1: on)
    steady_heap: bool = True  # glibc malloc tuned so epoch times measure compute (0: glibc's defaults)
    # seconds a run keeps retrying a tracking server that answered before and stopped answering (0: no retry)
    tracking_retry_s: float = 180.0
    # a checkpoint artifact every N epochs while a run trains, for resume without a shared disk (0: at the end only)
    checkpoint_upload_every: int = 1
    # seconds a new run waits on a lockless store (an HTTP tracking server) before checking for a rival run
    claim_settle_s: float = 2.0

    def switches(self) -> str:
        """The switches that differ from their defaults, as JSON (logged with every run)."""
        default = Settings()
        changed = {variable(f.name): _text(getattr(self, f.name)) for f in fields(self)
                   if getattr(self, f.name) != getattr(default, f.name)}
        return json.dumps(changed, sort_keys=True)


def variable(name: str) -> str:
    """The environment variable behind field `name`, e.g. 'cpp' → 'HARNESS_CPP'."""
    return PREFIX + name.upper()


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _flag(text: str | None, default: bool) -> bool:
    if text is None or text.strip() == "":
        return default
    return text.strip() not in ("0", "false", "False", "no", "off")


def _number(name: str, text: str | None, default: float) -> float:
    """A non-negative number switch (an int where the default is one); a HarnessError names a bad value."""
    if text is None or text.strip() == "":
        return default
    try:
        value = type(default)(text.strip())
    except ValueError:
        value = -1
    if value < 0:
        raise HarnessError(f"{variable(name)}={text!r}: expected a number >= 0")
    return value


def _read(environ: os._Environ[str] | dict[str, str]) -> Settings:
    values: dict[str, object] = {}
    defaults = asdict(Settings())
    for f in fields(Settings):
        text = environ.get(variable(f.name))
        default = defaults[f.name]
        if isinstance(default, bool):
            values[f.name] = _flag(text, default)
        elif isinstance(default, Path):
            values[f.name] = Path(text).expanduser() if text else default
        elif isinstance(default, int | float):
            values[f.name] = _number(f.name, text, default)
        else:
            values[f.name] = text or None
    return Settings(**values)  # type: ignore[arg-type]


_current = _read(os.environ)


def current() -> Settings:
    """The switches as read at import (or at the last `reload()`)."""
    return _current


def reload() -> Settings:
    """Read the environment again (tests that set a switch; a caller that changed os.environ on purpose)."""
    global _current
    _current = _read(os.environ)
    return _current


def apply_mlflow_defaults() -> None:
    """MLflow's client settings the harness wants, unless the user set them: called before any client is made."""
    for key, value in MLFLOW_DEFAULTS.items():
        os.environ.setdefault(key, value)
