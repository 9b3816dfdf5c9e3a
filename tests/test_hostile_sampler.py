"""Sizes the sampler multiplies (batch size x world size, pixel budgets) and bucket ids it
sizes arrays by: refused by name when int64 cannot hold them, never a silent empty epoch."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from samplers import BatchingRule, BucketBatchSampler

IDS = np.array([0, 0, 1, 1, 1, 0, -1, 1])


@pytest.mark.parametrize("batch_size,world_size", [(2**62, 4), (2**43, 2**20), (2**61, 3)])
def test_a_global_step_beyond_int64_is_refused_by_name(batch_size, world_size):
    with pytest.raises(ValueError, match=rf"{batch_size} x {world_size} = .* overflows"):
        BucketBatchSampler(IDS, batch_size=batch_size, world_size=world_size, rank=0)


@pytest.mark.parametrize("name", ["batch_size", "max_pixels_per_batch", "max_batch_size",
                                  "quadratic_pixels"])
def test_sizes_beyond_int64_are_refused_by_name(name):
    kw = {"max_pixels_per_batch": 4096} if name != "batch_size" else {}
    kw[name] = 10**29
    with pytest.raises(ValueError, match=rf"{name} must be at most 2\*\*62 .*got {10**29}"):
        BatchingRule(**kw)


def test_bare_bucket_ids_are_never_sized_by_a_huge_id():
    ids = np.array([0, 10**8, 3, 10**8])
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"bucket id 100000000 at index 1.*densely"):
            BucketBatchSampler(ids, batch_size=2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@settings(max_examples=40, deadline=None, database=None)
@given(batch_size=st.integers(1, 2**62),
       world_size=st.one_of(st.integers(1, 3), st.integers(4, 2**20)))
def test_sweep_every_accepted_size_samples_every_image(batch_size, world_size):
    """Either a clear ValueError, or an epoch in which every accepted index appears."""
    try:
        samplers = [BucketBatchSampler(IDS, batch_size=batch_size, world_size=world_size,
                                       rank=r, last_batch="short")
                    for r in range(min(world_size, 3))]
    except ValueError as error:
        assert "overflows" in str(error)
        return
    if world_size > 3:
        return  # the other ranks' shares are not built here
    seen = sorted(i for s in samplers for batch in s for i in batch)
    assert seen == sorted(np.flatnonzero(IDS >= 0).tolist())
