"""The trade of a bucket budget: fewer buckets fill more batches but keep fewer pixels.

:func:`ladder_trade` measures, on one data set, the preset, fitted ladders at a few budgets
and every image's own size: resolution loss (mean / p95 / max), crop loss and the steps whose
batch is short at a global batch size. :func:`worst_images` names the images that lose the
most pixels and why. ``bucket-report`` prints both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from bucketing.assign import Assignment, assign
from bucketing.fit_ladder import own_sizes
from bucketing.ladder import BucketLadder, NoImageFits
from bucketing.sizes import MAX_SIDE, image_sizes

if TYPE_CHECKING:
    from bucketing.index import ImageIndex


def trade_row(name: str, a: Assignment, global_batch: int, repeats: float = 1.0) -> dict[str, Any]:
    """Figures of one assignment: buckets used, resolution and crop loss over the accepted
    images, rejected images, and the steps per epoch (and those with a short batch) when each
    bucket's images, each seen ``repeats`` times, are cut into batches of ``global_batch``."""
    ok = a.accepted
    res, crop = a.resolution_loss[ok], a.crop_loss[ok]
    samples = np.round(a.counts[a.counts > 0] * repeats).astype(np.int64)
    samples = samples[samples > 0]
    return {
        "ladder": name,
        "buckets": int((a.counts > 0).sum()),
        "resolution_loss": {"mean": _stat(np.mean, res), "p95": _stat(_p95, res),
                            "max": _stat(np.max, res)},
        "crop_loss": {"mean": _stat(np.mean, crop), "p95": _stat(_p95, crop)},
        "rejected": int((~ok).sum()),
        "steps": int((-(-samples // global_batch)).sum()),
        "short_steps": int((samples % global_batch != 0).sum()),
        "chosen": False,
    }


def _p95(v: np.ndarray) -> float:
    return float(np.percentile(v, 95))


def _stat(f: Any, v: np.ndarray) -> float:
    return float(f(v)) if len(v) else 0.0


def ladder_trade(
    sizes: ImageIndex | np.ndarray | Sequence[Sequence[int]],
    base: BucketLadder,
    chosen: BucketLadder,
    *,
    global_batch: int,
    repeats: float = 1.0,
    budgets: Sequence[int] = (),
) -> list[dict[str, Any]]:
    """:func:`trade_row` for ``base`` (the preset), ladders fitted to ``sizes`` with as many
    buckets as the preset uses, a half and a quarter of that (and ``budgets``), every image's
    own size, and the
    ``chosen`` ladder (marked ``"chosen": True``; a row it equals is marked instead of added).
    Rows go from the most buckets to the fewest."""
    width, height = image_sizes(sizes)
    ok = (width <= MAX_SIDE) & (height <= MAX_SIDE)
    wh = np.stack([width[ok], height[ok]], axis=1)
    preset = assign(wh, base)
    ladders: list[tuple[str, BucketLadder]] = [("preset", base)]
    used = int((preset.counts > 0).sum())
    if used:
        wanted = {used, max(1, used // 2), max(1, used // 4), *(int(b) for b in budgets)}
        for k in sorted(wanted, reverse=True):
            ladders.append((f"fitted, {k}", BucketLadder.from_data(wh, max_buckets=k, base=base)))
        with contextlib.suppress(NoImageFits):  # the lattice may hold no image's own size
            ladders.append(("own sizes", BucketLadder.from_data(wh, base=base, native=True)))
    rows = [trade_row(name, preset if lad is base else assign(wh, lad), global_batch, repeats)
            for name, lad in ladders]
    same = [i for i, (_, lad) in enumerate(ladders)
            if np.array_equal(lad.buckets, chosen.buckets)]
    if same:
        rows[same[0]]["chosen"] = True
    else:
        rows.append({**trade_row("chosen", assign(wh, chosen), global_batch, repeats),
                     "chosen": True})
    return sorted(rows, key=lambda r: -r["buckets"])


def worst_images(
    sizes: ImageIndex | np.ndarray | Sequence[Sequence[int]], a: Assignment, count: int = 5,
) -> list[dict[str, Any]]:
    """The ``count`` accepted images that lose the most pixels (resolution loss), each with
    its row, size, bucket, loss and why: an aspect beyond the ladder's ``max_aspect`` (the
    excess is cropped), a size the lattice rounds down (its own size is all it can train at),
    its own size not a bucket (it shares the best one that fits), or a bucket that loses less
    than its own size (a closer aspect)."""
    width, height = image_sizes(sizes)
    ladder = a.ladder
    rows = np.flatnonzero(a.accepted)
    rows = rows[np.argsort(-a.resolution_loss[rows], kind="stable")[:count]]
    own = own_sizes(np.minimum(width[rows], MAX_SIDE), np.minimum(height[rows], MAX_SIDE),
                    multiple=ladder.multiple, max_area=ladder.max_area,
                    max_aspect=ladder.max_aspect, min_area=1)
    shapes = {tuple(b) for b in ladder.buckets.tolist()}
    has = {(ow, oh): (ow, oh) in shapes for ow, oh in own.tolist()}
    out = []
    for r, (ow, oh) in zip(rows.tolist(), own.tolist(), strict=True):
        w, h = int(width[r]), int(height[r])
        bw, bh = (int(v) for v in a.bucket_wh[r])
        if a.extreme[r]:
            why = (f"aspect {max(w / h, h / w):.2f} is beyond max_aspect "
                   f"{ladder.max_aspect:g}: the excess is cropped")
        elif (bw, bh) == (ow, oh):
            why = f"its own size on the {ladder.multiple}-pixel lattice is {ow}x{oh}"
        else:
            others = int(a.counts[a.bucket_id[r]]) - 1
            why = (f"{bw}x{bh} (shared with {others} other images) loses less than its own "
                   f"size {ow}x{oh}" if has[(ow, oh)] else
                   f"its own size {ow}x{oh} is not a bucket; {bw}x{bh} (shared with {others} "
                   "other images) is the best that fits")
        out.append({"row": r, "width": w, "height": h, "bucket": [bw, bh],
                    "resolution_loss": float(a.resolution_loss[r]), "why": why})
    return out
