"""Which indices go together: the distributed, lock-step, resumable bucket batch sampler."""

from samplers.batching import BatchingRule
from samplers.bucket_batch_sampler import BucketBatchSampler, bucket_batch_sampler
from samplers.loader_state import load_loader_state
from samplers.sample_index import SampleBatch, SampleIndex

__all__ = [
    "BatchingRule",
    "BucketBatchSampler",
    "SampleBatch",
    "SampleIndex",
    "bucket_batch_sampler",
    "load_loader_state",
]
