"""What the model receives: decode, fit to the bucket, caption, tokenize, collate.

Names are imported lazily so that importing one transform does not pull in
transformers or torch when it is not needed.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_image": "transforms.image",
    "BucketResizeCrop": "transforms.resize_crop",
    "CaptionTransform": "transforms.caption",
    "FluxTokenizer": "transforms.tokenize",
    "flux_image_ids": "transforms.tokenize",
    "collate": "transforms.collate",
    "to_model_input": "transforms.collate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'transforms' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
