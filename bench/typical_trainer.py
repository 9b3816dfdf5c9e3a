"""The "typical trainer" reference: bucketing and image loading the way kohya sd-scripts
describes them publicly, written here so that bench/ can compare against it.

Bucketing (``make_bucket_resolutions`` + ``select_buckets``): a fixed bucket list of about
``max_area`` pixels (widths from ``min_size`` to ``max_size`` every ``divisible`` px, the
largest height that keeps the area, plus the square); each image takes the bucket with the
nearest *linear* aspect ratio, whatever its size, so small images are upscaled. In the
no-upscale mode (kohya's ``bucket_no_upscale``) every image gets its own bucket instead:
its size shrunk to ``max_area`` if larger, keeping the aspect, then floored to ``divisible``.

Loading (``load_image_typical``): PIL open -> convert("RGB") (no EXIF orientation) ->
resize so the image covers the bucket -> center crop -> float tensor in [-1, 1].
This is reference code for measurements, not part of the library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T


def make_bucket_resolutions(
    max_reso: tuple[int, int] = (1024, 1024),
    min_size: int = 256,
    max_size: int = 2048,
    divisible: int = 64,
) -> np.ndarray:
    """kohya-style bucket list as a sorted (K, 2) int64 array of (w, h)."""
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area)) // divisible * divisible
    resos = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, (max_area // width) // divisible * divisible)
        resos.add((width, height))
        resos.add((height, width))
        width += divisible
    return np.asarray(sorted(resos), dtype=np.int64)


@dataclass
class TypicalAssignment:
    """Bucket (w, h) per image ((0, 0) where rejected), the resize scale, and flags."""

    bucket_wh: np.ndarray
    scale: np.ndarray
    upscaled: np.ndarray
    rejected: np.ndarray


def select_buckets(
    sizes: np.ndarray,
    resos: np.ndarray,
    *,
    no_upscale: bool = False,
    max_area: int = 1024 * 1024,
    divisible: int = 64,
) -> TypicalAssignment:
    """Per image (W, H): the bucket with the nearest linear aspect (``no_upscale=False``),
    or its own size-derived bucket (``no_upscale=True``). Rejected: a side floors to 0."""
    sizes = np.asarray(sizes, dtype=np.int64)
    w, h = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
    aspect = w / h
    if no_upscale:
        # Shrink to max_area keeping the aspect, then floor each side to `divisible`.
        shrink = np.minimum(1.0, np.sqrt(max_area / (w * h)))
        rw = np.floor(w * shrink + 0.5)
        rh = np.floor(h * shrink + 0.5)
        bucket = np.stack([rw - rw % divisible, rh - rh % divisible], axis=1).astype(np.int64)
    else:
        ar = resos[:, 0] / resos[:, 1]
        bucket = np.empty((len(sizes), 2), dtype=np.int64)
        for lo in range(0, len(sizes), 1 << 16):  # the N x K distance matrix, in slices
            sl = slice(lo, lo + (1 << 16))
            bucket[sl] = resos[np.abs(ar[None, :] - aspect[sl, None]).argmin(axis=1)]
    rejected = (bucket < 1).any(axis=1)
    bucket[rejected] = 0
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.maximum(bucket[:, 0] / w, bucket[:, 1] / h)
    scale[rejected] = np.nan
    return TypicalAssignment(bucket, scale, ~rejected & (scale > 1.0), rejected)


_TO_TENSOR = T.Compose([T.ToTensor(), T.Normalize([0.5], [0.5])])


def load_image_typical(path: str, bucket_wh: tuple[int, int]) -> torch.Tensor:
    """PIL open -> RGB -> resize to cover the bucket (Lanczos) -> center crop -> float
    tensor (3, bh, bw) in [-1, 1]. EXIF orientation is ignored, as in most trainers."""
    bw, bh = int(bucket_wh[0]), int(bucket_wh[1])
    with Image.open(path) as im:
        img = im.convert("RGB")
    w, h = img.size
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, int(w * scale + 0.5)), max(bh, int(h * scale + 0.5))
    img = img.resize((rw, rh), Image.LANCZOS)
    left, top = (rw - bw) // 2, (rh - bh) // 2
    img = img.crop((left, top, left + bw, top + bh))
    return _TO_TENSOR(img)
