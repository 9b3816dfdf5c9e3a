"""Per-sample random generators that depend only on (seed, epoch, index, stream).

Every random choice in the data pipeline (crop offset, flip, caption pick, ...) draws from
a generator built here, so a sample's augmentation is identical whatever the worker count,
the worker that loads it, or whether training was restarted mid-epoch. Distinct ``stream``
names give independent generators for independent decisions of the same sample.
"""

from __future__ import annotations

import zlib

import numpy as np


def sample_rng(seed: int, epoch: int, index: int, stream: str) -> np.random.Generator:
    """Return a fresh generator seeded purely from ``(seed, epoch, index, crc32(stream))``.

    All four integers must be non-negative (numpy's SeedSequence requirement).
    """
    for name, value in (("seed", seed), ("epoch", epoch), ("index", index)):
        if int(value) < 0:
            raise ValueError(f"sample_rng: {name} must be >= 0, got {value}")
    key = zlib.crc32(stream.encode("utf-8"))
    return np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch), int(index), key]))
    )
