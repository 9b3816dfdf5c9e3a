"""The map-style dataset that DataLoader workers run: item i is image i decoded, fitted to its
bucket, captioned and (optionally) tokenized.

Every random choice comes from ``sample_rng(seed, epoch, i, stream)``, never from worker RNG
state, so a sample is the same in any worker, with any worker count, after any resume.

A file that fails to decode (or to fit its bucket, or no longer has the size the scan
recorded) at training time does not end the epoch:
with ``on_error="substitute"`` another member of the same bucket (so the batch keeps its
shape) is used, chosen deterministically, the sample says ``substituted=True`` and carries
the requested row as ``original_index``, and a warning names the file once per process;
with ``on_error="raise"`` an :class:`~transforms.image.ImageDecodeError` names the file
and the reason.

``set_epoch`` must be called before each epoch's iterator is created. The epoch lives in a
one-element shared-memory tensor, so it reaches DataLoader workers that outlive an epoch
(``persistent_workers=True``) as well as freshly started ones.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from transforms.image import ORIGINAL_SIZE_KEY, ImageDecodeError, load_image
from transforms.rng import sample_rng

if TYPE_CHECKING:
    from PIL import Image

    from bucketing.assign import Assignment
    from bucketing.index import ImageIndex

ImageTransform = Callable[["Image.Image", Sequence[int], np.random.Generator], dict]
CaptionTransform = Callable[[list[str], np.random.Generator], str]

_ON_ERROR = ("substitute", "raise")
_WARNED: set[str] = set()  # files already reported by this process


class SubstitutionWarning(UserWarning):
    """A file failed at training time and another image of its bucket was used instead."""


class TextToImageDataset(Dataset):
    """Images of ``index`` fitted to the buckets of ``assignment`` (row i is row i of both).

    ``image_transform(img, bucket_wh, rng) -> dict`` (e.g. ``BucketResizeCrop``);
    ``caption_transform(captions, rng) -> str`` (default: the first caption, or "");
    ``model_transform(sample) -> dict`` (e.g. ``FluxTokenizer``). ``draft`` lets JPEGs
    decode at a reduced DCT scale when the bucket is at most half their size (only right
    for transforms that scale the image to cover the bucket). ``max_pixels`` refuses
    decompression bombs at decode time; ``background`` is the colour behind transparency.
    An assignment with upscaled rows (``assign(..., allow_upscale=True)``) needs an image
    transform that upscales: one with ``allow_upscale=False`` is refused here.
    """

    def __init__(
        self,
        index: ImageIndex,
        assignment: Assignment,
        *,
        image_transform: ImageTransform | None = None,
        caption_transform: CaptionTransform | None = None,
        model_transform: Callable[[dict], dict] | None = None,
        seed: int = 0,
        on_error: str = "substitute",
        max_substitutes: int = 8,
        draft: bool = True,
        max_pixels: int | None = None,
        background: Sequence[int] = (255, 255, 255),
        cache: Any = None,
    ) -> None:
        if image_transform is None and cache is None:
            raise ValueError("TextToImageDataset needs an image_transform (or an encoder cache)")
        if on_error not in _ON_ERROR:
            raise ValueError(f"on_error must be one of {_ON_ERROR}, got {on_error!r}")
        if len(assignment) != len(index):
            raise ValueError(
                f"assignment has {len(assignment)} rows but the index has {len(index)}: "
                "assign the same index the dataset reads"
            )
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        upscaled = int(np.count_nonzero(getattr(assignment, "upscaled", ())))
        if upscaled and getattr(image_transform, "allow_upscale", True) is False:
            raise ValueError(
                f"{upscaled} rows were assigned with allow_upscale=True (upscaled to a bucket "
                f"larger than the image) but image_transform refuses to upscale "
                "(allow_upscale=False): every such row would fail at training time; pass "
                "image_transform=BucketResizeCrop(allow_upscale=True, ...)"
            )
        self.index = index
        self.bucket_id = np.asarray(assignment.bucket_id, dtype=np.int64)
        self.bucket_wh = np.asarray(assignment.bucket_wh, dtype=np.int64).reshape(-1, 2)
        self.reasons = getattr(assignment, "reasons", None)
        self.image_transform = image_transform
        self.caption_transform = caption_transform
        self.model_transform = model_transform
        self.seed = int(seed)
        self.on_error = on_error
        self.max_substitutes = int(max_substitutes)
        self.draft = draft
        self.max_pixels = max_pixels
        self.background = tuple(background)
        self.cache = cache
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._members: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.index)

    @property
    def epoch(self) -> int:
        """The epoch every per-sample generator uses (shared with DataLoader workers)."""
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` in every per-sample generator from now on (call before iterating)."""
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch[0] = int(epoch)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = operator.index(i)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} rows")
        i %= n
        bucket = int(self.bucket_id[i])
        if bucket < 0:
            reason = self.reasons[i] if self.reasons is not None else None
            raise ValueError(
                f"row {i} ({self.index.paths[i]}) was rejected by assign"
                f"{f' ({reason})' if reason else ''} and has no bucket; sample accepted rows "
                "only (BucketBatchSampler does)"
            )
        try:
            sample, used = self._fit(i, i), i
        except Exception as error:
            if self.on_error == "raise":
                raise _as_decode_error(self._name(i), error) from error
            sample, used = self._substitute(i, bucket, error)

        captions = self.index.captions[used]
        if self.caption_transform is None:
            sample["caption"] = captions[0] if captions else ""
        else:
            rng = sample_rng(self.seed, self.epoch, i, "caption")
            sample["caption"] = self.caption_transform(list(captions), rng)
        if self.cache is not None:
            sample.update(self.cache.text_sample(sample["caption"]))
        sample["index"] = used
        sample["original_index"] = i
        sample["substituted"] = used != i
        if self.model_transform is not None:
            sample = self.model_transform(sample)
        return sample

    def _fit(self, row: int, requested: int) -> dict[str, Any]:
        """Decode ``row`` and fit it to ``requested``'s bucket with ``requested``'s generator."""
        wh = tuple(int(v) for v in self.bucket_wh[requested])
        if self.cache is not None:
            return self._cached(row, requested, wh)
        img = load_image(
            self.index.image_source(row),
            background=self.background,
            max_pixels=self.max_pixels,
            draft_size=wh if self.draft else None,
        )
        h, w = img.info[ORIGINAL_SIZE_KEY]
        scanned = (int(self.index.width[row]), int(self.index.height[row]))
        if (w, h) != scanned:  # its bucket was chosen for another picture
            raise ValueError(
                f"the file is {w}x{h} but was {scanned[0]}x{scanned[1]} when scanned: it "
                "changed after the scan (rescan to train on it)"
            )
        rng = sample_rng(self.seed, self.epoch, requested, "image")
        sample = dict(self.image_transform(img, wh, rng))
        shape = tuple(getattr(sample.get("pixel_values"), "shape", ()))
        if shape[-2:] != (wh[1], wh[0]):
            raise ValueError(
                f"image_transform returned pixel_values of shape {shape} for bucket "
                f"{wh[0]}x{wh[1]} (w x h)"
            )
        return sample

    def _cached(self, row: int, requested: int, wh: tuple[int, ...]) -> dict[str, Any]:
        """``row``'s cached latents for ``requested``'s bucket, drawn with its generator."""
        rng = sample_rng(self.seed, self.epoch, requested, "image")
        size = (int(self.index.width[row]), int(self.index.height[row]))
        return self.cache.latent_sample(self.index.paths[row], size, wh, rng)

    def _substitute(self, i: int, bucket: int, error: Exception) -> tuple[dict[str, Any], int]:
        """Fit another member of ``bucket``, tried in an order fixed by (seed, epoch, i)."""
        members = self._bucket_members(bucket)
        members = members[members != i]
        rng = sample_rng(self.seed, self.epoch, i, "substitute")
        tried: list[str] = []
        for j in rng.permutation(members)[: self.max_substitutes].tolist():
            try:
                sample = self._fit(j, i)
            except Exception as other:
                tried.append(f"row {j} ({self._name(j)}): {_reason(other)}")
                continue
            self._warn_once(i, j, error)
            return sample, j
        w, h = self.bucket_wh[i]
        raise RuntimeError(
            f"row {i} ({self._name(i)}) failed ({_reason(error)}) and no substitute from its "
            f"bucket {w}x{h} loaded ({len(tried)} tried of {len(members)} other members"
            f"{': ' + '; '.join(tried) if tried else ''})"
        ) from error

    def _bucket_members(self, bucket: int) -> np.ndarray:
        if bucket not in self._members:
            self._members[bucket] = np.flatnonzero(self.bucket_id == bucket)
        return self._members[bucket]

    def _name(self, row: int) -> str:
        return self.index.paths[row] or f"row {row}"

    def _warn_once(self, i: int, j: int, error: Exception) -> None:
        name = self._name(i)
        if name in _WARNED:
            return
        _WARNED.add(name)
        warnings.warn(
            f"could not load {name} ({_reason(error)}); row {i} is replaced by row {j} of the "
            "same bucket (substituted=True in the sample). Not repeated for this file.",
            SubstitutionWarning,
            stacklevel=3,
        )


def _reason(error: Exception) -> str:
    return (
        error.reason if isinstance(error, ImageDecodeError) else f"{type(error).__name__}: {error}"
    )


def _as_decode_error(name: str, error: Exception) -> ImageDecodeError:
    if isinstance(error, ImageDecodeError):
        return error
    return ImageDecodeError(name, _reason(error))
