"""Benchmark 4: images/s through a DataLoader producing bucket-shaped batches.

Every side reads the same files, gets the same bucket per image (our assignment on the
flux ladder), is batched by the same BucketBatchSampler plan and runs in the same
DataLoader configuration (``num_workers`` = cores, persistent workers, one warm-up epoch),
and the sides take turns: each repetition runs one epoch of every side, so a change of load
on a shared machine falls on all of them alike:

- ours: ``TextToImageDataset`` + ``BucketResizeCrop`` (EXIF orientation, JPEG draft,
  mode conversion) + ``collate`` -> uint8 [B, 3, H, W]; with the default filter
  (torchvision's antialiased bicubic uint8 kernels), with Pillow's lanczos (the previous
  default) and with bilinear;
- ours, GPU path: ``EncodedFit`` + ``collate_encoded`` in the workers, ``decode_batch`` on
  the CUDA device in the main process (skipped, with a note, without CUDA; see
  bench/gpu_loader.py for the comparison a GPU machine runs);
- bucketsampler: ``PIL.Image.open`` + its ``BucketResize`` (bicubic, center crop, float32
  [0, 1]; no EXIF orientation) + ``torch.stack``;
- typical trainer: ``bench/typical_trainer.load_image_typical`` (kohya-style PIL open ->
  convert -> lanczos resize -> center crop -> float tensor in [-1, 1]; no EXIF orientation);
- decode-only: ``torchvision.io.decode_jpeg`` (``decode_image`` for PNG) of the same files,
  no resize, no batching: the physical bound. Ours is reported as a fraction of it.

A second table gives decode + fit + collate per core (``num_workers=0``, one torch thread).

    python bench/loader.py            # full: 14 bundled photos x 8 and 256 ~2 MP JPEGs
    python bench/loader.py --quick    # make bench: fewer images and repetitions
    python bench/loader.py --tiny     # smoke test: seconds
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Timing, collect_garbage, machine_line, print_table, ratio  # noqa: E402

from bucketing.assign import assign  # noqa: E402
from bucketing.atomic import atomic_write_bytes  # noqa: E402
from bucketing.index import ImageIndex  # noqa: E402
from bucketing.ladder import BucketLadder  # noqa: E402
from bucketing.pipeline.dataset import TextToImageDataset  # noqa: E402
from samplers import BucketBatchSampler  # noqa: E402
from transforms.collate import collate  # noqa: E402
from transforms.gpu_decode import EncodedFit, collate_encoded, decode_batch  # noqa: E402
from transforms.resize_crop import BucketResizeCrop  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
SIZES_2MP = [(1600, 1200), (1200, 1600), (1920, 1080), (1080, 1920), (1440, 1440), (1800, 1200)]


# -- inputs ---------------------------------------------------------------------------------


def generated_jpegs(count: int, folder: Path = OUT / "jpeg_2mp") -> list[Path]:
    """``count`` ~2 MP photo-like JPEGs (smooth shapes plus fine texture), cached on disk."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(count):
        w, h = SIZES_2MP[k % len(SIZES_2MP)]
        path = folder / f"img{k:05d}_{w}x{h}.jpg"
        if not path.exists():
            atomic_write_bytes(path, _photo_like(w, h, seed=k))
        paths.append(path)
    return paths


def _photo_like(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    for c in range(3):
        fx, fy, phase = rng.uniform(1, 6, 2).tolist() + [rng.uniform(0, 6.28)]
        img[..., c] = 128 + 90 * np.sin(x / w * fx * 6.28 + phase) * np.cos(y / h * fy * 6.28)
    img += rng.normal(0, 12, (h, w, 1)).astype(np.float32)  # sensor-like grain
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def bundled_photos(repeat: int) -> list[Path]:
    folder = REPO / "examples" / "data"
    photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    return photos * repeat


def build_index(paths: list[Path]) -> ImageIndex:
    """An index of ``paths`` (repeats allowed) with oriented sizes read from the headers."""
    sizes = []
    for p in paths:
        with Image.open(p) as img:
            w, h = img.size
            swap = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
        sizes.append((h, w) if swap else (w, h))
    return ImageIndex(
        paths=[str(p) for p in paths],
        width=[w for w, _ in sizes],
        height=[h for _, h in sizes],
        captions=[[] for _ in paths],
    )


# -- the sides ------------------------------------------------------------------------------


class BucketsamplerSide(Dataset):
    """bucketsampler's per-item path: ``Image.open`` then ``BucketResize`` to our bucket."""

    def __init__(self, paths: list[str], bucket_wh: np.ndarray) -> None:
        from bucketsampler import Bucket
        from bucketsampler.torch import BucketResize

        self.paths = paths
        self.resizers = {
            (int(w), int(h)): BucketResize(Bucket(int(w), int(h))) for w, h in bucket_wh if w > 0
        }
        self.bucket_wh = bucket_wh

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        w, h = self.bucket_wh[i]
        with Image.open(self.paths[i]) as img:
            return self.resizers[(int(w), int(h))](img)


class TypicalTrainerSide(Dataset):
    """The kohya-style reference of bench/typical_trainer.py, to our bucket."""

    def __init__(self, paths: list[str], bucket_wh: np.ndarray, load: Callable) -> None:
        self.paths, self.bucket_wh, self.load = paths, bucket_wh, load

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        w, h = self.bucket_wh[i]
        return self.load(self.paths[i], (int(w), int(h)))


class DecodeOnlySide(Dataset):
    """``torchvision.io`` decode of the file's bytes, nothing else: the physical bound."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file

        data = read_file(self.paths[i])
        if self.paths[i].lower().endswith((".jpg", ".jpeg")):
            return decode_jpeg(data)
        return decode_image(data, mode=ImageReadMode.RGB)


def stack(samples: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(samples)


def as_list(samples: list[torch.Tensor]) -> list[torch.Tensor]:
    return samples


def typical_trainer_loader() -> Callable | None:
    """``load_image_typical(path, (w, h)) -> float tensor`` from bench/typical_trainer.py."""
    try:
        from typical_trainer import load_image_typical
    except ImportError:
        return None
    return load_image_typical


# -- measuring ------------------------------------------------------------------------------


Side = tuple[str, Dataset, Callable, Any]  # label, dataset, collate, main-process step


def interleaved_rates(
    sides: list[Side], batches: list[list[int]], workers: int, reps: int, pin: bool = False
) -> list[tuple[float, Timing]]:
    """Images/s (median epoch) of each side, measured round-robin: one warm-up epoch each,
    then ``reps`` rounds in which every side runs one epoch, so that a change of load on a
    shared machine falls on every side alike. A side's step runs on each batch in the main
    process (the GPU path's decode); the device is synchronised at the end of each epoch.
    ``pin``: pinned batches, where CUDA is available."""
    epochs = [_epoch(side, batches, workers, pin) for side in sides]
    for epoch in epochs:
        epoch()
    values: list[list[float]] = [[] for _ in sides]
    for _ in range(reps):
        for epoch, times in zip(epochs, values, strict=True):
            collect_garbage()
            t0 = time.perf_counter()
            epoch()
            times.append(time.perf_counter() - t0)
    n = sum(len(b) for b in batches)
    timings = [Timing(statistics.median(v), min(v), max(v), tuple(v)) for v in values]
    return [(n / t.median, t) for t in timings]


def _epoch(side: Side, batches: list[list[int]], workers: int, pin: bool) -> Callable[[], None]:
    _, dataset, collate_fn, step = side
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate_fn,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        pin_memory=pin and torch.cuda.is_available(),
    )

    def epoch() -> None:
        for batch in loader:
            if step is not None:
                step(batch)
        if step is not None and torch.cuda.is_available():
            torch.cuda.synchronize()

    return epoch


def our_sides(index: ImageIndex, assignment: Any) -> list[Side]:
    """(label, dataset, collate, consume) of our CPU filters and, with CUDA, the GPU path."""
    sides: list[Side] = []
    default = BucketResizeCrop().resample
    for resample, label in ((default, f"ours default ({default})"), *OTHER_FILTERS):
        fit = BucketResizeCrop(resample=resample)
        dataset = TextToImageDataset(index, assignment, image_transform=fit)
        sides.append((f"{label} (uint8)", dataset, collate, None))
    if torch.cuda.is_available():
        gpu = TextToImageDataset(index, assignment, image_transform=EncodedFit())
        sides.append(("ours GPU path (bf16 on cuda)", gpu, collate_encoded, decode_on_cuda))
    return sides


OTHER_FILTERS = (("lanczos", "ours lanczos (old default)"), ("bilinear", "ours bilinear"))


def decode_on_cuda(batch: dict[str, Any]) -> dict[str, Any]:
    """The GPU path's main-process step."""
    return decode_batch(batch, "cuda", torch.bfloat16)


def run_corpus(
    name: str, paths: list[Path], args: argparse.Namespace
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """All sides through the DataLoader on one corpus, then ours per core; two table rows."""
    index = build_index(paths)
    assignment = assign(index, BucketLadder.for_model("flux"))
    batches = [list(b) for b in BucketBatchSampler(assignment, batch_size=args.batch_size)]
    used = np.unique(assignment.bucket_id[assignment.accepted])
    print(
        f"{name}: {len(paths)} files, {int(assignment.accepted.sum())} accepted, "
        f"{len(batches)} batches in {len(used)} buckets"
    )
    str_paths = [str(p) for p in paths]
    wh = assignment.bucket_wh
    ours = our_sides(index, assignment)
    sides = [
        ("decode-only (torchvision.io)", DecodeOnlySide(str_paths), as_list, None),
        *ours,
        ("bucketsampler BucketResize (f32)", BucketsamplerSide(str_paths, wh), stack, None),
    ]
    typical = typical_trainer_loader()
    if typical is None:
        print("note: bench/typical_trainer.py not found; typical-trainer side skipped")
    else:
        typical_side = TypicalTrainerSide(str_paths, wh, typical)
        sides.append(("typical trainer (f32)", typical_side, stack, None))
    if not torch.cuda.is_available():
        print("note: no CUDA device: the GPU path is skipped (bench/gpu_loader.py measures it)")

    rows = []
    for (label, *_), (ips, timing) in zip(
        sides, interleaved_rates(sides, batches, args.workers, args.reps), strict=True
    ):
        rows.append({"corpus": name, "side": label, "images/s": ips, "epoch": str(timing)})
    bound, default, lanczos = (rows[k]["images/s"] for k in range(3))
    for row in rows:
        row["of decode-only"] = f"{row['images/s'] / bound:.0%}"
        peer = not row["side"].startswith("ours")
        row["default / it"] = ratio(default, row["images/s"]) if peer else ""
        row["lanczos / it"] = ratio(lanczos, row["images/s"]) if peer else ""

    per_core = []
    mine = [side for side in sides[: 1 + len(ours)] if not side[0].startswith("ours GPU")]
    torch.set_num_threads(1)
    try:
        for (label, *_), (ips, timing) in zip(
            mine, interleaved_rates(mine, batches, 0, args.reps), strict=True
        ):
            per_core.append(
                {"corpus": name, "side": label, "images/s per core": ips, "epoch": str(timing)}
            )
    finally:
        torch.set_num_threads(args.threads)
    return rows, per_core


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer images and repetitions")
    p.add_argument("--tiny", action="store_true", help="smoke test at a tiny size")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--count", type=int, default=None, help="number of generated ~2 MP JPEGs")
    args = p.parse_args(argv)
    repeat, count, reps = (1, 4, 1) if args.tiny else (4, 64, 3) if args.quick else (8, 256, 5)
    args.count = args.count or count
    args.reps = args.reps or reps
    if args.tiny:
        args.workers = min(args.workers, 2)
    args.threads = torch.get_num_threads()
    print(machine_line())
    print(f"DataLoader num_workers={args.workers}, batch_size={args.batch_size}, reps={args.reps}")
    photos = bundled_photos(repeat)[: 4 if args.tiny else None]
    rows, per_core = run_corpus("bundled photos", photos, args)
    more_rows, more_per_core = run_corpus("~2 MP JPEGs", generated_jpegs(args.count), args)
    print_table(rows + more_rows, "images/s through the DataLoader (median epoch [min-max])")
    print_table(per_core + more_per_core, "per core (num_workers=0, one torch thread)")


if __name__ == "__main__":
    main()
