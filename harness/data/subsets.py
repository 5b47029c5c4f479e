"""Seeded, nested subsets of a split.

A subset of size k is the first k positions of a seeded permutation of the split, so with one
subset seed the 250-image subset is contained in the 500-image one: training-set-size ablations
differ only in size. The permutation depends on the seed and the split name only (not on the
training seed), so the val subset stays fixed across every run of an ablation. A test subset is the
tail of the val split's permutation (`tail_subset`), so it never shares an image with a val prefix.
"""

from __future__ import annotations

import zlib

import numpy as np

from harness.errors import HarnessError

SubsetSize = int | float | None


def resolve_size(size: SubsetSize, total: int, key: str = "size", split: str = "") -> int:
    """Turn a count (int), a fraction (float in (0, 1]) or None (all) into a count of images.

    Raises `HarnessError` naming `key` for a non-positive count, a fraction outside (0, 1], or a
    count larger than the `total` images of the split.
    """
    where = f" of split {split!r}" if split else ""
    if size is None:
        return total
    if isinstance(size, bool) or not isinstance(size, int | float | np.integer | np.floating):
        raise HarnessError(f"{key} = {size!r}: expected a count (int), a fraction in (0, 1] or None")
    if isinstance(size, int | np.integer):
        count = int(size)
        if count < 1:
            raise HarnessError(f"{key} = {count}: a count must be at least 1")
    else:
        frac = float(size)
        if not 0.0 < frac <= 1.0:
            raise HarnessError(f"{key} = {frac}: a fraction must be in (0, 1]")
        count = max(1, int(round(frac * total)))
    if count > total:
        raise HarnessError(f"{key} = {size}: larger than the {total} images{where}")
    return count


def permutation(n: int, seed: int, split: str) -> np.ndarray:
    """The seeded permutation of `range(n)` whose prefixes are a split's subsets."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(split.encode())])
    return rng.permutation(n)


def nested_subset(n: int, size: SubsetSize, seed: int, split: str = "", key: str = "size",
                  skip: int = 0, tail: int = 0) -> np.ndarray:
    """Sorted positions of the subset: `permutation(n, seed, split)[skip : skip + count]`.

    `skip` reserves the head of the permutation (used when train and val are drawn from one split:
    val takes the head, train a prefix of the rest); `tail` reserves its end for the test subset.
    """
    available = n - skip - tail
    count = resolve_size(size, available, key, split)
    return np.sort(permutation(n, seed, split)[skip:skip + count])


def tail_subset(n: int, size: SubsetSize, seed: int, split: str = "", key: str = "test_size") -> np.ndarray:
    """Sorted positions of the last `size` entries of `permutation(n, seed, split)`: the test subset.

    Taken from the end so that val (a prefix of the same permutation) keeps its images when a test
    subset is added, as long as both fit. `None` means no test subset (empty). A fraction counts the
    whole split.
    """
    if size is None:
        return np.zeros(0, dtype=np.int64)
    count = resolve_size(size, n, key, split)
    return np.sort(permutation(n, seed, split)[n - count:])
