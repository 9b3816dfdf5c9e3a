"""What the data is: scan sources into an ImageIndex, define bucket ladders, assign
images to buckets without upscaling, and serve them as a map-style dataset.

Names are imported lazily so that ``import bucketing`` stays cheap in DataLoader
workers and command-line tools.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "scan": "bucketing.scan",
    "ImageIndex": "bucketing.index",
    "Rejection": "bucketing.index",
    "resolve_source": "bucketing.sources",
    "BucketLadder": "bucketing.ladder",
    "assign": "bucketing.assign",
    "Assignment": "bucketing.assign",
    "TextToImageDataset": "bucketing.dataset",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bucketing' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
