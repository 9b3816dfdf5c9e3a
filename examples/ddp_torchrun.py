"""The smallest correct DDP training loop on bucketed batches, with checkpoint and resume.

CPU and gloo so it runs anywhere; on GPUs use "nccl", move the model to ``cuda:LOCAL_RANK``
and pass that device to ``to_model_input``. Run it, stop it, run it again:

    torchrun --nproc_per_node=2 examples/ddp_torchrun.py --ckpt /tmp/ddp.pt --stop-after 5
    torchrun --nproc_per_node=2 examples/ddp_torchrun.py --ckpt /tmp/ddp.pt   # resumes at step 5
    torchrun --nproc_per_node=3 examples/ddp_torchrun.py --ckpt /tmp/ddp.pt   # ... or on 3 ranks

What makes it correct: the sampler is already rank-aware (world size and rank come from
torch.distributed), so there is no DistributedSampler and no ``shuffle``; every rank gets the
same number of batches, all of one bucket shape per step, so DDP never hangs on a rank that
ran out or waits on a slower shape; and the checkpoint holds the sampler's O(1) state, which
resumes exactly after the last batch trained on, at any world size.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from bucketing import BucketLadder, TextToImageDataset, scan
from bucketing.assign import assign
from bucketing.atomic import atomic_path
from samplers import BucketBatchSampler
from transforms import BucketResizeCrop, collate, to_model_input

DATA = Path(__file__).resolve().parent / "data"


class TinyNet(nn.Module):
    """Predicts an image's mean colour: any input size (one bucket's shape per batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 3, 3, stride=2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--ckpt", type=Path, default=Path("ddp_example.pt"))
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2, help="per rank")
    ap.add_argument("--max-area", type=int, default=256 * 256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--save-every", type=int, default=4, help="steps between checkpoints")
    ap.add_argument("--stop-after", type=int, default=None, help="simulate a crash at this step")
    args = ap.parse_args()

    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, ...
    rank = dist.get_rank()
    index = scan(args.data, workers=1, progress=False)  # ranks scan shards, all get the index
    assignment = assign(index, BucketLadder(max_area=args.max_area, multiple=16))
    dataset = TextToImageDataset(
        index, assignment, image_transform=BucketResizeCrop(crop="random", flip_p=0.5)
    )
    sampler = BucketBatchSampler(assignment, batch_size=args.batch_size, seed=0)
    loader = DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=args.workers
    )

    torch.manual_seed(0)  # the same initial weights on every rank
    model = DDP(TinyNet())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = 0
    if args.ckpt.exists():
        state = torch.load(args.ckpt, weights_only=True)
        model.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])  # another world size is fine: re-planned
        step = state["step"]
        if rank == 0 and sampler.epoch < args.epochs:
            print(f"resumed at step {step}: epoch {sampler.epoch}, {len(sampler)} batches left")

    def save(received: int | None = None) -> None:
        # The sampler state is identical on every rank; rank 0 writes. ``received`` counts the
        # batches trained on in this pass: the DataLoader's workers may have prefetched more.
        state = {"model": model.module.state_dict(), "optimizer": optimizer.state_dict(),
                 "sampler": sampler.state_dict(received=received), "step": step}  # fmt: skip
        if rank == 0:
            with atomic_path(args.ckpt) as tmp:
                torch.save(state, tmp)
        dist.barrier()

    for epoch in range(sampler.epoch, args.epochs):  # the loaded state says where to start
        sampler.set_epoch(epoch)  # a no-op for the resumed epoch: its position is kept
        dataset.set_epoch(epoch)
        for i, batch in enumerate(loader):
            pixels = to_model_input(batch, "cpu", torch.float32)["pixel_values"]
            loss = F.mse_loss(model(pixels), pixels.mean(dim=(2, 3)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if rank == 0:
                h, w = pixels.shape[-2:]
                print(f"epoch {epoch} step {step:3d} bucket {w}x{h} loss {loss.item():.4f}")
            if step % args.save_every == 0 or step == args.stop_after:
                save(received=i + 1)
            if step == args.stop_after:
                dist.destroy_process_group()
                return
    save()  # the last epoch is complete: a rerun finds nothing left to do
    if rank == 0:
        print(f"done: {step} steps")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
