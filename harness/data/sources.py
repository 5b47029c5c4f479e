"""The data a run reads, given its `DataConfig`: the COCO root it names, or the generated synthetic task,
prepared once per process and shared by every run that reads the same subset."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from harness import settings
from harness.config import DataConfig
from harness.data.coco import annotation_path
from harness.data.prepare import PreparedData, prepare_data
from harness.data.synth import synthesize
from harness.errors import HarnessError

Progress = Callable[[str, int, int], None]


def no_coco_root(what: str = "") -> HarnessError:
    prefix = f"{what}: " if what else ""
    return HarnessError(
        f"{prefix}no COCO root: pass --data-root DIR, set data.root in the ablation file, or set "
        f"${settings.variable('coco_root')}"
    )


def data_root(config: DataConfig, results_dir: Path, progress: Progress) -> Path:
    """The COCO root a run reads: the configured one, or the generated synthetic task (made once)."""
    if config.source == "synthetic":
        synth = config.synthetic
        root = results_dir / "data" / f"synthetic-{synth.n_train}-{synth.n_val}-{config.image_size}-{synth.seed}"
        if not (root / "annotations" / "instances_val2017.json").exists():
            progress("generating synthetic task", 0, 1)
            synthesize(root, n_train=synth.n_train, n_val=synth.n_val, size=config.image_size, seed=synth.seed)
        return root
    if not config.root:
        raise no_coco_root()
    root = Path(config.root).expanduser()
    if not root.is_dir():
        raise HarnessError(f"data root not found: {root}")
    return root


def check_data_roots(configs: Iterable[tuple[str, DataConfig]]) -> None:
    """Before anything is logged: every COCO root that the (run name, data config) pairs read exists
    with its annotation files."""
    seen: set[tuple[str | None, str, str]] = set()
    for name, data in configs:
        key = (data.root, data.train_split, data.val_split)
        if data.source != "coco" or key in seen:
            continue
        seen.add(key)
        if not data.root:
            raise no_coco_root(f"run {name}")
        root = Path(data.root).expanduser()
        if not root.is_dir():
            raise HarnessError(f"data root not found: {root}")
        for split in dict.fromkeys((data.train_split, data.val_split)):
            if not annotation_path(root, split).is_file():
                raise HarnessError(f"annotation file not found: {annotation_path(root, split)}")


class DataCache:
    """Prepared data shared by the runs of one invocation that read the same subset."""

    def __init__(self, results_dir: Path) -> None:
        self.results_dir = results_dir
        self._entries: dict[str, PreparedData] = {}

    def get(self, config: DataConfig, progress: Progress) -> PreparedData:
        root = data_root(config, self.results_dir, progress)
        key = repr((str(root.resolve()), config.model_dump(exclude={"hflip", "random_resized_crop"})))
        if key not in self._entries:
            self._entries[key] = prepare_data(
                root, train_split=config.train_split, val_split=config.val_split,
                train_size=config.train_size, val_size=config.val_size, image_size=config.image_size,
                resize=config.resize, subset_seed=config.subset_seed, cache_dir=self.results_dir / "cache",
                drop_empty=config.drop_empty, include_crowd=config.include_crowd,
                strict_images=config.strict_images, progress=progress,
            )
        return self._entries[key]
