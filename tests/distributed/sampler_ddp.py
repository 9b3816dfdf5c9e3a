"""Run under torchrun (gloo, CPU): real ranks check the sampler's guarantees end to end.

``epoch OUT``: every rank builds the sampler from torch.distributed, iterates epoch 1 through a
DataLoader with 2 workers, saves the state after ``k`` batches (``state_dict(received=k)``, as
a plain DataLoader's workers prefetch), all-gathers what it saw; rank 0 checks lock-step,
equal lengths and exactly-once (short last batches: duplicates only where a step has fewer
images than ranks), and writes the batches of the first k steps to OUT.

``resume OUT``: at another world size, loads that state, iterates the rest of the epoch,
all-gathers; rank 0 checks that the first k steps of the first run plus this run cover every
accepted index, with duplicates only from padding and every (row, occurrence) pair unique.
Exits non-zero on any failed check.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from samplers import BucketBatchSampler

IDS = np.random.default_rng(0).integers(-1, 6, 500)
BATCH_SIZE, SEED, EPOCH = 3, 7, 1


class Indices(Dataset):
    """Item i is (row, occurrence), as the worker received it."""

    def __len__(self) -> int:
        return len(IDS)

    def __getitem__(self, i: int) -> tuple[int, int]:
        return int(i), i.occurrence


def run_epoch(sampler: BucketBatchSampler, save_after: int | None) -> tuple[list, dict | None]:
    loader = DataLoader(Indices(), batch_sampler=sampler, num_workers=2, collate_fn=list)
    sampler.set_epoch(EPOCH)
    expected = len(sampler)  # batches this pass yields: the rest of the epoch after a resume
    batches, state = [], None
    for step, batch in enumerate(loader):
        batches.append(batch)
        if step + 1 == save_after:
            state = sampler.state_dict(received=step + 1)
    assert len(batches) == expected, (len(batches), expected)
    return batches, state


def check_lock_step(per_rank: list[list[list[int]]]) -> None:
    lengths = {len(b) for b in per_rank}
    assert len(lengths) == 1, f"ranks yielded different numbers of batches: {lengths}"
    for step in zip(*per_rank, strict=True):
        buckets = {int(IDS[i]) for batch in step for i, _ in batch}
        assert len(buckets) == 1, f"ranks in different buckets at one step: {buckets}"


def main(phase: str, out: Path) -> None:
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    sampler = BucketBatchSampler(IDS, batch_size=BATCH_SIZE, seed=SEED)
    assert (sampler.world_size, sampler.rank) == (world, rank)
    accepted = set(np.flatnonzero(IDS >= 0).tolist())
    if phase == "epoch":
        k = len(sampler) // 3
        batches, state = run_epoch(sampler, save_after=k)
        gathered = [None] * world
        dist.all_gather_object(gathered, (batches, state))
        if rank == 0:
            per_rank = [b for b, _ in gathered]
            assert all(s == gathered[0][1] for _, s in gathered), "states differ across ranks"
            check_lock_step(per_rank)
            pairs = Counter(p for batches in per_rank for b in batches for p in b)
            assert max(pairs.values()) == 1, "a (row, occurrence) pair was yielded twice"
            seen = Counter(i for i, _ in pairs)
            assert set(seen) == accepted, "missed or foreign indices"
            buckets = len(set(IDS[IDS >= 0].tolist()))
            padded = sampler.stats()["padded"]
            assert seen.total() - len(accepted) == padded <= buckets * (world - 1)
            head = [p for batches in per_rank for b in batches[:k] for p in b]
            (out / "state.json").write_text(json.dumps(gathered[0][1]))
            (out / "head.json").write_text(json.dumps({"world": world, "indices": head}))
    else:
        sampler.load_state_dict(json.loads((out / "state.json").read_text()))
        batches, _ = run_epoch(sampler, save_after=None)
        gathered = [None] * world
        dist.all_gather_object(gathered, batches)
        if rank == 0:
            check_lock_step(gathered)
            head = json.loads((out / "head.json").read_text())
            assert head["world"] != world, "the resume should change the world size"
            pairs = Counter(map(tuple, head["indices"]))
            pairs.update(p for batches in gathered for b in batches for p in b)
            assert max(pairs.values()) == 1, "a (row, occurrence) pair was yielded twice"
            seen = Counter(i for i, _ in pairs)
            assert set(seen) == accepted, "an accepted index was missed across the resume"
            buckets = len(set(IDS[IDS >= 0].tolist()))
            bound = buckets * (head["world"] + world - 2)  # short: W - 1 per bucket and plan
            assert seen.total() - len(accepted) <= bound, "duplicates beyond padding"
            (out / f"resumed_{world}.ok").write_text("ok")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
