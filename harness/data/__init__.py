"""COCO data layer: reading splits, nested subsets, the decode-once cache, the tensor loader,
the synthetic shapes dataset and the COCO download.

    from harness.data import prepare_data, BatchLoader
    data = prepare_data("data/coco", train_size=500, val_size=500, image_size=64)
    loader = BatchLoader(data.train_images, data.train_targets, batch_size=32, generator=g)
"""

from harness.data.cache import (
    PAD_RGB,
    RESIZE_MODES,
    CachedImages,
    DecodeFailure,
    SkippedImagesWarning,
    cache_key,
    decode_image,
    decode_images,
    load_or_build,
    transform_boxes,
)
from harness.data.coco import CocoSplit, annotation_path, image_dir, load_split, split_summary
from harness.data.download import (
    COCO_BASE_URL,
    KNOWN_FILES,
    DownloadResult,
    KnownFile,
    download_coco,
    download_file,
    unpack_zip,
)
from harness.data.pipeline import IMAGENET_MEAN, IMAGENET_STD, BatchLoader, denormalize, normalize_u8
from harness.data.prepare import PreparedData, prepare_data
from harness.data.sources import DataCache, check_datasets, data_root
from harness.data.subsets import nested_subset, permutation, resolve_size
from harness.data.synth import SHAPES, SynthResult, render_chunk, synthesize

__all__ = [
    "COCO_BASE_URL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KNOWN_FILES",
    "PAD_RGB",
    "RESIZE_MODES",
    "SHAPES",
    "BatchLoader",
    "CachedImages",
    "CocoSplit",
    "DataCache",
    "DecodeFailure",
    "DownloadResult",
    "KnownFile",
    "PreparedData",
    "SkippedImagesWarning",
    "SynthResult",
    "annotation_path",
    "cache_key",
    "check_datasets",
    "data_root",
    "decode_image",
    "decode_images",
    "denormalize",
    "download_coco",
    "download_file",
    "image_dir",
    "load_or_build",
    "load_split",
    "nested_subset",
    "normalize_u8",
    "permutation",
    "prepare_data",
    "render_chunk",
    "resolve_size",
    "split_summary",
    "synthesize",
    "transform_boxes",
    "unpack_zip",
]
