"""Builders: one call from "where the images are" to a dataset, torchtune style.

`text_to_image_dataset` is a plain function (no config objects), so a torchtune YAML builds it
with ``config.instantiate(cfg.dataset, model_transform)``::

    dataset:
      _component_: bucketing.text_to_image_dataset
      source: examples/data
      model: flux
      captions: {dropout: 0.1}

`MixedDataset` puts several such datasets behind one index space: each keeps its own buckets,
ladder, captions and seed; its rows are numbered one dataset after the other, and its bucket
ids are the (dataset, bucket) pairs, so one `BucketBatchSampler` plans them together and every
batch still holds one shape of one dataset.
"""

from __future__ import annotations

import operator
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from bucketing.assign import assign
from bucketing.ladder import MODEL_SPECS, BucketLadder, fitted_ladder
from bucketing.pipeline.dataset import TextToImageDataset
from bucketing.pipeline.stream import StreamingBucketDataset
from bucketing.scan import scan
from bucketing.sources import read_sidecar, sidecar_path
from bucketing.sources.hf_dataset import load_source
from samplers.sample_index import SampleIndex
from transforms.caption import CaptionTransform
from transforms.resize_crop import BucketResizeCrop

LADDER_KEYS = ("max_area", "levels", "step", "max_aspect", "fit", "max_buckets")
CAPTION_EXTENSION = re.compile(r"^\.[A-Za-z0-9_.-]+$")


def sidecar_captions(image: str, extension: str) -> list[str]:
    """The captions of ``<stem of image><extension>`` (``bucketing.sources.read_sidecar``);
    [] without it."""
    path = sidecar_path(image, extension)
    return read_sidecar(path) if os.path.lexists(path) else []


def make_ladder(
    model: str,
    ladder: BucketLadder | Mapping[str, Any] | None = None,
    sizes: Any = None,
) -> BucketLadder:
    """``ladder`` itself, or ``model``'s preset with the overrides of a mapping (``max_area``,
    ``levels``, ``step``, ``max_aspect``) fitted to ``sizes`` (an index or (N, 2) sizes) as
    ``fit`` says (``"data"``, the default: buckets chosen for these sizes, ``max_buckets`` of
    them or as many as the preset uses; ``"preset"``; ``"native"``): see
    :func:`bucketing.ladder.fitted_ladder`. Without sizes, the preset (settings checked)."""
    if isinstance(ladder, BucketLadder):
        return ladder
    if model not in MODEL_SPECS:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(MODEL_SPECS)}")
    overrides = dict(ladder or {})
    unknown = sorted(set(overrides) - set(LADDER_KEYS))
    if unknown:
        raise ValueError(f"unknown ladder keys {unknown}; known: {', '.join(LADDER_KEYS)}")
    fit = overrides.pop("fit", "data")
    max_buckets = overrides.pop("max_buckets", None)
    return fitted_ladder(BucketLadder.for_model(model, **overrides), sizes, fit=fit,
                         max_buckets=max_buckets)


def text_to_image_dataset(
    model_transform: Callable[[dict], dict] | None = None,
    *,
    source: Any,
    column_map: Mapping[str, str] | None = None,
    model: str = "flux",
    ladder: BucketLadder | Mapping[str, Any] | None = None,
    captions: CaptionTransform | Mapping[str, Any] | None = None,
    crop: str = "random",
    flip_p: float = 0.0,
    allow_upscale: bool = False,
    seed: int = 0,
    cache: str | None = None,
    workers: int | None = None,
    base_dir: str | None = None,
    caption_extension: str | None = None,
    on_error: str = "substitute",
    data_files: Any = None,
    data_dir: str | None = None,
    split: str = "train",
    streaming: bool = False,
    batch_size: int | None = None,
    max_buffered_rows: int | None = None,
    max_buffered_bytes: int | None = None,
    last_batch: str = "short",
) -> TextToImageDataset | StreamingBucketDataset:
    """Scan ``source``, assign its images to ``model``'s ladder and serve them fitted,
    captioned and passed through ``model_transform`` (e.g. a ``FluxTokenizer``).

    ``streaming=True`` scans nothing: it returns a ``StreamingBucketDataset`` reading
    ``source`` (tar shards, a ``datasets.IterableDataset``, a list of rows, or with
    ``data_files`` / ``data_dir`` / ``"hf:NAME"`` what ``datasets.load_dataset(...,
    streaming=True)`` builds) front to back into batches of ``batch_size`` (required), with
    the buffers' bounds ``max_buffered_rows`` / ``max_buffered_bytes`` and ``last_batch``
    ("short" or "drop"); iterate it with ``DataLoader(dataset, batch_size=None)``
    (docs/streaming.md). With no scan there are no sizes to fit: it uses the preset (with
    the mapping's overrides). ``cache``, ``workers``, ``caption_extension`` and ``on_error``
    are the scan's and the map-style dataset's and are refused with it.

    ``ladder``: a ``BucketLadder``, or overrides of the model's preset (``{"max_area":
    512 * 512}``) and how to fit it to the images (``{"fit": "data"}``, the default: buckets
    chosen for these images, as many as the preset would use; ``"preset"``; ``"native"``;
    ``"max_buckets": K``); ``captions``: a ``CaptionTransform`` or its keyword arguments
    (``{"dropout": 0.1, "template": "a photo of sks person, {caption}"}``); ``crop``, ``flip_p`` and
    ``allow_upscale`` configure ``BucketResizeCrop`` (and ``assign``); ``cache``, ``workers``,
    ``column_map`` and ``base_dir`` go to ``scan``, and so do ``data_files``, ``data_dir``
    and ``split``: with one of the first two, or ``source="hf:NAME"``, ``source`` names what
    ``datasets.load_dataset`` builds (``source="imagefolder", data_dir="photos"``).
    ``caption_extension`` (e.g. ``".caption"``) reads every image's captions from
    ``<stem><extension>`` only (none when that file is missing), instead of the first
    sidecar found. The dataset's ``index`` and rejections say
    what was left out and why.
    """
    preset = make_ladder(model, ladder)  # bad settings fail before the scan
    if captions is not None and not isinstance(captions, CaptionTransform):
        captions = CaptionTransform(**dict(captions))
    image_transform = BucketResizeCrop(crop=crop, flip_p=flip_p, allow_upscale=allow_upscale)
    if streaming:
        if batch_size is None:
            raise ValueError("streaming=True needs batch_size (the streamed dataset yields "
                             "whole batches)")
        given = {"cache": cache, "workers": workers, "caption_extension": caption_extension,
                 "on_error": None if on_error == "substitute" else on_error}
        refused = sorted(k for k, v in given.items() if v is not None)
        if refused:
            raise ValueError(f"{', '.join(refused)}: not used with streaming=True (nothing is "
                             "scanned; a row that fails is rejected, never substituted)")
        limits = {} if max_buffered_bytes is None else {"max_buffered_bytes": max_buffered_bytes}
        return StreamingBucketDataset(
            load_source(source, data_files, data_dir, split, streaming=True),
            batch_size=batch_size, ladder=preset, image_transform=image_transform,
            caption_transform=captions, model_transform=model_transform, seed=seed,
            max_buffered_rows=max_buffered_rows, last_batch=last_batch,
            column_map=column_map, base_dir=base_dir, **limits)
    if caption_extension is not None and not CAPTION_EXTENSION.match(caption_extension):
        raise ValueError(f"caption_extension must look like '.txt', got {caption_extension!r}")
    index = scan(source, cache=cache, workers=workers,
                 column_map=None if column_map is None else dict(column_map), base_dir=base_dir,
                 data_files=data_files, data_dir=data_dir, split=split)
    if caption_extension is not None:
        index.captions = [sidecar_captions(path, caption_extension) for path in index.paths]
    assignment = assign(index, make_ladder(model, ladder, index), allow_upscale=allow_upscale)
    return TextToImageDataset(
        index,
        assignment,
        image_transform=image_transform,
        caption_transform=captions,
        model_transform=model_transform,
        seed=seed,
        on_error=on_error,
    )


@dataclass(frozen=True)
class BucketShapes:
    """The (K, 2) ``buckets`` (w, h) of a mixed dataset: what a sampler reads of a ladder."""

    buckets: np.ndarray


class MixedDataset(Dataset):
    """Several bucketed datasets behind one index space, planned by one sampler.

    Rows are numbered dataset after dataset (``offsets``); ``dataset_of[i]`` says which
    dataset row i belongs to. ``bucket_id`` numbers the non-empty (dataset, bucket) pairs, so
    two datasets never share a bucket even with the same shape; ``ladder.buckets`` holds their
    shapes and ``bucket_wh`` each row's (what ``BucketBatchSampler`` reads for pixel budgets).
    Item i is the part's item (its own transforms, seed and captions) with ``dataset`` (the
    part's name) added and ``index`` / ``original_index`` in the mixed numbering.
    """

    def __init__(self, parts: Mapping[str, TextToImageDataset]) -> None:
        super().__init__()
        if not parts:
            raise ValueError("MixedDataset needs at least one dataset")
        self.names = list(parts)
        self.datasets = list(parts.values())
        sizes = [len(d) for d in self.datasets]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.dataset_of = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
        local = np.concatenate([np.asarray(d.bucket_id, dtype=np.int64) for d in self.datasets])
        self.bucket_wh = np.concatenate(
            [np.asarray(d.bucket_wh, dtype=np.int64).reshape(-1, 2) for d in self.datasets]
        )
        accepted = local >= 0
        pairs = np.stack([self.dataset_of[accepted], local[accepted]], axis=1)
        unique, first, inverse = np.unique(pairs, axis=0, return_index=True, return_inverse=True)
        self.bucket_id = np.full(len(local), -1, dtype=np.int64)
        self.bucket_id[accepted] = inverse.reshape(-1)
        self.bucket_dataset = unique[:, 0]
        self.ladder = BucketShapes(self.bucket_wh[accepted][first])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def epoch(self) -> int:
        """The epoch of the parts' per-sample generators."""
        return self.datasets[0].epoch

    def set_epoch(self, epoch: int) -> None:
        """Set every part's epoch (call before iterating, as for one dataset)."""
        for dataset in self.datasets:
            dataset.set_epoch(epoch)

    def __getitem__(self, i: int) -> dict[str, Any]:
        occurrence, epoch = getattr(i, "occurrence", 0), getattr(i, "epoch", None)
        i = operator.index(i)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a mixed dataset of {len(self)} rows")
        k = int(self.dataset_of[i])
        offset = int(self.offsets[k])
        sample = self.datasets[k][SampleIndex(i - offset, occurrence, epoch)]
        sample["dataset"] = self.names[k]
        for key in ("index", "original_index"):
            if key in sample:
                sample[key] = int(sample[key]) + offset
        return sample

    def row_repeats(self, repeats: Sequence[float]) -> np.ndarray:
        """A per-row repeats array from one number per dataset (for the sampler)."""
        if len(repeats) != len(self.datasets):
            raise ValueError(f"need one repeats value per dataset ({len(self.datasets)}), "
                             f"got {len(repeats)}")
        return np.asarray(repeats, dtype=np.float64)[self.dataset_of]

    def __repr__(self) -> str:
        parts = ", ".join(f"{n!r}: {len(d)} rows" for n, d in zip(self.names, self.datasets,
                                                                   strict=True))
        return f"MixedDataset({{{parts}}}, {len(self.ladder.buckets)} buckets)"
