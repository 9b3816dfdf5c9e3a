"""Fit an oriented RGB image to its bucket: scale to cover, crop to exactly (bh, bw), flip.

The scale is s = max(bw / W, bh / H), so the image covers the bucket on both axes and only
the overhang on one axis is cropped; s > 1 (upscaling) is refused unless asked for, because
an image smaller than its bucket means the assignment and the file disagree.

Output follows SDXL micro-conditioning: ``original_size`` (h, w) of the full oriented image
(before any JPEG draft reduction), ``crop_top_left`` (y, x) in the resized image, and
``target_size`` (h, w). On a horizontal flip the crop's x is mirrored
(``resized_w - x - bw``), i.e. the sample equals cropping the flipped resized image there.

Resampling: ``"bicubic"`` and ``"bilinear"`` run torchvision's antialiased uint8 kernels
(equal to Pillow's within one grey level, several times faster); ``"lanczos"``, ``"box"``,
``"hamming"`` and ``"nearest"`` run Pillow, resizing only the cropped region.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from transforms.image import ORIGINAL_SIZE_KEY

_TORCH_FILTERS = {
    "bicubic": F.InterpolationMode.BICUBIC,
    "bilinear": F.InterpolationMode.BILINEAR,
}
_PIL_FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "nearest": Image.Resampling.NEAREST,
}
RESAMPLE_MODES = tuple(sorted({*_TORCH_FILTERS, *_PIL_FILTERS}))


def resized_size(
    width: int, height: int, bucket_wh: Sequence[int], *, allow_upscale: bool = False
) -> tuple[int, int]:
    """(w, h) of the image scaled by s = max(bw/W, bh/H): one side equals the bucket's, the
    other covers it. Raises ValueError when s > 1 and ``allow_upscale`` is False."""
    bw, bh = (int(v) for v in bucket_wh)
    if bw < 1 or bh < 1:
        raise ValueError(f"bucket must be a positive (w, h), got {tuple(bucket_wh)}")
    if width < 1 or height < 1:
        raise ValueError(f"image has no pixels ({width}x{height})")
    if (bw > width or bh > height) and not allow_upscale:
        s = max(bw / width, bh / height)
        raise ValueError(
            f"image {width}x{height} is smaller than its bucket {bw}x{bh} (would need upscaling "
            f"by {s:.3f}, allow_upscale=False): the assignment does not match this image — "
            "was the file changed after the scan, or assigned with allow_upscale=True?"
        )
    if bw * height >= bh * width:  # width binds: bw / W >= bh / H
        return bw, max(bh, math.floor(height * bw / width + 0.5))
    return max(bw, math.floor(width * bh / height + 0.5)), bh


def resize_crop(
    img: Image.Image,
    bucket_wh: Sequence[int],
    *,
    crop: str | tuple[int, int] = "center",
    flip: bool = False,
    rng: np.random.Generator | None = None,
    resample: str = "lanczos",
    allow_upscale: bool = False,
) -> dict[str, Any]:
    """Scale ``img`` to cover the bucket, crop to exactly (bh, bw), optionally flip.

    ``crop``: ``"center"``, ``"random"`` (offset drawn from ``rng``) or an explicit (y, x) in
    the resized image. Returns ``pixel_values`` (uint8, (3, bh, bw), contiguous),
    ``original_size`` (h, w), ``crop_top_left`` (y, x), ``target_size`` (h, w), ``flipped``.
    """
    if img.mode != "RGB":
        raise ValueError(f"resize_crop expects an RGB image (use load_image), got mode {img.mode}")
    if resample not in RESAMPLE_MODES:
        raise ValueError(f"resample must be one of {RESAMPLE_MODES}, got {resample!r}")
    bw, bh = (int(v) for v in bucket_wh)
    width, height = img.size
    new_w, new_h = resized_size(width, height, (bw, bh), allow_upscale=allow_upscale)
    y, x = _crop_offset(crop, new_w - bw, new_h - bh, rng)

    if (new_w, new_h) == (width, height):
        region = img.crop((x, y, x + bw, y + bh))
        pixels = _pil_to_chw(region.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else region)
    elif resample in _TORCH_FILTERS:
        pixels = _torch_resize_crop(img, (new_w, new_h), (y, x), (bw, bh), flip, resample)
    else:
        sx, sy = new_w / width, new_h / height
        box = (x / sx, y / sy, (x + bw) / sx, (y + bh) / sy)
        region = img.resize((bw, bh), _PIL_FILTERS[resample], box=box)
        pixels = _pil_to_chw(region.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else region)

    original = img.info.get(ORIGINAL_SIZE_KEY, (height, width))
    return {
        "pixel_values": pixels,
        "original_size": (int(original[0]), int(original[1])),
        "crop_top_left": (y, new_w - x - bw if flip else x),
        "target_size": (bh, bw),
        "flipped": bool(flip),
    }


class BucketResizeCrop:
    """The image transform of ``TextToImageDataset``: ``(img, bucket_wh, rng) -> dict``.

    ``crop``: ``"center"`` or ``"random"``; ``flip_p``: probability of a horizontal flip;
    ``resample``: one of :data:`RESAMPLE_MODES`. The flip is drawn first and always, so
    changing ``crop`` never changes which samples are flipped.
    """

    def __init__(
        self,
        crop: str = "center",
        flip_p: float = 0.0,
        resample: str = "lanczos",
        allow_upscale: bool = False,
    ) -> None:
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")
        if resample not in RESAMPLE_MODES:
            raise ValueError(f"resample must be one of {RESAMPLE_MODES}, got {resample!r}")
        self.crop = crop
        self.flip_p = float(flip_p)
        self.resample = resample
        self.allow_upscale = allow_upscale

    def __call__(
        self, img: Image.Image, bucket_wh: Sequence[int], rng: np.random.Generator | None
    ) -> dict[str, Any]:
        """:func:`resize_crop` with this transform's settings; the flip is drawn from ``rng``."""
        if rng is None:
            if self.crop == "random" or self.flip_p > 0:
                raise ValueError("BucketResizeCrop needs an rng for random crops or flips")
            flip = False
        else:
            flip = bool(rng.random() < self.flip_p)
        return resize_crop(
            img,
            bucket_wh,
            crop=self.crop,
            flip=flip,
            rng=rng,
            resample=self.resample,
            allow_upscale=self.allow_upscale,
        )

    def __repr__(self) -> str:
        return (
            f"BucketResizeCrop(crop={self.crop!r}, flip_p={self.flip_p}, "
            f"resample={self.resample!r}, allow_upscale={self.allow_upscale})"
        )


def _crop_offset(
    crop: str | tuple[int, int], spare_w: int, spare_h: int, rng: np.random.Generator | None
) -> tuple[int, int]:
    if crop == "center":
        return spare_h // 2, spare_w // 2
    if crop == "random":
        if rng is None:
            raise ValueError("crop='random' needs an rng")
        return int(rng.integers(0, spare_h + 1)), int(rng.integers(0, spare_w + 1))
    if isinstance(crop, str):
        raise ValueError(f"crop must be 'center', 'random' or (y, x), got {crop!r}")
    y, x = (int(v) for v in crop)
    if not (0 <= y <= spare_h and 0 <= x <= spare_w):
        raise ValueError(f"crop (y, x)={crop} outside the valid range y<={spare_h}, x<={spare_w}")
    return y, x


def _pil_to_chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy())


def _torch_resize_crop(
    img: Image.Image,
    new_wh: tuple[int, int],
    yx: tuple[int, int],
    bucket_wh: tuple[int, int],
    flip: bool,
    resample: str,
) -> torch.Tensor:
    with warnings.catch_warnings():  # Pillow's buffer is read-only; it is only read here
        warnings.simplefilter("ignore", UserWarning)
        hwc = torch.from_numpy(np.asarray(img))
    resized = F.resize(
        hwc.permute(2, 0, 1),  # a channels-last view: the layout the uint8 kernels want
        [new_wh[1], new_wh[0]],
        interpolation=_TORCH_FILTERS[resample],
        antialias=True,
    )
    (y, x), (bw, bh) = yx, bucket_wh
    out = resized[:, y : y + bh, x : x + bw]
    return (out.flip(-1) if flip else out).contiguous()
