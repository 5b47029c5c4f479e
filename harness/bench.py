"""Speed and memory benchmarks: the single source of the figures in docs/benchmarks.md.

`bench_ops` times forward+backward of one layer (conv2d, our DCN in each layout, torchvision's DCN);
`bench_model` times whole training steps of the assignment's network for each deformable placement.
Timings are medians over repetitions after a warm-up, with the thread count fixed.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import ValidationError

from harness.allocator import steady_heap
from harness.config import ModelConfig
from harness.data import DataCache
from harness.errors import HarnessError
from harness.models import MODELS, DeformOptions, build_network, create_model
from harness.ops import (
    columns_times_weight,
    columns_times_weight_backward,
    deform_conv2d,
    deform_conv2d_shared,
    expand_shared_offset,
    image_chunks,
)
from harness.planning import AblationSpec, expand
from harness.runner import RunnerOptions, run_ablation
from harness.tracking.store import AblationStore
from harness.train import AMP_DTYPES, Trainer, fit, train_step

# (N, C, O, H=W, stride, dilation): three layer sizes of a small DCN network, plus a stride-2 and a dilation-2 case.
DEFAULT_SHAPES: list[tuple[int, int, int, int, int, int]] = [
    (8, 32, 32, 64, 1, 1),
    (16, 64, 64, 32, 1, 1),
    (16, 128, 128, 16, 1, 1),
    (16, 64, 64, 32, 2, 1),
    (16, 64, 64, 32, 1, 2),
]
IMPLS = ("conv2d", "per_tap", "shared", "modulated", "torchvision", "im2col_gemm")
MODEL_WIDTH = 0.25  # `bench model`'s width multiplier for the harness's own networks, unless given


@dataclass
class LayerShape:
    n: int
    c: int
    o: int
    size: int
    stride: int = 1
    dilation: int = 1
    kernel: int = 3

    @property
    def label(self) -> str:
        extra = "".join(
            f" {name}{v}" for name, v in (("s", self.stride), ("d", self.dilation)) if v != 1
        )
        return f"{self.n}x{self.c}->{self.o} @{self.size}{extra}"

    @classmethod
    def parse(cls, text: str) -> LayerShape:
        """'N,C,O,H[,stride[,dilation]]' → LayerShape."""
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            values = []
        if not 4 <= len(values) <= 6 or min(values) < 1:
            raise HarnessError(f"shape {text!r} must be N,C,O,H[,stride[,dilation]] with positive integers")
        return cls(*values)


def _im2col_gemm(
    shape: LayerShape, w: torch.Tensor, out: int, gen: torch.Generator, dtype: torch.dtype, device: str
) -> Callable[[], None]:
    """Only the matmuls of the per-tap layer (output, weight gradient, column gradient) on ready-made
    columns, done as the op does them: the floor of any sample-then-matmul DCN here."""
    taps = shape.kernel * shape.kernel
    columns = torch.randn(shape.n * out * out, taps * shape.c, generator=gen, dtype=dtype).to(device)
    grad_out = torch.randn(shape.n * out * out, shape.o, generator=gen, dtype=dtype).to(device)
    weight = w.reshape(shape.o, shape.c * taps)
    per_image = out * out * taps * shape.c * columns.element_size()

    def run() -> None:  # in the op's chunks: chunk-sized matmuls stay in cache
        for part in image_chunks(shape.n, per_image):
            columns_times_weight(columns[part.start * out * out : part.stop * out * out], weight, (out, out))
        for part in image_chunks(shape.n, per_image):  # the column gradient, then the weight's
            rows = slice(part.start * out * out, part.stop * out * out)
            columns_times_weight_backward(columns[rows], weight, grad_out[rows], (out, out), False, True)
            columns_times_weight_backward(columns[rows], weight, grad_out[rows], (out, out), True, False)

    return run


def make_case(
    shape: LayerShape, impl: str, dtype: torch.dtype = torch.float32, device: str = "cpu", amp: str = "none",
    synchronize: bool = True,
) -> Callable[[], None]:
    """A closure running forward+backward of one layer implementation on fixed random tensors.

    `amp` = bf16 / fp16 runs the forward under autocast (fp32 tensors in, like a network under AMP).
    On CUDA each call waits for the GPU unless `synchronize` is False (`interleaved_ms` times blocks).
    """
    gen = torch.Generator().manual_seed(0)
    k, pad = shape.kernel, shape.dilation * (shape.kernel // 2)

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.to(device).requires_grad_()

    x = leaf(torch.randn(shape.n, shape.c, shape.size, shape.size, generator=gen, dtype=dtype))
    w = leaf(torch.randn(shape.o, shape.c, k, k, generator=gen, dtype=dtype) * 0.05)
    b = leaf(torch.zeros(shape.o, dtype=dtype))
    out = (shape.size + 2 * pad - shape.dilation * (k - 1) - 1) // shape.stride + 1
    taps = k * k
    geometry = (shape.stride, pad, shape.dilation)

    def shared_offset() -> torch.Tensor:
        return leaf(torch.randn(shape.n, 2, out, out, generator=gen, dtype=dtype) * 2)

    def tap_offset() -> torch.Tensor:
        return leaf(torch.randn(shape.n, 2 * taps, out, out, generator=gen, dtype=dtype) * 2)

    if impl == "conv2d":
        def run() -> None:
            F.conv2d(x, w, b, shape.stride, pad, shape.dilation).sum().backward()
    elif impl == "shared":
        off = shared_offset()

        def run() -> None:
            deform_conv2d_shared(x, off, w, b, *geometry).sum().backward()
    elif impl == "per_tap":
        off = tap_offset()

        def run() -> None:
            deform_conv2d(x, off, w, b, *geometry).sum().backward()
    elif impl == "modulated":
        off = tap_offset()
        mask = leaf(torch.rand(shape.n, taps, out, out, generator=gen, dtype=dtype))

        def run() -> None:
            deform_conv2d(x, off, w, b, *geometry, mask=mask).sum().backward()
    elif impl == "torchvision":
        from torchvision.ops import deform_conv2d as tv_deform_conv2d

        off = tap_offset()

        def run() -> None:
            tv_deform_conv2d(x, off, w, b, *geometry).sum().backward()
    elif impl == "im2col_gemm":
        run = _im2col_gemm(shape, w.detach(), out, gen, dtype, device)
    elif impl == "shared_expanded":
        off = shared_offset()

        def run() -> None:
            deform_conv2d(x, expand_shared_offset(off, taps), w, b, *geometry).sum().backward()
    else:
        raise HarnessError(f"unknown implementation {impl!r}; known: {', '.join(IMPLS)}")
    amp_dtype = AMP_DTYPES.get(amp)
    device_type = torch.device(device).type

    def timed() -> None:
        with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            run()
        if synchronize and device_type == "cuda":
            torch.cuda.synchronize()

    return timed


# On a GPU a layer call at the benchmark's sizes is bound by the host, and the host's speed drifts by
# tens of percent within a minute: cases are timed in turns, in blocks of calls with one synchronize
# per block, so that host and device overlap as they do in training and every case sees the same drift.
CUDA_BLOCK_CALLS = 10
CUDA_ROUNDS = 15


def interleaved_ms(
    cases: dict[str, Callable[[], None]], rounds: int, block: int, warmup: int = 3,
    synchronize: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """Median milliseconds per call of each case, the cases taking turns (a block of `block` calls each,
    `synchronize()` after every block) for `rounds` rounds."""
    for run in cases.values():
        for _ in range(warmup):
            run()
    synchronize()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, run in cases.items():
            t0 = time.perf_counter()
            for _ in range(block):
                run()
            synchronize()
            times[name].append((time.perf_counter() - t0) * 1000 / block)
    return {name: statistics.median(t) for name, t in times.items()}


def median_ms(fn: Callable[[], None], warmup: int, reps: int, min_time_s: float = 0.0) -> float:
    """Median wall-clock of fn in milliseconds after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start < min_time_s and len(times) < 10 * reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def peak_memory_mb(shape: LayerShape, impl: str) -> float:
    """Peak extra resident memory (MiB) of one forward+backward, measured in a fresh process.

    After a warm-up call (whose buffers are freed again), a thread samples the process's RSS every
    0.2 ms during a second call; the figure is the peak minus the RSS before it. Large tensors are
    mmap-allocated and returned on free, so RSS follows them.
    """
    code = f"""
import json, threading, time, psutil, torch
from harness.bench import LayerShape, make_case
torch.set_num_threads(1)
run = make_case(LayerShape(**{asdict(shape)!r}), {impl!r})
run()
proc = psutil.Process()
base = peak = proc.memory_info().rss
done = threading.Event()
def sample():
    global peak
    while not done.is_set():
        peak = max(peak, proc.memory_info().rss)
        time.sleep(0.0002)
thread = threading.Thread(target=sample)
thread.start()
run()
done.set()
thread.join()
print(json.dumps((peak - base) / 2**20))
"""
    # a fixed mmap threshold: glibc's adaptive one would keep freed blocks in the heap and hide peaks
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe failed for {impl} {shape.label}: {done.stderr.strip()[-400:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1]))


@dataclass
class OpsRow:
    shape: str
    impl: str
    ms: float
    ratio_to_conv2d: float
    peak_mb: float | None = None


def _check_device(device: str) -> None:
    if device not in ("cpu", "cuda", "mps"):
        raise HarnessError(f"--device {device!r}: expected cpu, cuda or mps")
    if device == "cuda" and not torch.cuda.is_available():
        raise HarnessError("--device cuda: no CUDA device is available on this machine")


def cuda_peak_memory_mb(shape: LayerShape, impl: str, amp: str = "none") -> float:
    """Peak CUDA memory (MiB) allocated by one forward+backward beyond the case's own tensors."""
    run = make_case(shape, impl, device="cuda", amp=amp)
    run()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_ops(
    shapes: Sequence[LayerShape], impls: Sequence[str] = IMPLS, warmup: int = 2, reps: int = 5,
    threads: int = 2, memory: bool = False, progress: Callable[[str], None] | None = None,
    device: str = "cpu", amp: str = "none",
) -> list[OpsRow]:
    """Forward+backward median time of each implementation on each shape, and its ratio to conv2d.

    On the CPU each ratio divides by conv2d timed again just before and just after that implementation
    (the mean of the two), so a machine whose speed drifts during a long run still gives like-for-like
    ratios. On CUDA the implementations of a shape take turns (`interleaved_ms`, at least CUDA_ROUNDS
    rounds of CUDA_BLOCK_CALLS calls).
    """
    _check_device(device)
    steady_heap()
    torch.set_num_threads(threads)
    rows: list[OpsRow] = []
    for shape in shapes:
        if device == "cuda":
            rows += _interleaved_rows(shape, impls, max(reps, CUDA_ROUNDS), memory, progress, device, amp)
            continue
        conv = make_case(shape, "conv2d", device=device, amp=amp)

        def conv_ms(conv: Callable[[], None] = conv) -> float:
            return median_ms(conv, warmup, reps, min_time_s=0.5)

        first = conv_ms()
        for impl in impls:
            if progress:
                progress(f"{shape.label} {impl}")
            if impl == "conv2d":
                ms, ratio = first, 1.0
            else:
                before = conv_ms()
                ms = median_ms(make_case(shape, impl, device=device, amp=amp), warmup, reps, min_time_s=0.5)
                ratio = ms / ((before + conv_ms()) / 2)
            peak = None
            if memory:
                peak = cuda_peak_memory_mb(shape, impl, amp) if device == "cuda" else peak_memory_mb(shape, impl)
            rows.append(OpsRow(shape.label, impl, ms, ratio, peak))
    return rows


def _interleaved_rows(
    shape: LayerShape, impls: Sequence[str], rounds: int, memory: bool, progress: Callable[[str], None] | None,
    device: str, amp: str,
) -> list[OpsRow]:
    if progress:
        progress(f"{shape.label}: {', '.join(impls)} in turns")
    names = dict.fromkeys(["conv2d", *impls])  # conv2d for the ratios, first
    cases = {impl: make_case(shape, impl, device=device, amp=amp, synchronize=False) for impl in names}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    ms = interleaved_ms(cases, rounds, CUDA_BLOCK_CALLS, synchronize=sync)
    return [OpsRow(shape.label, impl, ms[impl], ms[impl] / ms["conv2d"],
                   (cuda_peak_memory_mb(shape, impl, amp) if device == "cuda" else peak_memory_mb(shape, impl))
                   if memory else None)
            for impl in impls]


@dataclass
class ModelRow:
    placement: str
    images_per_s: float
    ms_per_step: float
    relative_to_standard: float
    steps: int  # timed steps behind the median (the same for every placement: they are interleaved)


def _model_config(arch: str, placement: str, offset_channels: str, modulated: bool) -> ModelConfig:
    """A ResNet's or a factory's network config; a bad placement is a one-line error."""
    try:
        return ModelConfig(arch=arch, deform_layers=placement, offset_channels=offset_channels,  # type: ignore[arg-type]
                           modulated=modulated)
    except ValidationError as exc:
        reason = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
        raise HarnessError(f"--arch {arch} --placement {placement}: {reason}") from None


def bench_model(
    placements: Sequence[str], image_size: int = 64, batch: int = 32, arch: str = "unet_encoder",
    width: float | None = None, offset_channels: str = "per_tap", modulated: bool = False,
    warmup: int = 2, reps: int = 5, threads: int = 2, progress: Callable[[str], None] | None = None,
    device: str = "cpu", amp: str = "none", channels_last: bool = False,
) -> list[ModelRow]:
    """Training-step throughput (forward, BCE loss, backward, Adam step) per deformable placement,
    the placements' steps interleaved (see below), medians over the same number of steps each.
    `width` scales the harness's own networks (MODEL_WIDTH unless given); other archs have their own widths."""
    _check_device(device)
    if width is not None and arch not in MODELS:
        raise HarnessError(f"--width scales {' and '.join(MODELS)} only; {arch} is built at its own width")
    steady_heap()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = (torch.rand(batch, 80, device=device) < 0.05).float()
    device_type = torch.device(device).type
    steps: list[Callable[[], None]] = []
    for placement in placements:
        if progress:
            progress(placement)
        model = create_model(
            arch, width=MODEL_WIDTH if width is None else width, deform_layers=placement,
            options=DeformOptions(offset_channels=offset_channels, modulated=modulated),
        ) if arch in MODELS else build_network(_model_config(arch, placement, offset_channels, modulated), 80)
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        trainer = Trainer(
            model=model, train_model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
            scaler=torch.amp.GradScaler(device_type, enabled=amp == "fp16"), device=torch.device(device),
            amp_dtype=AMP_DTYPES.get(amp), channels_last=channels_last,
        )

        def step(trainer: Trainer = trainer) -> None:
            train_step(trainer, images, targets)
            if device_type == "cuda":
                torch.cuda.synchronize()

        for _ in range(warmup):
            step()
        steps.append(step)
    # One step of each placement in turn, round after round: a machine whose speed drifts (a shared VM)
    # then slows every placement alike, and the ratios stay put (timed one after another, they drift).
    times: list[list[float]] = [[] for _ in steps]
    min_time_s = 1.0 * len(steps)  # at least 1 s per placement, as each got when they were timed in turn
    start = time.perf_counter()
    while len(times[0]) < reps or (time.perf_counter() - start < min_time_s and len(times[0]) < 10 * reps):
        for step, timed in zip(steps, times, strict=True):
            t0 = time.perf_counter()
            step()
            timed.append((time.perf_counter() - t0) * 1000)
    rows: list[ModelRow] = []
    for placement, timed in zip(placements, times, strict=True):
        ms = statistics.median(timed)
        ips = batch / (ms / 1000)
        rows.append(ModelRow(placement, ips, ms, ips / (rows[0].images_per_s if rows else ips), len(timed)))
    return rows


def machine_description() -> dict[str, str | int]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }


@dataclass
class OverheadRow:
    setting: str
    seconds_per_epoch: float
    overhead: float


def bench_overhead(
    data_root: str, epochs: int = 10, image_size: int = 64, deform_layers: str = "first:2", threads: int = 2,
    work_dir: str | None = None,
) -> list[OverheadRow]:
    """Wall-clock per epoch of one run: bare `fit` vs the runner with MLflow logging and the profiler.

    Both read the same cached data; the MLflow store is created before timing, so what is measured is
    per-epoch logging, checkpointing and the profiling window.
    """
    torch.set_num_threads(threads)
    base = {
        "data": {"source": "coco", "root": data_root, "image_size": image_size},
        "model": {"deform_layers": deform_layers},
        "train": {"epochs": epochs, "threads": threads},
    }
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        results = Path(tmp) / "results"
        spec = AblationSpec(name="overhead", base=base, variants={"run": {}})
        run = expand(spec)[0]
        data = DataCache(results).get(run.config.data, lambda *_: None)  # decode once into the cache
        bare_config = run.config.model_copy(deep=True)
        bare_config.profile.enabled = False
        bare_config.train.checkpoint = False
        fit(bare_config, data, lr=1e-3, device=torch.device("cpu"))  # warm-up: allocator, caches
        started = time.perf_counter()
        data = DataCache(results).get(run.config.data, lambda *_: None)  # from the cache, as the runner does
        fit(bare_config, data, lr=1e-3, device=torch.device("cpu"))
        bare = (time.perf_counter() - started) / epochs
        uri = f"sqlite:///{tmp}/mlflow.db"
        AblationStore(uri, "overhead")
        started = time.perf_counter()
        run_ablation(spec, [run], RunnerOptions(tracking_uri=uri, results_dir=results))
        full = (time.perf_counter() - started) / epochs
    return [
        OverheadRow("fit only (no MLflow, no profiler, no checkpoints)", bare, 0.0),
        OverheadRow("harness run (MLflow + profiler window + checkpoints)", full, full / bare - 1),
    ]
