"""For a GPU machine: the GPU decode path against the CPU path, at 8 and 16 DataLoader workers.

Same files (generated photo-like ~2 MP JPEGs), same buckets (flux ladder), same batches
(BucketBatchSampler), and every side ends with the model input on the device — bfloat16 in
[-1, 1] — so the rates compare whole pipelines:

- CPU path: ``TextToImageDataset`` + ``BucketResizeCrop()`` (the default filter) +
  ``collate`` in the workers, ``to_model_input`` (pinned, non-blocking copy) in the main
  process;
- GPU path: ``EncodedFit`` + ``collate_encoded`` in the workers (bytes and fit params),
  ``decode_batch`` on the device in the main process;
- CPU decode-only: ``torchvision.io.decode_jpeg`` in the workers, nothing else;
- device decode-only: the workers read bytes, the main process decodes the batch on the
  device with ``decode_jpeg(list, device=...)``, no fit.

Targets: the GPU path >= 2x the CPU path at 16 workers, and above the 16-worker CPU
decode-only rate.

    python bench/gpu_loader.py                        # cuda, 8 and 16 workers, 384 JPEGs
    python bench/gpu_loader.py --device cpu --tiny    # smoke test without a GPU
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, print_table, ratio  # noqa: E402
from loader import (  # noqa: E402
    DecodeOnlySide,
    Side,
    as_list,
    build_index,
    generated_jpegs,
    interleaved_rates,  # noqa: E402
)

from bucketing.assign import assign  # noqa: E402
from bucketing.ladder import BucketLadder  # noqa: E402
from bucketing.pipeline.dataset import TextToImageDataset  # noqa: E402
from samplers import BucketBatchSampler  # noqa: E402
from transforms.collate import collate, to_model_input  # noqa: E402
from transforms.gpu_decode import EncodedFit, collate_encoded, decode_batch  # noqa: E402
from transforms.resize_crop import BucketResizeCrop  # noqa: E402


class BytesSide(DecodeOnlySide):
    """The file's bytes as a uint8 tensor: the device decode-only side's worker step."""

    def __getitem__(self, i: int) -> torch.Tensor:
        # not torchvision.io.read_file: its tensors cannot cross to the main process
        return torch.frombuffer(bytearray(Path(self.paths[i]).read_bytes()), dtype=torch.uint8)


def sides(paths: list[Path], device: str) -> tuple[list[Side], Any]:
    """(label, dataset, collate, main-process step) of each side, and the assignment."""
    index = build_index(paths)
    assignment = assign(index, BucketLadder.for_model("flux"))
    str_paths = [str(p) for p in paths]

    def model_input(batch: dict) -> Any:
        return to_model_input(batch, device, torch.bfloat16)

    def on_device(batch: dict) -> Any:
        return decode_batch(batch, device, torch.bfloat16)

    def decode_only(batch: list[torch.Tensor]) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(batch, mode=ImageReadMode.RGB, device=device)

    cpu = TextToImageDataset(index, assignment, image_transform=BucketResizeCrop())
    gpu = TextToImageDataset(index, assignment, image_transform=EncodedFit())
    return [
        ("CPU path (default fit)", cpu, collate, model_input),
        (f"GPU path (decode_batch on {device})", gpu, collate_encoded, on_device),
        ("CPU decode-only", DecodeOnlySide(str_paths), as_list, None),
        (f"device decode-only ({device})", BytesSide(str_paths), as_list, decode_only),
    ], assignment


def main(argv: list[str] | None = None) -> None:
    """Print one table (images/s per side and worker count) and the two targets."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--workers", type=int, nargs="+", default=[8, 16])
    p.add_argument("--count", type=int, default=384, help="number of generated ~2 MP JPEGs")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="smoke test: 6 images, 2 workers")
    args = p.parse_args(argv)
    if args.tiny:
        args.count, args.workers, args.batch_size, args.reps = 6, [2], 2, 1
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run with --device cpu for a smoke test")
    print(machine_line())
    if args.device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name(args.device)}")
    paths = generated_jpegs(args.count)
    all_sides, assignment = sides(paths, args.device)
    batches = [list(b) for b in BucketBatchSampler(assignment, batch_size=args.batch_size)]
    print(f"{len(paths)} files, {len(batches)} batches, batch size {args.batch_size}")
    rows = []
    for workers in args.workers:
        rates = interleaved_rates(all_sides, batches, workers, args.reps, pin=True)
        for (label, *_), (ips, timing) in zip(all_sides, rates, strict=True):
            rows.append({"workers": workers, "side": label, "images/s": ips, "epoch": str(timing)})
    print_table(rows, f"images/s to the model input on {args.device} (median epoch [min-max])")
    top = max(args.workers)
    rate = {r["side"].split(" (")[0]: r["images/s"] for r in rows if r["workers"] == top}
    gpu, cpu, bound = rate["GPU path"], rate["CPU path"], rate["CPU decode-only"]
    print(f"\nat {top} workers:")
    print(f"  GPU path >= 2x CPU path: {ratio(gpu, cpu)} {'PASS' if gpu >= 2 * cpu else 'MISS'}")
    print(f"  GPU path > CPU decode-only: {ratio(gpu, bound)} {'PASS' if gpu > bound else 'MISS'}")
    print(f"  images/s: {np.round([gpu, cpu, bound], 1).tolist()} (GPU, CPU, decode-only)")


if __name__ == "__main__":
    main()
