"""Benchmark 3: the bucket batch sampler — plan + iterate rank 0's epoch, ours vs bucketsampler.

Both sides get the same bucket ids (N indices in 40 buckets of realistic, uneven occupancy),
batch size and world size, and do the same job: build the sampler, set the epoch (1 by default:
a later epoch, as in training; ours with its defaults, short last batches and indices that
carry their epoch and occurrence), then iterate every batch rank 0 yields in that epoch. Each
(side, N, world size) runs in its own fresh subprocess, so
its peak RSS is its own: the first run is the memory measurement (peak RSS minus the RSS with
the ids already loaded) and the warm-up, then ``reps`` timed runs give median and spread.
Ours also reports restore times at mid-epoch (bucketsampler has no resumable state):
``load_state_dict`` alone, load + first batch at the same world size, and load + first batch
at another world size (elastic: the rest of the epoch is re-planned).

    python bench/sampler.py            # 1M and 10M indices, world sizes 1/8/64, 5 repetitions
    python bench/sampler.py --quick    # same sizes, 1 timed repetition (after the warm-up)
    python bench/sampler.py --tiny     # smoke test: 20k indices, world size 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Timing, fmt_seconds, machine_line, print_table, ratio, timeit  # noqa: E402

from bucketing.atomic import atomic_write_bytes  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
SIDES = ("bucketsampler", "ours")


def bucket_ids(n: int, buckets: int, path: Path) -> Path:
    """Cached .npy of n int64 bucket ids: a bell over the aspect-ordered buckets (square-ish
    buckets full, extreme ones sparse), the shape real photo collections give."""
    if not path.exists():
        centre = (buckets - 1) / 2
        weight = np.exp(-0.5 * ((np.arange(buckets) - centre) / (buckets / 5)) ** 2) + 0.01
        ids = np.random.default_rng(0).choice(buckets, size=n, p=weight / weight.sum())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, ids.astype(np.int64))
        os.replace(tmp, path)
    return path


def make_sampler(side: str, ids: np.ndarray, batch_size: int, world_size: int) -> Any:
    if side == "ours":
        from samplers import BucketBatchSampler

        return BucketBatchSampler(ids, batch_size, world_size=world_size, rank=0, seed=0)
    from bucketsampler.torch.sampler import BucketBatchSampler as PeerSampler

    return PeerSampler(
        ids, batch_size, shuffle=True, drop_last=False, num_replicas=world_size, rank=0, seed=0
    )


def epoch(
    side: str, ids: np.ndarray, batch_size: int, world_size: int, epoch_number: int = 1
) -> tuple[int, int]:
    """The measured job: build the sampler and iterate rank 0's epoch ``epoch_number``.
    Returns (batches, indices)."""
    sampler = make_sampler(side, ids, batch_size, world_size)
    sampler.set_epoch(epoch_number)
    batches = indices = 0
    for batch in sampler:
        batches += 1
        indices += len(batch)
    return batches, indices


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child_epoch(args: argparse.Namespace) -> dict[str, Any]:
    ids = np.load(args.ids)
    make_sampler(args.side, ids[:10], 1, 1)  # imports (torch included) before the baseline
    before = rss_mb()
    batches, indices = epoch(args.side, ids, args.batch_size, args.world_size, args.epoch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10 - before
    timing = timeit(lambda: epoch(args.side, ids, args.batch_size, args.world_size, args.epoch),
                    reps=args.reps, warmup=0)  # fmt: skip
    return {"timing": list(timing.values), "peak_mb": peak, "batches": batches,
            "indices": indices}  # fmt: skip


def child_restore(args: argparse.Namespace) -> dict[str, Any]:
    from samplers import BucketBatchSampler

    ids = np.load(args.ids)
    w, other = args.world_size, args.world_size * 2 if args.world_size < 64 else 32

    def build(world_size: int) -> BucketBatchSampler:
        return BucketBatchSampler(ids, args.batch_size, world_size=world_size, rank=0, seed=0)

    t0 = time.perf_counter()
    running = build(w)
    construct = time.perf_counter() - t0
    it, half = iter(running), len(running) // 2
    for _ in range(half):
        next(it)
    state = running.state_dict(received=half)
    del it, running

    def restore(world_size: int, first_batch: bool) -> list[float]:
        values = []
        for _ in range(args.reps + 1):  # a fresh sampler each time: nothing cached
            sampler = build(world_size)
            t0 = time.perf_counter()
            sampler.load_state_dict(state)
            if first_batch:
                next(iter(sampler))
            values.append(time.perf_counter() - t0)
        return values[1:]

    return {"construct": construct, "elastic_to": other, "state_bytes": len(json.dumps(state)),
            "load": restore(w, False), "load_first": restore(w, True),
            "elastic_first": restore(other, True)}  # fmt: skip


def run_child(mode: str, side: str, ids: Path, world_size: int, args) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", mode, "--side", side, "--ids", str(ids),
           "--world-size", str(world_size), "--batch-size", str(args.batch_size),
           "--reps", str(args.reps), "--epoch", str(args.epoch)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def timing(values: list[float]) -> Timing:
    return Timing(statistics.median(values), min(values), max(values), tuple(values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="1 timed repetition")
    mode.add_argument("--tiny", action="store_true", help="smoke test at 20k indices")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--buckets", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--epoch", type=int, default=1, help="the epoch iterated (default 1)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--child", choices=["epoch", "restore"], help=argparse.SUPPRESS)
    ap.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--ids", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--world-size", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result = child_epoch(args) if args.child == "epoch" else child_restore(args)
        print(json.dumps(result))
        return
    if args.tiny:
        args.sizes, args.world_sizes, args.reps = [20_000], [8], 1
    elif args.quick:
        args.reps = 1

    print(f"# bench/sampler.py | {machine_line()}")
    print(f"# batch size {args.batch_size} per rank, {args.buckets} buckets, epoch {args.epoch}, "
          f"reps {args.reps}; "
          "each side in a fresh process per row")  # fmt: skip
    rows, restores, results = [], [], []
    for n in args.sizes:
        ids = bucket_ids(n, args.buckets, OUT / f"sampler_ids_{n}_{args.buckets}.npy")
        for w in args.world_sizes:
            r = {side: run_child("epoch", side, ids, w, args) for side in SIDES}
            ours, peer = timing(r["ours"]["timing"]), timing(r["bucketsampler"]["timing"])
            mb = {side: r[side]["peak_mb"] for side in SIDES}
            rows.append({
                "N": f"{n:,}", "world": w, "ours": str(ours), "bucketsampler": str(peer),
                "speed-up": ratio(peer.median, ours.median),
                "ours MB": round(mb["ours"]), "bucketsampler MB": round(mb["bucketsampler"]),
                "memory": ratio(mb["bucketsampler"], mb["ours"]),
                "batches ours/peer": f"{r['ours']['batches']}/{r['bucketsampler']['batches']}",
            })  # fmt: skip
            s = run_child("restore", "ours", ids, w, args)
            restores.append({
                "N": f"{n:,}", "world": w, "construct": fmt_seconds(s["construct"]),
                "load_state_dict": str(timing(s["load"])),
                "load + 1st batch": str(timing(s["load_first"])),
                "elastic -> W' + 1st batch": f"{s['elastic_to']}: {timing(s['elastic_first'])}",
                "state bytes": s["state_bytes"],
            })  # fmt: skip
            results.append({"n": n, "world_size": w, "epoch": r, "restore": s})
            print(".", end="", flush=True, file=sys.stderr)
    print(file=sys.stderr)
    print_table(rows, "plan + iterate rank 0's epoch (median [min-max]); peak MB above the ids")
    print_table(restores, "ours: restore at mid-epoch (same world size, and elastic)")
    if args.json:
        atomic_write_bytes(args.json, json.dumps(results, indent=1).encode())


if __name__ == "__main__":
    main()
