"""``BatchingRule``: how many images of a bucket go into one rank's batch.

One constraint object (as lhotse's samplers take one) for the two ways of sizing batches: a
fixed ``batch_size`` for every bucket, or a budget ``max_pixels_per_batch`` that gives each
bucket of shape (w, h) ``floor(P / cost(w * h))`` images, at least 1 and at most
``max_batch_size``. The cost of an image of ``a`` pixels is ``a`` (memory and convolution
cost grow with pixels), or ``a + a**2 / quadratic_pixels`` with ``quadratic_pixels`` set:
attention grows with the square of the token count, and this is lhotse's
``quadratic_duration`` for images: at ``a = quadratic_pixels`` the quadratic term equals the
linear one. The sampler and ``bucket-report`` both ask the rule, so they agree.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_SIZE = 2**62  # any batch size or pixel budget above this would overflow int64 arithmetic


@dataclass(frozen=True)
class BatchingRule:
    """Per-rank batch size of each bucket: pass ``batch_size``, or ``max_pixels_per_batch``
    (optionally with ``max_batch_size`` and ``quadratic_pixels``)."""

    batch_size: int | None = None
    max_pixels_per_batch: int | None = None
    max_batch_size: int | None = None
    quadratic_pixels: int | None = None

    def __post_init__(self) -> None:
        if (self.batch_size is None) == (self.max_pixels_per_batch is None):
            raise ValueError("pass exactly one of batch_size or max_pixels_per_batch")
        if self.batch_size is not None and (
            self.max_batch_size is not None or self.quadratic_pixels is not None
        ):
            raise ValueError(
                "max_batch_size and quadratic_pixels only apply with max_pixels_per_batch"
            )
        for name in ("batch_size", "max_pixels_per_batch", "max_batch_size", "quadratic_pixels"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                    raise TypeError(f"{name} must be an int, got {type(value).__name__}")
                if value < 1:
                    raise ValueError(f"{name} must be >= 1, got {value}")
                if value > MAX_SIZE:
                    raise ValueError(f"{name} must be at most 2**62 (int64 arithmetic), got "
                                     f"{value}")
                object.__setattr__(self, name, int(value))

    @property
    def needs_shapes(self) -> bool:
        """Whether the batch sizes depend on the bucket shapes (a pixel budget)."""
        return self.batch_size is None

    def cost(self, bucket_wh: Any) -> np.ndarray:
        """Cost in pixels of one image of each bucket, (K,) float64 (see the module doc)."""
        wh = np.asarray(bucket_wh, dtype=np.float64).reshape(-1, 2)
        area = wh[:, 0] * wh[:, 1]
        return area if self.quadratic_pixels is None else area + area * area / self.quadratic_pixels

    def batch_sizes(self, bucket_wh: Any) -> np.ndarray:
        """Per-rank batch size of each bucket of ``bucket_wh`` ((K, 2) widths and heights),
        (K,) int64, each >= 1."""
        wh = np.asarray(bucket_wh, dtype=np.int64).reshape(-1, 2)
        if self.batch_size is not None:
            return np.full(len(wh), self.batch_size, dtype=np.int64)
        if self.quadratic_pixels is None:  # exact integer arithmetic for the common case
            sizes = self.max_pixels_per_batch // np.maximum(1, wh[:, 0] * wh[:, 1])
        else:
            sizes = np.floor(self.max_pixels_per_batch / np.maximum(1.0, self.cost(wh)))
        sizes = np.maximum(1, sizes).astype(np.int64)
        if self.max_batch_size is not None:
            sizes = np.minimum(sizes, self.max_batch_size)
        return sizes
