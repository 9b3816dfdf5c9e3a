"""Benchmark 1: header scan — files/s and wrongly oriented sizes, ours against the peers.

A generated corpus (JPEG and PNG of varied size and aspect, a third of them carrying an
EXIF orientation, camera-sized EXIF blocks; cached under bench/out/) is read by:

- ours: ``bucketing.scan`` on the folder (listing and captions included) with 1 worker
  and with all cores, each with a cold cache file (deleted before every repetition) and
  as a warm rescan (nothing changed: every header comes from the cache);
- a bare ``imagesize.get`` loop over the path list (the speed limit of header parsing,
  orientation ignored);
- a bare ``PIL.Image.open(path).size`` loop (orientation ignored);
- bucketsampler's ``build_metadata_cache`` (``Image.open`` in a thread pool), with 1 and
  all-cores threads.

Every side reads the same files with a warm page cache, after one untimed warm-up run;
the median of ``--reps`` repetitions is reported with its spread, and ratios against ours.

    python bench/scan.py                 # 20,000 files, 5 repetitions
    python bench/scan.py --quick         # 4,000 files, 3 repetitions
    python bench/scan.py --files 50 --reps 1   # smoke test
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine_line, print_table, ratio, timeit  # noqa: E402
from bucketing.atomic import atomic_write_bytes  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
CORPUS_VERSION = 1
TEMPLATES = 240  # distinct encoded images; corpus files are copies under distinct names


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _template(rng: random.Random) -> tuple[bytes, str, tuple[int, int]]:
    """One encoded image: (bytes, extension, oriented size the user sees)."""
    from PIL import Image

    megapixels = rng.choice([0.05, 0.1, 0.3, 0.5, 1.0, 2.0])
    aspect = rng.choice([4 / 3, 3 / 2, 16 / 9, 1.0, 3 / 4, 2 / 3, 9 / 16, 2.5])
    w = max(8, round((megapixels * 1e6 * aspect) ** 0.5))
    h = max(8, round(w / aspect))
    orientation = rng.choice([None, None, 1, 1, 1, 3, 6, 6, 8])
    im = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    exif = Image.Exif()
    if orientation is not None:
        exif[274] = orientation
        exif[0x010F] = "BenchCam"  # Make
        exif[0x9286] = b"\x00" * 6000  # a camera-sized block (maker notes, thumbnail)
    ext = ".png" if rng.random() < 0.25 else ".jpg"
    buf = io.BytesIO()
    if ext == ".png":
        im.save(buf, "PNG", exif=exif.tobytes(), compress_level=1)
    else:
        im.save(buf, "JPEG", exif=exif.tobytes(), quality=80)
    oriented = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    return buf.getvalue(), ext, oriented


def corpus(n: int, root: Path = OUT) -> tuple[Path, dict[str, tuple[int, int]]]:
    """The cached corpus of ``n`` files and the true oriented size of each (by path)."""
    folder = root / f"scan-corpus-{n}-v{CORPUS_VERSION}"
    truth_file = folder / "truth.json"
    if not truth_file.exists():
        shutil.rmtree(folder, ignore_errors=True)
        rng = random.Random(0)
        templates = [_template(rng) for _ in range(min(TEMPLATES, n))]
        truth = {}
        for i in range(n):
            data, ext, size = templates[i % len(templates)]
            sub = folder / f"{i // 1000:03d}"
            sub.mkdir(parents=True, exist_ok=True)
            path = sub / f"{i:06d}{ext}"
            path.write_bytes(data)
            truth[str(path)] = size
        # written last, atomically: its presence marks the corpus complete
        atomic_write_bytes(truth_file, json.dumps(truth).encode())
    truth = {p: tuple(s) for p, s in json.loads(truth_file.read_text()).items()}
    return folder, truth


def wrong(sizes: dict[str, tuple[int, int]], truth: dict[str, tuple[int, int]]) -> int:
    """Files whose reported size differs from what the user sees (missing ones count)."""
    return sum(tuple(sizes.get(p, (0, 0))) != s for p, s in truth.items())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=None, help="corpus size (default 20000)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5)")
    ap.add_argument("--quick", action="store_true", help="4000 files, 3 repetitions")
    ap.add_argument("--out", type=Path, default=OUT, help="where the corpus is cached")
    args = ap.parse_args(argv)
    n = args.files or (4000 if args.quick else 20000)
    reps = args.reps or (3 if args.quick else 5)

    import imagesize
    from bucketsampler import build_metadata_cache
    from PIL import Image

    from bucketing.scan import scan

    folder, truth = corpus(n, args.out)
    paths = sorted(truth)
    all_cores = cores()
    tmp = Path(tempfile.mkdtemp(prefix="bench-scan-"))
    cache = tmp / "scan.parquet"
    print(machine_line())
    print(f"corpus: {n} files in {folder} ({sum(p.endswith('.png') for p in paths)} PNG)")

    def ours(workers: int, warm: bool):
        def run():
            if not warm:
                cache.unlink(missing_ok=True)
            return scan(folder, workers=workers, cache=cache, progress=False)

        return run

    # imagesize >= 2 reads the EXIF orientation of JPEG/TIFF by default; the reference here
    # is header parsing without orientation, as the docstring and the project's speed targets
    # define it.
    major = int(imagesize.__version__.split(".")[0])
    no_rotation = {"exif_rotation": False} if major >= 2 else {}

    def bare_imagesize():
        return {p: imagesize.get(p, **no_rotation) for p in paths}

    def bare_pil():
        out = {}
        for p in paths:
            with Image.open(p) as im:
                out[p] = im.size
        return out

    def peer(threads: int):
        def run():
            rows = build_metadata_cache(paths, num_workers=threads)
            return {r.path: (r.width, r.height) for r in rows}

        return run

    sides = {
        "ours, 1 worker, cold cache": ours(1, False),
        f"ours, {all_cores} workers, cold cache": ours(all_cores, False),
        f"ours, {all_cores} workers, warm rescan": ours(all_cores, True),
        "bare imagesize.get loop": bare_imagesize,
        "bare PIL.Image.open().size loop": bare_pil,
        "bucketsampler build_metadata_cache, 1 thread": peer(1),
        f"bucketsampler build_metadata_cache, {all_cores} threads": peer(all_cores),
    }
    timings, wrong_counts = {}, {}
    for name, fn in sides.items():
        result = fn()  # also the warm-up
        if hasattr(result, "paths"):
            result = dict(zip(result.paths, map(tuple, result.sizes.tolist()), strict=True))
        wrong_counts[name] = wrong(result, truth)
        timings[name] = timeit(fn, reps=reps, warmup=0)
    shutil.rmtree(tmp, ignore_errors=True)

    ours_all = timings[f"ours, {all_cores} workers, cold cache"].median
    rows = [
        {
            "side": name,
            "files/s": round(n / t.median),
            "time": str(t),
            "ours (all cores, cold) vs it": ratio(t.median, ours_all),
            "wrong orientation": wrong_counts[name],
        }
        for name, t in timings.items()
    ]
    print_table(rows, f"header scan, {n} files, median of {reps}")
    cold = timings[f"ours, {all_cores} workers, cold cache"].median
    warm = timings[f"ours, {all_cores} workers, warm rescan"].median
    peer_all = timings[f"bucketsampler build_metadata_cache, {all_cores} threads"].median
    bare = timings["bare imagesize.get loop"].median
    print(
        f"\nwarm rescan vs cold: {ratio(cold, warm)} (target >= 20x); "
        f"ours vs bucketsampler: {ratio(peer_all, cold)} (target >= 2x); "
        f"ours vs bare imagesize: {ratio(bare, cold)} (target >= 0.5x)"
    )
    return {"timings": timings, "wrong": wrong_counts, "files": n}


if __name__ == "__main__":
    main()
