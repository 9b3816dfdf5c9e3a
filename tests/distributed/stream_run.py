"""Streaming in other processes: a restore in a fresh interpreter, and 2 gloo ranks under torchrun.

``make DIR``: writes tar shards of unequal sizes (img2dataset layout: jpg, txt, json with
width/height) to DIR.

``resume DIR WORKERS STATE OUT``: a fresh process builds the dataset, loads the
``StatefulDataLoader`` state saved in STATE (``torch.save``) and writes the rest of the
epoch's batches (:func:`summary`) to OUT as JSON.

``ddp DIR OUT`` (under torchrun): every rank streams its shards through a DataLoader with 2
workers, once freely (ranks yield different numbers of batches: the shards are unequal; no row
on two ranks; every row somewhere) and once through ``in_lockstep`` training a DDP model
(every rank takes the same number of steps and none hangs); rank 0 checks and writes OUT.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bucketing import BucketLadder, StreamingBucketDataset, in_lockstep
from transforms import BucketResizeCrop, CaptionTransform

SHARD_ROWS = (4, 9, 6, 14, 11)  # unequal on purpose
SIZES = ((96, 64), (64, 96), (80, 80), (128, 64), (64, 64), (100, 70), (300, 40))
BATCH_SIZE, SEED = 3, 5


def make(root: Path) -> list[str]:
    """Tar shards under ``root``; returns every row's key."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    keys = []
    for s, rows in enumerate(SHARD_ROWS):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for i in range(rows):
                w, h = SIZES[(i + s) % len(SIZES)]
                pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
                jpg = io.BytesIO()
                Image.fromarray(pixels).save(jpg, "JPEG")
                key = f"{s:02d}{i:04d}"
                keys.append(key)
                captions = f"a photo {key}, red" if i % 2 else f"a photo {key}"
                meta = {"width": w, "height": h, "key": key}
                for ext, data in (("jpg", jpg.getvalue()), ("txt", captions.encode()),
                                  ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return keys


def dataset(root: Path, **kwargs) -> StreamingBucketDataset:
    """The dataset every phase uses: small buckets, random crops and flips, caption shuffle."""
    return StreamingBucketDataset(
        root, batch_size=BATCH_SIZE, ladder=BucketLadder.for_model("flux", max_area=64 * 64),
        image_transform=BucketResizeCrop(crop="random", flip_p=0.5),
        caption_transform=CaptionTransform(shuffle_parts=True), seed=SEED,
        max_buffered_rows=5, **kwargs)


def summary(batch: dict) -> list:
    """What identifies a batch: its rows' keys, captions and a checksum of its pixels."""
    return [list(batch["key"]), list(batch["captions"]), int(batch["pixel_values"].sum()),
            list(batch["pixel_values"].shape)]


def resume(root: Path, workers: int, state_path: Path, out: Path) -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    loader = StatefulDataLoader(dataset(root), batch_size=None, num_workers=workers)
    loader.load_state_dict(torch.load(state_path, weights_only=False))
    out.write_text(json.dumps([summary(b) for b in loader]))


def ddp(root: Path, out: Path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = dataset(root)
    assert (data.rank, data.world_size) == (rank, world)
    loader = DataLoader(data, batch_size=None, num_workers=2)
    free = [summary(b) for b in loader]
    model = DistributedDataParallel(torch.nn.Linear(3, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = []
    for batch in in_lockstep(loader):
        pixels = batch["pixel_values"].float().mean(dim=(2, 3)) / 255
        loss = model(pixels).square().mean()
        optimizer.zero_grad()
        loss.backward()  # all-reduces gradients: a rank that left early would hang the others
        optimizer.step()
        shapes = {tuple(s) for s in batch["target_size"].tolist()}
        assert len(shapes) == 1, shapes
        steps.append(list(batch["pixel_values"].shape))
    gathered = [None] * world
    dist.all_gather_object(gathered, (free, steps))
    if rank == 0:
        counts = [len(f) for f, _ in gathered]
        assert len(set(counts)) > 1, f"the shards should give the ranks unequal streams: {counts}"
        keys = [k for f, _ in gathered for b in f for k in b[0]]
        assert len(keys) == len(set(keys)), "a row was served twice"
        locked = [len(s) for _, s in gathered]
        assert len(set(locked)) == 1 and locked[0] == min(counts), (locked, counts)
        out.write_text(json.dumps({"free": counts, "locked": locked, "keys": sorted(keys)}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    phase, args = sys.argv[1], sys.argv[2:]
    if phase == "make":
        make(Path(args[0]))
    elif phase == "resume":
        resume(Path(args[0]), int(args[1]), Path(args[2]), Path(args[3]))
    elif phase == "ddp":
        ddp(Path(args[0]), Path(args[1]))
    else:
        raise SystemExit(f"unknown phase {phase!r}")
