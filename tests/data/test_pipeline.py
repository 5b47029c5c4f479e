"""The tensor batch loader: shapes, epochs, seeded shuffling, normalisation, flips, crops, timing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.data import IMAGENET_MEAN, IMAGENET_STD, BatchLoader, denormalize
from harness.data import pipeline as pipeline_mod
from harness.errors import HarnessError


def _data(n: int = 10, size: int = 8, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    images[:, :, :, 0] = torch.arange(n, dtype=torch.uint8).view(n, 1, 1)  # left column tags the sample
    targets = torch.zeros(n, classes)
    targets[torch.arange(n), torch.arange(n) % classes] = 1
    return images, targets


def _ids(x: torch.Tensor) -> list[int]:
    """Recover the sample tag from a batch (left column when unflipped, right column when flipped)."""
    raw = denormalize(x).round()
    return [int(raw[i, 0, 0, 0]) for i in range(x.shape[0])]


def test_shapes_len_and_drop_last() -> None:
    images, targets = _data(10)
    loader = BatchLoader(images, targets, batch_size=4, shuffle=False, hflip=False)
    batches = list(loader)
    assert len(loader) == 3 == len(batches)
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 8, 8), (4, 3, 8, 8), (2, 3, 8, 8)]
    assert all(x.dtype == torch.float32 and y.dtype == torch.float32 for x, y in batches)
    assert torch.equal(torch.cat([y for _, y in batches]), targets)
    dropping = BatchLoader(images, targets, batch_size=4, drop_last=True)
    assert len(dropping) == 2 == len(list(dropping))


def test_normalisation() -> None:
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    for c, m in enumerate(IMAGENET_MEAN):
        images[0, c] = round(m * 255)
    images[1] = 255
    x, _ = next(iter(BatchLoader(images, torch.zeros(2, 1), batch_size=2, shuffle=False, hflip=False)))
    assert x[0].abs().max() < 0.01  # the mean colour maps to ~0
    for c, (m, s) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)):
        assert torch.allclose(x[1, c], torch.full((4, 4), (1 - m) / s))
    assert torch.allclose(denormalize(x)[1], torch.full((3, 4, 4), 255.0), atol=1e-3)


def test_seeded_shuffle_covers_each_sample_once() -> None:
    images, targets = _data(10)

    def order(seed: int) -> list[int]:
        loader = BatchLoader(images, targets, batch_size=3, hflip=False, generator=torch.Generator().manual_seed(seed))
        return [i for x, _ in loader for i in _ids(x)]

    a, b, c = order(1), order(1), order(2)
    assert sorted(a) == list(range(10)) and a == b and a != c and a != list(range(10))
    loader = BatchLoader(images, targets, batch_size=10, hflip=False, generator=torch.Generator().manual_seed(1))
    assert _ids(next(iter(loader))[0]) != _ids(next(iter(loader))[0])  # a new permutation each epoch


def test_targets_follow_their_images() -> None:
    images, targets = _data(10)
    loader = BatchLoader(images, targets, batch_size=4, generator=torch.Generator().manual_seed(3), hflip=False)
    for x, y in loader:
        ids = _ids(x)
        assert torch.equal(y, targets[ids])


def test_hflip_flips_about_half_the_samples() -> None:
    images, targets = _data(64, size=6)
    loader = BatchLoader(images, targets, batch_size=64, shuffle=False, hflip=True,
                         generator=torch.Generator().manual_seed(0))
    x, _ = next(iter(loader))
    raw = denormalize(x).round().to(torch.uint8)
    flipped = [bool(torch.equal(raw[i], images[i].flip(-1))) for i in range(64)]
    same = [bool(torch.equal(raw[i], images[i])) for i in range(64)]
    assert all(f or s for f, s in zip(flipped, same, strict=True))
    assert 16 <= sum(flipped) <= 48
    plain = BatchLoader(images, targets, batch_size=64, shuffle=False, hflip=False)
    assert torch.equal(denormalize(next(iter(plain))[0]).round().to(torch.uint8), images)


def test_random_resized_crop() -> None:
    images, targets = _data(16, size=16)
    ident = BatchLoader(images, targets, batch_size=16, shuffle=False, hflip=False, random_resized_crop=(1.0, 1.0),
                        ratio=(1.0, 1.0), generator=torch.Generator().manual_seed(0))
    x, _ = next(iter(ident))
    assert torch.allclose(denormalize(x), images.float(), atol=1e-3)  # full-image crop is the identity

    crop = BatchLoader(images, targets, batch_size=16, shuffle=False, hflip=True, random_resized_crop=(0.3, 0.6),
                       generator=torch.Generator().manual_seed(0))
    x, y = next(iter(crop))
    assert x.shape == (16, 3, 16, 16) and torch.equal(y, targets)
    assert not torch.allclose(denormalize(x), images.float(), atol=1.0)
    again = BatchLoader(images, targets, batch_size=16, shuffle=False, hflip=True, random_resized_crop=(0.3, 0.6),
                        generator=torch.Generator().manual_seed(0))
    assert torch.equal(next(iter(again))[0], x)  # reproducible from the generator


def test_wait_seconds_per_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    images, targets = _data(40, size=16)
    loader = BatchLoader(images, targets, batch_size=8, random_resized_crop=(0.5, 1.0))
    assert loader.wait_seconds == 0.0
    for _ in loader:
        pass
    assert loader.wait_seconds > 0 and loader.total_wait_seconds == pytest.approx(loader.wait_seconds)

    # with a clock that advances 1 s per reading, each batch costs exactly 1 s (plus 1 s epoch setup)
    clock = iter(range(10**6))
    monkeypatch.setattr(pipeline_mod.time, "perf_counter", lambda: float(next(clock)))
    before = loader.total_wait_seconds
    for i, _ in enumerate(loader, start=1):
        next(clock)  # the caller takes one tick between batches: it must not be counted
        assert loader.wait_seconds == pytest.approx(1 + i)  # epoch setup + one tick per batch so far
    assert loader.wait_seconds == pytest.approx(1 + 5)
    it = iter(loader)
    next(it)
    assert loader.wait_seconds == pytest.approx(2)  # reset when the next epoch starts
    assert loader.total_wait_seconds == pytest.approx(before + 8)
    assert loader.epochs == 3


def test_numpy_input_and_bad_arguments() -> None:
    images, targets = _data(4)
    loader = BatchLoader(images.numpy(), targets.numpy().astype(np.float32), batch_size=2)
    assert len(list(loader)) == 2
    with pytest.raises(HarnessError, match="uint8"):
        BatchLoader(images.float(), targets)
    with pytest.raises(HarnessError, match="targets"):
        BatchLoader(images, targets[:3])
    with pytest.raises(HarnessError, match="batch_size"):
        BatchLoader(images, targets, batch_size=0)
    with pytest.raises(HarnessError, match="random_resized_crop"):
        BatchLoader(images, targets, random_resized_crop=(0.8, 0.5))
