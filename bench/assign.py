"""Benchmark 2: bucket assignment — speed against bucketsampler, quality against the peers.

Speed: the same random (w, h) sizes through ``bucketing.assign`` and bucketsampler's
vectorised ``assign_many_indices`` (a dense N x K log-aspect distance matrix), with the same
bucket lists on both sides where memory allows. Quality, on a realistic photo mixture
(camera ratios 4:3, 3:2, 16:9, 1:1 and their portraits, 0.1-12 MP, a tail of panoramas):
crop loss, resolution loss, upscaled and rejected shares for ours (flux ladder, default
levels), bucketsampler's ``sdxl`` preset and the typical-trainer reference with and without
its no-upscale mode, and the fitted ladder (``from_data``, the default) and kohya-style own-size
buckets (``from_data(native=True)``). The trade of a bucket budget on ``realistic_sizes(20000,
seed=0)`` (resolution loss mean/p95/max, crop, short steps at global batch 32) and the time
``from_data`` takes on the largest timed N. Also what docs/ladders.md quotes: every preset and
``from_data`` on the
same mix, level spacing (resolution loss vs bucket count), the padding per epoch for 30, 300
and 100k images at world sizes 1 and 8, and ``min_bucket_size`` (padding vs losses). Padding
is computed from the bucket counts with the sampler's rule for each ``last_batch`` mode.

    python bench/assign.py            # full: 1M and 10M sizes, 5 repetitions
    python bench/assign.py --quick    # 1M sizes, 3 repetitions
    python bench/assign.py --tiny     # smoke test: 20k sizes, 1 repetition
    python bench/assign.py --quick --sizes 1000000 10000000   # what make bench runs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine_line, print_table, ratio, timeit  # noqa: E402
from bench.typical_trainer import make_bucket_resolutions, select_buckets  # noqa: E402
from bucketing.assign import assign  # noqa: E402
from bucketing.ladder import BucketLadder  # noqa: E402
from bucketing.ladder_trade import ladder_trade  # noqa: E402

# (aspect w/h of the landscape form, share); each non-square ratio is a portrait 35% of the time.
CAMERA_RATIOS = ((4 / 3, 0.34), (3 / 2, 0.26), (16 / 9, 0.16), (1.0, 0.12), (5 / 4, 0.07))
PANORAMA_SHARE = 0.05  # aspects 2:1 .. 6:1
PORTRAIT_SHARE = 0.35


def realistic_sizes(n: int, seed: int = 0) -> np.ndarray:
    """(n, 2) int64 photo sizes: camera aspect ratios (some cropped by +-5%), portraits,
    a panorama tail, and megapixels from 0.1 to 12 (log-uniform over three bands: web
    images 0.1-1 MP 40%, 1-4 MP 35%, camera/phone 4-12 MP 25%)."""
    rng = np.random.default_rng(seed)
    ratios = np.array([r for r, _ in CAMERA_RATIOS])
    shares = np.array([s for _, s in CAMERA_RATIOS])
    shares = shares / shares.sum() * (1 - PANORAMA_SHARE)
    kind = rng.choice(len(ratios) + 1, size=n, p=[*shares, PANORAMA_SHARE])
    aspect = np.where(kind < len(ratios), ratios[np.minimum(kind, len(ratios) - 1)],
                      rng.uniform(2.0, 6.0, n))
    jitter = rng.random(n) < 0.2
    aspect = aspect * np.where(jitter, rng.uniform(0.95, 1.05, n), 1.0)
    portrait = rng.random(n) < PORTRAIT_SHARE
    aspect = np.where(portrait, 1 / aspect, aspect)
    band = rng.choice(3, size=n, p=[0.40, 0.35, 0.25])
    lo = np.array([0.1, 1.0, 4.0])[band]
    hi = np.array([1.0, 4.0, 12.0])[band]
    mp = np.exp(rng.uniform(np.log(lo), np.log(hi)))
    w = np.maximum(1, np.round(np.sqrt(mp * 1e6 * aspect)))
    h = np.maximum(1, np.round(w / aspect))
    return np.stack([w, h], axis=1).astype(np.int64)


def random_sizes(n: int, seed: int = 1) -> np.ndarray:
    """(n, 2) uniform random sizes in [256, 4096]² (timing input)."""
    return np.random.default_rng(seed).integers(256, 4097, size=(n, 2), dtype=np.int64)


def _bucketsampler():
    try:
        import bucketsampler
    except ImportError:
        return None
    return bucketsampler


def _quality(name: str, wh: np.ndarray, sizes: np.ndarray, max_area: int,
             n_buckets: int, common: np.ndarray) -> dict:
    """Loss figures from bucket shapes alone, the same formulas for every side. ``common``:
    the images ours accepts; its crop mean compares every side on the same images (ours
    rejects the smallest ones, which would otherwise weigh on the peers' figures only)."""
    ok = (wh > 0).all(axis=1)
    w, h = sizes[ok, 0].astype(float), sizes[ok, 1].astype(float)
    bw, bh = wh[ok, 0].astype(float), wh[ok, 1].astype(float)
    s = np.maximum(bw / w, bh / h)
    crop = 1 - bw * bh / (s * s * w * h)
    res = np.maximum(0.0, 1 - bw * bh / np.minimum(w * h, max_area))
    return {
        "method": name,
        "buckets used": n_buckets,
        "crop mean": crop.mean(),
        "crop mean, same images": crop[common[ok]].mean(),
        "crop p95": np.percentile(crop, 95),
        "res loss mean": res.mean(),
        "res loss p95": np.percentile(res, 95),
        "upscaled %": 100 * (s > 1 + 1e-9).mean() * ok.mean(),
        "rejected %": 100 * (1 - ok.mean()),
    }


def bench_speed(sizes_n: list[int], reps: int) -> None:
    bs = _bucketsampler()
    flux = BucketLadder.for_model("flux")
    rows = []
    sdxl = bs.load_preset("sdxl") if bs is not None else None
    ours_sdxl = (BucketLadder.from_buckets([b.as_tuple() for b in sdxl], multiple=64)
                 if sdxl is not None else None)
    same = (bs.BucketSet.from_dims([tuple(b) for b in flux.buckets.tolist()])
            if bs is not None else None)
    for n in sizes_n:
        sizes = random_sizes(n)
        ours = timeit(lambda s=sizes: assign(s, flux), reps=reps)
        row = {"N": f"{n:,}", "buckets": len(flux), "ours": str(ours)}
        if bs is not None:
            ours9 = timeit(lambda s=sizes: assign(s, ours_sdxl), reps=reps)
            peer9 = timeit(lambda s=sizes: bs.assign_many_indices(s, sdxl), reps=reps)
            row.update({"ours (sdxl 9)": str(ours9), "bucketsampler (sdxl 9)": str(peer9),
                        "ratio 9": ratio(peer9.median, ours9.median)})
            # Its dense N x K float64 matrix: 10M sizes x 395 buckets would need 32 GB.
            if n * len(flux) * 8 <= 2**31:
                peer = timeit(lambda s=sizes: bs.assign_many_indices(s, same), reps=reps)
                row.update({f"bucketsampler (same {len(flux)})": str(peer),
                            f"ratio {len(flux)}": ratio(peer.median, ours.median)})
            else:
                row.update({f"bucketsampler (same {len(flux)})": "skipped: N x K > 2 GB",
                            f"ratio {len(flux)}": "-"})
        rows.append(row)
    print_table(rows, "assignment time, uniform random sizes 256-4096 px (median [min-max])")
    if bs is None:
        print("bucketsampler not installed (pip install -e '.[bench]'): peer columns skipped")


def bench_fitted(n: int, timed_n: int, global_batch: int = 32) -> None:
    """The trade of a bucket budget on ``realistic_sizes(n, seed=0)`` (the figures
    docs/ladders.md quotes), and the time of ``from_data`` on ``timed_n`` sizes."""
    sizes = realistic_sizes(n, seed=0)
    flux = BucketLadder.for_model("flux")
    fitted = BucketLadder.from_data(sizes)
    rows = ladder_trade(sizes, flux, fitted, global_batch=global_batch)
    table = [{
        "ladder": r["ladder"].replace("own sizes", "own sizes (kohya no-upscale, 16 px)")
        + (" (default)" if r["chosen"] else ""),
        "buckets used": r["buckets"],
        **{f"res loss {k}": v for k, v in r["resolution_loss"].items()},
        "crop mean": r["crop_loss"]["mean"], "crop p95": r["crop_loss"]["p95"],
        "rejected %": 100 * r["rejected"] / n,
        f"short steps at {global_batch}": f"{r['short_steps']} of {r['steps']}",
    } for r in rows]
    print_table(table, f"bucket budget trade on realistic_sizes({n:,}, seed=0), FLUX "
                f"(upscaled: 0 on every side)")
    big = realistic_sizes(timed_n, seed=0)
    fit_t = timeit(lambda: BucketLadder.from_data(big), reps=1, warmup=0)
    own_t = timeit(lambda: BucketLadder.from_data(big, native=True), reps=1, warmup=0)
    print_table([{"N": f"{timed_n:,}", "from_data (fitted)": str(fit_t),
                  "from_data(native=True)": str(own_t)}], "fitting time")


def bench_quality(n: int) -> None:
    sizes = realistic_sizes(n)
    flux = BucketLadder.for_model("flux")
    rows = []
    a = assign(sizes, flux)
    fitted = assign(sizes, BucketLadder.from_data(sizes))
    own = assign(sizes, BucketLadder.from_data(sizes, native=True))
    for label, f in (("ours: fitted (from_data, the default)", fitted),
                     ("ours: flux preset", a),
                     ("ours: own sizes (native=True, kohya no-upscale at 16 px)", own)):
        rows.append(_quality(label, f.bucket_wh, sizes, flux.max_area,
                             int((f.counts > 0).sum()), a.accepted))
    bs = _bucketsampler()
    if bs is not None:
        sdxl = bs.load_preset("sdxl")
        idx = bs.assign_many_indices(sizes, sdxl)
        wh = np.array([b.as_tuple() for b in sdxl], dtype=np.int64)[idx]
        rows.append(_quality("bucketsampler sdxl preset", wh, sizes, 1024 * 1024,
                             len(np.unique(idx)), a.accepted))
    resos = make_bucket_resolutions((1024, 1024))
    for no_up in (False, True):
        t = select_buckets(sizes, resos, no_upscale=no_up)
        used = len(np.unique(t.bucket_wh[~t.rejected], axis=0))
        label = "typical trainer, no-upscale" if no_up else "typical trainer"
        rows.append(_quality(label, t.bucket_wh, sizes, 1024 * 1024, used, a.accepted))
    print_table(rows, f"quality on {n:,} realistic photo sizes (losses are fractions of pixels)")


def _losses(a, sizes: np.ndarray) -> dict:
    """Rejected / upscaled shares and mean losses over the accepted images of one assignment."""
    ok = a.accepted
    return {
        "rejected %": 100 * (1 - ok.mean()),
        "upscaled %": 100 * a.upscaled.mean(),
        "res loss mean": a.resolution_loss[ok].mean(),
        "crop mean": a.crop_loss[ok].mean(),
    }


def bench_presets(n: int) -> None:
    sizes = realistic_sizes(n, seed=2)
    old = BucketLadder(step=32, levels=[s * s for s in (512, 640, 768, 896, 1024)])
    ladders = {name: BucketLadder.for_model(name) for name in ("flux", "sdxl", "sd15")}
    ladders["flux, from_data() (default)"] = BucketLadder.from_data(sizes)
    ladders["flux, from_data(max_buckets=64)"] = BucketLadder.from_data(sizes, max_buckets=64)
    ladders["flux, from_data(max_buckets=16)"] = BucketLadder.from_data(sizes, max_buckets=16)
    ladders["previous flux (512²..1024², step 32)"] = old
    rows = []
    for name, ladder in ladders.items():
        a = assign(sizes, ladder)
        rows.append({"ladder": name, "levels": len(ladder.levels), "buckets": len(ladder),
                     "buckets used": int((a.counts > 0).sum()), **_losses(a, sizes)})
    print_table(rows, f"presets and from_data on {n:,} realistic photo sizes")


LEVEL_CHOICES = {  # name: (width step, level sides)
    "512..1024 every 128, step 32 (previous flux)": (32, [512, 640, 768, 896, 1024]),
    "256..1024 every 128, step 32": (32, list(range(256, 1025, 128))),
    "256..1024 every 64, step 32": (32, list(range(256, 1025, 64))),
    "256..1024 every 128, step 16": (16, list(range(256, 1025, 128))),
    "256..1024 every 96, step 16": (16, [*range(256, 1024, 96), 1024]),
    "256..1024 every 64, step 16": (16, list(range(256, 1025, 64))),
    "256..1024 x1.19 (9 levels), step 16": (16, [256, 304, 368, 432, 512, 608, 720, 864, 1024]),
    "256..1024 x1.15 (11 levels), step 16 (flux)": (
        16, [256, 288, 336, 384, 448, 512, 592, 672, 784, 896, 1024]),
    "256..1024 x1.12 (13 levels), step 16": (
        16, [256, 288, 320, 368, 400, 464, 512, 576, 640, 720, 816, 912, 1024]),
}


def bench_levels(n: int) -> None:
    sizes = realistic_sizes(n, seed=2)
    rows = []
    for name, (step, sides) in LEVEL_CHOICES.items():
        ladder = BucketLadder(step=step, levels=[s * s for s in sides])
        a = assign(sizes, ladder)
        rows.append({"levels (sides), width step": name, "buckets": len(ladder),
                     "non-empty": int((a.counts > 0).sum()), **_losses(a, sizes)})
    print_table(rows, f"level spacing and width step, multiple 16, {n:,} realistic sizes")


def padding(counts: np.ndarray, batch: int, world: int, last_batch: str) -> int:
    """Duplicates per epoch from bucket counts, by the sampler's rule: each bucket is cut into
    global steps of ``batch * world``; its last, partial step is filled up to a full step
    ("pad"), or split across the ranks, one duplicate per rank left without an image
    ("short")."""
    counts = counts[counts > 0]
    last = counts - (-(-counts // (batch * world)) - 1) * batch * world
    if last_batch == "pad":
        return int((batch * world - last).sum())
    return int(np.maximum(world - last, 0).sum())


def bench_padding(big: int, batch: int = 4) -> None:
    rows = []
    for n in (30, 300, big):
        sizes = realistic_sizes(n, seed=4)
        flux = BucketLadder.for_model("flux")
        for label, ladder, kw in (
            ("flux", flux, {}),
            ("flux, min_bucket_size=8", flux, {"min_bucket_size": 8}),
            ("from_data(max_buckets=8)", BucketLadder.from_data(sizes, max_buckets=8), {}),
            ("from_data(max_buckets=32)", BucketLadder.from_data(sizes, max_buckets=32), {}),
        ):
            a = assign(sizes, ladder, **kw)
            rows.append({
                "images": f"{n:,}", "ladder": label,
                "buckets used": int((a.counts > 0).sum()),
                **{f"dup. world {w} ({mode})": padding(a.counts, batch, w, mode)
                   for w in (1, 8) for mode in ("short", "pad")},
                **_losses(a, sizes),
            })
    print_table(rows, f"duplicates per epoch, batch {batch} per rank, realistic sizes")


def bench_min_bucket(n: int, batch: int = 4, world: int = 8) -> None:
    sizes = realistic_sizes(n, seed=3)
    flux = BucketLadder.for_model("flux")
    rows = []
    for m in (None, 8, 16, 32, 64):
        a = assign(sizes, flux, min_bucket_size=m)
        rows.append({
            "min_bucket_size": m or "-",
            "non-empty buckets": int((a.counts > 0).sum()),
            "duplicates (short)": padding(a.counts, batch, world, "short"),
            "duplicates (pad)": padding(a.counts, batch, world, "pad"),
            **_losses(a, sizes),
        })
    print_table(rows, f"min_bucket_size on {n:,} realistic images, batch {batch} x world {world}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="1M sizes, 3 repetitions")
    mode.add_argument("--tiny", action="store_true", help="smoke test at 20k sizes")
    ap.add_argument("--sizes", type=int, nargs="+", help="override the timed N (e.g. 10000000)")
    args = ap.parse_args(argv)
    print(machine_line())
    if args.tiny:
        sizes_n, reps, quality_n, small_n = [20_000], 1, 20_000, 2_000
    elif args.quick:
        sizes_n, reps, quality_n, small_n = [1_000_000], 3, 200_000, 5_000
    else:
        sizes_n, reps, quality_n, small_n = [1_000_000, 10_000_000], 5, 1_000_000, 5_000
    sizes_n = args.sizes or sizes_n
    bench_speed(sizes_n, reps)
    bench_fitted(20_000, max(sizes_n))
    bench_quality(quality_n)
    bench_presets(quality_n)
    bench_levels(quality_n)
    bench_padding(small_n if args.tiny else 100_000)
    bench_min_bucket(small_n)


if __name__ == "__main__":
    main()
