"""Benchmark: tar shards read in place against the same files extracted to a folder.

A generated corpus (JPEG photos of varied size and aspect with a caption each) is written
twice, untimed: as a folder of ``{key}.jpg`` + ``{key}.txt`` files and as WebDataset shards
(``{key}.jpg`` + ``{key}.txt`` members, ``--per-shard`` keys a shard). Then, each the median
of ``--reps`` runs after one untimed warm-up (warm page cache):

- ``scan``: ``bucketing.scan`` of the folder and of the shards' folder, in this process
  (``workers=0``) and with every core;
- ``load``: ``load_image(index.image_source(i))`` for every row, in this process: a file
  opened by path against a member read by one positioned read from its shard.

The two indexes are checked to hold the same sizes and captions and the same pixels for a
sample of rows, and the shards' folder to hold nothing but the shards afterwards.

    python bench/tar.py                    # 4,000 images in 8 shards, 3 repetitions
    python bench/tar.py --files 200 --reps 1   # smoke test
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import fmt_seconds, machine_line, print_table, timeit  # noqa: E402
from bucketing import scan  # noqa: E402
from transforms.image import load_image  # noqa: E402

TEMPLATES = 64  # distinct encoded images; the corpus repeats them under distinct keys


def templates(seed: int = 0) -> list[bytes]:
    """JPEGs of 0.05-0.5 megapixels and photo aspects (smooth gradients plus noise)."""
    from PIL import Image

    rng = random.Random(seed)
    out = []
    for k in range(TEMPLATES):
        megapixels = rng.choice([0.05, 0.1, 0.2, 0.3, 0.5])
        aspect = rng.choice([4 / 3, 3 / 2, 16 / 9, 1.0, 3 / 4, 2 / 3])
        w = round((megapixels * 1e6 * aspect) ** 0.5)
        h = round(w / aspect)
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 // w, y * 255 // h, (x + y + 16 * k) % 256], axis=-1)
        noise = np.random.default_rng(k).integers(0, 24, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray((base + noise).clip(0, 255).astype(np.uint8)).save(buf, "JPEG",
                                                                          quality=90)  # fmt: skip
        out.append(buf.getvalue())
    return out


def write_corpus(root: Path, files: int, per_shard: int) -> tuple[Path, Path]:
    """(the folder, the shards' folder) under ``root``, holding the same images."""
    folder, shards = root / "extracted", root / "shards"
    folder.mkdir()
    shards.mkdir()
    images = templates()
    for start in range(0, files, per_shard):
        with tarfile.open(shards / f"{start // per_shard:05d}.tar", "w") as tf:
            for i in range(start, min(files, start + per_shard)):
                key = f"{i:08d}"
                data, caption = images[i % TEMPLATES], f"a photo number {i}".encode()
                (folder / f"{key}.jpg").write_bytes(data)
                (folder / f"{key}.txt").write_bytes(caption)
                for name, payload in ((f"{key}.jpg", data), (f"{key}.txt", caption)):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
    return folder, shards


def load_all(index) -> int:
    """Decode every row as the dataset does; the pixels decoded."""
    return sum(load_image(index.image_source(i)).size[0] for i in range(len(index)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=4000)
    p.add_argument("--per-shard", type=int, default=500)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    print(machine_line())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with tempfile.TemporaryDirectory(prefix="bench-tar-") as tmp:
        folder, shards = write_corpus(Path(tmp), args.files, args.per_shard)
        before = sorted(os.listdir(shards))
        a, b = scan(folder, workers=0), scan(shards, workers=0)
        assert a.sizes.tolist() == b.sizes.tolist() and list(a.captions) == list(b.captions)
        for i in range(0, len(a), max(1, len(a) // 20)):
            same = np.array_equal(np.asarray(load_image(a.image_source(i))),
                                  np.asarray(load_image(b.image_source(i))))  # fmt: skip
            assert same, f"row {i} differs"
        rows = []
        for name, source in (("folder (extracted)", folder), ("tar shards, in place", shards)):
            one = timeit(lambda s=source: scan(s, workers=0), args.reps)
            every = timeit(lambda s=source: scan(s, workers=cores), args.reps)
            index = scan(source, workers=0)
            load = timeit(lambda ix=index: load_all(ix), args.reps)
            rows.append({
                "source": name,
                "scan, 1 process": f"{fmt_seconds(one.median)} ({len(index) / one.median:,.0f}/s)",
                f"scan, {cores} workers": f"{fmt_seconds(every.median)} "
                                          f"({len(index) / every.median:,.0f}/s)",
                "load every image": f"{fmt_seconds(load.median)} "
                                    f"({len(index) / load.median:,.0f} img/s)",
            })  # fmt: skip
        assert sorted(os.listdir(shards)) == before, "something was written beside the shards"
    print_table(rows, f"{args.files:,} JPEGs (0.05-0.5 MP) + captions; shards of "
                      f"{args.per_shard} keys; median of {args.reps}")  # fmt: skip


if __name__ == "__main__":
    main()
