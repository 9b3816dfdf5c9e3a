"""Buckets fitted to one dataset, chosen from a model's whole lattice of shapes.

The *lattice* of a model is every (w, h) with both sides multiples of its ``multiple``, an
area between ``min_area`` and ``max_area`` and an aspect within ``max_aspect`` both ways. An
image's *own size* (:func:`own_sizes`) is the lattice point it trains at with nothing lost
but rounding: its size rounded down to the multiple, or, above ``max_area``, its size scaled
to ``max_area`` first (the neighbouring lattice point with the least crop + resolution loss).

:func:`fit_buckets` keeps at most ``max_buckets`` shapes for a set of images: it starts from
every image's own size (plus the preset's buckets, which cover small images) and removes, one
at a time, the shape whose images lose the least by moving to their next best shape (greedy
removal on :func:`~bucketing.sizes.fit_loss`, the objective :func:`bucketing.assign`
minimises). Images are grouped on 1-D keys of their own size, so millions of sizes cost one
sort. Everything here works on arrays; :meth:`bucketing.ladder.BucketLadder.from_data` wraps it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bucketing.sizes import fit_loss

_EXACT = 1 << 16  # up to this many images, groups are exact sizes
_FIT_GROUPS = 4096  # image groups scored against every candidate shape
_CANDIDATES = 2048  # own sizes kept as candidates (the most used), besides the preset's
_ROWS = 512  # groups per chunk while filling the loss matrix (bounds the temporaries)
_KEY = 1 << 31  # a side below 2**31: a * _KEY + b is a unique int64 key


def own_sizes(
    width: np.ndarray, height: np.ndarray, *, multiple: int, max_area: int,
    max_aspect: float, min_area: int,
) -> np.ndarray:
    """(N, 2) int64 own lattice size of each image, (0, 0) where the lattice has no shape that
    fits inside it. An image more elongated than ``max_aspect`` is first cropped to it; one
    above ``max_area`` is scaled to it, then the rounded-down point and its two neighbours one
    step wider or taller (within ``max_area``) compete on crop + resolution loss."""
    w = np.asarray(width, dtype=np.float64)
    h = np.asarray(height, dtype=np.float64)
    m = float(multiple)
    we = np.minimum(w, np.floor(h * max_aspect))
    he = np.minimum(h, np.floor(w * max_aspect))
    scale = np.minimum(1.0, np.sqrt(max_area / (we * he)))
    a = np.floor(we * scale / m)
    b = np.floor(he * scale / m)
    a = np.minimum(a, np.floor(b * max_aspect))  # rounding must not leave max_aspect
    b = np.minimum(b, np.floor(a * max_aspect))
    big = np.flatnonzero(scale < 1.0)  # only a scaled size has neighbours that may fit
    if len(big):
        wb, hb, web, heb = w[big], h[big], we[big], he[big]
        cap = np.minimum(wb * hb, float(max_area))
        best_a, best_b = a[big], b[big]
        best_f = _own_loss(best_a, best_b, wb, hb, web, heb, cap, m, max_area, max_aspect)
        for da, db in ((1.0, 0.0), (0.0, 1.0)):
            na, nb = a[big] + da, b[big] + db
            f = _own_loss(na, nb, wb, hb, web, heb, cap, m, max_area, max_aspect)
            better = f < best_f
            best_a, best_b = np.where(better, na, best_a), np.where(better, nb, best_b)
            best_f = np.minimum(best_f, f)
        a[big], b[big] = best_a, best_b
    out = np.stack([a, b], axis=1).astype(np.int64) * multiple
    out[(out[:, 0] < multiple) | (out[:, 1] < multiple) | (out[:, 0] * out[:, 1] < min_area)] = 0
    return out


def distinct_own_sizes(
    width: np.ndarray, height: np.ndarray, *, multiple: int, max_area: int,
    max_aspect: float, min_area: int,
) -> np.ndarray:
    """(K, 2) int64 distinct own sizes of these images (:func:`own_sizes`), sorted; grouped
    on a dense 1-D key, so millions of sizes cost no sort."""
    own = own_sizes(width, height, multiple=multiple, max_area=max_area,
                    max_aspect=max_aspect, min_area=min_area)
    own = own[own[:, 0] > 0] // multiple
    if not len(own):
        return np.zeros((0, 2), dtype=np.int64)
    nb = int(own[:, 1].max()) + 1
    present = np.flatnonzero(np.bincount(own[:, 0] * nb + own[:, 1]))
    return np.stack([present // nb, present % nb], axis=1) * multiple


def _own_loss(
    a: np.ndarray, b: np.ndarray, w: np.ndarray, h: np.ndarray, we: np.ndarray,
    he: np.ndarray, cap: np.ndarray, m: float, max_area: int, max_aspect: float,
) -> np.ndarray:
    """fit_loss of the lattice point (a, b) x ``m``; inf where it is off the lattice or does not
    fit inside the (aspect-cropped) image."""
    bw, bh = a * m, b * m
    ok = ((a >= 1) & (b >= 1) & (bw <= we) & (bh <= he) & (bw * bh <= max_area)
          & (bw <= bh * max_aspect) & (bh <= bw * max_aspect))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ok, fit_loss(bw, bh, w, h, cap), np.inf)


def fit_buckets(
    width: np.ndarray, height: np.ndarray, preset: np.ndarray, cut: np.ndarray, *,
    multiple: int, max_area: int, max_aspect: float, min_area: int, max_buckets: int,
) -> np.ndarray:
    """(K, 2) int64 lattice shapes, K <= ``max_buckets``, for images (``width``, ``height``):
    the greedy removal's choice or ``preset[cut]`` (the preset cut to the same budget),
    whichever loses less in total (an image left without a shape costing more than every loss
    together). ``preset``: (P, 2) shapes of the model's preset, candidates besides the own
    sizes. Empty when no shape fits any image. Deterministic: the rows' order does not
    matter."""
    preset = np.asarray(preset, dtype=np.int64).reshape(-1, 2)
    lattice = {"multiple": multiple, "max_area": max_area, "max_aspect": max_aspect,
               "min_area": min_area}
    w, h = np.asarray(width, dtype=np.int64), np.asarray(height, dtype=np.int64)
    if len(w) <= _EXACT:  # group by exact size: exact losses
        key, count = np.unique(w * _KEY + h, return_counts=True)
        w, h = key // _KEY, key % _KEY
        own = own_sizes(w, h, **lattice)
        has = own[:, 0] > 0
        weight = count[has].astype(np.float64)
        cells = _Cells(own[has] // multiple, weight, w[has] * weight, h[has] * weight, w[has],
                       h[has])
    else:  # group by own lattice point: one pass, no sort
        own = own_sizes(w, h, **lattice)
        has = own[:, 0] > 0
        cells = _cells(own[has] // multiple, w[has], h[has])
    if not len(cells.weight):
        return np.zeros((0, 2), dtype=np.int64)
    top = np.argsort(-cells.weight, kind="stable")[:_CANDIDATES]  # the most used own sizes
    cands = np.unique(np.concatenate([cells.point[top] * multiple, preset]), axis=0)
    fit_w, fit_h, mean_w, mean_h, weight = _coarsen(cells)
    loss = _loss_matrix(cands, fit_w, fit_h, mean_w, mean_h, max_area)
    lost = 2.0 * weight.sum() + 2.0
    cut_cols = np.flatnonzero((cands[:, None] == preset[cut][None]).all(axis=2).any(axis=1))
    cut_cost = _cost(loss[:, cut_cols], weight, lost)
    alive = _polish(loss, weight, _remove_to_budget(loss.copy(), weight, max_buckets, lost),
                    lost)
    if _cost(loss[:, alive], weight, lost) <= cut_cost:
        return cands[alive]
    return cands[cut_cols]


def _cost(loss: np.ndarray, weight: np.ndarray, lost: float) -> float:
    """Total loss of the groups, each taking its best column (``lost`` per image without)."""
    if loss.shape[1] == 0:
        return float(weight.sum() * lost)
    return float(weight @ np.minimum(loss.min(axis=1), lost))


@dataclass
class _Cells:
    """Images grouped by a lattice ``point`` (in multiples): per group the number of images,
    the sums of their widths and heights and their smallest width and height."""

    point: np.ndarray
    weight: np.ndarray
    sum_w: np.ndarray
    sum_h: np.ndarray
    min_w: np.ndarray
    min_h: np.ndarray


def _cells(point: np.ndarray, w: np.ndarray, h: np.ndarray) -> _Cells:
    """Group images by their own lattice point on a dense 1-D key (bincounts, no sort)."""
    nb = int(point[:, 1].max()) + 1
    key = point[:, 0] * nb + point[:, 1]
    size = int(key.max()) + 1
    weight = np.bincount(key, minlength=size).astype(np.float64)
    present = np.flatnonzero(weight)
    min_w = np.full(size, np.iinfo(np.int64).max)
    min_h = np.full(size, np.iinfo(np.int64).max)
    np.minimum.at(min_w, key, w)
    np.minimum.at(min_h, key, h)
    sum_w = np.bincount(key, weights=w.astype(np.float64), minlength=size)
    sum_h = np.bincount(key, weights=h.astype(np.float64), minlength=size)
    point = np.stack([present // nb, present % nb], axis=1)
    return _Cells(point, weight[present], sum_w[present], sum_h[present], min_w[present],
                  min_h[present])


def _coarsen(cells: _Cells) -> tuple[np.ndarray, ...]:
    """At most ``_FIT_GROUPS`` groups of cells (the cells themselves, else their lattice points
    coarsened by 1, 2, 4, ...):
    per group the smallest width and height (a shape fits the group only if it fits them),
    the mean width and height (what its losses are measured on) and the number of images."""
    inv, n = np.arange(len(cells.weight)), len(cells.weight)
    q = 1
    while n > _FIT_GROUPS:
        key = (cells.point[:, 0] // q) * _KEY + cells.point[:, 1] // q
        groups, inv = np.unique(key, return_inverse=True)
        inv, n, q = inv.reshape(-1), len(groups), 2 * q
    weight = np.bincount(inv, weights=cells.weight)
    mean_w = np.bincount(inv, weights=cells.sum_w) / weight
    mean_h = np.bincount(inv, weights=cells.sum_h) / weight
    fit_w = np.full(n, np.inf)
    fit_h = np.full(n, np.inf)
    np.minimum.at(fit_w, inv, cells.min_w.astype(np.float64))
    np.minimum.at(fit_h, inv, cells.min_h.astype(np.float64))
    return fit_w, fit_h, mean_w, mean_h, weight


def _loss_matrix(
    cands: np.ndarray, fit_w: np.ndarray, fit_h: np.ndarray, mean_w: np.ndarray,
    mean_h: np.ndarray, max_area: int,
) -> np.ndarray:
    """(groups, candidates) float64 crop + resolution loss, inf where a shape does not fit."""
    bw, bh = cands[None, :, 0].astype(np.float64), cands[None, :, 1].astype(np.float64)
    out = np.empty((len(fit_w), len(cands)))
    for lo in range(0, len(fit_w), _ROWS):
        sl = slice(lo, lo + _ROWS)
        w, h = mean_w[sl, None], mean_h[sl, None]
        cap = np.minimum(w * h, float(max_area))
        fits = (bw <= fit_w[sl, None]) & (bh <= fit_h[sl, None])
        out[sl] = np.where(fits, fit_loss(bw, bh, w, h, cap), np.inf)
    return out


def _best_two(loss: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per row: the best and second best column and their losses (column -1 where inf)."""
    rows = np.arange(len(loss))
    if loss.shape[1] == 1:
        first, f1 = np.zeros(len(loss), dtype=np.int64), loss[:, 0]
        return first, np.full(len(loss), -1), f1, np.full(len(loss), np.inf)
    two = np.argpartition(loss, 1, axis=1)[:, :2]
    swap = loss[rows, two[:, 1]] < loss[rows, two[:, 0]]
    # Ties go to the lower column, so that the result does not depend on the partition.
    tie = loss[rows, two[:, 1]] == loss[rows, two[:, 0]]
    swap |= tie & (two[:, 1] < two[:, 0])
    first = np.where(swap, two[:, 1], two[:, 0])
    second = np.where(swap, two[:, 0], two[:, 1])
    f1, f2 = loss[rows, first], loss[rows, second]
    first = np.where(np.isfinite(f1), first, -1)
    second = np.where(np.isfinite(f2), second, -1)
    return first, second, f1, f2


def _polish(loss: np.ndarray, weight: np.ndarray, alive: np.ndarray, lost: float,
            rounds: int = 3) -> np.ndarray:
    """Improve the kept columns ``alive`` in place of each other: each column's groups (those
    it serves best) move together to the column with the least total loss on them that fits
    them all, while the total loss falls (k-medians updates; never more columns)."""
    best = alive.copy()
    best_cost = _cost(loss[:, best], weight, lost)
    for _ in range(rounds):
        cols = np.flatnonzero(best)
        sub = loss[:, cols]
        served = np.isfinite(sub).any(axis=1)
        owner = np.argmin(sub, axis=1)
        new = np.zeros_like(best)
        for j, c in enumerate(cols.tolist()):
            rows = np.flatnonzero(served & (owner == j))
            if not len(rows):
                continue
            total = weight[rows] @ loss[rows]  # inf where a column misses one of them
            new[int(np.argmin(total)) if np.isfinite(total).any() else c] = True
        cost = _cost(loss[:, new], weight, lost)
        if not cost < best_cost - 1e-12:
            break
        best, best_cost = new, cost
    return best


def _remove_to_budget(
    loss: np.ndarray, weight: np.ndarray, budget: int, lost: float
) -> np.ndarray:
    """Boolean mask of the columns kept: greedy removal, each time of the column whose groups
    lose the least by moving to their second best (an image left without any shape costs
    ``lost``), until at most ``budget`` columns are some group's best. Works in ``loss``."""
    alive = np.ones(loss.shape[1], dtype=bool)
    first, second, f1, f2 = _best_two(loss)
    while True:
        has = first >= 0
        used = np.bincount(first[has], minlength=len(alive)) > 0
        if used.sum() <= budget:
            return alive & used
        move = weight * (np.where(second >= 0, f2, lost) - f1)
        cost = np.bincount(first[has], weights=move[has], minlength=len(alive))
        cost[~used] = np.inf
        gone = np.flatnonzero(~used & alive)  # no group's best: nothing moves
        gone = np.r_[gone, np.argmin(cost)].astype(np.int64)
        alive[gone] = False
        loss[:, gone] = np.inf
        rows = np.flatnonzero(np.isin(first, gone) | np.isin(second, gone))
        if len(rows):
            a, b, c, d = _best_two(loss[rows])
            first[rows], second[rows], f1[rows], f2[rows] = a, b, c, d
