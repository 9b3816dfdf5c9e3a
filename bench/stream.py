"""Streaming against the map-style path on the same files: images/s, and the buffers' memory.

The same JPEGs are written twice: as a folder (what the map-style path scans) and as
img2dataset-style tar shards (jpg + txt + json with width/height). Sides, each through a
``DataLoader`` with the same worker count, the flux ladder and one batch size, taking turns
per repetition so that a change of load on a shared machine falls on all alike:

- map-style, of the folder and of the tar shards (read in place): ``scan`` + ``assign``
  (timed apart, once) then ``TextToImageDataset`` + ``BucketBatchSampler`` + ``collate``;
- streaming, tar shards: ``StreamingBucketDataset`` over the shards (sizes from the json);
- streaming, file rows: ``StreamingBucketDataset`` over a list of the files' paths (sizes
  read from each header as the row arrives).

A second table runs the tar stream in one process at several buffer bounds: peak rows and
MiB held, and how many batches came out short (a bound reached, or the end of the stream).

    python bench/stream.py            # 384 photo-like ~1 MP JPEGs, 2 workers, warm-up + 3 reps
    python bench/stream.py --tiny     # smoke test: 24 small JPEGs, seconds
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, print_table  # noqa: E402

from bucketing import StreamingBucketDataset, TextToImageDataset, assign, scan  # noqa: E402
from bucketing.atomic import atomic_write_bytes  # noqa: E402
from bucketing.ladder import BucketLadder  # noqa: E402
from samplers import BucketBatchSampler  # noqa: E402
from transforms import BucketResizeCrop, collate  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
SIZES = [(1152, 864), (864, 1152), (1280, 720), (720, 1280), (1024, 1024), (1200, 800)]


def photo_like(w: int, h: int, seed: int) -> bytes:
    """A smooth-shapes-plus-grain JPEG (decodes like a photo, unlike noise or flat colour)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    for c in range(3):
        fx, fy, phase = rng.uniform(1, 6, 3).tolist()
        img[..., c] = 128 + 90 * np.sin(x / w * fx * 6.28 + phase) * np.cos(y / h * fy * 6.28)
    img += rng.normal(0, 12, (h, w, 1)).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_inputs(count: int, scale: float, shard_rows: int) -> tuple[Path, list[Path]]:
    """``count`` JPEGs as a folder (with .txt captions) and as tar shards; cached on disk."""
    root = OUT / f"stream_{count}_{scale:g}"
    folder, tars = root / "files", root / "shards"
    folder.mkdir(parents=True, exist_ok=True)
    tars.mkdir(parents=True, exist_ok=True)
    sizes = [(int(w * scale) // 16 * 16 + 7, int(h * scale) // 16 * 16 + 5) for w, h in SIZES]
    for k in range(count):
        w, h = sizes[k % len(sizes)]
        path = folder / f"{k:06d}.jpg"
        if not path.exists():
            atomic_write_bytes(path, photo_like(w, h, seed=k))
            (folder / f"{k:06d}.txt").write_text(f"a photo number {k}")
    shards = []
    for s in range(0, count, shard_rows):
        shard = tars / f"{s // shard_rows:05d}.tar"
        shards.append(shard)
        if shard.exists():
            continue
        partial = shard.with_suffix(".partial")
        with tarfile.open(partial, "w") as tar:
            for k in range(s, min(s + shard_rows, count)):
                data = (folder / f"{k:06d}.jpg").read_bytes()
                with Image.open(io.BytesIO(data)) as img:
                    w, h = img.size
                meta = json.dumps({"width": w, "height": h, "key": f"{k:06d}"}).encode()
                for ext, blob in (("jpg", data), ("txt", f"a photo number {k}".encode()),
                                  ("json", meta)):
                    info = tarfile.TarInfo(f"{k:06d}.{ext}")
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
        partial.rename(shard)
    return folder, shards


def epoch_rate(loader: DataLoader) -> tuple[float, int]:
    """(images/s of one pass over ``loader``, batches)."""
    t0 = time.perf_counter()
    images = batches = 0
    for batch in loader:
        images += len(batch["pixel_values"])
        batches += 1
    return images / (time.perf_counter() - t0), batches


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--scale", type=float, default=1.0, help="image sides x this")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--shard-rows", type=int, default=64)
    parser.add_argument("--tiny", action="store_true", help="24 small images, 1 repetition")
    args = parser.parse_args(argv)
    if args.tiny:
        args.images, args.scale, args.reps, args.shard_rows, args.workers = 24, 0.25, 1, 8, 0
    print(machine_line())
    folder, shards = make_inputs(args.images, args.scale, args.shard_rows)
    ladder = BucketLadder.for_model("flux", max_area=(512 if args.tiny else 1024) ** 2)
    fit = BucketResizeCrop(crop="random", flip_p=0.5)

    scan_s = {}

    def map_style(source: str | list[str], name: str) -> DataLoader:
        t0 = time.perf_counter()
        index = scan(source, workers=0)
        assignment = assign(index, ladder)
        scan_s[name] = time.perf_counter() - t0
        mapped = TextToImageDataset(index, assignment, image_transform=fit)
        sampler = BucketBatchSampler(assignment, batch_size=args.batch_size, seed=0)
        return DataLoader(mapped, batch_sampler=sampler, collate_fn=collate,
                          num_workers=args.workers)

    sides = {
        "map-style (folder)": map_style(str(folder), "folder"),
        "map-style (tar shards)": map_style([str(s) for s in shards], "tar shards"),
        "streaming (tar shards)": DataLoader(
            StreamingBucketDataset([str(s) for s in shards], batch_size=args.batch_size,
                                   ladder=ladder, image_transform=fit),
            batch_size=None, num_workers=args.workers),
        "streaming (file rows)": DataLoader(
            StreamingBucketDataset([{"image": str(p), "caption": "a photo"}
                                    for p in sorted(folder.glob("*.jpg"))],
                                   batch_size=args.batch_size, ladder=ladder, image_transform=fit),
            batch_size=None, num_workers=args.workers),
    }
    rates: dict[str, list[float]] = {name: [] for name in sides}
    counts: dict[str, int] = {}
    if not args.tiny:
        for loader in sides.values():  # warm-up: page cache, imports, first-use costs
            epoch_rate(loader)
    for _ in range(args.reps):
        for name, loader in sides.items():
            rate, batches = epoch_rate(loader)
            rates[name].append(rate)
            counts[name] = batches
    reference = statistics.median(rates["map-style (folder)"])
    print_table([
        {"side": name, "images/s": f"{statistics.median(r):.1f}",
         "range": f"{min(r):.1f}-{max(r):.1f}", "batches": counts[name],
         "vs map-style": f"{statistics.median(r) / reference:.2f}x"}
        for name, r in rates.items()
    ], f"throughput: {args.images} JPEGs, batch {args.batch_size}, {args.workers} workers, "
       f"median of {args.reps} (map-style scan + assign once: "
       + ", ".join(f"{k} {v:.2f} s" for k, v in scan_s.items()) + ")")

    rows = []
    for bound in (None, 2 * args.batch_size, args.batch_size):
        data = StreamingBucketDataset([str(s) for s in shards], batch_size=args.batch_size,
                                      ladder=ladder, image_transform=fit,
                                      max_buffered_rows=bound)
        batches = list(data)
        rows.append({
            "max_buffered_rows": data.max_rows,
            "peak rows": data.peak_buffered_rows,
            "peak MiB": f"{data.peak_buffered_bytes / 2**20:.1f}",
            "batches": len(batches),
            "short batches": sum(len(b["key"]) < args.batch_size for b in batches),
            "buckets used": len({tuple(b["pixel_values"].shape[2:]) for b in batches}),
        })
    print_table(rows, "buffer memory: one stream (num_workers=0), tar shards")


if __name__ == "__main__":
    main()
