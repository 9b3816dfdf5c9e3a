"""Which indices go together: the distributed, lock-step, resumable bucket batch sampler."""

from samplers.bucket_batch_sampler import BucketBatchSampler

__all__ = ["BucketBatchSampler"]
