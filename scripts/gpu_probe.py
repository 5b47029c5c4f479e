"""What `harness bench` alone does not show on a GPU: our CUDA paths against each other and torchvision,
interleaved in one process (the C++ autograd op, the same with its channels sampled in slices
(the `split` switch of harness.settings), its Python version and the Triton kernels; pick with PROBE_PATHS, default
"cpp,split"), larger shapes, memory, the kernels each runs (count and GPU time) and the network at the
benchmark's and at GPU-sized batches.

Run by scripts/gpu_check.sh; writes $OUT/probe.json and $OUT/profile.txt and prints a summary.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from harness import settings
from harness.bench import LayerShape, bench_model, cuda_peak_memory_mb, interleaved_ms, make_case
from harness.kernels import cpp_autograd, triton_kernels

OUT = Path(os.environ.get("OUT", "results/gpu_check"))
SHAPES = [LayerShape(8, 32, 32, 64), LayerShape(16, 64, 64, 32), LayerShape(16, 128, 128, 16),
          LayerShape(16, 64, 64, 32, 2), LayerShape(16, 64, 64, 32, 1, 2)]
# GPU-filling shapes; the last two have few output points for their channels (a large batch's deep layer,
# and the shared layout's sample at 16 px), where the `split` switch's slices should show
LARGE = [LayerShape(32, 64, 64, 128), LayerShape(64, 256, 256, 32), LayerShape(256, 512, 512, 4),
         LayerShape(64, 256, 256, 16)]
# the switches (harness.settings fields) that select each of our CUDA paths
KNOWN_PATHS = {"cpp": {"triton": "0", "cpp": "1", "split": "0"},
               "split": {"triton": "0", "cpp": "1", "split": "1"},
               "python": {"triton": "0", "cpp": "0", "split": "0"},
               "triton": {"triton": "1", "cpp": "0", "split": "0"}}
PATHS = {name: KNOWN_PATHS[name] for name in os.environ.get("PROBE_PATHS", "cpp,split").split(",")}
QUICK = os.environ.get("PROBE_QUICK") == "1"  # fewer rounds and settings, for a short time budget


def log(text: str) -> None:
    print(text, flush=True)


def save(report: dict[str, object]) -> None:
    """After every section, so that a run cut short by its time limit still leaves what it measured."""
    (OUT / "probe.json").write_text(json.dumps(report, indent=1))


def _switch(path: str) -> None:
    """Set the path's switches in the environment and have harness.settings read them again (not when they
    are set already: a timed call should not pay for re-reading the environment)."""
    wanted = PATHS[path]
    current = settings.current()
    if all(getattr(current, name) == (value == "1") for name, value in wanted.items()):
        return
    os.environ.update({settings.variable(name): value for name, value in wanted.items()})
    settings.reload()


def _on(path: str, run):
    def timed() -> None:
        _switch(path)
        run()
    return timed


def interleaved(shape: LayerShape, amp: str, rounds: int, calls: int) -> dict[str, float]:
    """Median ms per forward+backward of each case, the cases taking turns (blocks of `calls`)."""
    cases = {"conv2d": make_case(shape, "conv2d", device="cuda", amp=amp, synchronize=False),
             "torchvision": make_case(shape, "torchvision", device="cuda", amp=amp, synchronize=False)}
    for impl in ("per_tap", "shared", "modulated"):
        for path in PATHS:
            cases[f"{impl} {path}"] = _on(path, make_case(shape, impl, device="cuda", amp=amp, synchronize=False))
    return interleaved_ms(cases, rounds, calls, synchronize=torch.cuda.synchronize)  # warm-up compiles Triton's


def ratios(ms: dict[str, float]) -> str:
    """torchvision's time ÷ ours, per layout, for each path (in PATHS order)."""
    tv = ms["torchvision"]
    return "  ".join(f"{impl} tv/ours " + "/".join(f"{tv / ms[f'{impl} {path}']:.2f}" for path in PATHS
                                                  if f"{impl} {path}" in ms)
                     for impl in ("per_tap", "shared", "modulated"))


def interleaved_table(name: str, shapes: list[LayerShape], amp: str, rounds: int, calls: int) -> dict[str, dict]:
    table = {}
    for shape in shapes:
        ms = table[shape.label] = interleaved(shape, amp, rounds, calls)
        log(f"{name} {amp:4s} {shape.label:18s} " + " ".join(f"{k} {v:.3f}" for k, v in ms.items()))
        log(f"    {ratios(ms)}")
    return table


def main() -> None:
    assert torch.cuda.is_available(), "no CUDA device"
    t0 = time.perf_counter()
    cpp = cpp_autograd.status()  # builds the C++ op on a fresh machine
    report: dict[str, object] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                 "triton": triton_kernels.status(), "cpp": cpp,
                                 "cpp_build_s": round(time.perf_counter() - t0, 1), "paths": list(PATHS)}
    log(f"{report}")

    for amp in ("none", "bf16"):
        report[f"ops_{amp}"] = interleaved_table("ops", SHAPES, amp, rounds=8 if QUICK else 15, calls=10)
        save(report)

    memory = {}
    for shape in SHAPES + LARGE:
        for path in PATHS:
            _switch(path)
            memory[f"{shape.label} per_tap {path}"] = cuda_peak_memory_mb(shape, "per_tap")
        memory[f"{shape.label} torchvision"] = cuda_peak_memory_mb(shape, "torchvision")
    report["peak_mib"] = memory
    save(report)
    log("peak MiB " + ", ".join(f"{k} {v:.0f}" for k, v in memory.items()))

    for amp in ("none", "bf16"):
        report[f"large_{amp}"] = interleaved_table("large", LARGE, amp, rounds=3 if QUICK else 4, calls=3)
        save(report)

    busy: dict[str, dict[str, float]] = {}
    with open(OUT / "profile.txt", "w") as handle:
        for shape in (SHAPES[0], SHAPES[3]):
            for impl, path in (("conv2d", None), ("torchvision", None), *(("per_tap", p) for p in PATHS),
                               ("shared", list(PATHS)[0])):
                run = make_case(shape, impl, device="cuda")
                if path:
                    run = _on(path, run)
                for _ in range(3):
                    run()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        run()
                events = prof.key_averages()
                kernels = [e for e in events if e.device_type.name == "CUDA" and not e.key.startswith("harness::")]
                gpu_us = sum(e.self_device_time_total for e in kernels) / 5
                launches = sum(e.count for e in kernels) / 5
                name = f"{impl} {path or ''}".strip()
                busy.setdefault(shape.label, {})[name] = gpu_us
                handle.write(f"\n===== {name} {shape.label} (5 steps) =====\n"
                             f"{events.table(sort_by='device_time_total', row_limit=14, max_name_column_width=70)}\n")
                top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:4]
                log(f"gpu-busy {shape.label:18s} {name:16s} {gpu_us:7.0f} us/step, {launches:4.0f} kernels/step; "
                    + "; ".join(f"{e.key[:40]} {e.self_device_time_total / 5:.0f}us" for e in top))
    report["gpu_busy_us"] = busy
    save(report)

    if "triton" in PATHS:
        block_sweep(report)
    network(report)
    for name in KNOWN_PATHS["split"]:
        os.environ.pop(settings.variable(name), None)
    settings.reload()


def block_sweep(report: dict[str, object]) -> None:
    sweep = {}  # the Triton kernels' block sizes (pixels, channels), per_tap fp32
    _switch("triton")
    default = triton_kernels.BLOCK_PIXELS, triton_kernels.MAX_BLOCK_CHANNELS
    for pixels, channels in (default, (64, 16), (32, 16), (128, 8), (64, 8), (64, 32)):
        triton_kernels.BLOCK_PIXELS, triton_kernels.MAX_BLOCK_CHANNELS = pixels, channels
        for shape in (SHAPES[0], SHAPES[2], LARGE[0]):
            run = make_case(shape, "per_tap", device="cuda")
            for _ in range(3):
                run()
            torch.cuda.synchronize()
            times = []
            for _ in range(7):
                t0 = time.perf_counter()
                for _ in range(5):
                    run()
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 200)
            sweep[f"{pixels}x{channels} {shape.label}"] = statistics.median(times)
        log(f"blocks {pixels:3d} px x {channels:2d} ch: " + ", ".join(
            f"{sweep[f'{pixels}x{channels} {shape.label}']:.3f}" for shape in (SHAPES[0], SHAPES[2], LARGE[0])))
    report["block_sweep_ms"] = sweep
    save(report)
    triton_kernels.BLOCK_PIXELS, triton_kernels.MAX_BLOCK_CHANNELS = default  # the rest runs the defaults


def network(report: dict[str, object]) -> None:
    models = {}
    runs = ((32, "per_tap", "none"), (256, "per_tap", "none"), (256, "per_tap", "bf16"), (32, "shared", "none"),
            (256, "shared", "none"))
    for batch, offsets, amp in runs[:2] if QUICK else runs:
        for path in (*PATHS, *PATHS)[:2 if QUICK else 4]:  # twice each, interleaved
            _switch(path)
            rows = bench_model(["none", "first:2", "all"], image_size=64, batch=batch, offset_channels=offsets,
                               device="cuda", amp=amp, channels_last=amp == "bf16")
            key = f"batch{batch} {offsets} {amp} {path}"
            models.setdefault(key, []).append([asdict(r) for r in rows])
            log(f"model {key:30s} " + ", ".join(f"{r.placement} {r.images_per_s:.0f}/s ({r.relative_to_standard:.2f}x)"
                                                 for r in rows))
    report["models"] = models
    save(report)


if __name__ == "__main__":
    sys.exit(main())
