"""Benchmark: scale — a parquet manifest with sizes, from 1M to 10M rows.

For each size N (each measured step in a fresh process: peak RSS is per process):
- write an N-row manifest as 16 parquet shards (``file``, ``text``, ``WIDTH``,
  ``HEIGHT``; paths ~40 bytes, captions ~60 bytes, realistic photo sizes), untimed;
- ``index``: ``scan(folder, sizes="manifest")`` (rows/s, peak RSS (``VmHWM``) and its
  growth over the RSS before the scan, per row and as a multiple of the finished index's
  bytes), the index's bytes per row
  (all, and beyond the text itself), ``assign`` to the flux ladder, and one epoch plan of
  ``BucketBatchSampler`` at world size 64, batch 4 (construction + ``len``); then a forked
  child reads every row (``paths[i]``, ``captions[i]``) and reports how much its private
  memory grew (``Private_*`` of /proc/self/smaps_rollup, before/after) — for the index as
  scanned and for the same index loaded memory-mapped from a saved ``.arrow`` file;
- ``lists``: the same rows as the Python lists the index used to hold (``list[str]``,
  ``list[list[str]]``): bytes per row and the forked reader's private growth (the before).

    python bench/scale.py                      # 1M, 3M, 10M rows (scan: median of 3)
    python bench/scale.py --rows 1000000       # one size
    python bench/scale.py --tiny               # smoke test: 20k rows
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import fmt_seconds, machine_line, print_table  # noqa: E402

SHARDS = 16
WORLD, BATCH = 64, 4
CMAP = {"image": "file", "caption": "text", "width": "WIDTH", "height": "HEIGHT"}
WORDS = np.array(
    ["a", "photo", "of", "the", "red", "old", "small", "bright", "dog", "cat", "house", "tree",
     "on", "in", "with", "near", "by", "at", "sunset", "morning", "city", "beach", "mountain",
     "river", "portrait", "street"]
)  # fmt: skip


# -- the manifest ---------------------------------------------------------------------------


def make_manifest(n: int, folder: Path) -> None:
    """An n-row manifest in SHARDS parquet files under ``folder`` (vectorised: seconds)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from bench.assign import realistic_sizes  # imports torch: kept out of the measured steps

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sizes = realistic_sizes(n)
    cuts = np.linspace(0, n, SHARDS + 1).astype(np.int64)
    for s in range(SHARDS):
        lo, hi = int(cuts[s]), int(cuts[s + 1])
        rows = np.arange(lo, hi)
        number = pa.array(rows).cast(pa.string())
        shard = pa.array((rows // 10_000).astype(np.int64)).cast(pa.string())
        file = pc.binary_join_element_wise("/datasets/laion/part-", shard, "/img-", number,
                                           ".jpg", "")  # fmt: skip
        words = [pa.array(WORDS[rng.integers(0, len(WORDS), hi - lo)]) for _ in range(10)]
        text = pc.binary_join_element_wise(*words, number, " ")
        table = pa.table({"file": file, "text": text, "WIDTH": sizes[lo:hi, 0],
                          "HEIGHT": sizes[lo:hi, 1]})  # fmt: skip
        pq.write_table(table, folder / f"part-{s:05d}.parquet")


# -- memory of a forked reader --------------------------------------------------------------


def private_mb() -> tuple[float, float]:
    """Private (not shared) memory of this process, MiB: (Private_Dirty, Private_Clean).
    Dirty pages are copies; clean ones are file pages only this process has mapped so far
    (page cache, shared as soon as another process maps them, dropped under pressure)."""
    with open("/proc/self/smaps_rollup") as f:
        kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f if ":" in line)}
    return kb["Private_Dirty"] / 1024, kb["Private_Clean"] / 1024


def peak_mb() -> float:
    """Peak resident set size of this process's memory since :func:`reset_peak`, MiB
    (``VmHWM``). Not ``ru_maxrss``: Linux carries that over ``fork`` and ``exec``, so a step
    run in a child would report the parent's peak (the manifest writer's) as its own."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def reset_peak() -> None:
    """Start :func:`peak_mb` again from the current RSS (``/proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_mb() -> float:
    """Current resident set size, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _read_all(paths, captions, conn) -> None:
    before = private_mb()
    t0 = time.perf_counter()
    chars = 0
    for i in range(len(paths)):
        chars += len(paths[i])
        for c in captions[i]:
            chars += len(c)
    after = private_mb()
    conn.send(((after[0] - before[0], after[1] - before[1]), time.perf_counter() - t0, chars))


def forked_growth(paths, captions) -> tuple[tuple[float, float], float]:
    """((Private_Dirty, Private_Clean) MiB a forked child gains by reading every row, its
    seconds)."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_read_all, args=(paths, captions, child))
    proc.start()
    grown, seconds, chars = parent.recv()
    proc.join()
    assert chars > 0
    return grown, seconds


# -- the measured steps, one process each ---------------------------------------------------


def step_index(folder: Path, reps: int) -> dict:
    from bucketing import BucketLadder, ImageIndex, assign, scan

    base_rss = rss_mb()
    reset_peak()
    times = []
    for _ in range(reps):
        index = None
        t0 = time.perf_counter()
        index = scan(folder, sizes="manifest", column_map=CMAP)
        times.append(time.perf_counter() - t0)
    scan_s = statistics.median(times)
    scan_peak = peak_mb()
    n = len(index)
    text = int(index.paths.offsets[-1] - index.paths.offsets[0])
    text += int(index.captions.texts.offsets[-1] - index.captions.texts.offsets[0])
    t0 = time.perf_counter()
    assignment = assign(index, BucketLadder.for_model("flux"))
    assign_s = time.perf_counter() - t0
    from samplers import BucketBatchSampler  # torch: imported after the scan's peak RSS

    t0 = time.perf_counter()
    sampler = BucketBatchSampler(assignment, batch_size=BATCH, world_size=WORLD, rank=0, seed=0)
    steps = len(sampler)
    plan_s = time.perf_counter() - t0
    grown, read_s = forked_growth(index.paths, index.captions)
    saved = folder.parent / "index.arrow"
    index.save(saved)
    del index, assignment, sampler
    mapped = ImageIndex.load(saved)
    mapped_grown, _ = forked_growth(mapped.paths, mapped.captions)
    return {
        "rows": n, "scan_s": scan_s, "scan_range": [min(times), max(times)],
        "scan_peak_mb": scan_peak, "base_rss_mb": base_rss,
        "bytes_per_row": mapped.nbytes / n,
        "growth_per_row": (scan_peak - base_rss) * 2**20 / n,
        "beyond_text": (mapped.nbytes - text) / n, "assign_s": assign_s, "plan_s": plan_s,
        "steps": steps, "fork_mb": grown, "fork_read_s": read_s, "mapped_fork_mb": mapped_grown,
    }  # fmt: skip


def step_lists(folder: Path) -> dict:
    from bucketing import scan

    index = scan(folder, sizes="manifest", column_map=CMAP)
    before = rss_mb()
    paths, captions = list(index.paths), list(index.captions)
    n = len(paths)
    per_row = (rss_mb() - before) * 2**20 / n
    del index
    grown, read_s = forked_growth(paths, captions)
    return {"rows": n, "list_bytes_per_row": per_row, "list_fork_mb": grown,
            "list_fork_read_s": read_s}  # fmt: skip


def run_step(step: str, folder: Path, reps: int = 1) -> dict:
    """Run ``step`` in a fresh interpreter; its JSON result."""
    cmd = [sys.executable, __file__, "--step", step, str(folder), "--reps", str(reps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 3_000_000, 10_000_000])
    p.add_argument("--tiny", action="store_true", help="20k rows (smoke test)")
    p.add_argument("--no-lists", action="store_true", help="skip the list-based 'before'")
    p.add_argument("--reps", type=int, default=3, help="timed scans per size (median)")
    p.add_argument("--step", nargs=2, metavar=("STEP", "FOLDER"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.step:
        step, folder = args.step
        if step == "index":
            print(json.dumps(step_index(Path(folder), args.reps)))
        else:
            print(json.dumps(step_lists(Path(folder))))
        return
    sizes = [20_000] if args.tiny else args.rows
    print(machine_line())
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for n in sizes:
            folder = Path(tmp) / f"rows-{n}" / f"manifest-{n}"
            make_manifest(n, folder)
            got = run_step("index", folder, 1 if args.tiny else args.reps)
            if not args.no_lists:
                got.update(run_step("lists", folder))
            results.append(got)
            shutil.rmtree(folder.parent)
    print_table([_row(r) for r in results],
                f"manifest with sizes -> index -> assign -> epoch plan (world {WORLD}, batch "
                f"{BATCH}); {SHARDS} parquet shards")  # fmt: skip
    title = "a forked worker reads every row: private memory it gains (smaps_rollup)"
    print_table([_memory_row(r) for r in results], title)


def _row(r: dict) -> dict:
    return {
        "rows": f"{r['rows']:,}",
        "scan": f"{fmt_seconds(r['scan_s'])} [{'-'.join(map(fmt_seconds, r['scan_range']))}]",
        "rows/s": f"{r['rows'] / r['scan_s']:,.0f}",
        "peak RSS": f"{r['scan_peak_mb']:,.0f} MB",
        "RSS before": f"{r['base_rss_mb']:,.0f} MB",
        "peak growth/row": f"{r['growth_per_row']:.0f} B",
        "growth / index": f"{r['growth_per_row'] / r['bytes_per_row']:.2f}x",
        "index bytes/row": f"{r['bytes_per_row']:.0f}",
        "beyond text": f"{r['beyond_text']:.0f}",
        "assign": fmt_seconds(r["assign_s"]),
        "epoch plan": fmt_seconds(r["plan_s"]),
        "steps/rank": r["steps"],
    }


def _memory_row(r: dict) -> dict:
    lists = "list_fork_mb" in r
    return {
        "rows": f"{r['rows']:,}",
        "lists (before): bytes/row": f"{r['list_bytes_per_row']:.0f}" if lists else "-",
        "lists: worker grows": f"{sum(r['list_fork_mb']):,.0f} MB" if lists else "-",
        "columns: worker grows": f"{sum(r['fork_mb']):.1f} MB",
        "mapped .arrow: dirty": f"{r['mapped_fork_mb'][0]:.1f} MB",
        "mapped .arrow: clean (page cache)": f"{r['mapped_fork_mb'][1]:.0f} MB",
        "read every row": fmt_seconds(r["fork_read_s"]),
    }


if __name__ == "__main__":
    main()
