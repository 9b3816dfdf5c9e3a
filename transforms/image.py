"""Decode one image file (or its bytes) into an oriented 8-bit RGB ``PIL.Image``.

What reaches the model must be the picture the user meant, whatever the file stores:

- EXIF/XMP orientation is applied (the same rule as ``PIL.ImageOps.exif_transpose``, so the
  result's size equals the oriented size ``scan`` recorded).
- Alpha (RGBA, LA, PA, P or L/RGB/I;16 with a transparency key) is composited on
  ``background``; CMYK, LAB, 1-bit and palette images are converted by Pillow.
- 16-bit images are scaled to 8 bits (``round(v / 257)``), never clipped. 32-bit integer
  (``I``) images are read the same way when all values lie in [0, 65535] (how Pillow
  represents 16-bit data), else min-max scaled.
  Float (``F``) images are read as [0, 1] when all finite values lie there, else min-max
  scaled (constant images become black); NaN and inf become 0.
- JPEGs are decoded at a reduced DCT scale (``Image.draft``) when ``draft_size`` says the
  image will be shrunk to at most half its size anyway: same result after the final
  resize, a fraction of the decoding work. The full oriented size is kept in
  ``img.info["original_size"]`` as (h, w) for SDXL-style micro-conditioning.
- A decompression-bomb limit (``max_pixels``) is checked from the header, before decoding,
  and so is a memory limit in bytes (``max_decode_bytes``, 1 GiB by default): the peak
  memory of decoding and converting, from the mode, bit depth and size (see
  :func:`decode_bytes`), so that a tiny file declaring a huge 16-bit or float image is
  refused (``too_many_bytes``) instead of taking gigabytes. Wide modes are converted to
  8 bits in bands of rows with integer math where possible: no full-size float copies.

Every failure raises :class:`ImageDecodeError` naming the file and the reason.

:class:`DecodeSettings` holds those choices (``max_pixels``, ``max_decode_bytes``, ``draft``,
``background``) on one object, and :func:`decode_image` is the one decode every reader uses
(the dataset, the encoder cache's build, the GPU path's CPU fallback): it also refuses a file
whose size is no longer the one the scan recorded.
"""

from __future__ import annotations

import io
import math
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from bucketing.headers import SWAPS_AXES, orientation_code
from transforms.decoded_cache import DecodedImageCache

ORIGINAL_SIZE_KEY = "original_size"
DEFAULT_MAX_DECODE_BYTES = 2**30
_BAND_PIXELS = 2**20  # rows converted at a time from 16-bit / 32-bit / float images
_BAND_BYTES = 32  # bytes per pixel of a band's temporaries (float64 values and masks)

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ALPHA_MODES = {"RGBA": "RGBA", "RGBa": "RGBA", "LA": "LA", "La": "LA", "PA": "RGBA"}


class ImageDecodeError(OSError):
    """An image that cannot become RGB pixels; ``source`` and ``reason`` say which and why."""

    def __init__(self, source: str, reason: str | None = None) -> None:
        # A lone argument is a finished message: that is how torch's DataLoader re-raises a
        # worker's exception in the main process, so ``except ImageDecodeError`` still works.
        super().__init__(source if reason is None else f"cannot load image {source}: {reason}")
        self.source = source
        self.reason = reason

    def __reduce__(self):  # keep the two fields when the error crosses a worker process
        return (type(self), (self.source, self.reason))


def describe_source(path_or_bytes: str | os.PathLike | bytes) -> str:
    """A short human name for what ``load_image`` was given (a path, or ``<N bytes>``)."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return f"<{len(path_or_bytes)} bytes>"
    return os.fspath(path_or_bytes)


def load_image(
    path_or_bytes: str | os.PathLike | bytes,
    *,
    background: Sequence[int] = (255, 255, 255),
    max_pixels: int | None = None,
    draft_size: Sequence[int] | None = None,
    max_decode_bytes: int | None = DEFAULT_MAX_DECODE_BYTES,
) -> Image.Image:
    """Open, orient and convert an image to 8-bit RGB.

    ``max_pixels``: refuse images with more pixels than this, from the header, before decoding
    (Pillow's own decompression-bomb check applies as well). ``max_decode_bytes``: refuse,
    before decoding, images whose decoding and conversion would hold more memory than this
    (:func:`decode_bytes`; None: no limit). ``draft_size``: the (w, h) box
    the image will later be scaled to cover (the bucket); lets a JPEG decode at 1/2, 1/4 or
    1/8 scale while staying at least that large. Raises :class:`ImageDecodeError` on any failure.
    """
    name = describe_source(path_or_bytes)
    bg = _background(background)
    try:
        if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
            fp = io.BytesIO(path_or_bytes)
        else:
            fp = path_or_bytes
            if not stat.S_ISREG(os.stat(fp).st_mode):  # opening a FIFO would block forever
                raise ImageDecodeError(name, "not a regular file")
        with Image.open(fp) as img:
            width, height = img.size
            if width < 1 or height < 1:
                raise ImageDecodeError(name, f"empty image ({width}x{height})")
            if max_pixels is not None and width * height > max_pixels:
                raise ImageDecodeError(
                    name, f"too_many_pixels: {width}x{height} exceeds max_pixels={max_pixels}"
                )
            orientation = None
            if img.format == "JPEG":
                # needed before decoding to size the draft
                orientation = orientation_code(_exif_orientation(img))
                if draft_size is not None:
                    _draft(img, orientation in SWAPS_AXES, draft_size)
            _check_decode_bytes(name, img, max_decode_bytes)
            img.load()
            if orientation is None:
                orientation = orientation_code(_exif_orientation(img))
            rgb = _to_rgb(img, bg)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(name, f"too_many_pixels: {e}") from e
    except Image.UnidentifiedImageError as e:
        raise ImageDecodeError(name, "not a recognised image format") from e
    except Exception as e:  # any decoder failure (the AVIF plugin raises RuntimeError)
        raise ImageDecodeError(name, f"{type(e).__name__}: {e}") from e
    if orientation in _TRANSPOSE:
        rgb = rgb.transpose(_TRANSPOSE[orientation])
    if orientation in SWAPS_AXES:
        width, height = height, width
    rgb.info = {ORIGINAL_SIZE_KEY: (height, width)}
    return rgb


def decode_bytes(mode: str, size: Sequence[int], transparency: bool = False) -> int:
    """The peak bytes ``load_image`` holds to decode and convert a (w, h) image of Pillow
    ``mode`` (``transparency``: it has a colour key): Pillow's storage (1, 2 or 4 bytes a
    pixel) plus the conversion's (nothing for plain RGB; 4 for a mode Pillow converts;
    gray, L and RGB copies for 16-bit / 32-bit / float, plus their row band; 9 to composite
    alpha, 13 when the alpha mode is converted first)."""
    width, height = (int(v) for v in size)
    pixels = width * height
    stored = 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4
    if mode == "RGB" and not transparency:
        work = 0
    elif mode.startswith("I;16") or mode in ("I", "F"):
        work = 6 + 6 * transparency  # gray + L + RGB (+ alpha array, alpha image, canvas)
        pixels_in_band = min(pixels, _BAND_PIXELS)
        return pixels * (stored + work) + pixels_in_band * _BAND_BYTES
    elif mode in _ALPHA_MODES or transparency:
        work = 9 + 4 * (mode not in ("RGBA", "LA"))  # (RGBA copy) + RGB + alpha + canvas
    else:
        work = 4
    return pixels * (stored + work)


def _check_decode_bytes(name: str, img: Image.Image, limit: int | None) -> None:
    """Refuse ``img`` (opened, not decoded) when decoding it would hold over ``limit`` bytes."""
    if limit is None:
        return
    need = decode_bytes(img.mode, img.size, "transparency" in img.info)
    if need > limit:
        width, height = img.size
        raise ImageDecodeError(
            name,
            f"too_many_bytes: decoding this {width}x{height} {img.mode} image needs about "
            f"{need / 2**20:.0f} MiB, over max_decode_bytes={limit} ({limit / 2**20:.0f} MiB)",
        )


def _background(background: Sequence[int]) -> tuple[int, int, int]:
    bg = tuple(int(c) for c in background)
    if len(bg) != 3 or not all(0 <= c <= 255 for c in bg):
        raise ValueError(f"background must be three ints in 0..255, got {background!r}")
    return bg  # type: ignore[return-value]


@dataclass(frozen=True)
class DecodeSettings:
    """How a file becomes pixels, the same in every reader.

    ``max_pixels``: refuse images with more pixels (from the header; None: Pillow's own
    bomb limit only). ``max_decode_bytes``: refuse images whose decoding would hold more
    memory (:func:`decode_bytes`; None: no limit). ``draft``: let a JPEG decode at a reduced
    DCT scale when its bucket is at most half its size (right only for transforms that scale
    the image to cover the bucket). ``background``: the RGB colour behind transparency.
    """

    max_pixels: int | None = None
    max_decode_bytes: int | None = DEFAULT_MAX_DECODE_BYTES
    draft: bool = True
    background: tuple[int, int, int] = (255, 255, 255)

    def __post_init__(self) -> None:
        object.__setattr__(self, "background", _background(self.background))
        object.__setattr__(self, "draft", bool(self.draft))

    def load_kwargs(self, bucket_wh: Sequence[int] | None = None) -> dict[str, Any]:
        """The keyword arguments of :func:`load_image` for an image fitted to ``bucket_wh``."""
        return {"background": self.background, "max_pixels": self.max_pixels,
                "max_decode_bytes": self.max_decode_bytes,
                "draft_size": bucket_wh if self.draft and bucket_wh is not None else None}


DEFAULT_DECODE = DecodeSettings()


def decode_image(
    source: str | os.PathLike | bytes,
    settings: DecodeSettings = DEFAULT_DECODE,
    *,
    bucket_wh: Sequence[int] | None = None,
    expected_size: Sequence[int] | None = None,
    cache: DecodedImageCache | None = None,
) -> Image.Image:
    """:func:`load_image` of ``source`` with ``settings``, for a picture that will be fitted to
    ``bucket_wh`` (w, h; the JPEG draft's target). ``expected_size``: the (w, h) the scan
    recorded; a file of another oriented size raises :class:`ImageDecodeError` (it changed
    after the scan, so its bucket was chosen for another picture). ``cache``: a
    :class:`~transforms.decoded_cache.DecodedImageCache` that returns this picture without
    decoding when the same file (path, size, mtime) was decoded toward the same draft target
    with the same settings in this process, and keeps it otherwise."""
    kwargs = settings.load_kwargs(bucket_wh)
    key = cache.key(source, settings, kwargs["draft_size"]) if cache is not None else None
    img = cache.get(key) if cache is not None else None
    if img is None:
        img = load_image(source, **kwargs)
        if cache is not None:
            cache.put(key, img)
    check_size(describe_source(source), img.info[ORIGINAL_SIZE_KEY], expected_size)
    return img


def check_size(
    name: str, original_hw: Sequence[int], expected_size: Sequence[int] | None
) -> None:
    """Raise :class:`ImageDecodeError` when a decoded picture's oriented (h, w)
    ``original_hw`` is not the scan's (w, h) ``expected_size`` (None: no check)."""
    if expected_size is None:
        return
    h, w = (int(v) for v in original_hw)
    ew, eh = (int(v) for v in expected_size)
    if (w, h) != (ew, eh):
        raise ImageDecodeError(
            name, f"the file is {w}x{h} but was {ew}x{eh} when scanned: it changed after the "
            "scan (rescan to train on it)")


def _exif_orientation(img: Image.Image) -> Any:
    """Tag 274 as ``Image.getexif`` returns it (``bucketing.headers.orientation_code`` says
    what it means); 1 when there is none or the EXIF block is unreadable."""
    try:
        return img.getexif().get(0x0112, 1)
    except Exception:  # a corrupt EXIF block must not lose the image; Pillow then reads 1 too
        return 1


def _draft(img: Image.Image, swaps_axes: bool, draft_size: Sequence[int]) -> None:
    """Ask libjpeg for the smallest DCT scale that still covers ``draft_size`` once oriented
    (``swaps_axes``: the orientation turns the image a quarter turn)."""
    bw, bh = (int(v) for v in draft_size)
    width, height = img.size
    if swaps_axes:
        bw, bh = bh, bw
    if bw < 1 or bh < 1:
        return
    scale = max(bw / width, bh / height)
    if scale <= 0.5:
        img.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))


def _to_rgb(img: Image.Image, bg: tuple[int, int, int]) -> Image.Image:
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        gray, alpha = _wide_to_8bit(img)
        rgb = Image.fromarray(gray, "L").convert("RGB")
        return _composite(rgb, Image.fromarray(alpha, "L"), bg) if alpha is not None else rgb
    if mode in _ALPHA_MODES or "transparency" in img.info:
        # L, 1 or RGB (or P) with a single transparent colour key become LA / RGBA
        target = _ALPHA_MODES.get(mode) or ("LA" if mode in ("L", "1") else "RGBA")
        rgba = img if mode == target else img.convert(target)
        return _composite(rgba.convert("RGB"), rgba.getchannel("A"), bg)
    return img.convert("RGB")


def _composite(rgb: Image.Image, alpha: Image.Image, bg: tuple[int, int, int]) -> Image.Image:
    """Blend ``rgb`` over a solid ``bg`` with ``alpha`` (a fully opaque alpha is a no-op)."""
    if alpha.getextrema() == (255, 255):
        return rgb
    canvas = Image.new("RGB", rgb.size, bg)
    canvas.paste(rgb, mask=alpha)
    return canvas


def _wide_to_8bit(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """16-bit, 32-bit integer and float grayscale to uint8, plus an alpha from a colour key,
    converted band by band (one pass for the value range, one to map it)."""
    key = img.info.get("transparency")
    keyed = isinstance(key, (int, float)) and not isinstance(key, bool)
    gray = np.empty((img.height, img.width), np.uint8)
    alpha = np.empty_like(gray) if keyed else None
    lo, hi = _value_range(img)
    if img.mode == "F":
        if lo >= 0.0 and hi <= 1.0:
            offset, factor = 0.0, 255.0
        elif hi > lo:
            offset, factor = lo, 255.0 / (hi - lo)
        else:
            offset, factor = 0.0, 0.0  # a constant image becomes black
    for rows, band in _bands(img):
        if alpha is not None:
            alpha[rows] = np.where(band == key, 0, 255)
        if img.mode == "F":
            values = np.where(np.isfinite(band), band, 0.0).astype(np.float64)
            gray[rows] = np.rint((values - offset) * factor)
        elif lo >= 0 and hi <= 65535:  # how Pillow holds 16-bit data: round(v / 257)
            gray[rows] = (band.astype(np.int64) * 255 + 32767) // 65535
        else:
            gray[rows] = (band.astype(np.int64) - lo) * 255 // max(hi - lo, 1)
    return gray, alpha


def _value_range(img: Image.Image) -> tuple[float, float]:
    """(min, max) of the image's values; NaN and inf count as 0 (the value they become)."""
    lo, hi = math.inf, -math.inf
    for _, band in _bands(img):
        if img.mode == "F":
            band = np.where(np.isfinite(band), band, 0.0)
        lo, hi = min(lo, band.min().item()), max(hi, band.max().item())
    return lo, hi


def _bands(img: Image.Image):
    """(row slice, numpy array) for consecutive bands of about ``_BAND_PIXELS`` pixels."""
    step = max(1, _BAND_PIXELS // img.width)
    for top in range(0, img.height, step):
        bottom = min(top + step, img.height)
        yield slice(top, bottom), np.asarray(img.crop((0, top, img.width, bottom)))
