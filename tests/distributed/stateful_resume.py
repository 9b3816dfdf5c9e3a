"""Run as two processes: a StatefulDataLoader checkpoint restored in a fresh process.

``save OUT``: for 0 and 2 workers, runs 3 epochs uninterrupted (the usual loop, ``set_epoch``
each epoch) and writes their batches; then, in new loaders, checkpoints the loader in epoch 1
after its middle batch and after its last batch, writing each state with the epoch it was
taken in. ``resume OUT``: for each checkpoint, builds everything afresh, restores it (with
``load_loader_state`` or the loader's own ``load_state_dict``) and runs the usual loop from the
saved epoch; checks that the batches equal the uninterrupted run's after the checkpoint,
nothing more, and that ``sampler.epoch`` and ``len(loader)`` are right before the first
``iter``. Exits non-zero on a failed check.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from samplers import BucketBatchSampler, load_loader_state

IDS = np.random.default_rng(1).integers(-1, 4, 90)
EPOCHS, SAVED_EPOCH = 3, 1


class Items(Dataset):
    """Item i is (row, occurrence, epoch) as the worker received it."""

    def __len__(self) -> int:
        return len(IDS)

    def __getitem__(self, i: int) -> list[int]:
        return [int(i), i.occurrence, i.epoch]


def make(workers: int) -> tuple[BucketBatchSampler, StatefulDataLoader]:
    sampler = BucketBatchSampler(IDS, batch_size=3, seed=8, repeats=1.5)
    loader = StatefulDataLoader(Items(), batch_sampler=sampler, num_workers=workers,
                                collate_fn=list)  # fmt: skip
    return sampler, loader


def run(sampler, loader, first_epoch: int) -> list:
    out = []
    for epoch in range(first_epoch, EPOCHS):  # the usual loop
        sampler.set_epoch(epoch)
        out.append([batch for batch in loader])
    return out


def save(out: Path) -> None:
    for workers in (0, 2):
        full = run(*make(workers), 0)
        (out / f"full_{workers}.json").write_text(json.dumps(full))
        steps = len(full[SAVED_EPOCH])
        for name, k in (("mid", steps // 2), ("last", steps)):
            sampler, loader = make(workers)
            for epoch in range(SAVED_EPOCH):
                sampler.set_epoch(epoch)
                list(loader)
            sampler.set_epoch(SAVED_EPOCH)
            it = iter(loader)
            for _ in range(k):
                next(it)
            torch.save({"loader": loader.state_dict(), "epoch": SAVED_EPOCH, "k": k},
                       out / f"{name}_{workers}.pt")  # fmt: skip
            del it


def resume(out: Path) -> None:
    for workers in (0, 2):
        full = json.loads((out / f"full_{workers}.json").read_text())
        for name in ("mid", "last"):
            for helper in (True, False):
                ckpt = torch.load(out / f"{name}_{workers}.pt", weights_only=False)
                sampler, loader = make(workers)
                if helper:
                    load_loader_state(loader, ckpt["loader"])
                    left = len(full[SAVED_EPOCH]) - ckpt["k"]
                    assert sampler.epoch == ckpt["epoch"], (sampler.epoch, ckpt["epoch"])
                    assert len(loader) == left, (name, workers, len(loader), left)
                else:
                    loader.load_state_dict(ckpt["loader"])
                got = json.loads(json.dumps(run(sampler, loader, ckpt["epoch"])))
                want = [full[SAVED_EPOCH][ckpt["k"]:], *full[SAVED_EPOCH + 1:]]
                assert got == want, f"{name} checkpoint, {workers} workers, helper={helper}"
    print("stateful resume in a fresh process: exact")


if __name__ == "__main__":
    {"save": save, "resume": resume}[sys.argv[1]](Path(sys.argv[2]))
