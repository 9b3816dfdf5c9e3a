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
- A decompression-bomb limit (``max_pixels``) is checked from the header, before decoding.

Every failure raises :class:`ImageDecodeError` naming the file and the reason.
"""

from __future__ import annotations

import io
import math
import os
import stat
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from bucketing.headers import SWAPS_AXES, orientation_code

ORIGINAL_SIZE_KEY = "original_size"

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
) -> Image.Image:
    """Open, orient and convert an image to 8-bit RGB.

    ``max_pixels``: refuse images with more pixels than this, from the header, before decoding
    (Pillow's own decompression-bomb check applies as well). ``draft_size``: the (w, h) box
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


def _background(background: Sequence[int]) -> tuple[int, int, int]:
    bg = tuple(int(c) for c in background)
    if len(bg) != 3 or not all(0 <= c <= 255 for c in bg):
        raise ValueError(f"background must be three ints in 0..255, got {background!r}")
    return bg  # type: ignore[return-value]


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
        if mode == "P" or mode == "PA":
            rgba = img.convert("RGBA")
        elif mode in _ALPHA_MODES:
            rgba = img.convert(_ALPHA_MODES[mode])
        else:  # L or RGB with a single transparent colour key
            rgba = img.convert("LA" if mode in ("L", "1") else "RGBA")
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
    """16-bit, 32-bit integer and float grayscale to uint8, plus an alpha from a colour key."""
    a = np.asarray(img)
    key = img.info.get("transparency")
    alpha = None
    if isinstance(key, (int, float)) and not isinstance(key, bool):
        alpha = np.where(a == key, 0, 255).astype(np.uint8)
    if img.mode == "F":
        a = np.where(np.isfinite(a), a, 0.0).astype(np.float64)
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0.0 and hi <= 1.0:
            out = a * 255.0
        elif hi > lo:
            out = (a - lo) * (255.0 / (hi - lo))
        else:
            out = np.zeros_like(a)
        return np.rint(out).astype(np.uint8), alpha
    a = a.astype(np.int64)
    lo, hi = int(a.min()), int(a.max())
    if lo >= 0 and hi <= 65535:
        return ((a * 255 + 32767) // 65535).astype(np.uint8), alpha
    out = (a - lo) * 255 // max(hi - lo, 1)
    return out.astype(np.uint8), alpha
