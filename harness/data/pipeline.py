"""Tensor-based training pipeline over cached uint8 images.

`BatchLoader` draws batches by indexing the uint8 tensor [N, 3, S, S] (no DataLoader workers), converts
to float, applies random horizontal flips and an optional random-resized-crop to the whole batch at
once (one `grid_sample` call), and normalises with the ImageNet mean/std. Shuffling, flips and crops
draw from the `torch.Generator` passed in, so a run is reproducible from its seed. The loader times
itself: `wait_seconds` is the time spent producing the batches of the current (or last) epoch, which
the runner compares with the epoch time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from harness.errors import HarnessError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_PRELOAD_LIMIT = 2 << 30  # move at most 2 GiB of uint8 images onto an accelerator up front


def normalize_u8(x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """uint8 [B, 3, H, W] (or float in 0..255) → float32 normalised with mean/std (given in 0..1 units)."""
    x = x.float()
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return x.mul_(1.0 / 255.0).sub_(m).div_(s)


def denormalize(x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Inverse of `normalize_u8`, giving floats in 0..255 (for looking at batches)."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x * s + m) * 255.0


class BatchLoader:
    """Batches (x float32 normalised [B, 3, S, S], y float32 [B, C]) from uint8 images in memory.

    `len(loader)` is the number of batches per epoch. Each `iter()` is one epoch: a fresh shuffle
    when `shuffle`, `wait_seconds` reset to 0 and then increased by the time spent producing each
    batch (indexing, copying, augmenting; not the time the caller spends between batches).
    `total_wait_seconds` accumulates over all epochs. On an accelerator the images are moved there
    once when they fit in 2 GiB (`preload`); the random numbers always come from `generator`.
    """

    def __init__(
        self,
        images_u8: torch.Tensor | np.ndarray,
        targets: torch.Tensor | np.ndarray,
        batch_size: int = 32,
        shuffle: bool = True,
        hflip: bool = True,
        random_resized_crop: tuple[float, float] | None = None,
        generator: torch.Generator | None = None,
        device: str | torch.device = "cpu",
        drop_last: bool = False,
        *,
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        preload: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        images = torch.from_numpy(images_u8) if isinstance(images_u8, np.ndarray) else images_u8
        labels = torch.from_numpy(targets) if isinstance(targets, np.ndarray) else targets
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise HarnessError(f"images must be a uint8 tensor [N, 3, S, S], got {images.dtype} {tuple(images.shape)}")
        if labels.dim() != 2 or labels.shape[0] != images.shape[0]:
            raise HarnessError(f"targets {tuple(labels.shape)} do not match images {tuple(images.shape)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise HarnessError(f"batch_size = {batch_size!r}: expected a positive integer")
        if random_resized_crop is not None:
            lo, hi = (float(v) for v in random_resized_crop)
            if not 0.0 < lo <= hi <= 1.0:
                raise HarnessError(f"random_resized_crop = {random_resized_crop!r}: expected 0 < lo <= hi <= 1")
            random_resized_crop = (lo, hi)
        if not 0 < ratio[0] <= ratio[1]:
            raise HarnessError(f"ratio = {ratio!r}: expected 0 < lo <= hi")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.hflip = hflip
        self.random_resized_crop = random_resized_crop
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.generator = generator
        self.drop_last = drop_last
        if not 0 <= rank < world_size:
            raise HarnessError(f"rank {rank} is outside 0..{world_size - 1}")
        self.rank, self.world_size = rank, world_size
        on_accel = self.device.type != "cpu"
        if preload is None:
            preload = on_accel and images.numel() <= _PRELOAD_LIMIT
        if preload and on_accel:
            images = images.to(self.device)
        elif on_accel and images.device.type == "cpu" and torch.cuda.is_available():
            images = images.pin_memory()
        self.images = images.contiguous()
        self.targets = labels.to(self.images.device, torch.float32)
        self._scale = (1.0 / (255.0 * torch.tensor(std, dtype=torch.float32))).view(1, -1, 1, 1).to(self.device)
        self._shift = (torch.tensor(mean, dtype=torch.float32) / torch.tensor(std, dtype=torch.float32)).view(
            1, -1, 1, 1).to(self.device)
        self.wait_seconds = 0.0
        self.total_wait_seconds = 0.0
        self.epochs = 0

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch (all of them for one process)."""
        return math.ceil(int(self.images.shape[0]) / self.world_size)

    def _rand(self, *shape: int) -> torch.Tensor:
        gen_device = self.generator.device if self.generator is not None else torch.device("cpu")
        return torch.rand(*shape, generator=self.generator, device=gen_device).to(self.device)

    def _order(self) -> torch.Tensor:
        """This epoch's sample order; under data parallelism every rank draws the same permutation
        (same generator seed), pads it to a multiple of the world size and takes every world_size-th
        entry from its rank on, as DistributedSampler does: equal step counts on every rank."""
        n = int(self.images.shape[0])
        if not self.shuffle:
            order = torch.arange(n)
        else:
            gen_device = self.generator.device if self.generator is not None else torch.device("cpu")
            order = torch.randperm(n, generator=self.generator, device=gen_device).cpu()
        if self.world_size == 1:
            return order
        padded = self.num_samples * self.world_size
        if padded > n:
            order = torch.cat([order, order[: padded - n]])
        return order[self.rank :: self.world_size]

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        flip = (self._rand(b) < 0.5) if self.hflip else None
        if self.random_resized_crop is None:
            if flip is not None and bool(flip.any()):
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
            return x
        lo, hi = self.random_resized_crop
        area = lo + (hi - lo) * self._rand(b)
        log_r0, log_r1 = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(log_r0 + (log_r1 - log_r0) * self._rand(b))
        w = torch.sqrt(area * aspect).clamp(max=1.0)  # crop width / image width
        h = torch.sqrt(area / aspect).clamp(max=1.0)
        cx = (self._rand(b) * 2 - 1) * (1 - w)  # crop centre in [-1, 1] coordinates, crop inside the image
        cy = (self._rand(b) * 2 - 1) * (1 - h)
        sx = torch.where(flip, -w, w) if flip is not None else w
        theta = torch.zeros(b, 2, 3, device=self.device)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, h, cy
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def batch(self, index: torch.Tensor, augment: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of samples `index` (a 1-D index tensor), augmented when `augment`."""
        idx = index.to(self.images.device)
        x = self.images.index_select(0, idx).to(self.device, non_blocking=True).float()
        y = self.targets.index_select(0, idx).to(self.device, non_blocking=True)
        if augment:
            x = self._augment(x)
        return x.mul_(self._scale).sub_(self._shift), y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        t0 = time.perf_counter()
        self.wait_seconds = 0.0
        self.epochs += 1
        order = self._order()
        n = self.num_samples
        stop = (n // self.batch_size) * self.batch_size if self.drop_last else n
        elapsed = time.perf_counter() - t0
        self.wait_seconds += elapsed
        self.total_wait_seconds += elapsed
        for start in range(0, stop, self.batch_size):
            t0 = time.perf_counter()
            out = self.batch(order[start:start + self.batch_size])
            elapsed = time.perf_counter() - t0
            self.wait_seconds += elapsed
            self.total_wait_seconds += elapsed
            yield out
