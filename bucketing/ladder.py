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
import numbers
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from bucketing.assign import assign
from bucketing.fit_ladder import distinct_own_sizes, fit_buckets
from bucketing.models import MODELS, ModelSpec
from bucketing.sizes import MAX_SIDE, fit_loss, image_sizes

if TYPE_CHECKING:
    from bucketing.index import ImageIndex

__all__ = ["FIT_MODES", "MAX_BUCKETS", "MAX_SIDE", "MODEL_SPECS", "BucketLadder", "ModelSpec",
           "NoImageFits", "default_levels", "fit_loss", "fitted_ladder", "image_sizes"]

MAX_BUCKETS = 4096  # far above any useful ladder; checked before a ladder is built

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


class NoImageFits(ValueError):
    """``from_data`` found no image that a bucket of the base ladder's lattice fits."""


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
        canonical: Iterable[Sequence[int]] = (),
    ) -> None:
        if multiple < 1 or step < 1:
            raise ValueError(f"multiple and step must be >= 1, got {multiple} and {step}")
        if step % multiple:
            raise ValueError(f"step ({step}) must be a multiple of multiple ({multiple})")
        if not max_aspect >= 1.0:
            raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
        if max_area < multiple * multiple:
            raise ValueError(f"max_area {max_area} is below one {multiple}x{multiple} bucket")
        if math.isqrt(int(max_area)) > MAX_SIDE:
            raise ValueError(f"max_area {max_area} has a side above MAX_SIDE = {MAX_SIDE}")
        if levels is None:
            levels = default_levels(max_area, multiple)
        levels = sorted({int(a) for a in levels})
        _check_bucket_count(levels, multiple, step, max_aspect)
        if not levels or levels[0] < multiple * multiple or levels[-1] > max_area:
            raise ValueError(
                f"levels must be areas in [{multiple * multiple}, max_area={max_area}], "
                f"got {levels}"
            )
        per_level = [_level_buckets(a, multiple, step, max_aspect) for a in levels]
        extra = _canonical_levels(canonical, per_level, multiple, max_area, max_aspect)
        areas = [*levels, *(int((b[:, 0] * b[:, 1]).max()) for b in extra)]
        order = np.argsort(areas, kind="stable").tolist()
        per_level = [[*per_level, *extra][i] for i in order]
        levels = [areas[i] for i in order]
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
            "canonical": spec.canonical,
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
        max_aspect: float | None = None,
    ) -> BucketLadder:
        """A ladder from an explicit list of (w, h). Every side must be a positive multiple of
        ``multiple``; duplicates are an error. The list need not be symmetric. Levels are
        area bands (each down to 1/1.32 of its largest area, as far apart as the presets'
        levels) cut into the layers of the "both sides larger" order, so that each level is an
        antichain of similar areas (what keeps :func:`bucketing.assign` fast); each level's
        area is its largest bucket's area. ``max_area`` (default: the largest bucket's
        area, at least that) caps the pixels resolution loss is measured against; ``model``
        is recorded as ``ladder.model``; ``max_aspect`` (default: the most elongated bucket's,
        at least that) is where ``assign`` starts calling an image extreme."""
        arr = np.asarray(list(buckets), dtype=np.int64)
        if arr.ndim != 2 or arr.shape[1] != 2 or len(arr) == 0:
            raise ValueError("from_buckets needs a non-empty list of (width, height) pairs")
        if len(arr) > MAX_BUCKETS or arr.max() > MAX_SIDE:
            raise ValueError(f"from_buckets takes at most {MAX_BUCKETS} buckets with sides up "
                             f"to {MAX_SIDE}, got {len(arr)} buckets up to {arr.max()}")
        if (arr < 1).any() or (arr % multiple).any():
            bad = arr[((arr < 1) | (arr % multiple != 0)).any(axis=1)][0].tolist()
            raise ValueError(f"bucket {bad} has a side that is not a positive multiple of "
                             f"{multiple}")
        uniq, counts = np.unique(arr, axis=0, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"duplicate bucket {uniq[counts > 1][0].tolist()}")
        layer = _banded_layers(arr)
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
        widest = float(max(aspects.max(), 1 / aspects.min()))
        if max_aspect is not None and max_aspect < widest:
            raise ValueError(f"max_aspect {max_aspect} is below a bucket's aspect {widest:g}")
        self.max_aspect = widest if max_aspect is None else float(max_aspect)
        self._set(arr, rank[layer], sorted(levels))
        return self

    @classmethod
    def from_data(
        cls,
        sizes: ImageIndex | np.ndarray | Sequence[Sequence[int]],
        *,
        max_buckets: int | None = None,
        base: BucketLadder | str = "flux",
        native: bool = False,
    ) -> BucketLadder:
        """Buckets fitted to these image sizes (an index, an (N, 2) array or (w, h) pairs),
        chosen from ``base``'s whole lattice: every (w, h) with sides multiples of its
        ``multiple``, an area from its smallest bucket's up to its ``max_area`` and an aspect
        within its ``max_aspect`` (``base``: a preset name or a ladder).

        At most ``max_buckets`` buckets; None: as many as the buckets of ``base`` these images
        use (so the number of steps stays what the preset gives). Starting from every image's
        own lattice size, the bucket whose images lose least by moving is removed until the
        budget holds (see :mod:`bucketing.fit_ladder`); the result is compared with the best
        ``max_buckets`` buckets of ``base`` itself and the better of the two (total crop +
        resolution loss under :func:`bucketing.assign`, a lost image costing more than every
        loss together) is returned, so it is never worse than the preset cut to the same
        budget. ``native=True``: every image's own lattice size, no budget (for batch size 1,
        where buckets cost nothing). Deterministic; keeps ``base``'s ``max_area``,
        ``multiple``, ``max_aspect`` and ``model``."""
        if max_buckets is not None and (isinstance(max_buckets, bool)
                                        or not isinstance(max_buckets, numbers.Integral)):
            raise TypeError(f"max_buckets must be an int, got {max_buckets!r}")
        if max_buckets is not None and max_buckets < 1:
            raise ValueError(f"max_buckets must be >= 1, got {max_buckets}")
        if native and max_buckets is not None:
            raise ValueError("native=True gives every image its own size: no max_buckets")
        if isinstance(base, str):
            base = cls.for_model(base)
        width, height = image_sizes(sizes)
        ok = (width <= MAX_SIDE) & (height <= MAX_SIDE)
        width, height = width[ok], height[ok]
        lattice = {"multiple": base.multiple, "max_area": base.max_area,
                   "max_aspect": base.max_aspect, "min_area": int(base.areas.min())}
        if native:
            found = distinct_own_sizes(width, height, **lattice)
            if not len(found):
                raise NoImageFits("from_data needs at least one image that a bucket of the "
                                 "base ladder's lattice fits")
            return cls.from_buckets(found, base.multiple, max_area=base.max_area,
                                    model=base.model, max_aspect=base.max_aspect)
        preset = assign(np.stack([width, height], axis=1), base)
        budget = int((preset.counts > 0).sum()) if max_buckets is None else max_buckets
        budget = max(budget, 1)
        used = np.flatnonzero(preset.counts > 0)
        cut = used if len(used) <= budget else _preset_budget(base, width, height, budget)
        chosen = fit_buckets(width, height, base.buckets, cut, max_buckets=budget, **lattice)
        if not len(chosen) and len(cut):  # the lattice fits none the preset fits: the preset cut
            chosen = base.buckets[cut]
        if not len(chosen):
            raise NoImageFits("from_data needs at least one image that a bucket of the base "
                             "ladder fits")
        return cls.from_buckets(chosen, base.multiple, max_area=base.max_area, model=base.model,
                                max_aspect=base.max_aspect)

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



_PRESET_GROUPS = 8192  # distinct size groups scored against every bucket of a preset


def _preset_budget(base: BucketLadder, width: np.ndarray, height: np.ndarray,
                   max_buckets: int) -> np.ndarray:
    """Ascending ids of at most ``max_buckets`` buckets of ``base`` for these images: every
    image's best bucket when they fit the budget, else greedy facility location. Beyond 8192
    distinct sizes, sizes are grouped by their floor to ``multiple`` (which keeps the set of
    fitting buckets), then to coarser multiples."""
    q = 1
    while True:
        groups, weight = np.unique(np.stack([width // q, height // q], axis=1) * q,
                                   axis=0, return_counts=True)
        if len(groups) <= _PRESET_GROUPS:
            break
        q = base.multiple if q == 1 else 2 * q
    w, h = groups[:, :1].astype(np.float64), groups[:, 1:].astype(np.float64)
    bw, bh = (base.buckets[None, :, i].astype(np.float64) for i in (0, 1))
    cap = np.minimum(w * h, base.max_area)
    with np.errstate(divide="ignore", invalid="ignore"):
        loss = np.where((bw <= w) & (bh <= h), fit_loss(bw, bh, w, h, cap), np.inf)
    return _budget(loss, weight.astype(np.float64), max_buckets)


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


def _check_bucket_count(levels: Sequence[int], multiple: int, step: int,
                        max_aspect: float) -> None:
    """Refuse, before building it, a ladder that would hold more than ``MAX_BUCKETS`` buckets
    (bounded per level by the widths :func:`_level_buckets` walks)."""
    bound = 0
    for area in levels:
        widest = math.sqrt(area * min(max_aspect, area / multiple**2))
        bound += 1 + 2 * max(0, int((widest - math.isqrt(area)) // step) + 1)
        if bound > MAX_BUCKETS:
            raise ValueError(
                f"this ladder would hold more than {MAX_BUCKETS} buckets ({len(levels)} levels "
                f"up to area {levels[-1]}, step {step}, max_aspect {max_aspect}): use fewer "
                "levels, a larger step or a smaller max_area / max_aspect"
            )


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


def _canonical_levels(
    canonical: Iterable[Sequence[int]], per_level: list[np.ndarray], multiple: int,
    max_area: int, max_aspect: float,
) -> list[np.ndarray]:
    """Extra levels holding the ``canonical`` sizes the generated levels lack (those on the
    ladder's lattice: sides multiples of ``multiple``, area up to ``max_area``, aspect within
    ``max_aspect``), one level per antichain layer of them."""
    have = {tuple(b) for level in per_level for b in level.tolist()}
    missing = sorted({(int(w), int(h)) for w, h in canonical} - have)
    missing = [(w, h) for w, h in missing
               if w % multiple == 0 and h % multiple == 0 and 0 < w * h <= max_area
               and w <= h * max_aspect and h <= w * max_aspect]
    if not missing:
        return []
    arr = np.asarray(missing, dtype=np.int64)
    layer = _antichain_layers(arr)
    return [arr[layer == k] for k in range(int(layer.max()) + 1)]


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


_BAND = 1.32  # area ratio spanned by one band of from_buckets levels (a x1.15 side step)


def _banded_layers(arr: np.ndarray) -> np.ndarray:
    """Level of each bucket: bands of area (from the largest down, each band keeping areas
    above its largest / ``_BAND``), each band split into its antichain layers."""
    areas = arr[:, 0] * arr[:, 1]
    order = np.argsort(-areas, kind="stable")
    band = np.empty(len(arr), dtype=np.int64)
    k, top = 0, None
    for i in order.tolist():
        if top is not None and areas[i] * _BAND <= top:
            k, top = k + 1, None
        if top is None:
            top = areas[i]
        band[i] = k
    level = np.empty(len(arr), dtype=np.int64)
    offset = 0
    for k in range(int(band.max()), -1, -1):  # the smallest band first
        rows = np.flatnonzero(band == k)
        layer = _antichain_layers(arr[rows])
        level[rows] = offset + layer
        offset += int(layer.max()) + 1
    return level


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


FIT_MODES = ("data", "preset", "native")


def fitted_ladder(
    base: BucketLadder | str,
    sizes: ImageIndex | np.ndarray | Sequence[Sequence[int]] | None = None,
    *,
    fit: str = "data",
    max_buckets: int | None = None,
) -> BucketLadder:
    """The ladder a data set trains on by default: ``base`` (a preset name or a ladder) fitted
    to these sizes. ``fit="data"``: :meth:`BucketLadder.from_data` with ``max_buckets`` (None:
    as many buckets as the preset uses on this data); ``"native"``: every image its own
    lattice size (batch size 1); ``"preset"``, no ``sizes``, or sizes none of which the lattice
    fits: ``base`` itself (assign then rejects them "too_small"). The settings are checked even
    without sizes."""
    if fit not in FIT_MODES:
        raise ValueError(f"fit must be one of {', '.join(FIT_MODES)}, got {fit!r}")
    if max_buckets is not None and (isinstance(max_buckets, bool)
                                    or not isinstance(max_buckets, (int, np.integer))
                                    or max_buckets < 1):
        raise ValueError(f"max_buckets must be an integer >= 1, got {max_buckets!r}")
    if fit != "data" and max_buckets is not None:
        raise ValueError(f"max_buckets is a budget for fit='data', not fit={fit!r}")
    if isinstance(base, str):
        base = BucketLadder.for_model(base)
    if sizes is None or fit == "preset":
        return base
    try:
        if fit == "native":
            return BucketLadder.from_data(sizes, base=base, native=True)
        return BucketLadder.from_data(sizes, max_buckets=max_buckets, base=base)
    except NoImageFits:  # nothing to fit: the preset, which rejects them "too_small"
        return base
