"""Measure the data layer's figures for docs/data.md (a script, not a test).

    python -m harness.data.measure --coco-mini ../shared/coco-mini [--work DIR] [--json]

(0) time to synthesize the default 2,000 + 500 images; (a) load time of a cached 5,000-image
64 px subset (synthesize 5,000 images, prepare once, time the second prepare); (b) decode throughput
on coco-mini (no cache); (c) the loader's share of an epoch training `unet_encoder` (80 classes) at
64 px, batch 32, on coco-mini train with 2 torch threads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from harness.data import BatchLoader, load_split, prepare_data, synthesize
from harness.data.cache import decode_images
from harness.models import create_model


def cached_load(work: Path, n: int = 5000, size: int = 64, reps: int = 3) -> dict[str, Any]:
    root = work / "synth5k"
    t0 = time.perf_counter()
    synthesize(root, n_train=n, n_val=100, size=size, seed=0, overwrite=True)
    synth_s = time.perf_counter() - t0
    cache = work / "cache"
    t0 = time.perf_counter()
    first = prepare_data(root, image_size=size, cache_dir=cache)
    build_s = time.perf_counter() - t0
    times, train_load = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        again = prepare_data(root, image_size=size, cache_dir=cache)
        times.append(time.perf_counter() - t0)
        train_load.append(again.cache["train"]["seconds"])
        assert again.cache["train"]["hit"] and again.train_images.shape[0] == first.train_images.shape[0] == n
    return {"images": n, "size": size, "synthesize_s": round(synth_s, 3), "first_prepare_s": round(build_s, 3),
            "cached_prepare_s": [round(t, 3) for t in times], "cached_train_entry_s": train_load,
            "cache_mb": round(first.train_images.numel() / 2**20, 1)}


def synth_default(work: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    synthesize(work / "synth-default", n_train=2000, n_val=500, size=64, seed=0, overwrite=True)
    return {"images": 2500, "size": 64, "seconds": round(time.perf_counter() - t0, 3)}


def decode_throughput(coco: Path, size: int = 64, workers: tuple[int, ...] = (1, 2), reps: int = 3) -> dict[str, Any]:
    paths = [p for split in ("train2017", "val2017") for p in load_split(coco, split).paths]
    out: dict[str, Any] = {"images": len(paths), "size": size}
    for w in workers:
        rates = []
        for _ in range(reps):
            t0 = time.perf_counter()
            _, failures = decode_images(paths, size, "squash", workers=w)
            rates.append(len(paths) / (time.perf_counter() - t0))
            assert not failures
        out[f"workers_{w}_images_per_s"] = round(statistics.median(rates))
    return out


def loader_share(coco: Path, work: Path, epochs: int = 3, threads: int = 2) -> dict[str, Any]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    data = prepare_data(coco, image_size=64, cache_dir=work / "cache", val_size=32)
    model = create_model("unet_encoder", num_classes=80)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    rows = []
    for rrc in (None, (0.6, 1.0)):
        loader = BatchLoader(data.train_images, data.train_targets, batch_size=32, hflip=True,
                             random_resized_crop=rrc, generator=torch.Generator().manual_seed(0))
        model.train()
        for epoch in range(epochs + 1):  # epoch 0 warms up
            t0 = time.perf_counter()
            for x, y in loader:
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()
                opt.step()
            wall = time.perf_counter() - t0
            if epoch:
                rows.append({"random_resized_crop": rrc, "epoch_s": round(wall, 3),
                             "wait_s": round(loader.wait_seconds, 4),
                             "wait_share_pct": round(100 * loader.wait_seconds / wall, 2)})
    return {"train_images": len(data.train_ids), "batch": 32, "threads": threads, "epochs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coco-mini", type=Path, default=Path("../shared/coco-mini"))
    parser.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="harness-measure-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = {
            "machine": {"load_average": [round(v, 2) for v in os.getloadavg()], "cpus": os.cpu_count()},
            "synth_default": synth_default(work),
            "cached_load": cached_load(work),
            "decode": decode_throughput(args.coco_mini),
            "loader": loader_share(args.coco_mini, work),
        }
        result["machine"]["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
