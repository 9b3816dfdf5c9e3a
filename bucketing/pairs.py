"""Scan-time checks of a row's paired files (conditioning images, a loss mask).

A conditioning image or mask must show the same picture as the target image at any size:
its oriented aspect (from its header, EXIF orientation applied) may differ from the
target's by at most ``MAX_ASPECT_DIFFERENCE`` (1%); a pair of another size is scaled to the
target's size when it is fitted. A mask taken from the image's alpha needs an image that
has one. Each failure is a rejection of the row with its own reason: ``missing_pair``,
``unreadable_pair``, ``pair_aspect``, ``no_alpha``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

from bucketing.headers import Header
from bucketing.sources.rows import ALPHA_MASK

__all__ = ["MAX_ASPECT_DIFFERENCE", "aspect_problem", "has_alpha", "pair_files", "pair_problem"]

MAX_ASPECT_DIFFERENCE = 0.01
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def pair_files(conditioning: Sequence[str], mask: str | None) -> list[tuple[str, str]]:
    """(what, path) of each paired file whose header is read: the conditioning images, then
    a mask file (not the image's own alpha)."""
    named = [(f"conditioning image {k}", p) for k, p in enumerate(conditioning)]
    if mask and mask != ALPHA_MASK:
        named.append(("loss mask", mask))
    return named


def aspect_problem(target_wh: Sequence[int], pair_wh: Sequence[int]) -> str | None:
    """Why a paired image of oriented size ``pair_wh`` cannot be fitted with a target of
    ``target_wh`` (their aspects differ by more than 1%), or None."""
    (tw, th), (pw, ph) = target_wh, pair_wh
    ratio = (pw * th) / (ph * tw)
    if max(ratio, 1 / ratio) - 1 > MAX_ASPECT_DIFFERENCE:
        return (
            f"is {pw}x{ph} (aspect {pw / ph:.4f}) but the image is {tw}x{th} (aspect "
            f"{tw / th:.4f}): more than {MAX_ASPECT_DIFFERENCE:.0%} apart"
        )
    return None


def pair_problem(
    target: Header, files: Sequence[tuple[str, str]], headers: Sequence[Header]
) -> tuple[str, str] | None:
    """(reason, detail) for the first unusable paired file of a row, or None."""
    for (what, path), h in zip(files, headers, strict=True):
        if not h.ok:
            reason = "missing_pair" if h.reason == "missing_file" else "unreadable_pair"
            return reason, f"{what} {path}: {h.reason}: {h.detail}"
        problem = aspect_problem((target.width, target.height), (h.width, h.height))
        if problem is not None:
            return "pair_aspect", f"{what} {path} {problem}"
    return None


def has_alpha(source: str | os.PathLike | bytes) -> bool:
    """True when the image at ``source`` (a path or encoded bytes) has an alpha channel or a
    transparent colour key (header only, no pixel decoded); False when it cannot be read."""
    from PIL import Image

    try:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        with Image.open(fp) as img:
            return img.mode in _ALPHA_MODES or "transparency" in img.info
    except Exception:  # unreadable: the image itself is rejected or fails at decode
        return False
