"""Streaming: same-shape batches from a source read front to back (HF streaming datasets,
WebDataset / img2dataset tar shards, lists of rows), through bounded per-bucket buffers, with
an exact resume and a lock-step end of epoch across ranks. See docs/streaming.md."""

from bucketing.pipeline.stream.dataset import StreamingBucketDataset, make_shards
from bucketing.pipeline.stream.lockstep import in_lockstep

__all__ = ["StreamingBucketDataset", "in_lockstep", "make_shards"]
