"""Bucket ladders: the set of (width, height) training shapes, grouped in area levels.

A ladder has one or more *levels* (pixel areas up to ``max_area``). Each level holds
buckets of about that area at many aspect ratios: every side a multiple of
``multiple`` (FLUX: 16 = VAE factor 8 x patch size 2), widths on a ``step`` grid,
aspect within ``max_aspect`` both ways, mirrored so that (w, h) in implies (h, w) in.
Small images land in a smaller level instead of being upscaled.

Within a level no bucket is larger than another in both sides (an *antichain*), so the
buckets that fit inside an image form one contiguous run in aspect order; that is what
lets :func:`bucketing.assign` search a few log-aspect neighbours per level with
``searchsorted`` instead of scoring every bucket. ``MODEL_SPECS`` is the model registry
(:mod:`bucketing.models`): each model's divisibility, default area, levels and T5 length.
:meth:`BucketLadder.from_data` keeps, out of a preset, the buckets that serve one dataset best
within a bucket budget.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from bucketing.models import MODELS, ModelSpec

if TYPE_CHECKING:
    from bucketing.index import ImageIndex

# The largest side assign() accepts (PNG's limit; JPEG stops at 65535): beyond it an image is
# rejected "too_large", and below it w * h and every loss stay exact in int64 / float64.
MAX_SIDE = 2**31 - 1


_STEPS = 10  # level steps from the floor (a quarter of the top side) to the top side


def default_levels(max_area: int, multiple: int) -> list[int]:
    """Default level areas: 11 sides growing geometrically (x1.15 each, area x1.32) from a
    quarter of the top side up to the top side ``sqrt(max_area)``, rounded to ``multiple``
    (at least one ``multiple``); duplicates after rounding merge. For 1024² and 16: 256, 288,
    336, 384, 448, 512, 592, 672, 784, 896, 1024."""
    side = math.isqrt(int(max_area))
    sides = {max(multiple, int(side * 4 ** (k / _STEPS - 1) / multiple + 0.5) * multiple)
             for k in range(_STEPS + 1)}
    return sorted({min(s * s, int(max_area)) for s in sides})


# The presets: the model registry's entries (bucketing.models holds every model's numbers).
MODEL_SPECS: dict[str, ModelSpec] = MODELS


class BucketLadder:
    """The (K, 2) int64 ``buckets`` array of (w, h), sorted by level (ascending area) then
    aspect; bucket id = row. ``levels`` holds each level's nominal area, ``bucket_level``
    the level of each bucket. ``model`` names the preset the ladder comes from (``for_model``,
    or the base of ``from_data``), None for a ladder built from explicit parameters or buckets.

    With ``levels=None`` the levels are :func:`default_levels` for ``max_area``: 11 sides
    growing geometrically from a quarter of the top side to the top side.
    """

    model: str | None = None

    def __init__(
        self,
        max_area: int = 1024 * 1024,
        multiple: int = 16,
        step: int = 64,
        max_aspect: float = 4.0,
        levels: Sequence[int] | None = None,
    ) -> None:
        if multiple < 1 or step < 1:
            raise ValueError(f"multiple and step must be >= 1, got {multiple} and {step}")
        if step % multiple:
            raise ValueError(f"step ({step}) must be a multiple of multiple ({multiple})")
        if not max_aspect >= 1.0:
            raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
        if max_area < multiple * multiple:
            raise ValueError(f"max_area {max_area} is below one {multiple}x{multiple} bucket")
        if levels is None:
            levels = default_levels(max_area, multiple)
        levels = sorted({int(a) for a in levels})
        if not levels or levels[0] < multiple * multiple or levels[-1] > max_area:
            raise ValueError(
                f"levels must be areas in [{multiple * multiple}, max_area={max_area}], "
                f"got {levels}"
            )
        per_level = [_level_buckets(a, multiple, step, max_aspect) for a in levels]
        buckets, level_of = _dedupe_across_levels(per_level)
        self.max_area = int(max_area)
        self.multiple = int(multiple)
        self.step = int(step)
        self.max_aspect = float(max_aspect)
        self._set(buckets, level_of, levels)

    def _set(self, buckets: np.ndarray, level_of: np.ndarray, levels: Sequence[int]) -> None:
        order = np.lexsort((buckets[:, 0] / buckets[:, 1], level_of))
        self.buckets = np.ascontiguousarray(buckets[order], dtype=np.int64)
        self.bucket_level = np.ascontiguousarray(level_of[order], dtype=np.int64)
        self.levels = np.asarray(levels, dtype=np.int64)
        self.buckets.flags.writeable = False
        self.bucket_level.flags.writeable = False
        self.levels.flags.writeable = False
        # Half the log-aspect window assign() must search per level to be exact.
        self.search_window = _search_window(self)

    # -- constructors -------------------------------------------------------------------

    @classmethod
    def for_model(cls, name: str, **overrides: Any) -> BucketLadder:
        """The preset ladder for ``name`` (one of ``MODEL_SPECS``); keyword overrides
        (``max_area``, ``levels``, ``step``, ``max_aspect``) replace the preset's values."""
        if name not in MODEL_SPECS:
            raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_SPECS)}")
        spec = MODEL_SPECS[name]
        kwargs = {
            "max_area": spec.max_area,
            "multiple": spec.multiple,
            "step": spec.step,
            "max_aspect": spec.max_aspect,
            "levels": spec.levels,
        }
        if "max_area" in overrides and "levels" not in overrides:
            kwargs["levels"] = None  # the preset's levels belong to its own max_area
        kwargs.update(overrides)
        ladder = cls(**kwargs)
        ladder.model = name
        return ladder

    @classmethod
    def from_buckets(
        cls,
        buckets: Iterable[Sequence[int]],
        multiple: int = 8,
        *,
        max_area: int | None = None,
        model: str | None = None,
    ) -> BucketLadder:
        """A ladder from an explicit list of (w, h). Every side must be a positive multiple of
        ``multiple``; duplicates are an error. The list need not be symmetric. Levels are the
        layers of the "both sides larger" order (so that each level is an antichain); each
        level's area is its largest bucket's area. ``max_area`` (default: the largest bucket's
        area, at least that) caps the pixels resolution loss is measured against; ``model``
        is recorded as ``ladder.model``."""
        arr = np.asarray(list(buckets), dtype=np.int64)
        if arr.ndim != 2 or arr.shape[1] != 2 or len(arr) == 0:
            raise ValueError("from_buckets needs a non-empty list of (width, height) pairs")
        if (arr < 1).any() or (arr % multiple).any():
            bad = arr[((arr < 1) | (arr % multiple != 0)).any(axis=1)][0].tolist()
            raise ValueError(f"bucket {bad} has a side that is not a positive multiple of "
                             f"{multiple}")
        uniq, counts = np.unique(arr, axis=0, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"duplicate bucket {uniq[counts > 1][0].tolist()}")
        layer = _antichain_layers(arr)
        n_levels = int(layer.max()) + 1
        areas = arr[:, 0] * arr[:, 1]
        levels = [int(areas[layer == j].max()) for j in range(n_levels)]
        # Order levels by area so that level 0 is the smallest, as for generated ladders.
        rank = np.argsort(np.argsort(levels, kind="stable"), kind="stable")
        if max_area is not None and max_area < areas.max():
            raise ValueError(f"max_area {max_area} is below the largest bucket's area "
                             f"{int(areas.max())}")
        self = cls.__new__(cls)
        self.model = model
        self.max_area = int(areas.max() if max_area is None else max_area)
        self.multiple = int(multiple)
        self.step = int(multiple)
        aspects = arr[:, 0] / arr[:, 1]
        self.max_aspect = float(max(aspects.max(), 1 / aspects.min()))
        self._set(arr, rank[layer], sorted(levels))
        return self

    @classmethod
    def from_data(
        cls,
        sizes: ImageIndex | np.ndarray | Sequence[Sequence[int]],
        *,
        max_buckets: int,
        base: BucketLadder | str = "flux",
    ) -> BucketLadder:
        """At most ``max_buckets`` buckets of ``base`` (a preset name or a ladder), chosen for
        these image sizes (an index, an (N, 2) array or (w, h) pairs).

        Every image is scored against every bucket of ``base`` that fits inside it with
        :func:`bucketing.assign`'s objective (crop loss + resolution loss). When the images'
        own best buckets fit the budget, those are the ladder; otherwise buckets are added one
        at a time, each the one that lowers the total loss most (greedy facility location),
        and those no image would take are left out. Losing an image costs more than all
        losses together, so every image ``base`` fits keeps a bucket while the budget allows
        (the first buckets are small ones that fit many images). Beyond 8192 distinct sizes,
        sizes are grouped by their floor to ``multiple`` (which keeps the set of fitting
        buckets), then to coarser multiples. Deterministic. The result keeps ``base``'s
        ``max_area``, ``multiple`` and ``model``."""
        if max_buckets < 1:
            raise ValueError(f"max_buckets must be >= 1, got {max_buckets}")
        if isinstance(base, str):
            base = cls.for_model(base)
        width, height = image_sizes(sizes)
        ok = (width <= MAX_SIDE) & (height <= MAX_SIDE)
        width, height, q = width[ok], height[ok], 1
        while True:
            groups, weight = np.unique(np.stack([width // q, height // q], axis=1) * q,
                                       axis=0, return_counts=True)
            if len(groups) <= _FIT_GROUPS:
                break
            q = base.multiple if q == 1 else 2 * q
        w, h = groups[:, :1].astype(np.float64), groups[:, 1:].astype(np.float64)
        bw, bh = (base.buckets[None, :, i].astype(np.float64) for i in (0, 1))
        cap = np.minimum(w * h, base.max_area)
        with np.errstate(divide="ignore", invalid="ignore"):
            loss = np.where((bw <= w) & (bh <= h), fit_loss(bw, bh, w, h, cap), np.inf)
        chosen = _budget(loss, weight.astype(np.float64), max_buckets)
        if not len(chosen):
            raise ValueError("from_data needs at least one image that a bucket of the base "
                             "ladder fits")
        return cls.from_buckets(base.buckets[chosen], base.multiple, max_area=base.max_area,
                                model=base.model)

    # -- views --------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.buckets)

    def __repr__(self) -> str:
        sides = ", ".join(str(math.isqrt(int(a))) + "²" for a in self.levels)
        return (f"BucketLadder({len(self)} buckets, levels [{sides}], multiple={self.multiple}, "
                f"max_aspect={self.max_aspect:g})")

    @property
    def aspects(self) -> np.ndarray:
        """(K,) float64 w / h of each bucket."""
        return self.buckets[:, 0] / self.buckets[:, 1]

    @property
    def areas(self) -> np.ndarray:
        """(K,) int64 w * h of each bucket."""
        return self.buckets[:, 0] * self.buckets[:, 1]

    def level_slice(self, level: int) -> slice:
        """Rows of ``buckets`` in level ``level`` (contiguous, aspect ascending)."""
        lo, hi = np.searchsorted(self.bucket_level, [level, level + 1])
        return slice(int(lo), int(hi))



def image_sizes(
    index_or_sizes: ImageIndex | np.ndarray | Sequence[Sequence[int]],
) -> tuple[np.ndarray, np.ndarray]:
    """(width, height) int64 arrays from an :class:`~bucketing.index.ImageIndex`, an (N, 2)
    array or a sequence of (w, h). Sizes that are not whole numbers (1.5, NaN, text) are a
    ValueError, and so is the first size that is not positive; sides above ``MAX_SIDE``
    (whatever their magnitude, clipped to 2**62) are left for the caller to reject."""
    width = getattr(index_or_sizes, "width", None)
    height = getattr(index_or_sizes, "height", None)
    if width is not None and height is not None:
        width, height = np.asarray(width, np.int64), np.asarray(height, np.int64)
    else:
        try:
            arr = np.asarray(index_or_sizes)
            if arr.dtype == object:  # Python ints beyond int64 (exact below 2**53)
                arr = arr.astype(np.float64)
            if arr.dtype.kind == "f":  # whole numbers only; a huge one stays too large
                if not (np.isfinite(arr) & (arr == np.trunc(arr))).all():
                    raise ValueError("a size is not a whole number of pixels")
                arr = np.minimum(arr, 2.0**62)
            arr = arr.astype(np.int64)
        except (OverflowError, TypeError, ValueError) as e:
            raise ValueError(f"sizes must be whole numbers of pixels: {e}") from None
        if arr.size == 0:
            arr = arr.reshape(0, 2)
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise ValueError(f"sizes must be an (N, 2) array of (width, height), got shape "
                             f"{arr.shape}")
        width, height = arr[:, 0], arr[:, 1]
    if len(width) and (width.min() < 1 or height.min() < 1):
        i = int(np.flatnonzero((width < 1) | (height < 1))[0])
        raise ValueError(f"image {i} has size {width[i]}x{height[i]}; sizes must be positive")
    return np.ascontiguousarray(width), np.ascontiguousarray(height)


def fit_loss(
    bw: np.ndarray, bh: np.ndarray, w: np.ndarray, h: np.ndarray, cap: np.ndarray
) -> np.ndarray:
    """crop_loss + resolution_loss of buckets (bw, bh) that fit inside images (w, h), float64
    and broadcasting; ``cap`` = min(w * h, max_area): the pixels an image could train at."""
    x = bw * h  # proportional to the bucket's aspect over the image's
    y = bh * w
    kept = np.minimum(x, y) / np.maximum(x, y)
    return 2.0 - kept - (bw * bh) / cap


_FIT_GROUPS = 8192  # distinct size groups from_data scores against every bucket


def _budget(loss: np.ndarray, weight: np.ndarray, max_buckets: int) -> np.ndarray:
    """Ascending ids of the buckets kept for groups of images with ``loss`` (groups, K; inf
    where a bucket does not fit) and ``weight`` (images per group). Within the budget, every
    group's best bucket; beyond, greedy facility location: starting from no bucket (every
    image lost, dearer than all losses together), add the bucket that lowers the total loss
    most, ``max_buckets`` times; keep those that are some group's best."""
    fits = np.isfinite(loss).any(axis=1)
    own = np.unique(np.argmin(loss, axis=1)[fits])
    if len(own) <= max_buckets:
        return own
    cur = np.full(len(loss), 2.0 * weight.sum() + 2.0)
    chosen: list[int] = []
    for _ in range(max_buckets):
        gain = weight @ np.maximum(cur[:, None] - loss, 0.0)
        b = int(np.argmax(gain))
        if gain[b] <= 0.0:
            break
        chosen.append(b)
        cur = np.minimum(cur, loss[:, b])
    keep = np.asarray(chosen, dtype=np.int64)
    sub = loss[:, keep]
    return np.unique(keep[np.argmin(sub, axis=1)[np.isfinite(sub).any(axis=1)]])


def _level_buckets(area: int, multiple: int, step: int, max_aspect: float) -> np.ndarray:
    """Buckets of one level: the square, landscape widths on the ``step`` grid with the
    largest height that keeps the area, and their mirrors. An antichain by construction."""
    side = math.isqrt(area) // multiple * multiple
    out = [(side, side)] if side >= multiple else []
    last_h = side
    w = (side // step + 1) * step
    while True:
        h = area // w // multiple * multiple
        if h < multiple or w > max_aspect * h:
            break
        if h == last_h and len(out) > 1:  # one bucket per height keeps the level an
            out[-2:] = [(w, h), (h, w)]  # antichain: keep the wider (larger) one
        elif h < last_h:
            out += [(w, h), (h, w)]
            last_h = h
        w += step
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


def _dedupe_across_levels(per_level: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate levels; a shape present in several levels stays only in the highest."""
    seen: set[tuple[int, int]] = set()
    rows, level_of = [], []
    for j in range(len(per_level) - 1, -1, -1):
        for w, h in per_level[j].tolist():
            if (w, h) not in seen:
                seen.add((w, h))
                rows.append((w, h))
                level_of.append(j)
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2), np.asarray(level_of, dtype=np.int64)


def _antichain_layers(arr: np.ndarray) -> np.ndarray:
    """Layer of each bucket in the dominance order (a <= b iff both sides <=): the length of
    the longest chain of buckets it dominates. Buckets in one layer never dominate each other."""
    order = np.lexsort((arr[:, 1], arr[:, 0]))
    layer = np.zeros(len(arr), dtype=np.int64)
    for pos, i in enumerate(order):
        below = order[:pos]
        dom = below[(arr[below, 0] <= arr[i, 0]) & (arr[below, 1] <= arr[i, 1])]
        layer[i] = layer[dom].max() + 1 if len(dom) else 0
    return layer


def _search_window(ladder: BucketLadder) -> int:
    """Smallest m such that, per level, the best fitting bucket for any image whose aspect
    lies inside the level's aspect range is among the m nearest fitting buckets on each side.

    Going k buckets further from the image's aspect costs at least
    (r[i-1]/r[i]) * (1 - r[i]/r[i+k]) in crop loss and gains at most the level's relative
    area spread 1 - min_area/max_area in resolution loss; m is where the cost exceeds the gain.
    """
    m_all = 1
    for j in range(len(ladder.levels)):
        sl = ladder.level_slice(j)
        r = ladder.aspects[sl]
        a = ladder.areas[sl]
        n = len(r)
        if n < 3:
            m_all = max(m_all, n)
            continue
        spread = 1.0 - a.min() / a.max() + 1e-9
        m = 1
        while m < n:
            i = np.arange(1, n - m)  # i-1 >= 0 and i+m <= n-1
            up = (r[i - 1] / r[i]) * (1.0 - r[i] / r[i + m])
            k = np.arange(m + 1, n)  # below side: (r[k-1] - r[k-1-m]) / r[k]
            down = (r[k - 1] - r[k - 1 - m]) / r[k]
            if (up.size == 0 or up.min() > spread) and (down.size == 0 or down.min() > spread):
                break
            m += 1
        m_all = max(m_all, m)
    return m_all

