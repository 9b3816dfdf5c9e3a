"""``SampleIndex``: a row number that also says which occurrence of the row in the epoch it is."""

from __future__ import annotations

from typing import Any


class SampleIndex(int):
    """An ``int`` (a valid row number for any map-style dataset) with an ``occurrence``.

    ``occurrence`` numbers the occurrences of a row within an epoch: 0 for a row that appears
    once, 0 .. c - 1 for its c repeats, and on from c for padding duplicates (the numbers tell
    occurrences apart; they need not follow the order of the steps). A dataset keys each
    occurrence's random draws (crop, flip, caption) by it; ``getattr(i, "occurrence", 0)``
    also accepts plain ints. Equality, hashing and arithmetic are the int's; the occurrence
    survives pickling (DataLoader workers).
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
