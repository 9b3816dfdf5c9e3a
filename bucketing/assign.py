"""Assign every image to a bucket of a ladder, without upscaling, before decoding a pixel.

Per image (oriented W x H), among the buckets that fit inside it (bw <= W and bh <= H, so
the resize scale s = max(bw/W, bh/H) is <= 1) we take the one minimising

    crop_loss + resolution_loss,   crop_loss = 1 - bw*bh / (s²*W*H),
                                   resolution_loss = 1 - bw*bh / min(W*H, max_area),

ties going to the larger bucket. Each ladder level is an antichain, so the fitting buckets
of a level are one contiguous run in aspect order around the image's aspect: lookup tables
(the vectorised form of three ``searchsorted`` calls) find the run and the image's place in
it, and only ``ladder.search_window`` neighbours on each side are scored (the ladder proves
that is enough). An image more elongated than every bucket of a level takes that level's
most elongated fitting bucket. Levels are visited from the largest where a bucket fits
down, and an image stops as soon as a lower level cannot beat its best (its resolution loss,
plus the crop its aspect must lose outside the lower levels' aspect range, would be worse).
Work is done in cache-sized chunks; no N x K matrix is ever built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from bucketing.sizes import MAX_SIDE, fit_loss, image_sizes

if TYPE_CHECKING:
    from bucketing.index import ImageIndex
    from bucketing.ladder import BucketLadder

_ON_EXTREME = ("crop", "reject")
_CHUNK = 1 << 15  # images per vectorised pass: temporaries stay small and cache-resident


@dataclass
class Assignment:
    """Per-image result of :func:`assign`; row i is row i of the index (or sizes).

    ``bucket_id`` is -1 and ``bucket_wh`` (0, 0) where rejected, with ``reasons[i]`` saying
    why ("too_small", "extreme_aspect", "too_large"); ``scale``, ``crop_loss`` and
    ``resolution_loss`` are NaN there. ``upscaled`` marks images given a bucket larger than
    themselves (only with ``allow_upscale=True``); their resolution loss is 0. ``extreme``
    marks images more elongated than ``ladder.max_aspect``: cropped into the most elongated
    fitting bucket, or rejected "extreme_aspect" with ``on_extreme="reject"``.
    """

    bucket_id: np.ndarray
    bucket_wh: np.ndarray
    scale: np.ndarray
    crop_loss: np.ndarray
    resolution_loss: np.ndarray
    upscaled: np.ndarray
    ladder: BucketLadder
    reasons: np.ndarray
    extreme: np.ndarray

    def __len__(self) -> int:
        return len(self.bucket_id)

    @property
    def accepted(self) -> np.ndarray:
        """(N,) bool: the image has a bucket."""
        return self.bucket_id >= 0

    @cached_property
    def counts(self) -> np.ndarray:
        """(K,) int64 number of images in each bucket of ``ladder.buckets``."""
        ids = self.bucket_id[self.bucket_id >= 0]
        return np.bincount(ids, minlength=len(self.ladder.buckets)).astype(np.int64)

    def bucket_members(self) -> list[np.ndarray]:
        """For each bucket id, the ascending int64 indices of its images."""
        order = np.argsort(self.bucket_id, kind="stable")
        start = int(np.searchsorted(self.bucket_id[order], 0))
        return np.split(order[start:], np.cumsum(self.counts)[:-1])

    def reason_counts(self) -> dict[str, int]:
        """Rejected images per reason, most common first."""
        rejected = self.reasons[self.bucket_id < 0]
        names, counts = np.unique(rejected.astype(str), return_counts=True)
        pairs = sorted(zip(names.tolist(), counts.tolist(), strict=True), key=lambda kv: -kv[1])
        return dict(pairs)


def assign(
    index_or_sizes: ImageIndex | np.ndarray | Sequence[Sequence[int]],
    ladder: BucketLadder,
    *,
    allow_upscale: bool = False,
    on_extreme: str = "crop",
    min_bucket_size: int | None = None,
    max_crop_loss: float = 0.2,
) -> Assignment:
    """Give each image the fitting bucket with the least crop + resolution loss.

    ``index_or_sizes``: an :class:`~bucketing.index.ImageIndex`, an (N, 2) array or a
    sequence of (w, h). Images smaller than every bucket are rejected "too_small", or with
    ``allow_upscale=True`` take the log-aspect-nearest bucket of the smallest level and are
    flagged ``upscaled``. Images more elongated than ``ladder.max_aspect`` are cropped into
    the best (most elongated) fitting bucket, or rejected "extreme_aspect" with
    ``on_extreme="reject"``. A side above ``MAX_SIDE`` (2**31 - 1, more than any image
    format declares) is rejected "too_large". ``min_bucket_size``: buckets left with fewer
    images are emptied, smallest first, each image moving to its best remaining non-empty
    bucket that still fits it and crops at most ``max_crop_loss`` of it; a bucket whose
    images cannot all move so stays as it is.
    """
    if on_extreme not in _ON_EXTREME:
        raise ValueError(f"on_extreme must be one of {_ON_EXTREME}, got {on_extreme!r}")
    if min_bucket_size is not None and min_bucket_size < 1:
        raise ValueError(f"min_bucket_size must be >= 1, got {min_bucket_size}")
    if not 0.0 <= max_crop_loss <= 1.0:
        raise ValueError(f"max_crop_loss must be in [0, 1], got {max_crop_loss}")
    width, height = image_sizes(index_or_sizes)
    n = len(width)
    tables = _Tables(ladder)
    best_id = np.full(n, -1, dtype=np.int64)
    too_large = (width > MAX_SIDE) | (height > MAX_SIDE)
    extreme = np.zeros(n, dtype=bool)
    for lo in range(0, n, _CHUNK):
        sl = slice(lo, lo + _CHUNK)
        big = too_large[sl]  # searched as 1x1 (and skipped): w * h could overflow int64
        w, h = width[sl], height[sl]
        if big.any():
            w, h = np.where(big, 1, w), np.where(big, 1, h)
        aspect = w / h
        extreme[sl] = (aspect > ladder.max_aspect) | (aspect < 1.0 / ladder.max_aspect)
        skip = big | extreme[sl] if on_extreme == "reject" else big
        best_id[sl] = _search(tables, w, h, aspect, skip)

    reasons = np.full(n, None, dtype=object)
    refused = too_large | (extreme if on_extreme == "reject" else False)
    reasons[extreme & refused] = "extreme_aspect"
    reasons[too_large] = "too_large"
    unfit = ~refused & (best_id < 0)
    upscaled = np.zeros(n, dtype=bool)
    if allow_upscale:
        best_id[unfit] = _nearest_in_level(ladder, 0, width[unfit] / height[unfit])
        upscaled = unfit
    else:
        reasons[unfit] = "too_small"
    if min_bucket_size is not None:
        _merge_small(ladder, width, height, best_id, upscaled, min_bucket_size, max_crop_loss)
    return _result(ladder, width, height, best_id, upscaled, reasons, extreme)


# -- the search -------------------------------------------------------------------------


# Losses closer than this are a tie (then the larger bucket wins): equal losses computed by
# different float expressions can differ in the last bits.
_TIE = 1e-12


def _better(f: np.ndarray, a: np.ndarray, best_f: np.ndarray, best_a: np.ndarray) -> np.ndarray:
    """Where loss ``f`` of area ``a`` beats the best so far: lower, or tied and larger."""
    return (f < best_f - _TIE) | ((f <= best_f + _TIE) & (a > best_a))


class _Tables:
    """Lookup tables that replace binary searches in the hot loop (built per call, tiny).

    Per level j (global bucket ids ``start[j]:stop[j]``, aspect ascending):
    ``hi[j, v]`` = last bucket with bw <= v, ``lo[j, v]`` = first bucket with bh <= v (v up
    to the largest side ``side``); the image's aspect position p (first bucket with aspect
    >= x) from a uniform aspect grid: ``below[j, t]`` buckets lie surely below bin t and
    at most one ``edge`` aspect is near it, compared exactly.
    """

    def __init__(self, ladder: BucketLadder) -> None:
        b = ladder.buckets
        self.ladder = ladder
        self.bw, self.bh = b[:, 0].astype(np.float64), b[:, 1].astype(np.float64)
        self.area = self.bw * self.bh
        self.cap = float(ladder.max_area)
        self.window = ladder.search_window
        n_levels = len(ladder.levels)
        slices = [ladder.level_slice(j) for j in range(n_levels)]
        self.start = np.array([s.start for s in slices], dtype=np.int64)
        self.stop = np.array([s.stop for s in slices], dtype=np.int64)
        self.size = int((self.stop - self.start).max())
        min_area = np.array([self.area[s].min() if s.stop > s.start else np.inf
                             for s in slices])
        self.min_area_from = np.minimum.accumulate(min_area[::-1])[::-1]
        max_area = np.array([self.area[s].max() if s.stop > s.start else 0.0 for s in slices])
        # The largest bucket area in levels 0..j: bounds what going down to level j can gain.
        self.area_at_or_below = np.maximum.accumulate(max_area)
        # The aspect range of levels 0..j: an image outside it loses at least its distance.
        r = ladder.aspects
        self.aspect_lo_at_or_below = np.minimum.accumulate(
            [r[s].min() if s.stop > s.start else np.inf for s in slices])
        self.aspect_hi_at_or_below = np.maximum.accumulate(
            [r[s].max() if s.stop > s.start else 0.0 for s in slices])
        self.side = int(b.max())
        v = np.arange(self.side + 1)
        self.hi = np.empty((n_levels, self.side + 1), dtype=np.int64)
        self.lo = np.empty((n_levels, self.side + 1), dtype=np.int64)
        aspects = ladder.aspects
        gaps = [np.diff(aspects[s]) for s in slices]
        min_gap = min([g.min() for g in gaps if len(g)] + [0.25])
        self.inv_delta = 2.0 / min_gap  # bins half the smallest gap: one edge per bin
        self.bins = int(np.ceil((aspects.max() + 1.0) * self.inv_delta)) + 1
        eps = 1e-9
        edges = np.arange(self.bins) / self.inv_delta
        self.below = np.empty((n_levels, self.bins), dtype=np.int64)
        self.edge = np.full((n_levels, self.bins), np.inf)
        for j, s in enumerate(slices):
            self.hi[j] = s.start + np.searchsorted(b[s, 0], v, side="right") - 1
            self.lo[j] = s.start + np.searchsorted(-b[s, 1], -v)
            r = aspects[s]
            self.below[j] = s.start + np.searchsorted(r, edges - eps)
            near_lo = np.searchsorted(r, edges - eps)
            near_hi = np.searchsorted(r, edges + 1.0 / self.inv_delta + eps, side="right")
            has = near_lo < near_hi
            self.edge[j, has] = r[near_lo[has]]
        self.hi, self.lo = self.hi.reshape(-1), self.lo.reshape(-1)
        self.below, self.edge = self.below.reshape(-1), self.edge.reshape(-1)


def _search(
    tb: _Tables, width: np.ndarray, height: np.ndarray, aspect: np.ndarray, skip: np.ndarray
) -> np.ndarray:
    """Optimal fitting bucket id per image (-1 where none fits or ``skip``)."""
    area = width * height
    cap = np.minimum(area, tb.cap).astype(np.float64)
    level = _top_fitting_level(tb, width, height, area, skip)
    best_f, best_id, best_a = _score_level(tb, width, height, aspect, cap, level)
    # Go one level down only where that level could still win: a lower bound on its loss
    # must not exceed the best total loss found so far (the bound grows going down).
    level -= 1
    can = _lower_bound(tb, np.maximum(level, 0), aspect, cap) <= best_f + _TIE
    rows = np.flatnonzero(can & (level >= 0))
    while len(rows):
        f, bid, a = _score_level(tb, width[rows], height[rows], aspect[rows], cap[rows],
                                 level[rows])
        better = _better(f, a, best_f[rows], best_a[rows])
        upd = rows[better]
        best_f[upd], best_id[upd], best_a[upd] = f[better], bid[better], a[better]
        level[rows] -= 1
        lower = level[rows]
        rows = rows[lower >= 0]
        lower = lower[lower >= 0]
        rows = rows[_lower_bound(tb, lower, aspect[rows], cap[rows]) <= best_f[rows] + _TIE]
    best_id[~np.isfinite(best_f)] = -1
    return best_id


def _top_fitting_level(
    tb: _Tables, width: np.ndarray, height: np.ndarray, area: np.ndarray, skip: np.ndarray
) -> np.ndarray:
    """Per image, the highest level where some bucket fits inside it (-1: none, or skip)."""
    # Start at the highest level whose smallest bucket is no larger than the image (a
    # suffix minimum makes the level minima non-decreasing, so one searchsorted finds it).
    level = np.searchsorted(tb.min_area_from, area, side="right") - 1
    level[skip] = -1
    # Then down past the levels where no bucket fits (two table lookups instead of a score);
    # the first pass covers every image, the next ones only those still without a fit.
    w, h = np.minimum(width, tb.side), np.minimum(height, tb.side)
    at = level * (tb.side + 1)  # level -1 reads a valid junk row, masked by level >= 0
    rows = np.flatnonzero((tb.lo[at + h] > tb.hi[at + w]) & (level >= 0))
    while len(rows):
        level[rows] -= 1
        rows = rows[level[rows] >= 0]
        at = level[rows] * (tb.side + 1)
        rows = rows[tb.lo[at + h[rows]] > tb.hi[at + w[rows]]]
    return level


# Slack on a lower bound before a level is skipped: far above the rounding of the losses,
# far below any real difference, so that a level that could tie is still scored.
_BOUND_SLACK = 1e-9


def _lower_bound(tb: _Tables, level: np.ndarray, x: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """A lower bound (less a small slack) on the loss of any bucket in levels 0..``level``
    for images of aspect ``x``: the resolution loss of the largest such bucket plus the crop
    an aspect outside those levels' aspect range must lose."""
    res = 1.0 - tb.area_at_or_below[level] / cap
    crop = np.maximum(1.0 - tb.aspect_hi_at_or_below[level] / x,
                      1.0 - x / tb.aspect_lo_at_or_below[level])
    return res + np.maximum(crop, 0.0) - _BOUND_SLACK


def _score_level(
    tb: _Tables, w: np.ndarray, h: np.ndarray, x: np.ndarray, cap: np.ndarray, level: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best (loss, bucket id, area) per image within its given level; loss inf where
    nothing fits (or the level is -1)."""
    lv = np.maximum(level, 0)
    start, stop = tb.start[lv], tb.stop[lv]
    row = lv * (tb.side + 1)
    hi = tb.hi[row + np.minimum(w, tb.side)]
    lo = tb.lo[row + np.minimum(h, tb.side)]
    cell = lv * tb.bins + np.minimum(x * tb.inv_delta, tb.bins - 1).astype(np.int64)
    p = tb.below[cell] + (x > tb.edge[cell])
    fits = (lo <= hi) & (level >= 0)
    # An image more elongated than every bucket of the level is cropped to the level's most
    # elongated fitting bucket: collapse its window onto that bucket.
    # (np.minimum keeps junk candidates in range where nothing fits and lo is past the end.)
    lo, hi = np.where(p >= stop, hi, lo), np.where(p <= start, np.minimum(lo, hi), hi)
    wf, hf = w.astype(np.float64), h.astype(np.float64)
    best_f = best_id = best_a = None
    for t in range(-tb.window, tb.window):
        # Where nothing fits, hi < lo and the candidate is junk (a valid index): masked below.
        cand = p + t
        np.maximum(cand, lo, out=cand)
        np.minimum(cand, hi, out=cand)
        f, a = _loss(tb, cand, wf, hf, cap), tb.area[cand]
        if best_f is None:
            best_f, best_id, best_a = f, cand, a
            continue
        better = _better(f, a, best_f, best_a)
        np.copyto(best_f, f, where=better)
        np.copyto(best_id, cand, where=better)
        np.copyto(best_a, a, where=better)
    best_f[~fits] = np.inf
    return best_f, best_id, best_a


def _loss(tb: _Tables, cand: np.ndarray, wf: np.ndarray, hf: np.ndarray,
          cap: np.ndarray) -> np.ndarray:
    """:func:`~bucketing.ladder.fit_loss` of buckets ``cand``, the same float operations in
    the same order (so the same bits), with fewer temporaries."""
    x, y = tb.bw[cand], tb.bh[cand]
    x *= hf
    y *= wf
    kept = np.minimum(x, y)
    kept /= np.maximum(x, y, out=x)
    loss = np.subtract(2.0, kept, out=kept)
    loss -= np.divide(tb.area[cand], cap, out=y)  # area = bw * bh exactly
    return loss


def _nearest_in_level(ladder: BucketLadder, level: int, aspect: np.ndarray) -> np.ndarray:
    """Bucket id of the log-aspect-nearest bucket of ``level`` for each aspect."""
    sl = ladder.level_slice(level)
    logr = np.log(ladder.aspects[sl])
    x = np.log(aspect)
    p = np.clip(np.searchsorted(logr, x), 1, max(len(logr) - 1, 1))
    left = np.clip(p - 1, 0, len(logr) - 1)
    right = np.clip(p, 0, len(logr) - 1)
    pick = np.where(np.abs(x - logr[left]) <= np.abs(logr[right] - x), left, right)
    return pick + sl.start


def _best_among(
    ladder: BucketLadder, width: np.ndarray, height: np.ndarray, allowed: np.ndarray,
    max_crop_loss: float,
) -> np.ndarray:
    """Dense search over the ``allowed`` bucket ids for a few images; -1 where none fits
    and crops at most ``max_crop_loss``."""
    cap = np.minimum(width * height, ladder.max_area).astype(np.float64)
    bw = ladder.buckets[allowed, 0][None, :].astype(np.float64)
    bh = ladder.buckets[allowed, 1][None, :].astype(np.float64)
    w, h = width[:, None].astype(np.float64), height[:, None].astype(np.float64)
    x, y = bw * h, bh * w
    crop = 1.0 - np.minimum(x, y) / np.maximum(x, y)
    ok = (bw <= w) & (bh <= h) & (crop <= max_crop_loss + _TIE)
    f = np.where(ok, fit_loss(bw, bh, w, h, cap[:, None]), np.inf)
    # Ties to the larger area: order candidates by area descending before argmin.
    order = np.argsort(-(bw * bh)[0], kind="stable")
    pick = np.argmin(f[:, order], axis=1)
    out = allowed[order][pick]
    return np.where(np.isfinite(f[np.arange(len(w)), order[pick]]), out, -1)


def _merge_small(
    ladder: BucketLadder,
    width: np.ndarray,
    height: np.ndarray,
    best_id: np.ndarray,
    upscaled: np.ndarray,
    min_size: int,
    max_crop_loss: float,
) -> None:
    """Empty buckets holding fewer than ``min_size`` images into their best fitting
    remaining non-empty neighbour that crops at most ``max_crop_loss``, smallest bucket
    first; in place on ``best_id``."""
    k = len(ladder.buckets)
    counts = np.bincount(best_id[best_id >= 0], minlength=k)
    closed = np.zeros(k, dtype=bool)  # emptied, or known impossible to empty
    while True:
        small = np.flatnonzero((counts > 0) & (counts < min_size) & ~closed)
        if not len(small):
            return
        b = small[np.argmin(counts[small])]
        closed[b] = True
        members = np.flatnonzero(best_id == b)
        if upscaled[members].any():
            continue  # upscaled images fit no bucket: nowhere to move them
        allowed = np.flatnonzero((counts > 0) & (np.arange(k) != b))
        if not len(allowed):
            continue
        target = _best_among(ladder, width[members], height[members], allowed, max_crop_loss)
        if (target < 0).any():
            continue  # some member fits nowhere else (within the crop limit): it stays whole
        best_id[members] = target
        counts[b] = 0
        np.add.at(counts, target, 1)


def _result(
    ladder: BucketLadder, width: np.ndarray, height: np.ndarray, best_id: np.ndarray,
    upscaled: np.ndarray, reasons: np.ndarray, extreme: np.ndarray,
) -> Assignment:
    n = len(best_id)
    # Row -1 of the padded table is (0, 0): rejected images need no mask.
    table = np.vstack([ladder.buckets, np.zeros((1, 2), dtype=np.int64)])
    wh = np.take(table, best_id, axis=0)  # several times faster than table[best_id]
    scale, crop, res = np.empty(n), np.empty(n), np.empty(n)
    for lo in range(0, n, _CHUNK):
        sl = slice(lo, lo + _CHUNK)
        bw, bh = wh[sl, 0].astype(np.float64), wh[sl, 1].astype(np.float64)
        wf, hf = width[sl].astype(np.float64), height[sl].astype(np.float64)
        x, y = bw * hf, bh * wf
        rejected = best_id[sl] < 0
        np.maximum(bw / wf, bh / hf, out=scale[sl])
        with np.errstate(invalid="ignore"):
            np.divide(np.minimum(x, y), np.maximum(x, y), out=crop[sl])  # bw*bh / (s²*W*H)
        np.subtract(1.0, crop[sl], out=crop[sl])
        np.maximum(1.0 - (bw * bh) / np.minimum(wf * hf, ladder.max_area), 0.0, out=res[sl])
        for out in (scale, crop, res):
            out[sl][rejected] = np.nan
    res[upscaled] = 0.0
    return Assignment(best_id, wh, scale, crop, res, upscaled.copy(), ladder, reasons, extreme)
