"""``SampleIndex``: a row number that also says which occurrence of the row in the epoch it is."""

from __future__ import annotations

from typing import Any


class SampleIndex(int):
    """An ``int`` (a valid row number for any map-style dataset) with an ``occurrence``.

    ``occurrence`` is 0 for a row's first occurrence in the epoch and 1, 2, ... for its
    repeats and padding duplicates, so a dataset can key each occurrence's random draws (crop,
    flip, caption) by it: ``getattr(i, "occurrence", 0)`` also accepts plain ints. Equality,
    hashing and arithmetic are the int's; the occurrence survives pickling (DataLoader workers).
    """

    occurrence: int = 0  # the class default: most indices are first occurrences

    def __new__(cls, value: int, occurrence: int = 0) -> SampleIndex:
        self = super().__new__(cls, value)
        if occurrence:
            self.occurrence = int(occurrence)
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (SampleIndex, (int(self), self.occurrence))

    def __repr__(self) -> str:
        if self.occurrence:
            return f"SampleIndex({int(self)}, occurrence={self.occurrence})"
        return int.__repr__(self)
