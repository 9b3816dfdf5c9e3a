"""Fit a row's paired files with the target image's own :class:`FitParams`.

Edit pairs, control images and masked losses need every image of a row cut from the same
place: the bucket and the params (scale, crop box, flip) are drawn once, for the target
image, and every conditioning image goes through the same :func:`~transforms.resize_crop.fit`
kernel with them. A conditioning image stored at another size of the same aspect (checked
at scan time, within 1%) is scaled straight to the target's resized size, so it lands on the
same crop box.

Masks are coverage, not colour: :func:`fit_mask` resamples them with an area (box) filter,
each output pixel the mean of the mask pixels under it, so a mask edge becomes partial
coverage (0-255) in exactly the pixels it crosses; nothing rings or overshoots as a bicubic
kernel would, and no pixel outside the crop box contributes. A mask file is read as grey
levels (255: train on this pixel, 0: do not; transparency counts as 0); ``"alpha"`` takes
the image's own alpha channel (255: opaque).
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as torch_f
from PIL import Image

from bucketing.models import MODELS
from bucketing.pairs import aspect_problem
from bucketing.sources.rows import ALPHA_MASK
from transforms.image import (
    _TRANSPOSE,
    DEFAULT_DECODE,
    ORIGINAL_SIZE_KEY,
    DecodeSettings,
    ImageDecodeError,
    _check_decode_bytes,
    _exif_orientation,
    decode_image,
    describe_source,
)
from transforms.resize_crop import DEFAULT_RESAMPLE, FitParams, decode_and_fit

__all__ = ["fit_mask", "load_alpha", "load_mask", "loss_weight_for", "paired_fields"]

_BLACK = (0, 0, 0)
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def load_alpha(
    source: str | os.PathLike | bytes, settings: DecodeSettings = DEFAULT_DECODE
) -> Image.Image:
    """The oriented alpha channel of the image at ``source`` as an ``L`` image (a colour key
    counts: its pixels are 0), under the limits of ``settings``. Raises
    :class:`ImageDecodeError` when it has none."""
    name = describe_source(source)
    max_pixels, max_decode_bytes = settings.max_pixels, settings.max_decode_bytes
    try:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        with Image.open(fp) as img:
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise ImageDecodeError(name, f"too_many_pixels: over max_pixels={max_pixels}")
            _check_decode_bytes(name, img, max_decode_bytes)
            if img.mode not in _ALPHA_MODES and "transparency" not in img.info:
                raise ImageDecodeError(name, "no alpha channel for loss_mask='alpha'")
            img.load()
            orientation = _exif_orientation(img)
            if img.mode in ("I", "F") or img.mode.startswith("I;16"):
                key = img.info["transparency"]
                alpha = Image.fromarray(np.where(np.asarray(img) == key, 0, 255).astype(np.uint8))
            else:
                alpha = img.convert("RGBA").getchannel("A")
    except ImageDecodeError:
        raise
    except Exception as e:
        raise ImageDecodeError(name, f"{type(e).__name__}: {e}") from e
    if orientation in _TRANSPOSE:
        alpha = alpha.transpose(_TRANSPOSE[orientation])
    return alpha


def load_mask(
    source: str | os.PathLike | bytes, settings: DecodeSettings = DEFAULT_DECODE
) -> Image.Image:
    """A mask file as an oriented ``L`` image, decoded like every image (``decode_image``
    with the limits of ``settings``): its grey levels (any mode: 16-bit scaled, colour by
    luma, transparency composited on black, no JPEG draft)."""
    mask_settings = dataclasses.replace(settings, background=_BLACK, draft=False)
    rgb = decode_image(source, mask_settings)
    mask = rgb.convert("L")
    mask.info = dict(rgb.info)
    return mask


def fit_mask(mask: Image.Image, params: FitParams) -> torch.Tensor:
    """``mask`` (an ``L`` image at any size of the target's aspect) cut by ``params``:
    uint8 [1, h, w] coverage, area-averaged (box filter) from the crop box, then flipped."""
    if mask.mode != "L":
        raise ValueError(f"fit_mask expects an L image, got mode {mask.mode}")
    (new_w, new_h), (y, x, bh, bw) = params.resized, params.crop
    sx, sy = new_w / mask.width, new_h / mask.height
    box = (x / sx, y / sy, (x + bw) / sx, (y + bh) / sy)
    region = mask.resize((bw, bh), Image.Resampling.BOX, box=box)
    if params.flip:
        region = region.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(region).copy()).unsqueeze(0)


def _check_aspect(original_hw: Sequence[int], target_wh: Sequence[int], what: str,
                  source: str | os.PathLike | bytes) -> None:
    """Refuse a paired image whose aspect changed since the scan (the file was replaced)."""
    h, w = original_hw
    problem = aspect_problem(target_wh, (w, h))
    if problem is not None:
        raise ValueError(f"{what} {describe_source(source)} {problem} (changed since the scan?)")


def paired_fields(
    index: Any,
    row: int,
    params: FitParams,
    settings: DecodeSettings = DEFAULT_DECODE,
    *,
    resample: str = DEFAULT_RESAMPLE,
) -> dict[str, torch.Tensor]:
    """Row ``row``'s paired files fitted with its image's ``params``:
    ``conditioning_pixel_values`` uint8 [K, 3, h, w] (when the index has K > 0), each through
    ``decode_and_fit`` with the image's decode ``settings`` and ``resample``, and
    ``loss_mask`` uint8 [1, h, w] (when it has masks; a row without one is all 255)."""
    target = (int(index.width[row]), int(index.height[row]))
    bw, bh = params.bucket
    out: dict[str, torch.Tensor] = {}
    if index.conditioning:
        images = []
        for k, column in enumerate(index.conditioning):
            source = column[row]  # same aspect, any size: checked, not the target's size
            fitted = decode_and_fit(source, params, settings, resample=resample)
            _check_aspect(fitted["original_size"], target, f"conditioning image {k}", source)
            images.append(fitted["pixel_values"])
        out["conditioning_pixel_values"] = torch.stack(images)
    if index.loss_mask is not None:
        value = index.loss_mask[row]
        if not value:
            out["loss_mask"] = torch.full((1, bh, bw), 255, dtype=torch.uint8)
        else:
            if value == ALPHA_MASK:
                mask = load_alpha(index.image_source(row), settings)
            else:
                mask = load_mask(value, settings)
                _check_aspect(mask.info[ORIGINAL_SIZE_KEY], target, "loss mask", value)
            out["loss_mask"] = fit_mask(mask, params)
    return out


def loss_weight_for(
    mask: torch.Tensor, model: str, *, latent_hw: Sequence[int] | None = None
) -> torch.Tensor:
    """Per-latent loss weights from a batch's ``loss_mask`` ([B, 1, H, W], floats in [0, 1]
    from ``to_model_input``; uint8 0-255 is read as such): area-averaged down to the latent
    grid (``latent_hw``, default H and W over the model's VAE factor; a mask already on that
    grid, as an encoder cache stores it, is kept), so a latent's weight is the share of its
    pixels the mask covers. FLUX packs latents into 2x2 tokens: its weights come back
    packed the same way, [B, (h/2)(w/2), 1], to multiply a loss of shape [B, N, C*4]; other
    models get [B, 1, h, w] for a loss of shape [B, C, h, w]. The weights are float32."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"loss_mask must be [B, 1, H, W], got {tuple(mask.shape)}")
    spec = MODELS[model]
    weights = mask.float() / 255.0 if mask.dtype == torch.uint8 else mask.float()
    h, w = mask.shape[-2:]
    lh, lw = (h // spec.vae_scale_factor, w // spec.vae_scale_factor) if latent_hw is None \
        else (int(latent_hw[0]), int(latent_hw[1]))
    if (lh, lw) != (h, w):
        if h % lh or w % lw:
            raise ValueError(f"a {h}x{w} mask does not divide into a {lh}x{lw} latent grid")
        weights = torch_f.avg_pool2d(weights, (h // lh, w // lw))
    if spec.patch_size > 1 and model.startswith("flux"):
        p = spec.patch_size
        tokens = torch_f.avg_pool2d(weights, p)  # [B, 1, h/2, w/2]
        return tokens.flatten(2).transpose(1, 2)  # [B, N, 1], pack_latents' token order
    return weights
