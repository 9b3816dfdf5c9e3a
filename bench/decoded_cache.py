"""Benchmark: the per-worker decoded-image cache on a small set with many repeats.

The "most people" case: a few dozen personal photos, 10 repeats an epoch, 2 DataLoader
workers. Without the cache every occurrence decodes its file again; with it each worker
decodes a file once (at the JPEG draft scale, before the fit) and every occurrence still
draws its own crop and flip. Both sides run the same sampler plan and take turns; the
batches of the two sides are compared bit for bit.

Sets:
- ``12mp``: 29 generated photo-like 4032x3024 JPEGs (a phone's 12 MP), cached in bench/out;
- ``bundled``: the photos of examples/data copied to 29 files (they are small: the decode
  is a small part of a sample there).

    python bench/decoded_cache.py                  # both sets, 3 repetitions
    python bench/decoded_cache.py --quick          # the 12 MP set, 2 repetitions
    python bench/decoded_cache.py --quick --sets bundled   # examples/data x 29, 2 repetitions
    python bench/decoded_cache.py --tiny           # smoke test: 6 small photos, 1 repetition
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, print_table  # noqa: E402
from loader import _photo_like  # noqa: E402

from bucketing import BucketLadder, TextToImageDataset, assign, scan  # noqa: E402
from bucketing.atomic import atomic_write_bytes  # noqa: E402
from samplers import BucketBatchSampler  # noqa: E402
from transforms import BucketResizeCrop, collate  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"


def photos_12mp(count: int, size: tuple[int, int]) -> Path:
    """``count`` photo-like JPEGs of ``size`` (w, h) with a caption each, made once."""
    folder = OUT / f"decoded_cache_{size[0]}x{size[1]}_{count}"
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        path = folder / f"photo{k:03d}.jpg"
        if not path.exists():
            w, h = size if k % 3 else size[::-1]  # a third are portraits
            atomic_write_bytes(path, _photo_like(w, h, seed=k))
            (folder / f"photo{k:03d}.txt").write_text(f"photo {k}")
    return folder


def bundled_copies(count: int) -> Path:
    """examples/data's photos copied (with their captions) to ``count`` files."""
    source = REPO / "examples" / "data"
    photos = sorted(p for p in source.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    folder = OUT / f"decoded_cache_bundled_{count}"
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        src = photos[k % len(photos)]
        dst = folder / f"c{k:03d}_{src.name}"
        if not dst.exists():
            shutil.copyfile(src, dst)
    return folder


def run_epoch(dataset: TextToImageDataset, sampler: BucketBatchSampler, workers: int,
              digest: bool) -> tuple[float, str]:
    """One epoch through fresh DataLoader workers: (seconds, digest of every batch)."""
    h = hashlib.sha256()
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                        num_workers=workers)
    t0 = time.perf_counter()
    for batch in loader:
        if digest:
            h.update(batch["pixel_values"].numpy().tobytes())
    return time.perf_counter() - t0, h.hexdigest()


def bench_set(folder: Path, repeats: int, workers: int, reps: int) -> dict:
    """Epoch times with and without the cache on ``folder``, alternating sides."""
    index = scan(str(folder), workers=1)
    assignment = assign(index, BucketLadder.for_model("flux"))
    sampler = BucketBatchSampler(assignment, batch_size=4, seed=0, repeats=repeats)
    transform = BucketResizeCrop(crop="random", flip_p=0.5)
    sides = {"off": TextToImageDataset(index, assignment, image_transform=transform,
                                       decoded_cache_bytes=0),
             "on": TextToImageDataset(index, assignment, image_transform=transform)}
    times: dict[str, list[float]] = {"off": [], "on": []}
    digests: dict[str, set[str]] = {"off": set(), "on": set()}
    for rep in range(reps):
        for name, dataset in sides.items():
            seconds, digest = run_epoch(dataset, sampler, workers, digest=rep == 0)
            times[name].append(seconds)
            if rep == 0:
                digests[name].add(digest)
    off, on = sorted(times["off"])[reps // 2], sorted(times["on"])[reps // 2]
    stats = sides["on"].stats()["decoded_cache"]
    n = sum(len(b) for b in sampler)
    return {"set": folder.name, "files": len(index), "samples/epoch": n,
            "no cache": f"{off:.2f} s", "decoded cache": f"{on:.2f} s",
            "speed-up": f"{off / on:.1f}x", "hit rate": f"{stats['hit_rate']:.0%}",
            "held/worker": f"{stats['bytes'] / max(1, workers) / 2**20:.0f} MiB",
            "same samples": "yes" if digests["off"] == digests["on"] else "NO",
            "_ratio": off / on}


def main(argv: list[str] | None = None) -> int:
    """Measure and print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the 12 MP set, 2 repetitions")
    size.add_argument("--tiny", action="store_true", help="smoke test")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (default: 2)")
    p.add_argument("--repeats", type=int, default=10, help="repeats an epoch (default: 10)")
    p.add_argument("--sets", nargs="+", choices=("12mp", "bundled"),
                   help="which sets (default: 12mp, and bundled without --quick)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(machine_line())
    if args.tiny:
        sets, reps = [photos_12mp(6, (800, 600))], 1
    else:
        names = args.sets or (["12mp"] if args.quick else ["12mp", "bundled"])
        makers = {"12mp": lambda: photos_12mp(29, (4032, 3024)),
                  "bundled": lambda: bundled_copies(29)}
        sets, reps = [makers[name]() for name in names], 2 if args.quick else 3
    rows = [bench_set(folder, args.repeats, args.workers, reps) for folder in sets]
    print_table([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
                f"One epoch, {args.repeats} repeats, {args.workers} workers (fresh workers each "
                f"epoch), batch 4, flux ladder, random crop + flip; median of {reps}")
    first = rows[0]
    ok = first["_ratio"] >= 3 and first["same samples"] == "yes"
    print(f"{first['set']}: {first['_ratio']:.1f}x with identical samples (target >= 3x): "
          f"{'PASS' if ok else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
