"""Run under torchrun (gloo, CPU): ``accelerator.prepare(loader)`` on the documented loader.

With ``emit="all_ranks"`` accelerate's BatchSamplerShard hands each process exactly the batch
its rank plans, over two epochs driven by ``sampler.set_epoch`` alone: rank 0 checks that
every accepted image is seen once per epoch (duplicates only where a step has fewer images
than ranks), that the ranks are in the same bucket at every step, that ``len(loader)`` is the
rank's plan, and that each item carries the epoch. With the default ``emit="rank"`` the first
batch raises, naming accelerate and ``emit="all_ranks"``. Exits non-zero on a failed check.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch.distributed as dist
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from samplers import BucketBatchSampler

IDS = np.random.default_rng(4).integers(-1, 4, 59)
EPOCHS = 2


class Items(Dataset):
    """Item i says which row, occurrence and epoch the worker received."""

    def __len__(self) -> int:
        return len(IDS)

    def __getitem__(self, i: int) -> dict[str, int]:
        return {"row": int(i), "occurrence": i.occurrence, "epoch": i.epoch}


def main() -> None:
    accelerator = Accelerator(cpu=True)
    world, rank = accelerator.num_processes, accelerator.process_index
    assert world == dist.get_world_size() == 2
    sampler = BucketBatchSampler(IDS, batch_size=3, seed=5, emit="all_ranks")
    loader = DataLoader(Items(), batch_sampler=sampler, num_workers=2)
    loader = accelerator.prepare(loader)
    seen = []
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        plan = BucketBatchSampler(IDS, batch_size=3, seed=5, world_size=world, rank=rank)
        plan.set_epoch(epoch)
        assert len(loader) == len(plan), (len(loader), len(plan))
        batches = [
            list(zip(b["row"].tolist(), b["occurrence"].tolist(), b["epoch"].tolist(), strict=True))
            for b in loader
        ]
        assert [[r for r, _, _ in b] for b in batches] == [list(map(int, b)) for b in plan]
        assert {e for b in batches for _, _, e in b} == {epoch}
        seen.append(batches)
    gathered = [None] * world
    dist.all_gather_object(gathered, seen)
    if rank == 0:
        accepted = set(np.flatnonzero(IDS >= 0).tolist())
        for epoch in range(EPOCHS):
            per_rank = [g[epoch] for g in gathered]
            assert len({len(b) for b in per_rank}) == 1, "ranks ran different numbers of steps"
            for step in zip(*per_rank, strict=True):
                buckets = {int(IDS[r]) for batch in step for r, _, _ in batch}
                assert len(buckets) == 1, f"ranks in different buckets at one step: {buckets}"
            pairs = Counter((r, o) for batches in per_rank for b in batches for r, o, _ in b)
            assert max(pairs.values()) == 1, "a (row, occurrence) pair was seen twice"
            rows = Counter(r for r, _ in pairs)
            assert set(rows) == accepted, "an image was missed or is foreign"
            assert rows.total() - len(accepted) <= len(set(IDS[IDS >= 0].tolist()))

    default = accelerator.prepare(DataLoader(Items(), batch_sampler=BucketBatchSampler(IDS, 3)))
    try:
        next(iter(default))
    except RuntimeError as e:
        assert "accelerate" in str(e) and 'emit="all_ranks"' in str(e), str(e)
    else:
        raise AssertionError("the default emit under accelerate's shard did not raise")
    accelerator.wait_for_everyone()
    if rank == 0:
        print("accelerate prepare: every image once per epoch, lock-step: ok")


if __name__ == "__main__":
    main()
