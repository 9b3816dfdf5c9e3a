"""BucketBatchSampler: the guarantees of the global plan, resume, elastic resume, errors.

Ranks are simulated in-process by building one sampler per rank (what each real process does);
tests/test_sampler_distributed.py runs the same under torchrun.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tracemalloc
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bucketing import TextToImageDataset, scan
from bucketing.assign import assign
from bucketing.ladder import BucketLadder
from samplers import BatchingRule, BucketBatchSampler, SampleIndex, bucket_batch_sampler
from samplers.plan import PLAN_VERSION
from transforms import BucketResizeCrop


def ranks(ids, world_size, **kw) -> list[BucketBatchSampler]:
    return [BucketBatchSampler(ids, world_size=world_size, rank=r, **kw) for r in range(world_size)]


def run_steps(samplers, steps=None) -> list[list[list[int]]]:
    """Step-major batches: out[t][r] is rank r's batch at step t (checks lock-step lengths)."""
    iters = [iter(s) for s in samplers]
    out = []
    for _ in range(len(samplers[0]) if steps is None else steps):
        out.append([next(it) for it in iters])
    if steps is None:
        for it in iters:
            assert next(it, None) is None, "a rank yields more than len(sampler) batches"
    return out


IDS = st.lists(st.integers(-1, 6), min_size=1, max_size=250).filter(lambda x: max(x) >= 0)
MODES = st.sampled_from(["short", "pad", "drop"])


class Rows:
    """A dataset-like object: per-row bucket ids and bucket shapes (what the sampler reads)."""

    def __init__(self, ids: np.ndarray, shapes: np.ndarray) -> None:
        self.bucket_id = ids
        self.bucket_wh = np.where(ids[:, None] >= 0, shapes[np.maximum(ids, 0)], 0)


def check_epoch(samplers, ids, repeats=None) -> list[list[list[int]]]:
    """Run one epoch on every rank and check the guarantees that hold in every mode."""
    s0 = samplers[0]
    steps = run_steps(samplers)
    stats = s0.stats()
    assert all(len(s) == len(steps) == stats["steps"] for s in samplers)  # same length
    bs = s0.batch_sizes
    pairs = Counter((int(i), i.occurrence) for st_ in steps for b in st_ for i in b)
    assert max(pairs.values(), default=1) == 1  # every (row, occurrence) at most once
    for batches in steps:
        (bucket,) = {int(ids[i]) for b in batches for i in b}  # one bucket per step, all ranks
        sizes = [len(b) for b in batches]
        if s0.last_batch == "short":  # split as evenly as possible, at most the batch size
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1 and max(sizes) <= bs[bucket]
        else:
            assert sizes == [bs[bucket]] * len(samplers)
    assert len(pairs) == stats["samples"] + stats["padded"] - stats["dropped"]
    counts = Counter(int(i) for i, _ in pairs.elements())
    copies = np.zeros(len(ids), dtype=np.int64)
    copies[list(counts)] = list(counts.values())
    accepted = ids >= 0
    assert not copies[~accepted].any()  # -1 never appears
    per_row = np.broadcast_to(1.0 if repeats is None else repeats, ids.shape)
    if np.any(per_row % 1):
        return steps  # fractional draws: floor <= copies <= ceil, checked in the plan tests
    planned = np.where(accepted, per_row, 0).astype(np.int64)
    world = len(samplers)
    for bucket in set(ids[accepted].tolist()):
        mine = ids == bucket
        extra = int(np.maximum(copies[mine] - planned[mine], 0).sum())
        missing = int(np.maximum(planned[mine] - copies[mine], 0).sum())
        step = world * bs[bucket]
        if s0.last_batch == "drop":
            assert extra == 0 and missing < step
        else:
            assert missing == 0
            assert extra < (world if s0.last_batch == "short" else step)
    assert int(np.maximum(copies - planned, 0).sum()) == stats["padded"]
    assert int(np.maximum(planned - copies, 0).sum()) == stats["dropped"]
    return steps


# -- guarantees 1-3 ----------------------------------------------------------------------


@settings(deadline=None, max_examples=60)
@given(
    ids=IDS,
    world_size=st.sampled_from([1, 2, 3, 5, 8, 13, 32, 64]),
    batch_size=st.integers(1, 4),
    last_batch=MODES,
    seed=st.integers(0, 2**32),
)
def test_lock_step_equal_length_and_exactly_once(ids, world_size, batch_size, last_batch, seed):
    ids = np.array(ids)
    samplers = ranks(ids, world_size, batch_size=batch_size, last_batch=last_batch, seed=seed)
    check_epoch(samplers, ids)
    if world_size == 1 and last_batch == "short":
        assert samplers[0].stats()["padded"] == 0


@settings(deadline=None, max_examples=30)
@given(
    ids=IDS,
    shapes=st.lists(st.tuples(st.integers(1, 64), st.integers(1, 64)), min_size=7, max_size=7),
    budget=st.integers(1, 20_000),
    cap=st.none() | st.integers(1, 6),
    world_size=st.integers(1, 64),
    last_batch=MODES,
    repeats=st.none() | st.integers(0, 3) | st.sampled_from([0.5, 1.5]),
)
def test_pixel_budgets_and_repeats_keep_every_guarantee(
    ids, shapes, budget, cap, world_size, last_batch, repeats
):
    ids, shapes = np.array(ids), np.array(shapes) * 16
    if repeats == 0:
        repeats = np.arange(len(ids)) % 3  # per row: 0, 1, 2, ...
    rows = Rows(ids, shapes)
    kw = {"max_pixels_per_batch": budget, "max_batch_size": cap, "last_batch": last_batch,
          "repeats": repeats}  # fmt: skip
    try:
        samplers = ranks(rows, world_size, **kw)
    except ValueError as e:  # per-row repeats of 0 can leave a data set with nothing to sample
        assert "nothing" in str(e)
        return
    rule = BatchingRule(max_pixels_per_batch=budget, max_batch_size=cap)
    used = np.unique(ids[ids >= 0])  # the sampler knows the shapes of buckets with rows only
    assert np.array_equal(samplers[0].batch_sizes[used], rule.batch_sizes(shapes)[used])
    area = shapes[:, 0] * shapes[:, 1]
    expected = np.maximum(1, budget // area)
    assert np.array_equal(rule.batch_sizes(shapes), expected if cap is None
                          else np.minimum(expected, cap))  # fmt: skip
    check_epoch(samplers, ids, repeats)


def test_small_data_sets_on_one_gpu_use_every_photo_once_without_duplicates() -> None:
    for n in (28, 100):
        ids = np.random.default_rng(n).choice(7, size=n, p=[0.3, 0.25, 0.2, 0.1, 0.1, 0.03, 0.02])
        sampler = BucketBatchSampler(ids, batch_size=4, seed=1)
        batches = list(sampler)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(n))  # every photo, once: no duplicate at all
        assert all(isinstance(i, SampleIndex) and i.occurrence == 0 for i in flat)
        assert max(Counter(tuple(b) for b in batches).values()) == 1
        stats = sampler.stats()
        assert (stats["padded"], stats["dropped"], stats["samples"]) == (0, 0, n)
        assert stats["short_steps"] == sum(1 for b in stats["buckets"] if b["count"] % 4)
        for repeats in (2, 3):
            sampler = BucketBatchSampler(ids, batch_size=4, seed=1, repeats=repeats)
            flat = [i for b in sampler for i in b]
            assert len(flat) == n * repeats == sampler.stats()["samples"]
            occurrences = {}
            for i in flat:
                occurrences.setdefault(int(i), []).append(i.occurrence)
            assert all(sorted(o) == list(range(repeats)) for o in occurrences.values())
            assert len(occurrences) == n


def test_fractional_repeats_change_the_epoch_length_and_total_steps_sums_it() -> None:
    ids = np.random.default_rng(0).integers(0, 5, 300)
    repeats = np.where(np.arange(300) < 100, 2.5, 1.0)  # a subject set weighted 2.5x
    sampler = BucketBatchSampler(ids, batch_size=4, world_size=2, rank=1, repeats=repeats)
    lengths = []
    for epoch in range(6):
        sampler.set_epoch(epoch)
        lengths.append(len(sampler))
        assert len(list(sampler)) == lengths[-1]
        samples = sampler.stats()["samples"]
        assert 200 + 200 <= samples <= 200 + 300
    assert len(set(lengths)) > 1
    assert sampler.total_steps(6) == sum(lengths) and sampler.total_steps(0) == 0
    fixed = BucketBatchSampler(ids, batch_size=4, repeats=2)
    assert fixed.total_steps(5) == 5 * len(fixed)


def test_drop_last_is_last_batch_drop_and_contradictions_are_errors() -> None:
    ids = np.random.default_rng(1).integers(0, 3, 50)
    old = BucketBatchSampler(ids, batch_size=4, drop_last=True)
    new = BucketBatchSampler(ids, batch_size=4, last_batch="drop")
    assert old.last_batch == "drop" and old.drop_last and list(old) == list(new)
    assert old.state_dict() == new.state_dict()
    assert BucketBatchSampler(ids, batch_size=4).last_batch == "short"
    with pytest.raises(ValueError, match="contradicts"):
        BucketBatchSampler(ids, batch_size=4, drop_last=True, last_batch="pad")
    with pytest.raises(ValueError, match="last_batch must be one of"):
        BucketBatchSampler(ids, batch_size=4, last_batch="fill")


def test_fewer_indices_than_ranks_still_gives_every_rank_a_batch() -> None:
    steps = run_steps(ranks(np.array([0, 0, 1]), 8, batch_size=2))
    assert len(steps) == 2 and {i for b in steps[0] + steps[1] for i in b} == {0, 1, 2}
    assert run_steps(ranks(np.array([0, 0, 1]), 8, batch_size=2, last_batch="drop")) == []


def test_max_pixels_per_batch_gives_each_bucket_its_own_batch_size() -> None:
    ladder = BucketLadder.from_buckets([(512, 512), (1024, 1024), (1024, 512), (512, 1024)])
    sizes = np.array([[1200, 1200], [600, 600], [1100, 600], [600, 1100]] * 30)
    assignment = assign(sizes, ladder)
    sampler = BucketBatchSampler(
        assignment, max_pixels_per_batch=4 * 1024 * 1024, seed=1, last_batch="pad"
    )
    area = ladder.buckets[:, 0] * ladder.buckets[:, 1]
    assert sampler.batch_sizes.tolist() == (4 * 1024 * 1024 // area).tolist()
    for batch in sampler:
        (bucket,) = set(assignment.bucket_id[batch].tolist())
        assert len(batch) == sampler.batch_sizes[bucket]
    capped = BucketBatchSampler(assignment, max_pixels_per_batch=4 * 1024 * 1024,
                                max_batch_size=8)  # fmt: skip
    assert capped.batch_sizes.max() == 8 and capped.batch_sizes.min() == 4
    tiny = BucketBatchSampler(assignment, max_pixels_per_batch=1)
    assert tiny.batch_sizes.tolist() == [1, 1, 1, 1]
    stats = sampler.stats()
    assert [b["wh"] for b in stats["buckets"]] == ladder.buckets.tolist()
    assert [b["batch_size"] for b in stats["buckets"]] == sampler.batch_sizes.tolist()


def test_assignment_rejections_never_appear() -> None:
    ladder = BucketLadder.from_buckets([(512, 512), (256, 256)])
    sizes = np.array([[600, 600], [100, 100], [700, 520], [20, 900]] * 5)
    assignment = assign(sizes, ladder)
    seen = {i for b in BucketBatchSampler(assignment, batch_size=3) for i in b}
    assert seen == set(np.flatnonzero(assignment.bucket_id >= 0).tolist())
    assert BucketBatchSampler(assignment, batch_size=3).stats()["excluded"] == 10


# -- guarantee 4 -------------------------------------------------------------------------


def test_iterations_repeat_and_epochs_differ() -> None:
    ids = np.random.default_rng(0).integers(-1, 5, 400)
    sampler = BucketBatchSampler(ids, batch_size=4, world_size=2, rank=1, seed=3)
    first, again = list(sampler), list(sampler)
    assert first == again
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(map(sorted, second)) != sorted(map(sorted, first))
    assert list(BucketBatchSampler(ids, batch_size=4, world_size=2, rank=1, seed=4)) != first
    unshuffled = BucketBatchSampler(ids, batch_size=4, shuffle=False)
    unshuffled.set_epoch(5)
    assert list(unshuffled)[0] == np.flatnonzero(ids == 0)[:4].tolist()


_DIGEST = """
import hashlib, sys
import numpy as np
from samplers import BatchingRule, BucketBatchSampler, SampleIndex
ids = np.random.default_rng(0).integers(-1, 7, 5000)
s = BucketBatchSampler(ids, batch_size=3, world_size=4, rank=2, seed=11)
s.set_epoch(2)
print(hashlib.sha256(repr(list(s)).encode()).hexdigest())
"""


def test_same_plan_in_separate_processes_with_different_hash_seeds() -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _DIGEST],
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            stdout=subprocess.PIPE,
            text=True,
        )
        for hash_seed in ("0", "12345")
    ]
    digests = {proc.communicate(timeout=120)[0].strip() for proc in procs}
    assert all(proc.returncode == 0 for proc in procs)
    assert len(digests) == 1 and len(digests.pop()) == 64


# -- guarantee 5: exact resume -----------------------------------------------------------


@settings(deadline=None, max_examples=40)
@given(
    ids=IDS,
    world_size=st.integers(1, 4),
    last_batch=MODES,
    repeats=st.none() | st.sampled_from([2, 1.5]),
    epoch=st.integers(0, 3),
    data=st.data(),
)
def test_resume_after_any_k_yields_exactly_the_rest(
    ids, world_size, last_batch, repeats, epoch, data
):
    kw = {"batch_size": 2, "world_size": world_size, "rank": world_size - 1, "seed": 9,
          "last_batch": last_batch, "repeats": repeats}  # fmt: skip
    ids = np.array(ids)
    sampler = BucketBatchSampler(ids, **kw)
    sampler.set_epoch(epoch)
    full = list(sampler)
    k = data.draw(st.integers(0, len(full)))
    running = BucketBatchSampler(ids, **kw)
    running.set_epoch(epoch)
    it = iter(running)
    assert [next(it) for _ in range(k)] == full[:k]
    state = json.loads(json.dumps(running.state_dict(received=k)))
    fresh = BucketBatchSampler(ids, **kw)
    fresh.load_state_dict(state)
    if k < len(full):
        assert fresh.epoch == epoch and len(fresh) == len(full) - k
        rest = list(fresh)
        assert rest == full[k:]
        occurrences = [[i.occurrence for i in b] for b in rest]
        assert occurrences == [[i.occurrence for i in b] for b in full[k:]]
        assert list(fresh) == full  # the pass after a resumed one is the whole epoch again
    else:  # a finished epoch has nothing left; set_epoch(epoch + 1) starts the next one
        assert fresh.epoch == epoch and len(fresh) == 0
        fresh.set_epoch(epoch)  # the usual loop's set_epoch(saved_epoch) keeps it finished
        assert list(fresh) == [] and list(fresh) == []
        sampler.set_epoch(epoch + 1)  # (with fractional repeats its length may differ)
        fresh.set_epoch(epoch + 1)
        assert len(fresh) == len(sampler) and list(fresh) == list(sampler)


def test_state_is_small_constant_and_survives_json_and_torch_save() -> None:
    sizes = []
    for n in (100, 200_000):
        ids = np.random.default_rng(n).integers(0, 40, n)
        sampler = BucketBatchSampler(ids, batch_size=4, world_size=8, rank=0)
        it = iter(sampler)
        next(it)
        state = sampler.state_dict()
        assert json.loads(json.dumps(state)) == state
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        assert torch.load(buffer, weights_only=True) == state
        sizes.append(len(json.dumps(state)))
        assert state["consumed"] == 1 and state["world_size"] == 8
    assert max(sizes) < 400 and sizes[1] - sizes[0] < 10  # O(1): only the digits of N grow


def test_state_is_the_same_on_every_rank_and_loads_on_any() -> None:
    ids = np.random.default_rng(2).integers(0, 3, 90)
    samplers = ranks(ids, 3, batch_size=2, seed=5)
    iters = [iter(s) for s in samplers]
    for _ in range(4):
        [next(it) for it in iters]
    states = [s.state_dict() for s in samplers]
    assert states[0] == states[1] == states[2]
    rest = [list(it) for it in iters]
    restored = ranks(ids, 3, batch_size=2, seed=5)
    for s in restored:
        s.load_state_dict(states[0])
    assert [list(s) for s in restored] == rest


def test_set_epoch_keeps_a_resume_for_the_same_epoch_and_drops_it_for_another() -> None:
    ids = np.random.default_rng(3).integers(0, 4, 200)
    sampler = BucketBatchSampler(ids, batch_size=4, seed=1)
    sampler.set_epoch(2)
    full = list(sampler)
    it = iter(sampler)
    next(it), next(it)
    state = sampler.state_dict()
    fresh = BucketBatchSampler(ids, batch_size=4, seed=1)
    fresh.load_state_dict(state)
    fresh.set_epoch(2)
    assert list(fresh) == full[2:]
    fresh.load_state_dict(state)
    fresh.set_epoch(3)
    assert len(list(fresh)) == len(full) and fresh.state_dict()["epoch"] == 3


def test_state_dict_before_iterating_and_after_set_epoch() -> None:
    sampler = BucketBatchSampler(np.zeros(10, dtype=int), batch_size=2)
    assert sampler.state_dict()["consumed"] == 0
    list(sampler)
    assert sampler.state_dict()["consumed"] == 5
    sampler.set_epoch(4)
    assert (sampler.state_dict()["epoch"], sampler.state_dict()["consumed"]) == (4, 0)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"seed": 1}, "seed"),
        ({"batch_size": 3}, "batch sizes"),
        ({"last_batch": "pad"}, "last_batch"),
        ({"drop_last": True}, "last_batch"),
        ({"repeats": 2}, "repeats"),
        ({"shuffle": False}, "shuffle"),
        ({"ids": "other"}, "bucket ids"),
        ({"ids": "longer"}, "number of indices"),
    ],
)
def test_loading_a_state_from_another_configuration_names_the_difference(change, named):
    ids = np.random.default_rng(0).integers(0, 4, 100)
    base = {"batch_size": 2, "seed": 0, "shuffle": True}
    state = BucketBatchSampler(ids, **base).state_dict()
    other_ids = {"other": np.roll(ids, 1), "longer": np.append(ids, 0)}.get(change.get("ids"), ids)
    kwargs = {**base, **{k: v for k, v in change.items() if k != "ids"}}
    with pytest.raises(ValueError, match=named) as err:
        BucketBatchSampler(other_ids, **kwargs).load_state_dict(state)
    assert "different configuration" in str(err.value)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ([1, 2], "must be a dict"),
        ({"epoch": 0}, "missing"),
    ],
)
def test_loading_garbage_is_a_clear_error(state, message):
    sampler = BucketBatchSampler(np.zeros(8, dtype=int), batch_size=2)
    with pytest.raises(ValueError, match=message):
        sampler.load_state_dict(state)


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ({"version": 99}, "version 99"),
        ({"history": [[2]]}, "history must be"),
        ({"consumed": -1}, "field consumed must be >= 0"),
        ({"epoch": "1"}, "epoch must be an int"),
    ],
)
def test_loading_a_corrupted_field_is_a_clear_error(field, message):
    sampler = BucketBatchSampler(np.zeros(8, dtype=int), batch_size=2)
    with pytest.raises(ValueError, match=message):
        sampler.load_state_dict({**sampler.state_dict(), **field})


def test_loading_more_consumed_steps_than_the_epoch_has_is_an_error() -> None:
    sampler = BucketBatchSampler(np.zeros(8, dtype=int), batch_size=2)
    state = {**sampler.state_dict(), "consumed": 5}
    with pytest.raises(ValueError, match="only 4"):
        sampler.load_state_dict(state)


# -- guarantee 7: elastic ----------------------------------------------------------------


@settings(deadline=None, max_examples=50)
@given(
    ids=IDS,
    sizes=st.lists(st.sampled_from([1, 2, 3, 5, 8, 13, 64]), min_size=2, max_size=4),
    batch_size=st.integers(1, 3),
    last_batch=MODES,
    repeats=st.none() | st.sampled_from([2, 1.5]),
    data=st.data(),
)
def test_elastic_resume_misses_nothing_and_repeats_only_padding(
    ids, sizes, batch_size, last_batch, repeats, data
):
    """World size changes (possibly several times) inside one epoch."""
    ids = np.array(ids)
    kw = {"batch_size": batch_size, "seed": 4, "last_batch": last_batch, "repeats": repeats}
    seen, state, padding_bound = Counter(), None, 0
    buckets = len(set(ids[ids >= 0].tolist()))
    for i, world_size in enumerate(sizes):
        samplers = ranks(ids, world_size, **kw)
        for s in samplers:
            s.set_epoch(1)
            if state is not None:
                s.load_state_dict(state)
        total = len(samplers[0])
        last = i == len(sizes) - 1
        k = total if last else data.draw(st.integers(0, total))
        steps = run_steps(samplers, k)
        for batches in steps:
            assert len({int(ids[j]) for b in batches for j in b}) == 1
        seen.update((int(j), j.occurrence) for batches in steps for b in batches for j in b)
        state = samplers[0].state_dict()
        per_bucket = world_size - 1 if last_batch == "short" else world_size * batch_size - 1
        padding_bound += buckets * per_bucket
        if k == total:
            break
    assert max(seen.values(), default=1) == 1  # (row, occurrence) pairs unique across re-plans
    rows = Counter(j for j, _ in seen)
    accepted = set(np.flatnonzero(ids >= 0).tolist())
    assert set(rows) <= accepted
    planned = len(accepted) * (1 if repeats is None else int(repeats))
    if last_batch != "drop":
        assert set(rows) == accepted or repeats == 1.5
    if repeats != 1.5:
        extra = rows.total() - planned
        assert extra <= (0 if last_batch == "drop" else padding_bound)


def test_elastic_resume_is_recorded_and_chains() -> None:
    ids = np.random.default_rng(5).integers(0, 3, 300)
    samplers = ranks(ids, 4, batch_size=2)
    run_steps(samplers, 10)
    state = samplers[0].state_dict()
    two = ranks(ids, 2, batch_size=2)
    for s in two:
        s.load_state_dict(state)
    assert len(two[0]) < len(BucketBatchSampler(ids, batch_size=2, world_size=2))
    it = iter(two[0])
    [next(it) for _ in range(3)]
    chained = two[0].state_dict()
    assert chained["history"] == [[4, 10]]
    assert (chained["world_size"], chained["consumed"]) == (2, 3)
    # loading at the same world size continues that re-planned pass exactly
    again = BucketBatchSampler(ids, batch_size=2, world_size=2, rank=0)
    again.load_state_dict(chained)
    assert list(again) == list(it)


def test_elastic_resume_from_zero_is_a_plain_epoch() -> None:
    ids = np.random.default_rng(6).integers(0, 5, 200)
    state = BucketBatchSampler(ids, batch_size=2, world_size=4).state_dict()
    resumed = BucketBatchSampler(ids, batch_size=2, world_size=3, rank=1)
    resumed.load_state_dict(state)
    assert list(resumed) == list(BucketBatchSampler(ids, batch_size=2, world_size=3, rank=1))


# -- construction ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        (
            (np.zeros(4, int), 2),
            {"world_size": 2, "rank": 3},
            ValueError,
            r"rank 3 not in \[0, 2\)",
        ),
        ((np.zeros(4, int), 2), {"world_size": 2, "rank": -1}, ValueError, r"rank -1 not in"),
        ((np.zeros(4, int), 2), {"world_size": 0}, ValueError, "world_size must be >= 1"),
        ((np.zeros(4, int), 0), {}, ValueError, "batch_size must be >= 1"),
        ((np.zeros(4, int), 2.0), {}, TypeError, "batch_size must be an int"),
        ((np.zeros(4, int),), {}, ValueError, "exactly one of batch_size or max_pixels"),
        ((np.zeros(4, int), 2), {"max_pixels_per_batch": 9}, ValueError, "exactly one"),
        ((np.zeros(4, int),), {"max_pixels_per_batch": 9}, ValueError, "needs the bucket shapes"),
        ((np.zeros(4, int), 2), {"max_batch_size": 3}, ValueError, "only apply"),
        ((np.zeros(4, int), 2), {"world_size": 2**21}, ValueError, "world_size must be <="),
        ((np.zeros(4, int), 2), {"seed": 2**64}, ValueError, "seed must be <="),
        ((np.zeros(4, int), 2), {"repeats": -1}, ValueError, r"repeats must be in \[0, 65536\]"),
        ((np.zeros(4, int), 2), {"repeats": float("nan")}, ValueError, "repeats must be in"),
        ((np.zeros(4, int), 2), {"repeats": [1, 2]}, ValueError, "4 numbers"),
        ((np.zeros(4, int), 2), {"repeats": [1, 1, 1e9, 1]}, ValueError, "at row 2"),
        ((np.zeros(4, int), 2), {"repeats": 0}, ValueError, "nothing to sample"),
        ((np.zeros(4, int), 2), {"repeats": ["a"] * 4}, ValueError, "repeats must be a number"),
        ((np.zeros(4, int), 2), {"batching": BatchingRule(2)}, ValueError, "not both"),
        ((np.zeros(4, int),), {"batching": 2}, TypeError, "must be a BatchingRule"),
        ((np.zeros(4, int), 2), {"seed": -1}, ValueError, "seed must be >= 0"),
        ((np.array([], int), 2), {}, ValueError, "empty"),
        ((np.full(3, -1), 2), {}, ValueError, "no accepted indices"),
        ((np.array([0, -2]), 2), {}, ValueError, "index 1 has -2"),
        ((np.zeros((2, 2), int), 2), {}, ValueError, "1-D"),
        ((np.array([0.5, 1.0]), 2), {}, ValueError, "integers"),
    ],
)
def test_construction_errors_say_what_is_wrong(args, kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        BucketBatchSampler(*args, **kwargs)


def test_bucket_id_beyond_the_ladder_is_an_error() -> None:
    ladder = BucketLadder.from_buckets([(512, 512), (256, 256)])
    assignment = assign(np.array([[600, 600], [700, 700]]), ladder)
    assignment.bucket_id[1] = 3
    with pytest.raises(ValueError, match="bucket id 3 at index 1 is out of range"):
        BucketBatchSampler(assignment, batch_size=1)


def test_defaults_without_torch_distributed_are_one_rank() -> None:
    sampler = BucketBatchSampler(np.zeros(4, dtype=int), batch_size=2)
    assert (sampler.world_size, sampler.rank) == (1, 0)
    assert "world_size=1" in repr(sampler)


# -- hostile states: every field bounded before anything is allocated --------------------


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ({"world_size": 2**27}, "world_size must be <= 1048576"),
        ({"world_size": 2**28}, "world_size must be <= 1048576"),
        ({"history": [[2**27, 1]]}, "history world_size must be <="),
        ({"history": [[2, 1]] * 257}, "at most 256 entries"),
        ({"epoch": 2**63}, "epoch must be <="),
        ({"fingerprint": "abc"}, "fingerprint must be a dict, got str"),
        ({"fingerprint": None}, "fingerprint must be a dict, got NoneType"),
        ({"fingerprint": [1, 2]}, "fingerprint must be a dict, got list"),
    ],
)
def test_an_edited_state_is_refused_before_any_allocation(field, message) -> None:
    sampler = BucketBatchSampler(np.random.default_rng(0).integers(0, 3, 1000), batch_size=2)
    state = {**sampler.state_dict(), **field}

    def load() -> None:
        with pytest.raises(ValueError, match=message):
            sampler.load_state_dict(state)

    assert _peak_bytes(load) < 2**20


def test_the_largest_world_size_in_a_history_costs_memory_in_proportion_to_the_data() -> None:
    ids = np.random.default_rng(0).integers(0, 3, 1000)
    for mode in ("short", "pad"):
        state = {**BucketBatchSampler(ids, batch_size=2, last_batch=mode).state_dict(),
                 "world_size": 2**20, "consumed": 1}  # fmt: skip
        resumed = BucketBatchSampler(ids, batch_size=2, world_size=2, rank=1, last_batch=mode)
        assert _peak_bytes(lambda s=resumed, st=state: s.load_state_dict(st)) < 2**20
        assert resumed.state_dict()["history"] == [[2**20, 1]]
        rest = [i for b in resumed for i in b]
        assert 0 < len(rest) < 1000


def test_a_state_of_an_older_planning_algorithm_is_refused_with_a_clear_error() -> None:
    sampler = BucketBatchSampler(np.zeros(8, dtype=int), batch_size=2)
    state = sampler.state_dict()
    assert state["fingerprint"]["plan_version"] == PLAN_VERSION
    old = {**state, "fingerprint": {k: v for k, v in state["fingerprint"].items()
                                    if k != "plan_version"}}  # fmt: skip
    for saved in (old, {**state, "fingerprint": {**state["fingerprint"], "plan_version": 99}}):
        with pytest.raises(ValueError, match="planning algorithm version .* plans with version"):
            sampler.load_state_dict(saved)


# -- the batching rule -------------------------------------------------------------------


def test_the_batching_rule_is_what_the_sampler_uses_and_exposes() -> None:
    ladder = BucketLadder.from_buckets([(512, 512), (1024, 1024), (1024, 512)])
    sizes = np.array([[1200, 1200], [600, 600], [1100, 600]] * 20)
    assignment = assign(sizes, ladder)
    rule = BatchingRule(max_pixels_per_batch=2**22, max_batch_size=12)
    by_rule = BucketBatchSampler(assignment, batching=rule, seed=3)
    by_keywords = BucketBatchSampler(assignment, max_pixels_per_batch=2**22, max_batch_size=12,
                                     seed=3)  # fmt: skip
    assert by_rule.batching == by_keywords.batching == rule
    assert list(by_rule) == list(by_keywords) and by_rule.state_dict() == by_keywords.state_dict()
    assert by_rule.batch_sizes.tolist() == rule.batch_sizes(ladder.buckets).tolist() == [12, 8, 4]
    assert by_rule.stats()["batching"]["max_pixels_per_batch"] == 2**22
    assert BucketBatchSampler(assignment, 3).batching == BatchingRule(batch_size=3)


def test_a_quadratic_cost_shrinks_large_buckets_more_as_attention_does() -> None:
    wh = np.array([[256, 256], [512, 512], [1024, 1024]])
    linear = BatchingRule(max_pixels_per_batch=2**22)
    quadratic = BatchingRule(max_pixels_per_batch=2**22, quadratic_pixels=2**20)
    assert linear.batch_sizes(wh).tolist() == [64, 16, 4]
    area = wh[:, 0] * wh[:, 1]
    expected = np.floor(2**22 / (area + area**2 / 2**20)).astype(int)
    assert quadratic.batch_sizes(wh).tolist() == expected.tolist() == [60, 12, 2]
    assert np.allclose(quadratic.cost(wh), area + area.astype(float) ** 2 / 2**20)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({}, ValueError, "exactly one"),
        ({"batch_size": 2, "max_pixels_per_batch": 4}, ValueError, "exactly one"),
        ({"batch_size": 2, "quadratic_pixels": 4}, ValueError, "only apply"),
        ({"max_pixels_per_batch": 0}, ValueError, "max_pixels_per_batch must be >= 1"),
        ({"max_pixels_per_batch": 9, "quadratic_pixels": 1.5}, TypeError, "must be an int"),
        ({"batch_size": True}, TypeError, "batch_size must be an int"),
    ],
)
def test_batching_rule_errors(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        BatchingRule(**kwargs)


# -- the builder -------------------------------------------------------------------------


def test_builder_takes_a_text_to_image_dataset(examples_dir) -> None:
    index = scan(examples_dir, workers=1, progress=False)
    assignment = assign(index, BucketLadder.from_buckets([(256, 256), (320, 192), (192, 320)]))
    dataset = TextToImageDataset(index, assignment, image_transform=BucketResizeCrop())
    built = bucket_batch_sampler(dataset, 2, seed=4, repeats=2)
    direct = BucketBatchSampler(assignment, 2, seed=4, repeats=2)
    assert list(built) == list(direct) and built.state_dict() == direct.state_dict()
    by_pixels = bucket_batch_sampler(dataset, max_pixels_per_batch=3 * 256 * 256, last_batch="pad")
    used = np.unique(assignment.bucket_id[assignment.bucket_id >= 0])
    expected = BatchingRule(max_pixels_per_batch=3 * 256 * 256).batch_sizes(ladder_wh(assignment))
    assert by_pixels.batch_sizes[used].tolist() == expected[used].tolist()
    quadratic = BatchingRule(max_pixels_per_batch=3 * 256 * 256, quadratic_pixels=256 * 256)
    assert bucket_batch_sampler(dataset, batching=quadratic).batching == quadratic
    state = by_pixels.state_dict()
    BucketBatchSampler(assignment, max_pixels_per_batch=3 * 256 * 256,
                       last_batch="pad").load_state_dict(state)  # fmt: skip
    with pytest.raises(TypeError, match="needs a dataset with an assignment or bucket_id"):
        bucket_batch_sampler([1, 2, 3], 2)


def ladder_wh(assignment) -> np.ndarray:
    return np.asarray(assignment.ladder.buckets).reshape(-1, 2)


def test_rows_of_one_bucket_with_different_shapes_are_an_error() -> None:
    rows = Rows(np.array([0, 0]), np.array([[64, 64]]))
    rows.bucket_wh[1] = [32, 32]
    with pytest.raises(ValueError, match=r"row \d of bucket 0 has bucket_wh"):
        BucketBatchSampler(rows, max_pixels_per_batch=4096)


@settings(deadline=None, max_examples=25)
@given(
    ids=st.lists(st.integers(-1, 4), min_size=1, max_size=80).filter(lambda v: max(v) >= 0),
    world_size=st.integers(1, 4),
    repeats=st.none() | st.sampled_from([2, 1.5]),
    epoch=st.integers(0, 2),
    data=st.data(),
)
def test_all_ranks_yields_every_ranks_batch_of_each_step_in_rank_order(
    ids, world_size, repeats, epoch, data
):
    kw = {"batch_size": 2, "world_size": world_size, "seed": 4, "repeats": repeats}
    ids = np.array(ids)
    per_rank = []
    for r in range(world_size):
        s = BucketBatchSampler(ids, rank=r, **kw)
        s.set_epoch(epoch)
        per_rank.append(list(s))
    every = BucketBatchSampler(ids, rank=0, emit="all_ranks", **kw)
    every.set_epoch(epoch)
    batches = list(every)
    assert len(every) == len(batches) == world_size * len(per_rank[0])
    expected = [b for step in zip(*per_rank, strict=True) for b in step]
    assert batches == expected
    assert [[(i.occurrence, i.epoch) for i in b] for b in batches] == [
        [(i.occurrence, i.epoch) for i in b] for b in expected
    ]
    # the state counts steps: one started by any of its batches
    k = data.draw(st.integers(0, len(batches)))
    it = iter(every)
    for _ in range(k):
        next(it)
    steps = -(-k // world_size)
    assert every.state_dict(received=steps)["consumed"] == steps
    resumed = BucketBatchSampler(ids, rank=0, emit="all_ranks", **kw)
    resumed.load_state_dict(every.state_dict(received=steps))
    assert list(resumed) == expected[steps * world_size:]


def test_sample_batch_is_a_list_of_rows_whose_items_carry_epoch_and_occurrence():
    sampler = BucketBatchSampler(np.zeros(5, dtype=np.int64), batch_size=5, repeats=2, seed=1)
    sampler.set_epoch(3)
    batch = next(iter(sampler))
    assert isinstance(batch, list) and len(batch) == 5
    assert batch == [int(i) for i in batch] and np.asarray(batch).dtype.kind == "i"
    assert all(isinstance(i, SampleIndex) and i.epoch == 3 for i in batch)
    assert [batch[j].occurrence for j in range(5)] == [i.occurrence for i in batch]
    assert batch[-1] == batch[4] and batch[1:3] == list(batch)[1:3]
    again = pickle.loads(pickle.dumps(batch))
    assert again == batch and [(i.epoch, i.occurrence) for i in again] == [
        (i.epoch, i.occurrence) for i in batch
    ]
    assert SampleIndex(7).epoch is None
    assert pickle.loads(pickle.dumps(SampleIndex(7, 2, 5))).epoch == 5
    with pytest.raises(ValueError, match="emit must be one of"):
        BucketBatchSampler(np.zeros(5, dtype=np.int64), batch_size=2, emit="ranks")
