"""Shared fixtures: the real coco-mini subset (when present) and a small synthetic COCO dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# On a machine without CUDA the GPU path's Triton kernels are tested in Triton's interpreter, which has
# to be switched on before triton is first imported (the kernels only run there when a test asks).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _settings_from_environment() -> None:
    """Each test starts from the switches of its own environment (a test's monkeypatch is undone by then)."""
    from harness import settings

    settings.reload()


@pytest.fixture
def harness_env(monkeypatch: pytest.MonkeyPatch):
    """Set or clear HARNESS_* switches for one test: `harness_env(cpp="0", split=None)` (None clears one).

    Returns the settings as re-read; the environment is restored after the test.
    """
    from harness import settings

    def apply(**values: object) -> settings.Settings:
        for name, value in values.items():
            if value is None:
                monkeypatch.delenv(settings.variable(name), raising=False)
            else:
                monkeypatch.setenv(settings.variable(name), str(value))
        return settings.reload()

    return apply


def coco_mini_path() -> Path:
    """`$HARNESS_COCO_MINI`, else `../shared/coco-mini` beside the repository root."""
    override = os.environ.get("HARNESS_COCO_MINI")
    return Path(override) if override else REPO_ROOT.parent / "shared" / "coco-mini"


@pytest.fixture(scope="session")
def coco_mini_root() -> Path:
    """Root of the real COCO 2017 mini subset; skips the test when it is not there."""
    root = coco_mini_path()
    if not (root / "annotations" / "instances_val2017.json").is_file():
        pytest.skip(f"coco-mini not found at {root} (set HARNESS_COCO_MINI to its path)")
    return root


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic COCO-format dataset (64 train / 32 val images, 32 px, seed 0), made once per session."""
    from harness.data import synthesize

    root = tmp_path_factory.mktemp("synth") / "coco"
    synthesize(root, n_train=64, n_val=32, size=32, seed=0)
    return root


@pytest.fixture
def make_coco():
    """Factory writing a tiny COCO root: make_coco(root, images, annotations, categories, split="val2017").

    `images` are dicts with id/width/height and optional file_name, mode ("RGB", "L", ...) and
    write=False (listed in the JSON, no file written); pixels are a deterministic gradient.
    """
    import json

    import numpy as np
    from PIL import Image

    def make(root: Path, images: list[dict], annotations: list[dict], categories: list[dict] | None = None,
             split: str = "val2017") -> Path:
        cats = categories if categories is not None else [
            {"id": 1, "name": "a"}, {"id": 3, "name": "b"}, {"id": 7, "name": "c"}]
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / split).mkdir(parents=True, exist_ok=True)
        records = []
        for img in images:
            name = img.get("file_name", f"{img['id']:012d}.png")
            records.append({"id": img["id"], "file_name": name, "width": img["width"], "height": img["height"]})
            if img.get("write", True):
                ys, xs = np.mgrid[0:img["height"], 0:img["width"]]
                rgb = np.stack([xs * 255 // max(1, img["width"] - 1), ys * 255 // max(1, img["height"] - 1),
                                np.full_like(xs, img["id"] % 256)], -1).astype(np.uint8)
                Image.fromarray(rgb, "RGB").convert(img.get("mode", "RGB")).save(root / split / name)
        anns = [{"id": i + 1, "iscrowd": 0, "bbox": [0, 0, 1, 1], "area": 1.0, **a} for i, a in enumerate(annotations)]
        data = {"images": records, "annotations": anns, "categories": cats}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
        return root

    return make
