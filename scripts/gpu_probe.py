"""What `harness bench` alone does not show on a GPU: the column-chunk size, larger shapes, the kernel
breakdown (fp32 and bf16, ours and torchvision's) and the network at a GPU-sized batch.

Run by scripts/gpu_check.sh; writes $OUT/probe.json and $OUT/profile.txt and prints a summary.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import harness.ops
from harness.bench import LayerShape, _make_case, bench_model, bench_ops

OUT = Path(os.environ.get("OUT", "results/gpu_check"))
SHAPES = [LayerShape(8, 32, 32, 64), LayerShape(16, 64, 64, 32), LayerShape(16, 128, 128, 16),
          LayerShape(16, 64, 64, 32, 2), LayerShape(16, 64, 64, 32, 1, 2)]
LARGE = [LayerShape(32, 64, 64, 128), LayerShape(64, 256, 256, 32)]


def log(text: str) -> None:
    print(text, flush=True)


def main() -> None:
    assert torch.cuda.is_available(), "no CUDA device"
    report: dict[str, object] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}

    sweep = {}
    for mib in (4, 64, 1024) if os.environ.get("PROBE_SWEEP", "1") == "1" else ():
        harness.ops.CUDA_COLUMN_CHUNK_BYTES = mib * 2**20
        rows = bench_ops(SHAPES, ("conv2d", "per_tap"), reps=20, device="cuda")
        sweep[mib] = {r.shape: r.ms for r in rows if r.impl == "per_tap"}
        log(f"chunk {mib:5d} MiB per_tap ms: " + ", ".join(f"{v:.3f}" for v in sweep[mib].values()))
    report["chunk_sweep_ms"] = sweep
    harness.ops.CUDA_COLUMN_CHUNK_BYTES = 256 * 2**20

    large = {}
    for amp in ("none", "bf16"):
        rows = bench_ops(LARGE, ("conv2d", "per_tap", "shared", "torchvision"), reps=10, device="cuda", amp=amp,
                         memory=True)
        large[amp] = [asdict(r) for r in rows]
        for r in rows:
            log(f"large {amp:4s} {r.shape:22s} {r.impl:12s} {r.ms:8.3f} ms  {r.ratio_to_conv2d:5.2f}x  "
                f"{r.peak_mb:.0f} MiB")
    report["large"] = large

    models = {}
    for batch, size in ((256, 64), (64, 128)):
        for amp, offsets in (("none", "per_tap"), ("none", "shared"), ("bf16", "per_tap"), ("bf16", "shared")):
            rows = bench_model(["none", "first:2", "all"], image_size=size, batch=batch, offset_channels=offsets,
                               device="cuda", amp=amp, channels_last=amp == "bf16")
            key = f"batch{batch}@{size} {amp} {offsets}"
            models[key] = [asdict(r) for r in rows]
            log(f"model {key:28s} " + ", ".join(f"{r.placement} {r.images_per_s:.0f}/s ({r.relative_to_standard:.2f}x)"
                                                 for r in rows))
    report["models"] = models

    busy: dict[str, dict[str, float]] = {}
    with open(OUT / "profile.txt", "w") as handle:
        cases = [(shape, impl, amp) for shape in (SHAPES[0], SHAPES[1])
                 for impl, amp in (("conv2d", "none"), ("per_tap", "none"), ("shared", "none"),
                                   ("torchvision", "none"), ("per_tap", "bf16"))]
        for shape, impl, amp in cases:
            run = _make_case(shape, impl, device="cuda", amp=amp)
            for _ in range(3):
                run()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    run()
            events = prof.key_averages()
            # device events, less the profiler scopes' GPU ranges (harness::deform_sampling would count twice)
            kernels = [e for e in events if e.device_type.name == "CUDA" and not e.key.startswith("harness::")]
            gpu_us = sum(e.self_device_time_total for e in kernels) / 5
            launches = sum(e.count for e in kernels) / 5
            busy.setdefault(shape.label, {})[f"{impl} {amp}"] = gpu_us
            table = events.table(sort_by="device_time_total", row_limit=14, max_name_column_width=70)
            handle.write(f"\n===== {impl} {amp} {shape.label} (5 steps) =====\n{table}\n")
            top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:4]
            log(f"gpu-busy {shape.label:18s} {impl:12s} {amp:4s} {gpu_us:7.0f} us/step, {launches:4.0f} kernels/step; "
                + "; ".join(f"{e.key[:48]} {e.self_device_time_total / 5:.0f}us" for e in top))
    report["gpu_busy_us"] = busy

    (OUT / "probe.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.exit(main())
