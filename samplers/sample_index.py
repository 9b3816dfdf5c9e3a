"""``SampleIndex``: a row number that also says which epoch and which occurrence of the row in
that epoch it is; ``SampleBatch``: the list of them the sampler yields, made per batch in O(1)
objects and expanded into ``SampleIndex`` items only as it is read (in a DataLoader worker)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, SupportsIndex


class SampleIndex(int):
    """An ``int`` (a valid row number for any map-style dataset) with an ``epoch`` and an
    ``occurrence``.

    ``epoch`` is the sampler epoch that planned it (``None`` when made by hand: the dataset's
    own epoch then applies), so a dataset keys its random draws by the index alone and follows
    ``sampler.set_epoch`` without being told. ``occurrence`` numbers the occurrences of a row
    within an epoch: 0 for a row that appears once, 0 .. c - 1 for its c repeats, and on from c
    for padding duplicates (the numbers tell occurrences apart; they need not follow the order
    of the steps). A dataset keys each occurrence's draws (crop, flip, caption) by them;
    ``getattr(i, "occurrence", 0)`` and ``getattr(i, "epoch", None)`` also accept plain ints.
    Equality, hashing and arithmetic are the int's; both survive pickling (DataLoader workers).
    """

    occurrence: int = 0  # class defaults: most indices are first occurrences
    epoch: int | None = None

    def __new__(cls, value: int, occurrence: int = 0, epoch: int | None = None) -> SampleIndex:
        self = super().__new__(cls, value)
        if occurrence:
            self.occurrence = int(occurrence)
        if epoch is not None:
            self.epoch = int(epoch)
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (SampleIndex, (int(self), self.occurrence, self.epoch))

    def __repr__(self) -> str:
        extra = f", occurrence={self.occurrence}" if self.occurrence else ""
        extra += f", epoch={self.epoch}" if self.epoch is not None else ""
        return f"SampleIndex({int(self)}{extra})" if extra else int.__repr__(self)


class SampleBatch(list):
    """One batch of the sampler: a ``list`` of row numbers whose items come out as
    :class:`SampleIndex` (with the batch's ``epoch`` and each row's occurrence) when iterated or
    indexed. Comparison, ``len`` and ``numpy``/``torch`` conversion see the plain row numbers.

    Holding plain ints until read keeps the sampler's per-batch cost to one object, and the
    batch pickles to a DataLoader worker as two short lists and an int.
    """

    __slots__ = ("epoch", "occurrences")

    def __init__(self, rows: Any = (), epoch: int = 0, occurrences: list[int] | None = None):
        super().__init__(rows)
        self.epoch = epoch
        self.occurrences = occurrences  # None: every row is a first occurrence

    def __iter__(self) -> Any:
        rows, epoch = list.__iter__(self), self.epoch
        if self.occurrences is None:
            return (SampleIndex(v, 0, epoch) for v in rows)
        return (SampleIndex(v, o, epoch) for v, o in zip(rows, self.occurrences, strict=True))

    def __getitem__(self, i: SupportsIndex | slice) -> Any:
        if isinstance(i, slice):
            return list(self)[i]
        position = range(len(self))[i]
        occurrence = 0 if self.occurrences is None else self.occurrences[position]
        return SampleIndex(list.__getitem__(self, position), occurrence, self.epoch)

    def __reduce__(self) -> tuple[Any, ...]:
        return (SampleBatch, (list.copy(self), self.epoch, self.occurrences))

    def __repr__(self) -> str:
        return f"SampleBatch({list(self)!r})"


@lru_cache(maxsize=8)
def batch_class(epoch: int) -> type[SampleBatch]:
    """A :class:`SampleBatch` subclass for batches of ``epoch`` whose rows are all first
    occurrences: ``batch_class(epoch)(rows)`` is made by ``list``'s own constructor, at C speed
    (the sampler makes one per batch). It pickles as a plain ``SampleBatch``."""
    return type(
        "SampleBatch",
        (SampleBatch,),
        {"__slots__": (), "__init__": list.__init__, "epoch": epoch, "occurrences": None,
         "__module__": __name__},  # fmt: skip
    )
