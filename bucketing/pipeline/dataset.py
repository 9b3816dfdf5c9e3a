"""The map-style dataset that DataLoader workers run: item i is image i decoded, fitted to its
bucket, captioned and (optionally) tokenized.

Every random choice comes from ``sample_rng(seed, epoch, i, stream, occurrence)``, never from
worker RNG state, so a sample is the same in any worker, with any worker count, after any
resume. ``occurrence`` is read from the index the sampler yields (``samplers.SampleIndex``, an
``int`` with ``.occurrence``; a plain int is occurrence 0), so each repeat or padding
duplicate of a row within an epoch draws its own crop, flip and caption.

The three transforms share one signature, ``transform(sample: dict) -> dict``:
the image transform gets ``image`` (the decoded, oriented 8-bit RGB ``PIL.Image``),
``bucket`` (w, h) and ``rng`` and must add ``pixel_values`` of the bucket's shape; the
caption transform gets ``captions`` (the image's list of captions) and ``rng`` and must set
``caption`` (a str); the model transform gets the finished sample. Every sample also holds
``index``, ``original_index``, ``substituted`` and ``occurrence``. The inputs ``image``,
``captions`` and ``rng`` are removed once their transform has run. An image transform with a
``read(source, settings, *, bucket_wh, expected_size)`` method (:class:`ReadsFiles`, such as
the GPU path's ``EncodedFit``) says how its ``image`` is read; otherwise it is
``transforms.image.decode_image``, the decode every reader of the library shares, through the
dataset's :class:`~transforms.decoded_cache.DecodedImageCache` (``decoded_cache_bytes`` per
process): a file repeated within an epoch is decoded once per DataLoader worker, and every
occurrence still draws its own crop and flip from the same pixels. :meth:`stats` gives its
hit and miss counts, summed over the workers.

An encoder cache built with ``images=False`` (text embeddings only) keeps the pixel path:
images are decoded and fitted per occurrence as without a cache, and the final caption
(after template, dropout and shuffle) takes its embeddings from the cache. A caption variant
the cache does not hold is refused with a clear error, never encoded in a worker: the
caption transform is checked at construction: shuffle and tag dropout make captions no
build can list, and its template, prefix and suffix must be the build's
(``build_cache(..., caption_transform=...)`` caches them).

A file that fails to decode (or to fit its bucket, or no longer has the size the scan
recorded) at training time does not end the epoch:
with ``on_error="substitute"`` another member of the same bucket (so the batch keeps its
shape) is used, chosen deterministically, the sample says ``substituted=True`` and carries
the requested row as ``original_index``, and a warning names the file once per process;
with ``on_error="raise"`` an :class:`~transforms.image.ImageDecodeError` names the file
and the reason.

The epoch of those draws travels with the index: ``BucketBatchSampler`` yields indices that
carry the epoch it planned (``SampleIndex.epoch``), so ``sampler.set_epoch`` alone changes every
crop, flip and caption. For plain int indices (another sampler) the dataset's own epoch applies:
call ``set_epoch`` before each epoch's iterator is created. It lives in a one-element
shared-memory tensor, so it reaches DataLoader workers that outlive an epoch
(``persistent_workers=True``) as well as freshly started ones. Where a set dataset epoch and an
index's epoch disagree, the index's wins, with a warning once per process.
"""

from __future__ import annotations

import inspect
import operator
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import Dataset

from bucketing.pipeline.encoder_cache.captions import check_cacheable_captions
from bucketing.pipeline.encoder_cache.pairs import cached_pairs
from bucketing.pipeline.plan import check_encoder_cache, dataset_fingerprint
from bucketing.printable import escape
from transforms.decoded_cache import DEFAULT_DECODED_CACHE_BYTES, DecodedImageCache
from transforms.image import (
    DEFAULT_MAX_DECODE_BYTES,
    DecodeSettings,
    ImageDecodeError,
    decode_image,
)
from transforms.paired import paired_fields
from transforms.resize_crop import DEFAULT_RESAMPLE, FitParams
from transforms.rng import sample_rng

if TYPE_CHECKING:
    from bucketing.assign import Assignment
    from bucketing.index import ImageIndex

SampleTransform = Callable[[dict[str, Any]], dict[str, Any]]
"""The one signature of the dataset's image, caption and model transforms."""


@runtime_checkable
class DeclaresUpscale(Protocol):
    """An image transform that says whether it fits images smaller than their bucket
    (``BucketResizeCrop`` does); the dataset refuses an upscaled assignment when it does not.
    A transform without the attribute is trusted."""

    allow_upscale: bool


@runtime_checkable
class ReadsFiles(Protocol):
    """An image transform that reads its files itself: ``read(source, settings, *,
    bucket_wh, expected_size)`` returns what it wants as ``sample["image"]`` (the GPU path's
    ``EncodedFit`` hands over a JPEG's bytes), with the limits and errors of
    ``transforms.image.decode_image``."""

    def read(
        self, source: Any, settings: DecodeSettings, *, bucket_wh: Sequence[int],
        expected_size: Sequence[int],
    ) -> Any:
        """The image input of ``source`` for a picture fitted to ``bucket_wh``."""


_ON_ERROR = ("substitute", "raise")
_TRANSIENT = ("image", "captions", "rng", "path")  # transform inputs, not sample contents
_MAX_EPOCH = 2**63 - 1  # the epoch is shared with workers as one int64
_WARNED: set[str] = set()  # files already reported by this process


class SubstitutionWarning(UserWarning):
    """A file failed at training time and another image was used instead (of its bucket, or
    of the nearest bucket whose image covers this shape without upscaling), or, where no
    image could stand in, the sample left its batch."""


class TextToImageDataset(Dataset):
    """Images of ``index`` fitted to the buckets of ``assignment`` (row i is row i of both).

    Transforms take the sample dict and return it (see the module docstring):
    ``image_transform`` (e.g. ``BucketResizeCrop``), ``caption_transform`` (e.g.
    ``CaptionTransform``; default: the first caption, or ""), ``model_transform`` (e.g.
    ``FluxTokenizer``); anything else is a TypeError here, not in a worker. ``draft``,
    ``max_pixels``, ``max_decode_bytes`` and ``background`` are the decode settings
    (``transforms.image.DecodeSettings``, kept as ``self.decode``): JPEG draft decoding, the
    decompression-bomb and decode-memory limits (from the header, before decoding) and the
    colour behind transparency.
    An assignment with upscaled rows (``assign(..., allow_upscale=True)``) needs an image
    transform that upscales: one with ``allow_upscale=False`` is refused here.
    ``encoder_cache``: an encoder cache (``bucketing.build_cache``); samples then carry its
    ``latents`` and caption embeddings instead of pixels, and no image transform is needed
    (``cache=`` is its old name: accepted with a DeprecationWarning); a text-only one
    (``build_cache(..., images=False)``) supplies the embeddings while the image transform
    fits pixels per occurrence. ``decoded_cache_bytes``: the decoded pictures each process
    keeps (``transforms.decoded_cache``; 0: decode every occurrence afresh). A cache built
    for another plan (rows in other buckets, rows or captions it lacks) is refused here,
    before any DataLoader worker starts.

    An index with paired files (``index.conditioning``, ``index.loss_mask``) adds
    ``conditioning_pixel_values`` uint8 [K, 3, h, w] and ``loss_mask`` uint8 [1, h, w],
    fitted with the image's own ``sample["fit"]`` (see :mod:`transforms.paired`); the image
    transform must add that ``fit`` (``BucketResizeCrop`` does). The GPU decode path does
    not fit paired files yet and is refused for such an index.
    """

    def __init__(
        self,
        index: ImageIndex,
        assignment: Assignment,
        *,
        image_transform: SampleTransform | None = None,
        caption_transform: SampleTransform | None = None,
        model_transform: SampleTransform | None = None,
        seed: int = 0,
        on_error: str = "substitute",
        max_substitutes: int = 8,
        draft: bool = True,
        max_pixels: int | None = None,
        max_decode_bytes: int | None = DEFAULT_MAX_DECODE_BYTES,
        background: Sequence[int] = (255, 255, 255),
        encoder_cache: Any = None,
        cache: Any = None,
        decoded_cache_bytes: int = DEFAULT_DECODED_CACHE_BYTES,
    ) -> None:
        if cache is not None:
            warnings.warn("TextToImageDataset(cache=...) is now encoder_cache=...; the old name "
                          "goes in the next release", DeprecationWarning, stacklevel=2)
            if encoder_cache is not None:
                raise TypeError("give encoder_cache= only (cache= is its old name)")
            encoder_cache = cache
        if on_error not in _ON_ERROR:
            raise ValueError(f"on_error must be one of {_ON_ERROR}, got {on_error!r}")
        if len(assignment) != len(index):
            raise ValueError(
                f"assignment has {len(assignment)} rows but the index has {len(index)}: "
                "assign the same index the dataset reads"
            )
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        cached_pixels = encoder_cache is not None and getattr(encoder_cache, "images", True)
        if not cached_pixels or image_transform is not None:  # latents need no image transform
            _check_transform("image_transform", image_transform)
        if encoder_cache is not None:
            check_cacheable_captions(caption_transform, encoder_cache)
        for name, transform in (
            ("caption_transform", caption_transform), ("model_transform", model_transform)
        ):
            if transform is not None:
                _check_transform(name, transform)
        if getattr(index, "has_pairs", False) and isinstance(image_transform, ReadsFiles):
            raise ValueError(
                "this index has conditioning images or loss masks, which an image transform "
                f"that reads its own files ({type(image_transform).__name__}, e.g. the GPU "
                "decode path's EncodedFit) does not fit yet; use "
                "image_transform=BucketResizeCrop(...) (decoding on the CPU in DataLoader "
                "workers)"
            )
        upscaled = int(np.count_nonzero(getattr(assignment, "upscaled", ())))
        refuses = isinstance(image_transform, DeclaresUpscale) and not image_transform.allow_upscale
        if upscaled and refuses:
            raise ValueError(
                f"{upscaled} rows were assigned with allow_upscale=True (upscaled to a bucket "
                f"larger than the image) but image_transform refuses to upscale "
                "(allow_upscale=False): every such row would fail at training time; pass "
                "image_transform=BucketResizeCrop(allow_upscale=True, ...)"
            )
        if encoder_cache is not None:  # before any worker starts, not at the first mismatching row
            check_encoder_cache(encoder_cache, index, assignment, caption_transform)
        self.index = index
        # views of the assignment's arrays (no per-row copy in the dataset or its workers)
        self.bucket_id = np.asarray(assignment.bucket_id)
        self.bucket_wh = np.asarray(assignment.bucket_wh).reshape(-1, 2)
        self.reasons = getattr(assignment, "reasons", None)
        self.image_transform = image_transform
        self.caption_transform = caption_transform
        self.model_transform = model_transform
        self.seed = int(seed)
        self.on_error = on_error
        self.max_substitutes = int(max_substitutes)
        self.decode = DecodeSettings(max_pixels=max_pixels, max_decode_bytes=max_decode_bytes,
                                     draft=draft, background=tuple(background))
        self.encoder_cache = encoder_cache
        self._cached_pixels = cached_pixels
        self.decoded_cache = DecodedImageCache(decoded_cache_bytes)
        self._epoch = torch.full((1,), -1, dtype=torch.int64).share_memory_()  # -1: never set
        self._warned_epoch = False
        self._members: tuple[np.ndarray, np.ndarray] | None = None  # built on first need

    def __len__(self) -> int:
        return len(self.index)

    @property
    def plan_fingerprint(self) -> str:
        """The fingerprint of this dataset's plan: rows, buckets, seed, image and caption
        settings (``bucketing.pipeline.plan``); ``BucketBatchSampler`` records it."""
        return dataset_fingerprint(self)

    @property
    def epoch(self) -> int:
        """The epoch the per-sample generators use for indices that do not carry one (shared
        with DataLoader workers); 0 until :meth:`set_epoch`."""
        return max(0, int(self._epoch[0]))

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` in the per-sample generators from now on (call before iterating), for
        indices that do not carry their own (``BucketBatchSampler``'s do)."""
        epoch = operator.index(epoch)
        if not 0 <= epoch <= _MAX_EPOCH:
            raise ValueError(f"epoch must be in [0, 2**63 - 1], got {epoch}")
        self._epoch[0] = epoch

    def stats(self) -> dict[str, Any]:
        """What the dataset's caches did, summed over the main process and its DataLoader
        workers: ``decoded_cache`` (hits, misses, evictions, hit_rate, bytes and entries
        held, the per-process limit)."""
        return {"decoded_cache": self.decoded_cache.stats()}

    def __getitem__(self, i: int) -> dict[str, Any]:
        occurrence = operator.index(getattr(i, "occurrence", 0))
        epoch = self._epoch_of(i)
        i = operator.index(i)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} rows")
        if occurrence < 0:
            raise ValueError(f"row {i}: occurrence must be >= 0, got {occurrence}")
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
            sample = self._fit(i, i, (epoch, occurrence))
        except Exception as error:
            if self.on_error == "raise":
                raise _as_decode_error(self._name(i), error) from error
            sample = self._substitute(i, bucket, (epoch, occurrence), error)
            if sample.get("dropped"):
                return sample

        captions = list(self.index.captions[sample["index"]])
        if self.caption_transform is None:
            sample["caption"] = captions[0] if captions else ""
        else:
            rng = sample_rng(self.seed, epoch, i, "caption", occurrence)
            sample = self._apply(
                "caption_transform", self.caption_transform, sample, captions=captions, rng=rng,
                path=self.index.paths[sample["index"]],
            )
            if not isinstance(sample.get("caption"), str):
                raise TypeError(
                    "caption_transform must set sample['caption'] to a str, got "
                    f"{sample.get('caption')!r}"
                )
        if self.encoder_cache is not None:
            sample.update(self.encoder_cache.text_sample(sample["caption"]))
        if self.model_transform is not None:
            sample = self.model_transform(sample)
        return sample

    def _epoch_of(self, i: Any) -> int:
        """The epoch of ``i``'s draws: the one it carries (``SampleIndex.epoch``), else the
        dataset's. A set dataset epoch that disagrees loses, with a warning once per process."""
        carried = getattr(i, "epoch", None)
        own = int(self._epoch[0])
        if carried is None:
            return max(0, own)
        carried = operator.index(carried)
        if own >= 0 and own != carried and not self._warned_epoch:
            self._warned_epoch = True
            warnings.warn(
                f"dataset.set_epoch({own}) disagrees with the epoch {carried} the sampler's "
                "index carries; the index's epoch is used (sampler.set_epoch alone is enough)",
                stacklevel=3,
            )
        return carried

    def _fit(self, row: int, requested: int, draw: tuple[int, int]) -> dict[str, Any]:
        """Decode ``row`` and fit it to ``requested``'s bucket with ``requested``'s generator
        (``draw`` = (epoch, occurrence))."""
        wh = tuple(int(v) for v in self.bucket_wh[requested])
        epoch, occurrence = draw
        if self._cached_pixels:
            return self._cached(row, requested, draw, wh)
        scanned = (int(self.index.width[row]), int(self.index.height[row]))
        if isinstance(self.image_transform, ReadsFiles):
            img = self.image_transform.read(self.index.image_source(row), self.decode,
                                            bucket_wh=wh, expected_size=scanned)
        else:  # a changed file's bucket was chosen for another: the size is checked
            img = decode_image(self.index.image_source(row), self.decode, bucket_wh=wh,
                               expected_size=scanned, cache=self.decoded_cache)
        identity = {
            "index": row,
            "original_index": requested,
            "substituted": row != requested,
            "occurrence": occurrence,
        }
        rng = sample_rng(self.seed, epoch, requested, "image", occurrence)
        fitted = self._apply(
            "image_transform", self.image_transform, identity, image=img, bucket=wh, rng=rng
        )
        sample = {**fitted, **identity}  # which row this is stays the dataset's to say
        shape = tuple(getattr(sample.get("pixel_values", sample.get("encoded")), "shape", ()))
        if shape[-2:] != (wh[1], wh[0]):
            raise ValueError(
                f"image_transform returned pixel_values of shape {shape} for bucket "
                f"{wh[0]}x{wh[1]} (w x h)"
            )
        if self.index.has_pairs:
            sample.update(self._paired(row, sample.get("fit")))
        return sample

    def _paired(self, row: int, params: Any) -> dict[str, Any]:
        """``row``'s conditioning images and mask, cut with its image's ``params``."""
        if not isinstance(params, FitParams):
            raise TypeError(
                "the index has conditioning images or loss masks, which are fitted with the "
                "image's own FitParams: image_transform must add sample['fit'] "
                "(BucketResizeCrop does)"
            )
        resample = getattr(self.image_transform, "resample", DEFAULT_RESAMPLE)
        return paired_fields(self.index, row, params, self.decode, resample=resample)

    def _cached(
        self, row: int, requested: int, draw: tuple[int, int], wh: tuple[int, ...]
    ) -> dict[str, Any]:
        """``row``'s cached latents for ``requested``'s bucket, drawn with its generator."""
        epoch, occurrence = draw
        rng = sample_rng(self.seed, epoch, requested, "image", occurrence)
        size = (int(self.index.width[row]), int(self.index.height[row]))
        sample = self.encoder_cache.latent_sample(self.index.paths[row], size, wh, rng)
        if self.index.has_pairs:
            sample.update(cached_pairs(self.encoder_cache, self.index, row, sample["fit"]))
        return {**sample, "index": row, "original_index": requested,
                "substituted": row != requested, "occurrence": occurrence}

    @staticmethod
    def _apply(
        name: str, transform: SampleTransform, sample: dict[str, Any], **inputs: Any
    ) -> dict[str, Any]:
        """``transform`` of ``sample`` plus ``inputs``; the transient inputs are dropped after."""
        out = transform({**sample, **inputs})
        if not isinstance(out, Mapping):
            raise TypeError(f"{name} must return the sample dict, got {type(out).__name__}")
        return {k: v for k, v in out.items() if k not in _TRANSIENT}

    def _substitute(
        self, i: int, bucket: int, draw: tuple[int, int], error: Exception
    ) -> dict[str, Any]:
        """Fit another member of ``bucket``, tried in an order fixed by (seed, epoch, i,
        occurrence) (``draw`` = (epoch, occurrence)); failing that, an image of the nearest
        other bucket whose scanned size covers this bucket (fitted to it, never upscaled);
        failing that, a ``dropped`` sample that ``collate`` leaves out of the batch, with a
        warning naming the file."""
        members = self._bucket_members(bucket)
        members = members[members != i]
        rng = sample_rng(self.seed, draw[0], i, "substitute", draw[1])
        tried: list[str] = []
        candidates = [*rng.permutation(members)[: self.max_substitutes].tolist(),
                      *self._covering(i, bucket)]
        for j in candidates:
            try:
                sample = self._fit(j, i, draw)
            except Exception as other:
                tried.append(f"row {j} ({self._name(j)}): {_reason(other)}")
                continue
            self._warn_once(i, j, error)
            return sample
        w, h = self.bucket_wh[i]
        name = self._name(i)
        if name not in _WARNED:
            _WARNED.add(name)
            warnings.warn(
                f"could not load {escape(name)} ({escape(_reason(error))}) and no image could "
                f"stand in for its {w}x{h} bucket without upscaling ({len(tried)} tried"
                f"{': ' + escape('; '.join(tried)) if tried else ''}): row {i} leaves its batch "
                "(a short batch; dropped=True). Not repeated for this file.",
                SubstitutionWarning,
                stacklevel=3,
            )
        return {"dropped": True, "index": i, "original_index": i, "substituted": False,
                "occurrence": draw[1], "target_size": (int(h), int(w))}

    def _covering(self, i: int, bucket: int) -> list[int]:
        """Rows of other buckets whose scanned size covers row ``i``'s bucket (so fitting them
        to it never upscales), nearest bucket first (by aspect, then area), in row order."""
        w, h = (int(v) for v in self.bucket_wh[i])
        ok = np.flatnonzero((self.bucket_id >= 0) & (self.bucket_id != bucket)
                            & (np.asarray(self.index.width) >= w)
                            & (np.asarray(self.index.height) >= h))
        buckets, first = np.unique(self.bucket_id[ok], return_index=True)
        other = self.bucket_wh[ok[first]].astype(np.float64)
        aspect = np.abs(np.log(other[:, 0] / other[:, 1]) - np.log(w / h))
        area = np.abs(other[:, 0] * other[:, 1] - w * h)
        rows: list[int] = []
        for b in buckets[np.lexsort((buckets, area, aspect))]:
            rows += ok[self.bucket_id[ok] == b][: self.max_substitutes - len(rows)].tolist()
            if len(rows) >= self.max_substitutes:
                break
        return rows

    def _bucket_members(self, bucket: int) -> np.ndarray:
        """The rows of ``bucket``: a view into one int32 array of all rows ordered by bucket
        (4 bytes a row, built the first time a file fails in this process)."""
        if self._members is None:
            ids = self.bucket_id
            if int(ids.max()) < 2**15:  # numpy sorts 16-bit keys by radix: 4x faster
                ids = ids.astype(np.int16)
            order = np.argsort(ids, kind="stable").astype(np.int32)
            bounds = np.searchsorted(ids[order], np.arange(int(ids.max()) + 2))
            self._members = (order, bounds)
        order, bounds = self._members
        return order[bounds[bucket] : bounds[bucket + 1]]

    def _name(self, row: int) -> str:
        return self.index.paths[row] or f"row {row}"

    def _warn_once(self, i: int, j: int, error: Exception) -> None:
        name = self._name(i)
        if name in _WARNED:
            return
        _WARNED.add(name)
        warnings.warn(
            f"could not load {escape(name)} ({escape(_reason(error))}); row {i} is replaced by "
            f"row {j} of the same bucket (substituted=True in the sample). Not repeated for "
            "this file.",
            SubstitutionWarning,
            stacklevel=3,
        )


def _check_transform(name: str, transform: Any) -> None:
    """Refuse, at construction, a transform that cannot be called as ``transform(sample)``."""
    if not callable(transform):
        raise TypeError(
            f"{name} must be a callable taking and returning the sample dict "
            f"(transform(sample) -> sample), got {transform!r}"
        )
    try:
        signature = inspect.signature(transform)
    except (TypeError, ValueError):  # some builtins have none: trust them
        return
    try:
        signature.bind({})
    except TypeError as error:
        raise TypeError(
            f"{name} must take one argument, the sample dict (transform(sample) -> sample), "
            f"but {transform!r} has the signature {signature} ({error}); an image transform "
            "reads sample['image'], sample['bucket'] and sample['rng'], a caption transform "
            "sample['captions'] and sample['rng']"
        ) from None


def _reason(error: Exception) -> str:
    return (
        error.reason if isinstance(error, ImageDecodeError) else f"{type(error).__name__}: {error}"
    )


def _as_decode_error(name: str, error: Exception) -> ImageDecodeError:
    if isinstance(error, ImageDecodeError):
        return error
    return ImageDecodeError(name, _reason(error))
