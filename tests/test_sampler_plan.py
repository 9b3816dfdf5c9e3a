"""The sampler's pure numpy core: keyed permutations, grouping, repeats, the epoch plan,
re-planning."""

from __future__ import annotations

from collections import Counter

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from samplers.permutation import permute, uniform
from samplers.plan import (
    _key_state,
    canonical_ids,
    group_by_bucket,
    make_layout,
    make_plan,
    rank_batches,
    remaining_units,
    step_buckets,
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


def _plan(counts, batch_sizes, world_size, *, last_batch="short", shuffle=True, seed=0,
          repeats=None):  # fmt: skip
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    members = np.arange(offsets[-1], dtype=np.int32)
    layout = make_layout(members, offsets, repeats, seed=seed, epoch=0)
    return make_plan(
        layout, np.asarray(batch_sizes), world_size, seed=seed, epoch=0, shuffle=shuffle,
        last_batch=last_batch,
    )  # fmt: skip


def _steps(plan, t0=0, t1=None):
    """out[t][r]: rank r's (row, occurrence) pairs at global step t."""
    t1 = plan.num_steps if t1 is None else t1
    per_rank = []
    for r in range(plan.world_size):
        rows, occ, bounds = rank_batches(plan, r, t0, t1)
        pairs = list(zip(rows.tolist(), occ.tolist(), strict=True))
        per_rank.append([pairs[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    return [list(step) for step in zip(*per_rank, strict=True)]


@settings(deadline=None, max_examples=40)
@given(
    counts=st.lists(st.integers(0, 60), min_size=1, max_size=5),
    bs=st.integers(1, 4),
    world_size=st.integers(1, 6),
    last_batch=st.sampled_from(["short", "pad", "drop"]),
)
def test_plan_steps_cover_each_bucket(counts, bs, world_size, last_batch):
    plan = _plan(counts, [bs] * len(counts), world_size, last_batch=last_batch)
    steps = _steps(plan)
    assert len(steps) == plan.num_steps
    seen = Counter(pair for step in steps for batch in step for pair in batch)
    assert max(seen.values(), default=1) == 1  # (row, occurrence) pairs never repeat
    for b, n in enumerate(counts):
        mine = [(row, o) for row, o in seen if plan.offsets[b] <= row < plan.offsets[b + 1]]
        rows = {row for row, _ in mine}
        assert len(mine) == plan.slots[b] and len(mine) - len(rows) == plan.padded[b]
        assert n - len(rows) == plan.dropped[b]
        if last_batch == "drop":
            assert plan.dropped[b] < world_size * bs and plan.padded[b] == 0
        else:
            assert len(rows) == n and plan.padded[b] < world_size * bs
        if last_batch == "short":
            assert plan.padded[b] <= world_size - 1
    for step in steps:
        sizes = [len(batch) for batch in step]
        assert min(sizes) >= 1
        if last_batch == "short":  # split as evenly as possible
            assert max(sizes) - min(sizes) <= 1
        else:
            assert sizes == [bs] * world_size


def test_plan_without_shuffle_is_bucket_major_and_in_order() -> None:
    plan = _plan([3, 2], [2, 2], 1, shuffle=False, last_batch="pad")
    assert [[r for r, _ in step[0]] for step in _steps(plan)] == [[0, 1], [2, 0], [3, 4]]
    assert step_buckets(plan, 0, 3)[0].tolist() == [0, 0, 1]
    short = _plan([3, 2], [2, 2], 1, shuffle=False)
    assert [[r for r, _ in step[0]] for step in _steps(short)] == [[0, 1], [2], [3, 4]]


def test_short_last_step_pads_only_ranks_without_an_image() -> None:
    plan = _plan([9], [2], 4, shuffle=False)  # steps of 8: then 1 image for 4 ranks
    last = _steps(plan)[-1]
    assert last == [[(8, 0)], [(0, 1)], [(1, 1)], [(2, 1)]]
    assert plan.padded.tolist() == [3] and plan.short.tolist() == [True]
    even = _plan([14], [2], 4, shuffle=False)  # 6 left for 4 ranks: 2, 2, 1, 1
    assert [len(b) for b in _steps(even)[-1]] == [2, 2, 1, 1] and even.padded.tolist() == [0]


@settings(deadline=None, max_examples=40)
@given(
    counts=st.lists(st.integers(0, 50), min_size=1, max_size=4),
    world_size=st.integers(1, 5),
    last_batch=st.sampled_from(["short", "pad", "drop"]),
    repeats=st.sampled_from([None, 2.0, 1.5]),
    data=st.data(),
)
def test_remaining_units_are_exactly_the_unseen(counts, world_size, last_batch, repeats, data):
    rep = None if repeats is None else np.asarray(repeats)
    plan = _plan(counts, [2] * len(counts), world_size, last_batch=last_batch, seed=7,
                 repeats=rep)  # fmt: skip
    k = data.draw(st.integers(0, plan.num_steps))
    seen = {pair for step in _steps(plan, 0, k) for batch in step for pair in batch}
    units, offsets = remaining_units(plan, k)
    rows, occ, _ = plan.layout.lookup(units)
    left = set(zip(rows.tolist(), occ.tolist(), strict=True))
    all_rows, all_occ, all_count = plan.layout.lookup(np.arange(plan.layout.offsets[-1]))
    count = dict(zip(all_rows.tolist(), all_count.tolist(), strict=True))
    everything = set(zip(all_rows.tolist(), all_occ.tolist(), strict=True))
    # a padding duplicate (occurrence >= count) marks the unit it repeats as seen
    seen_units = {(r, o % count[r]) for r, o in seen}
    assert seen_units <= everything and left == everything - seen_units
    row_offsets = np.concatenate([[0], np.cumsum(counts)])
    for b in range(len(counts)):  # grouped by the same buckets
        part = rows[offsets[b] : offsets[b + 1]]
        assert ((row_offsets[b] <= part) & (part < row_offsets[b + 1])).all()


@settings(deadline=None, max_examples=30)
@given(
    repeats=st.lists(st.floats(0, 4, allow_nan=False), min_size=1, max_size=40),
    epoch=st.integers(0, 50),
)
def test_repeats_give_floor_plus_a_deterministic_fractional_draw(repeats, epoch):
    rep = np.asarray(repeats)
    members = np.arange(len(rep), dtype=np.int32)
    offsets = np.array([0, len(rep)])
    layout = make_layout(members, offsets, rep, seed=3, epoch=epoch)
    rows, occ, count = layout.lookup(np.arange(layout.offsets[-1]))
    per_row = np.bincount(rows, minlength=len(rep))
    assert ((np.floor(rep) <= per_row) & (per_row <= np.ceil(rep))).all()
    for row in range(len(rep)):  # occurrences of a row are 0 .. c - 1
        assert sorted(occ[rows == row].tolist()) == list(range(per_row[row]))
    again = make_layout(members, offsets, rep, seed=3, epoch=epoch)
    assert np.array_equal(again.ends, layout.ends)


def test_fractional_repeats_average_out_and_vary_by_epoch() -> None:
    members, offsets = np.arange(2000, dtype=np.int32), np.array([0, 2000])
    totals = [int(make_layout(members, offsets, np.asarray(1.25), seed=0, epoch=e).offsets[-1])
              for e in range(20)]  # fmt: skip
    assert len(set(totals)) > 5 and abs(np.mean(totals) - 2500) < 30
    u = uniform(np.arange(20000), 12345)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01


def test_keys_do_not_collide_across_seed_and_epoch_words() -> None:
    assert not np.array_equal(_key_state(2**32, 0, 0, 4), _key_state(0, 1, 0, 4))
    assert not np.array_equal(_key_state(0, 2**32, 0, 4), _key_state(0, 0, 1, 4))
