"""What the data is: scan sources into an ImageIndex, define bucket ladders, assign
images to buckets without upscaling (the core: numpy, pyarrow, Pillow; no torch), and the
composition that serves them as a map-style dataset (imported on first use, so that
``import bucketing.assign`` never pulls in torch)."""

import importlib
from typing import Any

from bucketing.assign import Assignment, assign
from bucketing.index import ImageIndex, Rejection
from bucketing.ladder import BucketLadder
from bucketing.scan import scan
from bucketing.sources import resolve_source

# Composition: name -> module. Imported lazily; nothing in the core imports these.
_LAZY = {
    "TextToImageDataset": "bucketing.dataset",
    "build_cache": "bucketing.cache",
    "EncoderCache": "bucketing.cache",
    "MixedDataset": "bucketing.builders",
    "text_to_image_dataset": "bucketing.builders",
    "from_config": "bucketing.config",
    "load_config": "bucketing.config",
}

__all__ = [
    "Assignment",
    "BucketLadder",
    "EncoderCache",
    "ImageIndex",
    "MixedDataset",
    "Rejection",
    "TextToImageDataset",
    "assign",
    "build_cache",
    "from_config",
    "load_config",
    "resolve_source",
    "scan",
    "text_to_image_dataset",
]


def __getattr__(name: str) -> Any:
    """Import a composition name (``TextToImageDataset``, ...) on first use."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bucketing' has no attribute {name!r}")
