"""One plan: a spec plus its data gives an index, an assignment and a fingerprint of both
(and of the settings that change what a sample is).

The fingerprint is what the report prints, what an encoder cache records, what a dataset
exposes (``TextToImageDataset.plan_fingerprint``, ``MixedDataset.plan_fingerprint``) and what
``BucketBatchSampler`` folds into its resume state, so a state saved for another plan (a
config's datasets reordered, another ladder) is refused. :func:`check_encoder_cache` compares
a dataset's assignment and captions with what an encoder cache was built for, when the
dataset is constructed, before any DataLoader worker starts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from bucketing.index import ImageIndex
from bucketing.pipeline.encoder_cache.reader import EncoderCache
from transforms.caption import CaptionTransform, format_caption

if TYPE_CHECKING:
    from bucketing.assign import Assignment

_PRIMITIVE = (str, int, float, bool, type(None))
_SHOWN = 5  # buckets and rows named in a mismatch message


def plan_fingerprint(
    paths: Sequence[str], sizes: np.ndarray, bucket_wh: np.ndarray, accepted: np.ndarray,
    settings: Mapping[str, Any],
) -> str:
    """A 16-hex-digit fingerprint of rows (path, size), their buckets (w, h; rejected rows
    count as 0x0) and ``settings`` (JSON-able: the options that change a sample)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(len(paths).to_bytes(8, "little"))
    for path in paths:
        h.update(str(path).encode("utf-8", "surrogatepass") + b"\0")
    wh = np.where(np.asarray(accepted, dtype=bool)[:, None],
                  np.asarray(bucket_wh, dtype="<i8").reshape(-1, 2), 0)
    h.update(np.ascontiguousarray(np.asarray(sizes, dtype="<i8").reshape(-1, 2)).data)
    h.update(np.ascontiguousarray(wh.astype("<i8")).data)
    return h.hexdigest()


def combine(parts: Sequence[tuple[str, str]]) -> str:
    """The fingerprint of a mix: its (name, part fingerprint) pairs, in order."""
    return hashlib.blake2b(json.dumps(list(parts)).encode(), digest_size=8).hexdigest()


def transform_settings(transform: Any) -> dict[str, Any] | str | None:
    """The plain settings of a transform (its int / float / str / bool attributes, and its
    class name): what a fingerprint records of it."""
    if transform is None:
        return None
    state = getattr(transform, "__dict__", {})
    plain = {k: v for k, v in sorted(state.items()) if isinstance(v, _PRIMITIVE)
             or isinstance(v, tuple) and all(isinstance(x, _PRIMITIVE) for x in v)}
    return {"class": type(transform).__name__, **plain}


@dataclass(frozen=True)
class Plan:
    """A data set's plan: its ``index``, ``assignment`` and the ``settings`` that change what
    a sample is; :attr:`fingerprint` hashes the three."""

    index: ImageIndex
    assignment: Assignment
    settings: Mapping[str, Any]

    @cached_property
    def fingerprint(self) -> str:
        """:func:`plan_fingerprint` of this plan."""
        return plan_fingerprint(
            self.index.paths, np.stack([self.index.width, self.index.height], axis=1),
            self.assignment.bucket_wh, np.asarray(self.assignment.bucket_id) >= 0, self.settings)


def dataset_fingerprint(dataset: Any) -> str:
    """The plan fingerprint of a ``TextToImageDataset``: its rows, buckets, seed and the
    settings of its image and caption transforms (the model transform, which tokenizes,
    does not change which image or caption a sample is)."""
    index = dataset.index
    settings = {"seed": dataset.seed, "image": transform_settings(dataset.image_transform),
                "caption": transform_settings(dataset.caption_transform)}
    return plan_fingerprint(index.paths, np.stack([index.width, index.height], axis=1),
                            dataset.bucket_wh, np.asarray(dataset.bucket_id) >= 0, settings)


# --------------------------------------------------------------------------- cache check


def fixed_captions(caption_transform: Any, captions: Sequence[Sequence[str]]) -> list[list[str]]:
    """Each row's captions as ``caption_transform`` gives them when every caption must come
    from an encoder cache: as they are (no transform), or with its template and trigger words
    (a row without captions gets the template of ""). Raises ValueError for a transform whose
    captions cannot be cached (shuffled parts, tag dropout, or a transform of another kind)."""
    if caption_transform is None:
        return [list(c) for c in captions]
    if not isinstance(caption_transform, CaptionTransform):
        kind = type(caption_transform).__name__
        raise ValueError(f"an encoder cache holds fixed captions; {kind} may make others: use "
                         "CaptionTransform (template, prefix, suffix, dropout) or none")
    t = caption_transform
    if t.shuffle_parts or t.tag_dropout:
        raise ValueError("an encoder cache holds fixed captions, but this CaptionTransform "
                         "shuffles parts or drops tags (every epoch another caption): turn "
                         "shuffle_parts and tag_dropout off, or train without the cache")
    return [[format_caption(c, prefix=t.prefix, suffix=t.suffix, template=t.template)
             for c in (row or [""])] for row in captions]


def cached_captions(caption_transform: Any, captions: Sequence[Sequence[str]]) -> set[str]:
    """Every caption a dataset with ``caption_transform`` asks an encoder cache for."""
    rows = fixed_captions(caption_transform, captions)
    needed = {c for row in rows for c in row}
    if caption_transform is None:  # the first caption, or "" for a row without one
        needed = {row[0] if row else "" for row in rows}
    if getattr(caption_transform, "dropout", 0):
        needed.add("")
    return needed


@dataclass(frozen=True)
class MixRows:
    """What ``build_cache`` reads of an assignment, for the rows of several plans."""

    bucket_id: np.ndarray
    bucket_wh: np.ndarray
    upscaled: np.ndarray

    def __len__(self) -> int:
        return len(self.bucket_id)


def mix_rows(plans: Mapping[str, Plan], caption_transforms: Mapping[str, Any]
             ) -> tuple[ImageIndex, MixRows]:
    """One index and assignment holding the accepted rows of every plan (captions as each
    dataset's transform gives them), for one encoder cache covering a whole mix. An image
    in two datasets must have one bucket (a cache holds one per image)."""
    paths, sizes, captions, wh, upscaled = [], [], [], [], []
    seen: dict[str, tuple[str, tuple[int, int]]] = {}
    blobs = [name for name, plan in plans.items() if plan.index.blob is not None]
    if blobs and len(plans) > 1:
        raise ValueError(f"dataset {blobs[0]!r} holds its images inside another container; "
                         "one encoder cache covers such a dataset only on its own")
    for name, plan in plans.items():
        index, assignment = plan.index, plan.assignment
        rows = np.flatnonzero(np.asarray(assignment.bucket_id) >= 0).tolist()
        texts = fixed_captions(caption_transforms.get(name), [index.captions[r] for r in rows])
        bucket_wh = np.asarray(assignment.bucket_wh).reshape(-1, 2)
        for row, text in zip(rows, texts, strict=True):
            path, bucket = index.paths[row], (int(bucket_wh[row, 0]), int(bucket_wh[row, 1]))
            if path in seen:
                other, theirs = seen[path]
                if theirs != bucket:
                    raise ValueError(
                        f"{path} is in datasets {other!r} ({theirs[0]}x{theirs[1]}) and {name!r} "
                        f"({bucket[0]}x{bucket[1]}): one encoder cache holds one bucket per "
                        "image; give the two datasets the same ladder or build two caches")
                continue
            seen[path] = (name, bucket)
            paths.append(path)
            sizes.append((int(index.width[row]), int(index.height[row])))
            captions.append(text)
            wh.append(bucket)
            upscaled.append(bool(np.asarray(assignment.upscaled)[row]))
    only = next(iter(plans.values())).index if len(plans) == 1 else None
    size = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    index = ImageIndex(paths=paths, width=size[:, 0], height=size[:, 1], captions=captions,
                       blob=None if only is None else _rows_blob(only, plans))
    n = len(paths)
    return index, MixRows(np.zeros(n, dtype=np.int64), np.asarray(wh, dtype=np.int64).reshape(
        -1, 2), np.asarray(upscaled, dtype=bool))


def _rows_blob(index: ImageIndex, plans: Mapping[str, Plan]) -> _RowBlob | None:
    """The one plan's blob reader, renumbered to its accepted rows."""
    if index.blob is None:
        return None
    plan = next(iter(plans.values()))
    return _RowBlob(index.blob, np.flatnonzero(np.asarray(plan.assignment.bucket_id) >= 0))


@dataclass(frozen=True)
class _RowBlob:
    """``blob(rows[i])``: picklable, for DataLoader workers."""

    blob: Any
    rows: np.ndarray

    def __call__(self, i: int) -> bytes:
        return self.blob(int(self.rows[i]))


def check_encoder_cache(cache: Any, index: ImageIndex, assignment: Assignment,
                        caption_transform: Any = None) -> None:
    """Refuse (ValueError) an encoder cache built for another plan than this dataset's: rows
    the cache holds in another bucket, accepted rows it never saw, captions it lacks. The
    message says how many rows and which buckets differ, and how to rebuild. A cache of
    another kind (not an :class:`EncoderCache`) is trusted."""
    if not isinstance(cache, EncoderCache):
        return
    accepted = np.flatnonzero(np.asarray(assignment.bucket_id) >= 0)
    wh = np.asarray(assignment.bucket_wh).reshape(-1, 2)
    rows = cache.rows
    cached = {p: (w, h) for p, w, h in zip(rows["path"], rows["bucket_w"], rows["bucket_h"],
                                           strict=True)}
    missing_at_build = set(cache.meta.get("plan", {}).get("missing", ()))
    moved: dict[tuple[tuple[int, int], tuple[int, int]], int] = {}
    unseen: list[str] = []
    for row in accepted.tolist():
        path, mine = index.paths[row], (int(wh[row, 0]), int(wh[row, 1]))
        theirs = cached.get(path)
        if theirs is None:
            if path not in missing_at_build:
                unseen.append(path)
        elif tuple(int(v) for v in theirs) != mine:
            key = (tuple(int(v) for v in theirs), mine)
            moved[key] = moved.get(key, 0) + 1
    lacking = sorted(c for c in cached_captions(
        caption_transform, [index.captions[r] for r in accepted.tolist()])
        if not cache.has_caption(c))
    if not (moved or unseen or lacking):
        return
    parts = []
    if moved:
        shown = ", ".join(f"{a[0]}x{a[1]} -> {b[0]}x{b[1]} ({n})"
                          for (a, b), n in sorted(moved.items())[:_SHOWN])
        parts.append(f"{sum(moved.values())} rows are cached in another bucket than this "
                     f"dataset's (cache -> dataset: {shown})")
    if unseen:
        parts.append(f"{len(unseen)} accepted rows are not in the cache (e.g. "
                     f"{', '.join(repr(p) for p in unseen[:_SHOWN])})")
    if lacking:
        parts.append(f"{len(lacking)} captions are not in the cache (e.g. {lacking[0][:60]!r})")
    built = cache.meta.get("plan", {}).get("fingerprint")
    raise ValueError(
        f"the encoder cache {cache.root} was built for another plan"
        f"{f' ({built})' if built else ''} than this dataset's: " + "; ".join(parts) +
        ". Rebuild it for this dataset's ladder and captions: bucket-cache --config FILE (the "
        "same file the trainer reads), or bucket-cache SOURCE with the same --model, "
        "--max-area, --levels, --max-buckets, --template and --prefix, or build_cache(index, "
        "assignment, ...) with this dataset's index, assignment and templated captions"
    )
