"""Fit an oriented RGB image to its bucket: scale to cover, crop to exactly (bh, bw), flip.

The scale is s = max(bw / W, bh / H), so the image covers the bucket on both axes and only
the overhang on one axis is cropped; s > 1 (upscaling) is refused unless asked for, because
an image smaller than its bucket means the assignment and the file disagree.

Output follows SDXL micro-conditioning: ``original_size`` (h, w) of the full oriented image
(before any JPEG draft reduction), ``crop_top_left`` (y, x) in the resized image, and
``target_size`` (h, w). On a horizontal flip the crop's x is mirrored
(``resized_w - x - bw``), i.e. the sample equals cropping the flipped resized image there.

torchvision v2's split: :meth:`BucketResizeCrop.make_params` (or :func:`fit_params`) draws
a :class:`FitParams` from the full oriented size, the bucket and a generator, and the
deterministic kernel :func:`fit` applies it to the decoded pixels; samples carry the params
as ``sample["fit"]``, so the report, the caches and the GPU path read the same crop and flip.

Resampling: ``"bicubic"`` (the default) and ``"bilinear"`` run torchvision's antialiased
uint8 kernels (equal to Pillow's within one grey level, several times faster), reading
Pillow's pixel buffer in place where Pillow exports it; ``"lanczos"``, ``"box"``,
``"hamming"`` and ``"nearest"`` run Pillow, resizing only the cropped region.

:func:`decode_and_fit` is decode plus fit for a file and params drawn beforehand: what the
encoder cache builds its latents from.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from transforms.image import DEFAULT_DECODE, ORIGINAL_SIZE_KEY, DecodeSettings, decode_image

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
DEFAULT_RESAMPLE = "bicubic"


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


@dataclass(frozen=True)
class FitParams:
    """Everything random or derived about fitting one image to its bucket, before any pixel.

    ``bucket`` (w, h); ``scale`` = max(bw/W, bh/H) of the full oriented (W, H) image;
    ``resized`` (w, h) the image scaled by it; ``crop`` (y, x, h, w), the box cut from the
    resized image (h, w equal the bucket's); ``flip`` mirrors the crop horizontally. The same
    params cut the same region whatever decoded the file (full size, a JPEG draft, the GPU
    path), so caches can key samples by them.
    """

    bucket: tuple[int, int]
    scale: float
    resized: tuple[int, int]
    crop: tuple[int, int, int, int]
    flip: bool

    def __post_init__(self) -> None:
        (bw, bh), (rw, rh), (y, x, h, w) = self.bucket, self.resized, self.crop
        if (h, w) != (bh, bw):
            raise ValueError(f"crop {self.crop} (y, x, h, w) is not the bucket's {bw}x{bh}")
        if not (0 <= y <= rh - h and 0 <= x <= rw - w):
            raise ValueError(f"crop {self.crop} (y, x, h, w) is outside the resized {rw}x{rh}")

    @property
    def crop_top_left(self) -> tuple[int, int]:
        """SDXL's ``crop_top_left`` (y, x): the crop's corner, mirrored when flipped (so the
        sample equals cropping the flipped resized image there)."""
        y, x, _, w = self.crop
        return (y, self.resized[0] - x - w) if self.flip else (y, x)


def fit_params(
    size_wh: Sequence[int],
    bucket_wh: Sequence[int],
    *,
    crop: str | tuple[int, int] = "center",
    flip: bool = False,
    rng: np.random.Generator | None = None,
    allow_upscale: bool = False,
) -> FitParams:
    """The :class:`FitParams` of an image of full oriented size ``size_wh`` in ``bucket_wh``.

    ``crop``: ``"center"``, ``"random"`` (offset drawn from ``rng``: y, then x) or an explicit
    (y, x) in the resized image. Raises ValueError when upscaling is needed and not allowed.
    """
    width, height = (int(v) for v in size_wh)
    bw, bh = (int(v) for v in bucket_wh)
    new_w, new_h = resized_size(width, height, (bw, bh), allow_upscale=allow_upscale)
    y, x = _crop_offset(crop, new_w - bw, new_h - bh, rng)
    return FitParams(
        bucket=(bw, bh),
        scale=max(bw / width, bh / height),
        resized=(new_w, new_h),
        crop=(y, x, bh, bw),
        flip=bool(flip),
    )


def fit(img: Image.Image, params: FitParams, *, resample: str = DEFAULT_RESAMPLE) -> torch.Tensor:
    """The deterministic kernel: ``img`` scaled to ``params.resized``, cropped, maybe flipped.

    ``img`` is the oriented RGB picture at any decoded size (a JPEG draft is smaller than the
    size the params were made for: it is scaled straight to ``params.resized``). Returns
    uint8 (3, h, w): with the torch filters a view into the resized image (channels last),
    since ``collate`` copies every sample into the batch anyway and one copy is enough;
    call ``.contiguous()`` for a compact tensor of its own.
    """
    if img.mode != "RGB":
        raise ValueError(f"fit expects an RGB image (use load_image), got mode {img.mode}")
    if resample not in RESAMPLE_MODES:
        raise ValueError(f"resample must be one of {RESAMPLE_MODES}, got {resample!r}")
    (new_w, new_h), (y, x, bh, bw), flip = params.resized, params.crop, params.flip
    if img.size == (new_w, new_h):
        region = img.crop((x, y, x + bw, y + bh))
    elif resample in _TORCH_FILTERS:
        return _torch_resize_crop(img, params, resample)
    else:
        sx, sy = new_w / img.width, new_h / img.height
        box = (x / sx, y / sy, (x + bw) / sx, (y + bh) / sy)
        region = img.resize((bw, bh), _PIL_FILTERS[resample], box=box)
    return _pil_to_chw(region.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else region)


def original_size_wh(img: Image.Image) -> tuple[int, int]:
    """(w, h) of the full oriented picture ``img`` was decoded from (``load_image`` records it
    before a JPEG draft shrinks the decode), else ``img.size``."""
    h, w = img.info.get(ORIGINAL_SIZE_KEY, (img.height, img.width))
    return int(w), int(h)


def sample_fields(params: FitParams, pixels: torch.Tensor, size_wh: Sequence[int]) -> dict:
    """The sample keys of a fitted image: ``pixel_values``, ``fit``, and SDXL's
    ``original_size`` (h, w), ``crop_top_left`` (y, x), ``target_size`` (h, w), ``flipped``."""
    bw, bh = params.bucket
    return {
        "pixel_values": pixels,
        "fit": params,
        "original_size": (int(size_wh[1]), int(size_wh[0])),
        "crop_top_left": params.crop_top_left,
        "target_size": (bh, bw),
        "flipped": params.flip,
    }


def decode_and_fit(
    source: str | os.PathLike | bytes,
    params: FitParams,
    settings: DecodeSettings = DEFAULT_DECODE,
    *,
    resample: str = DEFAULT_RESAMPLE,
    expected_size: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Decode ``source`` and fit it with ``params``: :func:`sample_fields` (``pixel_values``
    uint8 (3, h, w) of ``params.bucket``, ``fit``, SDXL's sizes).

    The decode is :func:`~transforms.image.decode_image` with ``settings`` (limits, JPEG
    draft toward the bucket, background) and ``expected_size``, the scan's (w, h), checked;
    the fit is :func:`fit` with ``resample``. The params come first (from the scanned size:
    ``BucketResizeCrop.make_params`` or :func:`fit_params`), so images that must share one
    crop, such as a pair, pass the same params. Raises
    :class:`~transforms.image.ImageDecodeError` or ValueError on a file that cannot be served.
    """
    img = decode_image(source, settings, bucket_wh=params.bucket, expected_size=expected_size)
    return sample_fields(params, fit(img, params, resample=resample), original_size_wh(img))


class BucketResizeCrop:
    """The image transform of ``TextToImageDataset``: ``transform(sample) -> sample``.

    Reads ``sample["image"]`` (oriented RGB), ``sample["bucket"]`` (w, h) and
    ``sample["rng"]``; adds :func:`sample_fields` (``pixel_values``, ``fit``, ...).
    ``make_params`` draws the randomness and the :func:`fit` kernel applies it, so the GPU
    path and the caches reuse the same draws. ``transform(img, bucket_wh, rng) -> dict``
    works too, for a direct call.

    ``crop``: ``"center"`` or ``"random"``; ``flip_p``: probability of a horizontal flip;
    ``resample``: one of :data:`RESAMPLE_MODES`; ``allow_upscale``: fit images smaller
    than their bucket (``TextToImageDataset`` reads it to refuse an upscaled assignment
    this transform would fail on). The flip is drawn first and always, so changing ``crop``
    never changes which samples are flipped.
    """

    def __init__(
        self,
        crop: str = "center",
        flip_p: float = 0.0,
        resample: str = DEFAULT_RESAMPLE,
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
        self.allow_upscale = bool(allow_upscale)

    def make_params(
        self, size_wh: Sequence[int], bucket_wh: Sequence[int], rng: np.random.Generator | None
    ) -> FitParams:
        """Draw the flip, then the crop, for a (w, h) image in a (w, h) bucket."""
        if rng is None:
            if self.crop == "random" or self.flip_p > 0:
                raise ValueError("BucketResizeCrop needs an rng for random crops or flips")
            flip = False
        else:
            flip = bool(rng.random() < self.flip_p)
        return fit_params(
            size_wh, bucket_wh, crop=self.crop, flip=flip, rng=rng, allow_upscale=self.allow_upscale
        )

    @overload
    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any]: ...
    @overload
    def __call__(
        self, sample: Image.Image, bucket_wh: Sequence[int], rng: np.random.Generator | None
    ) -> dict[str, Any]: ...

    def __call__(self, sample, bucket_wh=None, rng=None):
        """``sample`` plus its fitted fields; or, given an image, its bucket and a generator,
        the fitted fields alone."""
        if isinstance(sample, Mapping):
            img, bucket_wh, rng = sample["image"], sample["bucket"], sample["rng"]
            return {**sample, **self._fitted(img, bucket_wh, rng)}
        return self._fitted(sample, bucket_wh, rng)

    def _fitted(
        self, img: Image.Image, bucket_wh: Sequence[int], rng: np.random.Generator | None
    ) -> dict[str, Any]:
        size = original_size_wh(img)
        params = self.make_params(size, bucket_wh, rng)
        return sample_fields(params, fit(img, params, resample=self.resample), size)

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


def _torch_resize_crop(img: Image.Image, params: FitParams, resample: str) -> torch.Tensor:
    (new_w, new_h), (y, x, bh, bw) = params.resized, params.crop
    resized = F.resize(
        _channels_last(img),  # the layout the uint8 kernels want
        [new_h, new_w],
        interpolation=_TORCH_FILTERS[resample],
        antialias=True,
    )
    out = resized[:3, y : y + bh, x : x + bw]
    return out.flip(-1) if params.flip else out  # collate's stack is the one copy


def _channels_last(img: Image.Image) -> torch.Tensor:
    """A (C, H, W) channels-last uint8 view of an RGB ``img``: Pillow's own buffer (4 bytes
    a pixel, RGB and padding; the kernels run 4 channels as fast as 3), shared without a
    copy where Pillow exports it (Arrow, one memory block), else a packed RGB copy."""
    with warnings.catch_warnings():  # read-only buffers; they are only read here
        warnings.simplefilter("ignore", UserWarning)
        try:
            flat = pa.array(img).values.to_numpy(zero_copy_only=True)
        except (pa.ArrowException, ValueError, TypeError):  # several blocks, or older Pillow
            flat = None
        if flat is None or flat.size != img.width * img.height * 4:
            return torch.from_numpy(np.asarray(img)).permute(2, 0, 1)
        return torch.from_numpy(flat).view(img.height, img.width, 4).permute(2, 0, 1)
