"""Run under torchrun (gloo): every rank runs the GPU decode path on its own device (its CUDA
device when there is one, else the CPU) through a DataLoader with a worker.

``CORPUS OUT``: each rank iterates its share of epoch 1, checks every batch against the CPU
path (same crop boxes and flips, pixels > 40 dB), then restarts from the sampler state saved
after its first batch and checks that the resumed batches equal the uninterrupted ones
exactly; rank 0 checks that the ranks together saw every accepted image, and each rank
writes ``OUT/ok_<rank>``. Exits non-zero on any failed check.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from bucketing import BucketLadder, TextToImageDataset, assign, scan
from samplers import BucketBatchSampler
from transforms.collate import collate, to_model_input
from transforms.gpu_decode import EncodedFit, collate_encoded, decode_batch
from transforms.resize_crop import BucketResizeCrop

EPOCH = 1


def batches(dataset: TextToImageDataset, sampler: BucketBatchSampler, device: str) -> list:
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_encoded, num_workers=1)
    return [decode_batch(b, device, torch.float32) for b in loader]


def main(corpus: Path, out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    warnings.simplefilter("ignore", UserWarning)  # the corpus's truncated file is substituted
    index = scan(corpus)
    assignment = assign(index, BucketLadder.for_model("flux"))
    fit = BucketResizeCrop(crop="random", flip_p=0.5)
    gpu = TextToImageDataset(index, assignment, image_transform=EncodedFit(fit), seed=3)
    cpu = TextToImageDataset(index, assignment, image_transform=fit, seed=3)
    for dataset in (gpu, cpu):
        dataset.set_epoch(EPOCH)
    sampler = BucketBatchSampler(assignment, batch_size=2, seed=9)
    sampler.set_epoch(EPOCH)
    whole = batches(gpu, sampler, device)
    seen = []
    for batch in whole:
        rows = batch["original_index"].tolist()
        seen += rows
        reference = to_model_input(collate([cpu[r] for r in rows]), device, torch.float32)
        assert torch.equal(batch["crop_top_left"], reference["crop_top_left"])
        assert torch.equal(batch["flipped"], reference["flipped"])
        assert batch["pixel_values"].device == torch.device(device)
        for a, b in zip(batch["pixel_values"], reference["pixel_values"], strict=True):
            mse = float(((a - b) * 127.5).pow(2).mean())
            assert mse == 0 or 10 * math.log10(255**2 / mse) > 40

    state = sampler.state_dict(received=1)
    resumed_sampler = BucketBatchSampler(assignment, batch_size=2, seed=9)
    resumed_sampler.load_state_dict(state)
    resumed = batches(gpu, resumed_sampler, device)
    assert len(resumed) == len(whole) - 1
    for a, b in zip(resumed, whole[1:], strict=True):
        assert torch.equal(a["original_index"], b["original_index"])
        assert torch.equal(a["pixel_values"], b["pixel_values"])

    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, seen)
    if rank == 0:
        union = {r for part in everyone for r in part}
        assert union == set(range(len(index))), sorted(union)
    (out / f"ok_{rank}").write_text("ok")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
