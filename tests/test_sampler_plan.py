"""The sampler's pure numpy core: keyed permutations, grouping, the epoch plan, re-planning."""

from __future__ import annotations

from collections import Counter

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from samplers.permutation import permute
from samplers.plan import (
    canonical_ids,
    group_by_bucket,
    make_plan,
    rank_batches,
    remaining_members,
    step_buckets,
    step_indices,
)

KEYS = st.integers(0, 2**64 - 1)


@settings(deadline=None, max_examples=60)
@given(n=st.integers(1, 3000), key=KEYS)
def test_permute_is_a_bijection_of_range_n(n: int, key: int) -> None:
    image = permute(np.arange(n), n, key)
    assert image.dtype == np.int64
    assert np.array_equal(np.sort(image), np.arange(n))


@settings(deadline=None, max_examples=30)
@given(sizes=st.lists(st.integers(1, 400), min_size=1, max_size=6), data=st.data())
def test_permute_with_per_element_domains_equals_separate_calls(sizes, data) -> None:
    keys = [data.draw(KEYS) for _ in sizes]
    x = np.concatenate([np.arange(n) for n in sizes])
    n = np.repeat(sizes, sizes)
    k = np.repeat(np.array(keys, dtype=np.uint64), sizes)
    together = permute(x, n, k)
    apart = np.concatenate(
        [permute(np.arange(s), s, key) for s, key in zip(sizes, keys, strict=True)]
    )
    assert np.array_equal(together, apart)


def test_permute_spreads_a_position_over_the_range_across_keys() -> None:
    """Where position 0 lands, over 3000 keys, is close to uniform on [0, 10)."""
    keys = np.random.default_rng(0).integers(0, 2**63, 3000, dtype=np.uint64)
    counts = Counter(permute(np.zeros(3000, dtype=np.int64), 10, keys).tolist())
    assert sorted(counts) == list(range(10))
    assert all(220 <= c <= 380 for c in counts.values()), counts


def test_permute_is_keyed_and_deterministic() -> None:
    a, b = permute(np.arange(1000), 1000, 1), permute(np.arange(1000), 1000, 2)
    assert not np.array_equal(a, b)
    assert np.array_equal(a, permute(np.arange(1000), 1000, 1))
    # a shuffle, not a shift: neighbours do not stay neighbours
    assert np.mean(np.abs(np.diff(a)) == 1) < 0.05


def test_group_by_bucket_is_stable_and_skips_excluded() -> None:
    ids = np.array([2, -1, 0, 2, 0, -1, 2])
    members, offsets = group_by_bucket(canonical_ids(ids), 4)
    assert members.tolist() == [2, 4, 0, 3, 6]
    assert offsets.tolist() == [0, 2, 2, 5, 5]


def test_canonical_ids_depend_on_values_only() -> None:
    small = canonical_ids(np.array([0, -1, 3]))
    assert small.dtype == np.uint8 and small.tolist() == [1, 0, 4]
    assert canonical_ids(np.array([300, -1])).dtype == np.uint16


def _plan(counts, batch_sizes, world_size, *, drop_last=False, shuffle=True, seed=0):
    offsets = np.concatenate([[0], np.cumsum(counts)])
    members = np.arange(offsets[-1], dtype=np.int32)
    return make_plan(
        members, offsets, np.asarray(batch_sizes), world_size, seed=seed, epoch=0,
        shuffle=shuffle, drop_last=drop_last,
    )  # fmt: skip


@settings(deadline=None, max_examples=40)
@given(
    counts=st.lists(st.integers(0, 60), min_size=1, max_size=5),
    bs=st.integers(1, 4),
    world_size=st.integers(1, 6),
    drop_last=st.booleans(),
)
def test_plan_steps_cover_each_bucket_with_wrap_padding(counts, bs, world_size, drop_last):
    plan = _plan(counts, [bs] * len(counts), world_size, drop_last=drop_last)
    flat, bounds = step_indices(plan, 0, plan.num_steps)
    seen = Counter(flat.tolist())
    for b, n in enumerate(counts):
        mine = {i: c for i, c in seen.items() if plan.offsets[b] <= i < plan.offsets[b + 1]}
        taken = sum(mine.values())
        assert taken == plan.steps[b] * world_size * bs
        if drop_last:
            assert max(mine.values(), default=1) == 1 and n - taken == plan.dropped[b]
            assert plan.dropped[b] < world_size * bs
        else:
            assert len(mine) == n and taken - n == plan.padded[b] < world_size * bs
    # rank slices of each step, concatenated in rank order, are the step
    ranks = [rank_batches(plan, r, 0, plan.num_steps) for r in range(world_size)]
    for t in range(plan.num_steps):
        joined = np.concatenate([f[b[t] : b[t + 1]] for f, b in ranks])
        assert np.array_equal(joined, flat[bounds[t] : bounds[t + 1]])


def test_plan_without_shuffle_is_bucket_major_and_in_order() -> None:
    plan = _plan([3, 2], [2, 2], 1, shuffle=False)
    flat, bounds = step_indices(plan, 0, plan.num_steps)
    assert [flat[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:], strict=True)] == [
        [0, 1], [2, 0], [3, 4],
    ]  # fmt: skip
    assert step_buckets(plan, 0, 3)[0].tolist() == [0, 0, 1]


@settings(deadline=None, max_examples=40)
@given(
    counts=st.lists(st.integers(0, 50), min_size=1, max_size=4),
    world_size=st.integers(1, 5),
    drop_last=st.booleans(),
    data=st.data(),
)
def test_remaining_members_are_exactly_the_unseen(counts, world_size, drop_last, data):
    plan = _plan(counts, [2] * len(counts), world_size, drop_last=drop_last, seed=7)
    k = data.draw(st.integers(0, plan.num_steps))
    flat, _ = step_indices(plan, 0, k)
    members, offsets = remaining_members(plan, k)
    assert sorted(members.tolist()) == sorted(set(range(sum(counts))) - set(flat.tolist()))
    # grouped by the same buckets
    for b in range(len(counts)):
        part = members[offsets[b] : offsets[b + 1]]
        assert ((plan.offsets[b] <= part) & (part < plan.offsets[b + 1])).all()
