"""Bounded per-bucket buffers: finished samples wait here until their bucket holds a batch.

Which bucket goes next is a pure function of what the buffers hold, so a restore that puts
the same samples back makes the same decisions:

1. a bucket holding ``batch_size`` samples emits them (the lowest bucket id first);
2. otherwise, while the buffers hold more than ``max_rows`` samples or more than
   ``max_bytes`` bytes (the tensors' ``nbytes``), the fullest bucket (most samples; ties:
   most bytes, then lowest id) emits what it holds as a short batch.

So between two emissions the buffers hold at most ``max_rows`` samples and ``max_bytes``
bytes, plus the one sample that just arrived; ``drain`` empties them at the end of a stream.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch


def sample_bytes(sample: Mapping[str, Any]) -> int:
    """The bytes of a sample's tensors (pixels, token ids): what it holds in a buffer."""
    return sum(v.nbytes for v in sample.values() if isinstance(v, torch.Tensor))


class BucketBuffers:
    """Per-bucket lists of ``(ref, sample)``; ``ref`` is what a state records of a sample
    (its shard and position), never its pixels."""

    def __init__(self, batch_size: int, max_rows: int | None, max_bytes: int | None) -> None:
        self.batch_size = batch_size
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.buckets: dict[int, list[tuple[Any, dict[str, Any]]]] = {}
        self.bytes_of: dict[int, int] = {}
        self.rows = 0
        self.bytes = 0
        self.peak_rows = 0
        self.peak_bytes = 0

    def add(self, bucket: int, ref: Any, sample: dict[str, Any]) -> None:
        """Put ``sample`` (known to a state as ``ref``) in ``bucket``'s buffer."""
        size = sample_bytes(sample)
        self.buckets.setdefault(bucket, []).append((ref, sample))
        self.bytes_of[bucket] = self.bytes_of.get(bucket, 0) + size
        self.rows += 1
        self.bytes += size
        self.peak_rows = max(self.peak_rows, self.rows)
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def ready(self) -> int | None:
        """The bucket to emit now (rule 1, then rule 2 of the module docstring), or None."""
        full = [b for b, items in self.buckets.items() if len(items) >= self.batch_size]
        if full:
            return min(full)
        over_rows = self.max_rows is not None and self.rows > self.max_rows
        over_bytes = self.max_bytes is not None and self.bytes > self.max_bytes
        if (over_rows or over_bytes) and self.buckets:
            return min(self.buckets,
                       key=lambda b: (-len(self.buckets[b]), -self.bytes_of[b], b))
        return None

    def take(self, bucket: int) -> list[tuple[Any, dict[str, Any]]]:
        """Remove and return up to ``batch_size`` of ``bucket``'s samples, oldest first."""
        items = self.buckets[bucket]
        out, rest = items[: self.batch_size], items[self.batch_size :]
        size = sum(sample_bytes(s) for _, s in out)
        if rest:
            self.buckets[bucket] = rest
            self.bytes_of[bucket] -= size
        else:
            del self.buckets[bucket]
            del self.bytes_of[bucket]
        self.rows -= len(out)
        self.bytes -= size
        return out

    def drain(self) -> Iterator[list[tuple[Any, dict[str, Any]]]]:
        """Every bucket's remaining samples, in batches of at most ``batch_size``, by bucket id."""
        while self.buckets:
            yield self.take(min(self.buckets))

    def refs(self) -> list[list[Any]]:
        """``[bucket, [ref, ...]]`` for every non-empty bucket, by bucket id (for a state)."""
        return [[b, [ref for ref, _ in self.buckets[b]]] for b in sorted(self.buckets)]
