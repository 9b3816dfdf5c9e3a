"""Per-sample random generators that depend only on (seed, epoch, index, stream, occurrence).

Every random choice in the data pipeline (crop offset, flip, caption pick, ...) draws from
a generator built here, so a sample's augmentation is identical whatever the worker count,
the worker that loads it, or whether training was restarted mid-epoch. Distinct ``stream``
names give independent generators for independent decisions of the same sample, and each
``occurrence`` of a row within an epoch (a repeat, a padding duplicate) its own draws.

The key is honest at any width: integers of any size are mixed in whole, as 32-bit words
with their counts, so no two (seed, epoch, index, occurrence) tuples share a generator
(``seed=2**32`` is not ``seed=0`` of another epoch). Keys below 2**32 with occurrence 0 keep
the four-word entropy of earlier versions, hence the same draws.
"""

from __future__ import annotations

import operator
import zlib

import numpy as np


def sample_rng(
    seed: int, epoch: int, index: int, stream: str, occurrence: int = 0
) -> np.random.Generator:
    """Return a fresh generator seeded purely from
    ``(seed, epoch, index, crc32(stream), occurrence)``.

    The integers must be non-negative; any size is accepted and kept distinct.
    """
    values = []
    for name, value in (
        ("seed", seed), ("epoch", epoch), ("index", index), ("occurrence", occurrence)
    ):
        value = operator.index(value)
        if value < 0:
            raise ValueError(f"sample_rng: {name} must be >= 0, got {value}")
        values.append(value)
    key = zlib.crc32(stream.encode("utf-8"))
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(_entropy(values, key))))


def _entropy(values: list[int], key: int) -> list[int]:
    """An injective word sequence for ``(seed, epoch, index, occurrence)`` and ``key``.

    Small keys without an occurrence: ``[seed, epoch, index, key]`` (four words, as before).
    Otherwise each value's 32-bit words, then ``key``, then the four word counts: at least
    nine words, readable back from the end, so never equal to a four-word key nor to another
    layout's (SeedSequence pads short entropy with zeros, so every layout has >= 4 words).
    """
    seed, epoch, index, occurrence = values
    if occurrence == 0 and max(seed, epoch, index) < 2**32:
        return [seed, epoch, index, key]
    words: list[int] = []
    counts = []
    for value in values:
        shifts = range(0, max(value.bit_length(), 1), 32)
        chunk = [(value >> shift) & 0xFFFFFFFF for shift in shifts]
        words += chunk
        counts.append(len(chunk))
    return [*words, key, *counts]
