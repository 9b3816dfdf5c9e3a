"""What determines a cache entry: the fit settings, file identity, crop variants and
the content keys of image and text entries."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from bucketing.members import stat_path
from bucketing.models import MODELS, encoder_models
from transforms.image import DEFAULT_DECODE, DecodeSettings
from transforms.resize_crop import (
    DEFAULT_RESAMPLE,
    BucketResizeCrop,
    FitParams,
)

if TYPE_CHECKING:
    from bucketing.assign import Assignment
    from bucketing.index import ImageIndex


CACHE_FORMAT = "aspect-bucketing/encoder-cache"
CACHE_VERSION = 1
CROPS = ("center", "random")
T5_PADDINGS = ("trimmed", "full")

# Output sizes of the models with encoders (from the model registry), for estimates before
# anything is built: latent channels, the text sequence's width and padded length, and the
# pooled embedding's width.
MODEL_SIZES: dict[str, dict[str, int]] = {
    name: {"latent_channels": MODELS[name].latent_channels,
           "text_width": MODELS[name].text_width, "text_length": MODELS[name].text_length,
           "pooled": MODELS[name].pooled}
    for name in encoder_models()
}
TRIMMED_MODELS = tuple(name for name, spec in MODELS.items() if spec.t5_trimmed)
SHARD_BYTES = 256 << 20  # a shard is written once its entries reach this size



def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()



# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class FitSettings:
    """How pixels are produced before the VAE: the crops, the filter and the decode settings
    (``decode``: those of the dataset's pixel path); what every image entry's key includes."""

    crop: str = "center"
    variants: int = 1
    flip: bool = False
    resample: str = DEFAULT_RESAMPLE
    decode: DecodeSettings = DEFAULT_DECODE
    allow_upscale: bool = False
    seed: int = 0

    def key(self) -> dict[str, Any]:
        """The settings that change an entry's pixels (not how many variants exist, nor the
        decode limits, which only refuse files)."""
        return {"resample": self.resample, "background": list(self.decode.background),
                "draft": self.decode.draft, "allow_upscale": self.allow_upscale, "decode": "pil"}


def file_identity(index: ImageIndex, row: int) -> list[Any] | None:
    """(path, size, mtime_ns) of a file row (a tar member: its path, which holds its offset,
    and its shard's size and mtime); (label, size, sha256) for embedded bytes; None when the
    file is gone."""
    if index.blob is not None:
        data = index.blob(row)
        return [index.paths[row], len(data), hashlib.sha256(data).hexdigest()]
    try:
        st = os.stat(stat_path(index.paths[row]))
    except OSError:
        return None
    return [index.paths[row], int(st.st_size), int(st.st_mtime_ns)]


def variant_params(
    size_wh: Sequence[int], bucket_wh: Sequence[int], settings: FitSettings, path: str
) -> list[FitParams]:
    """The unflipped :class:`FitParams` of an image's cached variants, from
    ``BucketResizeCrop.make_params`` as the pixel path draws them: the centre crop, or
    ``variants`` random crops from a generator keyed by (seed, path), so a rebuild draws the
    same crops for an unchanged image whatever its row number."""
    transform = BucketResizeCrop(crop=settings.crop, allow_upscale=settings.allow_upscale)
    if settings.crop == "center":
        return [transform.make_params(size_wh, bucket_wh, None)]
    words = np.frombuffer(hashlib.sha256(path.encode("utf-8", "surrogatepass")).digest()[:8],
                          dtype=np.uint32)
    rng = np.random.default_rng([settings.seed, *words.tolist()])
    return [transform.make_params(size_wh, bucket_wh, rng) for _ in range(settings.variants)]


@dataclass
class Job:
    """One (image, crop) to decode and encode: its flips' keys (None: already stored)."""

    row: int
    params: FitParams
    keys: tuple[str | None, ...]

    @property
    def bucket(self) -> tuple[int, int]:
        """The (w, h) bucket."""
        return self.params.bucket


def plan_rows(
    index: ImageIndex,
    assignment: Assignment,
    settings: FitSettings,
    image_fingerprint: str,
    dtype: str,
) -> tuple[dict[str, list], list[Job]]:
    """The view's image columns for every accepted row, and one job per (row, crop)."""
    flips = (False, True) if settings.flip else (False,)
    cols: dict[str, list] = {k: [] for k in (
        "row", "path", "identity", "width", "height", "bucket_w", "bucket_h", "resized_w",
        "resized_h", "crop_y", "crop_x", "latent_keys")}
    jobs: list[Job] = []
    fit_key = settings.key()
    bucket_wh = np.asarray(assignment.bucket_wh).reshape(-1, 2)
    for row in np.flatnonzero(np.asarray(assignment.bucket_id) >= 0).tolist():
        identity = file_identity(index, row)
        if identity is None:
            continue  # the file is gone: the dataset substitutes it like a failed decode
        bucket = (int(bucket_wh[row, 0]), int(bucket_wh[row, 1]))
        size = (int(index.width[row]), int(index.height[row]))
        variants = variant_params(size, bucket, settings, index.paths[row])
        keys = []
        for params in variants:
            ks = tuple(_digest({"file": identity, "size": size, "bucket": bucket,
                                "resized": params.resized, "crop": params.crop, "flip": flip,
                                "fit": fit_key, "vae": image_fingerprint, "dtype": dtype})
                       for flip in flips)
            keys.extend(ks)
            jobs.append(Job(row, params, ks))
        resized = variants[0].resized
        boxes = [p.crop[:2] for p in variants]
        for name, value in (("row", row), ("path", index.paths[row]),
                            ("identity", json.dumps(identity)), ("width", size[0]),
                            ("height", size[1]), ("bucket_w", bucket[0]), ("bucket_h", bucket[1]),
                            ("resized_w", resized[0]), ("resized_h", resized[1]),
                            ("crop_y", [b[0] for b in boxes]), ("crop_x", [b[1] for b in boxes]),
                            ("latent_keys", keys)):
            cols[name].append(value)
    return cols, jobs


def text_key(caption: str, text_fingerprint: str, dtype: str, padding: str) -> str:
    """The entry key of a caption's embeddings."""
    return _digest({"caption": caption, "text": text_fingerprint, "dtype": dtype,
                    "padding": padding})


