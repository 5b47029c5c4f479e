"""A torch.profiler window over a few training steps: trace for TensorBoard/Perfetto, op table, DCN share.

Traces go through `tensorboard_trace_handler`, so `tensorboard --logdir results/profiles` shows them
with the torch-tb-profiler plugin; the `.pt.trace.json` files also open in https://ui.perfetto.dev.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

from harness.config import ProfileConfig
from harness.ops import SAMPLING_SCOPE


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Kineto writes start/stop lines (and, without a GPU, an error) straight to fd 2: hide those only."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)

# torchvision's fused DCN kernels (backend: torchvision); our own sampling runs inside SAMPLING_SCOPE.
TORCHVISION_DCN_OPS = ("torchvision::deform_conv2d", "torchvision::_deform_conv2d_backward")


@dataclass
class OpRow:
    name: str
    calls: int
    self_cpu_ms: float
    self_cuda_ms: float
    cpu_total_ms: float
    share: float


@dataclass
class ProfileSummary:
    ops: list[OpRow] = field(default_factory=list)
    deform_share: float = 0.0
    step_ms: float = 0.0
    trace_dir: str = ""

    def op_table_csv(self) -> str:
        lines = ["name,calls,self_cpu_ms,self_cuda_ms,cpu_total_ms,share"]
        for op in self.ops:
            name = op.name.replace('"', "'")
            lines.append(
                f'"{name}",{op.calls},{op.self_cpu_ms:.4f},{op.self_cuda_ms:.4f},{op.cpu_total_ms:.4f},{op.share:.6f}'
            )
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for a checkpoint read with weights_only=True."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProfileSummary:
        return cls(ops=[OpRow(**row) for row in data.get("ops", [])], deform_share=data.get("deform_share", 0.0),
                   step_ms=data.get("step_ms", 0.0), trace_dir=data.get("trace_dir", ""))


class ProfileWindow:
    """Call `step()` after every training step; the profiler records steps wait+warmup..+active.

    When disabled, or once the window has closed, `step()` costs nothing.
    """

    def __init__(self, config: ProfileConfig, trace_dir: Path, total_steps: int) -> None:
        self.config = config
        self.trace_dir = trace_dir
        budget = max(0, total_steps - config.wait - config.warmup)
        self.active = min(config.active, budget)
        self.enabled = config.enabled and self.active > 0
        self._profiler: profile | None = None
        self._steps = 0
        self._window_start = 0.0
        self._window_steps = 0
        self._window_s = 0.0
        self.summary: ProfileSummary | None = None

    def __enter__(self) -> ProfileWindow:
        if self.enabled:
            self.trace_dir.mkdir(parents=True, exist_ok=True)
            activities = [ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(ProfilerActivity.CUDA)
            self._profiler = profile(
                activities=activities,
                schedule=schedule(wait=self.config.wait, warmup=self.config.warmup, active=self.active, repeat=1),
                on_trace_ready=tensorboard_trace_handler(str(self.trace_dir)),
                record_shapes=self.config.record_shapes,
                profile_memory=self.config.profile_memory,
                with_stack=self.config.with_stack,
            )
            with _quiet_native_stderr():
                self._profiler.__enter__()
        return self

    def step(self) -> None:
        if self._profiler is None:
            return
        now = time.perf_counter()
        if self._steps == self.config.wait + self.config.warmup:
            self._window_start = now
        self._steps += 1
        if self.config.wait + self.config.warmup < self._steps <= self.config.wait + self.config.warmup + self.active:
            self._window_steps += 1
            self._window_s = now - self._window_start
        with _quiet_native_stderr():
            self._profiler.step()
        if self._steps >= self.config.wait + self.config.warmup + self.active:
            self._close()

    def _close(self) -> None:
        if self._profiler is None:
            return
        profiler, self._profiler = self._profiler, None
        with _quiet_native_stderr():
            profiler.__exit__(None, None, None)
        self.summary = summarise(profiler, self.config.top_n, str(self.trace_dir))
        if self._window_steps:
            self.summary.step_ms = 1000 * self._window_s / self._window_steps

    def __exit__(self, *exc: Any) -> None:
        self._close()


def summarise(profiler: profile, top_n: int, trace_dir: str) -> ProfileSummary:
    """Top operators by self time, and the share of the window's time inside deformable sampling.

    The share is the time of the `harness.ops.SAMPLING_SCOPE` ranges (forward and backward sampling
    of our DCN, with everything they call: on the CPU in fp32 the whole layer, whose fused kernel also
    does the products) plus torchvision's fused DCN kernels, over the total self
    time of every operator: device time on a GPU, CPU time otherwise.
    """
    try:
        averages = profiler.key_averages()
        events = profiler.events()
    except (AssertionError, RuntimeError):  # no completed window
        return ProfileSummary(trace_dir=trace_dir)
    rows = []
    for event in averages:
        if event.key == SAMPLING_SCOPE:
            continue
        self_cpu = event.self_cpu_time_total / 1000
        self_cuda = getattr(event, "self_device_time_total", 0) / 1000
        rows.append((event.key, event.count, self_cpu, self_cuda, event.cpu_time_total / 1000))
    on_device = sum(r[3] for r in rows) > 0
    total = sum(r[3] if on_device else r[2] for r in rows) or 1.0
    rows.sort(key=lambda r: r[3] if on_device else r[2], reverse=True)
    deform_cpu = deform_device = 0.0
    calls = 0
    for event in events:
        if event.name == SAMPLING_SCOPE or any(marker in event.name for marker in TORCHVISION_DCN_OPS):
            deform_cpu += event.cpu_time_total / 1000
            deform_device += event.device_time_total / 1000
            calls += 1
    deform = deform_device if on_device else deform_cpu
    ops = [OpRow(name, n, cpu, cuda, tot, (cuda if on_device else cpu) / total)
           for name, n, cpu, cuda, tot in rows[:top_n]]
    if calls:  # one row for all deformable sampling (its ops also appear above under their own names)
        ops.append(OpRow(f"{SAMPLING_SCOPE} (all sampling ops)", calls, deform_cpu, deform_device, deform_cpu,
                         deform / total))
        ops.sort(key=lambda op: op.self_cuda_ms if on_device else op.self_cpu_ms, reverse=True)
    return ProfileSummary(ops=ops, deform_share=min(1.0, deform / total), trace_dir=trace_dir)
