"""Paired files in the encoder cache: a row's conditioning latents [K, C, h, w] and its
loss mask on the latent grid (uint8 [1, h, w], area-averaged coverage), one entry per cached
image latent (same crop variant, same flip).

A pair entry's key is derived from its image latent's key and the paired files' identities
(path, size, mtime_ns; for an alpha mask the image's own), so the image latents are shared
with an unpaired build and a changed conditioning image or mask re-encodes only its pairs.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as torch_f

from bucketing.pipeline.encoder_cache.keys import Job, _digest, file_identity
from bucketing.pipeline.encoder_cache.store import ShardWriter
from bucketing.sources.rows import ALPHA_MASK
from transforms.paired import paired_fields
from transforms.resize_crop import FitParams

if TYPE_CHECKING:
    from bucketing.index import ImageIndex
    from bucketing.pipeline.encoder_cache.keys import FitSettings
    from bucketing.pipeline.encoder_cache.reader import EncoderCache


def pair_identity(index: ImageIndex, row: int) -> list[Any] | None:
    """What determines ``row``'s pair entries: each conditioning image's and the mask's
    (path, size, mtime_ns), ``"alpha"`` plus the image's identity for an alpha mask, None
    for no mask; None for the whole row when a paired file is gone."""
    out: list[Any] = []
    paths = [c[row] for c in index.conditioning]
    mask = index.loss_mask[row] if index.loss_mask is not None else ""
    for path in paths + ([mask] if mask and mask != ALPHA_MASK else []):
        try:
            st = os.stat(path)
        except OSError:
            return None
        out.append([path, int(st.st_size), int(st.st_mtime_ns)])
    if mask == ALPHA_MASK:
        out.append(["alpha", file_identity(index, row)])
    elif not mask:
        out.append(None)
    return out


def pair_key(latent_key: str, identity: list[Any]) -> str:
    """The entry key of the pairs cached beside the image latent ``latent_key``."""
    return _digest({"latents": latent_key, "pairs": identity})


def latent_mask(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """A uint8 [1, H, W] pixel mask area-averaged onto a (h, w) latent grid, uint8."""
    h, w = latent_hw
    pooled = torch_f.avg_pool2d(mask[None].float(), (mask.shape[-2] // h, mask.shape[-1] // w))
    return pooled[0].round().clamp(0, 255).to(torch.uint8)


def encode_pairs(
    index: ImageIndex,
    jobs: list[Job],
    settings: FitSettings,
    encoders: Any,
    writer: ShardWriter,
    stored: dict[str, str],
    rank: int,
    world: int,
) -> list[str]:
    """Encode the pair entries the store lacks for every job (this rank's share: every
    ``world``-th job); returns the rows that failed, as ``"path: error"``."""
    failed: list[str] = []
    for n, job in enumerate(jobs):
        if n % world != rank:
            continue
        identity = pair_identity(index, job.row)
        keys = [pair_key(k, identity) if k is not None and identity is not None else None
                for k in job.keys]  # fmt: skip
        if identity is None:
            failed.append(f"{index.paths[job.row]}: a paired file is gone")
            continue
        if all(k is None or k in stored for k in keys):
            continue
        try:
            fields = paired_fields(index, job.row, job.params, settings.decode,
                                   resample=settings.resample)
        except Exception as error:  # noqa: BLE001 - recorded; the dataset substitutes it
            failed.append(f"{index.paths[job.row]}: {type(error).__name__}: {error}")
            continue
        flips = [flip for flip, key in enumerate(keys) if key is not None and key not in stored]
        for flip, tensors in zip(flips, _encoded(fields, flips, encoders), strict=True):
            writer.add(keys[flip], tensors)
    return failed


def _encoded(
    fields: dict[str, torch.Tensor], flips: list[int], encoders: Any
) -> list[dict[str, torch.Tensor]]:
    """The tensors of a row's pair entries, one per flip in ``flips`` (0: as fitted, 1:
    mirrored): conditioning latents (every flip in one VAE call) and the latent-grid mask."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in flips]
    f = getattr(encoders, "vae_scale_factor", 8)
    if "conditioning_pixel_values" in fields:
        pixels = fields["conditioning_pixel_values"]
        both = torch.cat([pixels.flip(-1) if flip else pixels for flip in flips])
        latents = encoders.encode_images(both).cpu().chunk(len(flips))
        for entry, z in zip(out, latents, strict=True):
            entry["conditioning_latents"] = z
    if "loss_mask" in fields:
        mask = fields["loss_mask"]
        for entry, flip in zip(out, flips, strict=True):
            entry["loss_mask"] = latent_mask(mask.flip(-1) if flip else mask,
                                             (mask.shape[-2] // f, mask.shape[-1] // f))
    return out


def cached_pairs(
    cache: EncoderCache, index: ImageIndex, row: int, params: FitParams
) -> dict[str, torch.Tensor]:
    """``row``'s cached conditioning latents and latent-grid mask for the crop and flip of
    ``params`` (the sample's own, from :meth:`EncoderCache.latent_sample`). Raises KeyError
    when they are not cached (the dataset then substitutes the row)."""
    rows = cache.rows
    r = cache._by_path.get(index.paths[row])
    if r is None:
        raise KeyError(f"{index.paths[row]} is not in the cache {cache.root}")
    boxes = list(zip(rows["crop_y"][r], rows["crop_x"][r], strict=True))
    k = boxes.index(tuple(params.crop[:2]))
    keys = rows["latent_keys"][r]
    per = len(keys) // len(boxes)
    latent = keys[k * per + (1 if params.flip and per > 1 else 0)]
    identity = pair_identity(index, row)
    if identity is None:
        raise KeyError(f"a paired file of {index.paths[row]} is gone")
    key = pair_key(latent, identity)
    out = {}
    if index.conditioning:
        out["conditioning_latents"] = cache._tensor(key, "conditioning_latents")
    if index.loss_mask is not None:
        out["loss_mask"] = cache._tensor(key, "loss_mask")
    return out
