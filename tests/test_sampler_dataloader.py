"""BucketBatchSampler inside real DataLoaders with worker processes, and StatefulDataLoader
checkpoints: a restored stream equals the uninterrupted one, mid-epoch and across epochs; the
occurrence of each index reaches the workers."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from samplers import BucketBatchSampler, SampleIndex, load_loader_state
from samplers.loader_state import find_sampler_state

IDS = np.random.default_rng(0).integers(-1, 5, 120)


class Indices(Dataset):
    """Item i is i: the loader's batches show exactly what the sampler chose."""

    def __len__(self) -> int:
        return len(IDS)

    def __getitem__(self, i: int) -> int:
        return i


def make(num_workers: int, **kw) -> tuple[BucketBatchSampler, StatefulDataLoader]:
    sampler = BucketBatchSampler(IDS, batch_size=3, seed=2, **kw)
    return sampler, StatefulDataLoader(Indices(), batch_sampler=sampler, num_workers=num_workers)


def epoch(sampler: BucketBatchSampler, loader, e: int) -> list[list[int]]:
    sampler.set_epoch(e)
    return [batch.tolist() for batch in loader]


def test_plain_dataloader_with_workers_yields_the_sampler_batches() -> None:
    sampler = BucketBatchSampler(IDS, batch_size=3, world_size=2, rank=1, seed=2)
    loader = DataLoader(Indices(), batch_sampler=sampler, num_workers=2)
    assert len(loader) == len(sampler)
    assert [b.tolist() for b in loader] == list(sampler)


@pytest.mark.parametrize(
    ("num_workers", "k"), [(0, 0), (0, 1), (0, 13), (0, -1), (0, None), (2, 5), (2, None)]
)
def test_stateful_dataloader_restore_mid_epoch_equals_uninterrupted(num_workers, k) -> None:
    sampler, loader = make(num_workers)
    full = epoch(sampler, loader, 1)
    k = len(full) if k is None else k % len(full)

    sampler, loader = make(num_workers)
    sampler.set_epoch(1)
    it = iter(loader)
    head = [next(it).tolist() for _ in range(k)]
    state = loader.state_dict()
    del it, loader

    sampler, loader = make(num_workers)
    loader.load_state_dict(state)
    if k == len(full):  # a checkpoint at the end of the epoch resumes with the next one
        assert epoch(sampler, loader, 2) == epoch(*make(num_workers), 2)
    else:
        tail = epoch(sampler, loader, 1)
        assert head + tail == full
        assert epoch(sampler, loader, 2) == epoch(*make(num_workers), 2)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stateful_dataloader_two_plus_two_epochs_equal_four(num_workers) -> None:
    sampler, loader = make(num_workers, world_size=2, rank=0)
    four = [epoch(sampler, loader, e) for e in range(4)]
    assert four[0] != four[1]

    sampler, loader = make(num_workers, world_size=2, rank=0)
    two = [epoch(sampler, loader, e) for e in range(2)]
    state = loader.state_dict()
    sampler, loader = make(num_workers, world_size=2, rank=0)
    loader.load_state_dict(state)
    two += [epoch(sampler, loader, e) for e in range(2, 4)]
    assert two == four


def test_sampler_state_inside_the_loader_state_counts_what_was_yielded() -> None:
    """With prefetching workers the sampler runs ahead; the loader's snapshot must not."""
    sampler, loader = make(2)
    sampler.set_epoch(0)
    it = iter(loader)
    for _ in range(4):
        next(it)
    state = loader.state_dict()
    with pytest.warns(UserWarning, match="prefetches"):
        assert sampler.state_dict()["consumed"] > 4  # prefetched ahead
    found = find_sampler_state(state)
    assert found["consumed"] == 4 and found["epoch"] == 0
    del it


def test_collated_batches_are_tensors_of_one_bucket() -> None:
    sampler, loader = make(2)
    for batch in loader:
        assert isinstance(batch, torch.Tensor)
        assert len(set(IDS[batch.numpy()].tolist())) == 1


def test_plain_dataloader_with_workers_resumes_from_the_batches_received() -> None:
    sampler = BucketBatchSampler(IDS, batch_size=3, seed=2)
    full = [b.tolist() for b in DataLoader(Indices(), batch_sampler=sampler, num_workers=2)]
    sampler = BucketBatchSampler(IDS, batch_size=3, seed=2)
    it = iter(DataLoader(Indices(), batch_sampler=sampler, num_workers=2))
    head = [next(it).tolist() for _ in range(6)]
    with pytest.warns(UserWarning, match="prefetches"):
        assert sampler.state_dict()["consumed"] > 6  # the workers' prefetch, not what we received
    state = sampler.state_dict(received=6)
    del it
    fresh = BucketBatchSampler(IDS, batch_size=3, seed=2)
    fresh.load_state_dict(state)
    loader = DataLoader(Indices(), batch_sampler=fresh, num_workers=2)
    assert len(loader) == len(full) - 6
    assert head + [b.tolist() for b in loader] == full


def test_received_beyond_what_was_handed_out_is_an_error() -> None:
    sampler = BucketBatchSampler(IDS, batch_size=3)
    with pytest.raises(ValueError, match="no iteration has started"):
        sampler.state_dict(received=1)
    assert sampler.state_dict(received=0)["consumed"] == 0
    it = iter(sampler)
    next(it), next(it)
    with pytest.raises(ValueError, match="handed out 2 batches"):
        sampler.state_dict(received=3)


class Occurrences(Dataset):
    """Item i is (row, occurrence): what a worker process received from the sampler."""

    def __len__(self) -> int:
        return len(IDS)

    def __getitem__(self, i: int) -> tuple[int, int]:
        assert isinstance(i, SampleIndex), type(i)
        return int(i), getattr(i, "occurrence", 0)


def pairs(batches) -> list[list[tuple[int, int]]]:
    return [[(int(i), i.occurrence) for i in b] for b in batches]


@pytest.mark.parametrize("stateful", [False, True])
def test_occurrences_reach_dataloader_workers(stateful) -> None:
    kw = {"batch_size": 3, "seed": 2, "repeats": 3, "world_size": 2, "rank": 1,
          "last_batch": "pad"}  # fmt: skip
    expected = pairs(BucketBatchSampler(IDS, **kw))
    assert {o for b in expected for _, o in b} >= {0, 1, 2}
    loader_class = StatefulDataLoader if stateful else DataLoader
    sampler = BucketBatchSampler(IDS, **kw)
    loader = loader_class(Occurrences(), batch_sampler=sampler, num_workers=2, collate_fn=list)
    assert [list(b) for b in loader] == expected
    if stateful:  # and after a mid-epoch restore, in fresh workers
        sampler = BucketBatchSampler(IDS, **kw)
        loader = StatefulDataLoader(Occurrences(), batch_sampler=sampler, num_workers=2,
                                    collate_fn=list)  # fmt: skip
        it = iter(loader)
        head = [list(next(it)) for _ in range(5)]
        state = loader.state_dict()
        del it
        sampler = BucketBatchSampler(IDS, **kw)
        loader = StatefulDataLoader(Occurrences(), batch_sampler=sampler, num_workers=2,
                                    collate_fn=list)  # fmt: skip
        loader.load_state_dict(state)
        assert head + [list(b) for b in loader] == expected


def test_sample_index_is_an_int_that_keeps_its_occurrence_through_pickle() -> None:
    i = SampleIndex(7, 2)
    j = pickle.loads(pickle.dumps(i))
    assert (j, j.occurrence, type(j)) == (7, 2, SampleIndex)
    assert (
        SampleIndex(7) == 7
        and hash(SampleIndex(7, 1)) == hash(7)
        and SampleIndex(7).occurrence == 0
    )
    assert repr(SampleIndex(7)) == "7" and repr(i) == "SampleIndex(7, occurrence=2)"
    assert list(range(10))[i] == 7 and torch.tensor([i, SampleIndex(3)]).tolist() == [7, 3]


@pytest.mark.slow
def test_stateful_resume_in_a_fresh_process_is_exact(tmp_path) -> None:
    """Mid-epoch and last-batch checkpoints, 0 and 2 workers, restored in a new process in
    the usual ``for epoch in range(saved_epoch, E)`` loop: exactly the uninterrupted batches."""
    script = Path(__file__).parent / "distributed" / "stateful_resume.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for phase in ("save", "resume"):
        proc = subprocess.run([sys.executable, str(script), phase, str(tmp_path)], env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
    assert "exact" in proc.stdout


def test_state_dict_without_received_warns_mid_iteration_but_not_under_stateful_loader():
    sampler = BucketBatchSampler(IDS, batch_size=3, seed=2)
    it = iter(DataLoader(Indices(), batch_sampler=sampler, num_workers=0))
    next(it)
    with pytest.warns(UserWarning, match="prefetches"):
        sampler.state_dict()
    assert sampler.state_dict(received=1)["consumed"] == 1  # no warning with received=
    sampler, loader = make(2)
    it = iter(loader)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        next(it)
        state = loader.state_dict()
    assert find_sampler_state(state)["consumed"] == 1


def test_load_loader_state_updates_epoch_and_length_before_iter() -> None:
    sampler, loader = make(0)
    for e in range(2):
        epoch(sampler, loader, e)
    sampler.set_epoch(2)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    fresh, fresh_loader = make(0)
    load_loader_state(fresh_loader, state)
    assert fresh.epoch == 2 and len(fresh_loader) == len(sampler) - 3
