"""Image sizes and the loss of fitting a bucket inside one: what the ladder and assignment share.

:func:`image_sizes` validates (width, height) from an index, an array or pairs;
:func:`fit_loss` is the objective :func:`bucketing.assign` minimises (crop + resolution loss).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from bucketing.index import ImageIndex

# The largest side assign() accepts (PNG's limit; JPEG stops at 65535): beyond it an image is
# rejected "too_large", and below it w * h and every loss stay exact in int64 / float64.
MAX_SIDE = 2**31 - 1


def image_sizes(
    index_or_sizes: ImageIndex | np.ndarray | Sequence[Sequence[int]],
) -> tuple[np.ndarray, np.ndarray]:
    """(width, height) int64 arrays from an :class:`~bucketing.index.ImageIndex`, an (N, 2)
    array or a sequence of (w, h). Sizes that are not whole numbers (1.5, NaN, text) are a
    ValueError, and so is the first size that is not positive; sides above ``MAX_SIDE``
    (whatever their magnitude, clipped to 2**62) are left for the caller to reject."""
    width = getattr(index_or_sizes, "width", None)
    height = getattr(index_or_sizes, "height", None)
    if width is not None and height is not None:
        width, height = np.asarray(width, np.int64), np.asarray(height, np.int64)
    else:
        try:
            arr = np.asarray(index_or_sizes)
            if arr.dtype == object:  # Python ints beyond int64 (exact below 2**53)
                arr = arr.astype(np.float64)
            if arr.dtype.kind == "f":  # whole numbers only; a huge one stays too large
                if not (np.isfinite(arr) & (arr == np.trunc(arr))).all():
                    raise ValueError("a size is not a whole number of pixels")
                arr = np.minimum(arr, 2.0**62)
            arr = arr.astype(np.int64)
        except (OverflowError, TypeError, ValueError) as e:
            raise ValueError(f"sizes must be whole numbers of pixels: {e}") from None
        if arr.size == 0:
            arr = arr.reshape(0, 2)
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise ValueError(f"sizes must be an (N, 2) array of (width, height), got shape "
                             f"{arr.shape}")
        width, height = arr[:, 0], arr[:, 1]
    if len(width) and (width.min() < 1 or height.min() < 1):
        i = int(np.flatnonzero((width < 1) | (height < 1))[0])
        raise ValueError(f"image {i} has size {width[i]}x{height[i]}; sizes must be positive")
    return np.ascontiguousarray(width), np.ascontiguousarray(height)


def fit_loss(
    bw: np.ndarray, bh: np.ndarray, w: np.ndarray, h: np.ndarray, cap: np.ndarray
) -> np.ndarray:
    """crop_loss + resolution_loss of buckets (bw, bh) that fit inside images (w, h), float64
    and broadcasting; ``cap`` = min(w * h, max_area): the pixels an image could train at."""
    x = bw * h  # proportional to the bucket's aspect over the image's
    y = bh * w
    kept = np.minimum(x, y) / np.maximum(x, y)
    return 2.0 - kept - (bw * bh) / cap
