"""``scan(source) -> ImageIndex``: list a source, read every image's oriented size from
its header (never its pixels), and record each file that cannot be used with a reason.

Work is spread over worker processes in chunks; results keep the source's order, so
the index is the same for any number of workers. With ``cache=PATH`` a rescan reads
headers only for new or changed files (see ``bucketing.scan_cache``). Under
``torch.distributed`` each rank reads a contiguous shard and the shards are gathered,
so every rank ends with the same index; the local rank 0 of every node writes the cache.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bucketing.headers import (
    Header,
    default_max_pixels,
    read_many,
    worker_init,
    worker_read,
)
from bucketing.index import CaptionColumn, ImageIndex, Rejection, TextColumn
from bucketing.members import stat_path
from bucketing.pairs import has_alpha, pair_files, pair_problem
from bucketing.scan_cache import CacheRow, ScanCache, check_cache_path
from bucketing.sources import Entry, resolve_source
from bucketing.sources.hf_dataset import load_source
from bucketing.sources.rows import ALPHA_MASK, refuse_pairs
from bucketing.sources.shards import read_manifest_columns
from bucketing.sources.tar import tar_columns, tar_shards

__all__ = ["ScanStats", "scan"]

# One process reads ~30-40k headers/s; a process pool costs tens of ms to start and to send
# results back, so it pays only with thousands of files per worker.
_MIN_PER_WORKER = 4096


@dataclass(frozen=True)
class ScanStats:
    """What a scan did, attached to its result as ``index.scan_stats``.

    ``files``: entries the source listed; ``read``: headers actually read in this call
    (all ranks); ``reused``: results taken from the cache; ``read_local``: headers read
    by this process's rank; ``rejected``: rejections in the index; ``cache``: ``"none"``,
    ``"absent"`` (no cache file yet), ``"loaded"`` or ``"rebuilt"`` (an unusable cache
    file was ignored); ``seconds``: wall time of the whole call.
    """

    files: int
    read: int
    reused: int
    read_local: int
    rejected: int
    cache: str
    seconds: float


def scan(
    source: Any,
    *,
    workers: int | None = None,
    cache: str | os.PathLike | None = None,
    progress: bool | None = None,
    max_pixels: int | None = None,
    column_map: dict[str, str] | None = None,
    base_dir: str | os.PathLike | None = None,
    download_dir: str | os.PathLike | None = None,
    sizes: str = "headers",
    data_files: Any = None,
    data_dir: str | os.PathLike | None = None,
    split: str = "train",
) -> ImageIndex:
    """Scan ``source`` (folder, manifest, list of paths, ``datasets.Dataset``) into an index.

    ``workers``: processes reading headers (default: the cores available to this rank;
    0 or 1 reads in this process). ``cache``: parquet file for incremental rescans.
    ``progress``: tqdm bar (default: when stderr is a terminal, on rank 0).
    ``max_pixels``: larger images are rejected ``too_many_pixels`` from the header
    (default: Pillow's decompression-bomb error limit, ``2 * Image.MAX_IMAGE_PIXELS``).
    ``column_map``/``base_dir``/``download_dir`` are passed to ``resolve_source``;
    ``data_files``/``data_dir``/``split`` too: with one of the first two, or a source
    written ``"hf:NAME"``, the source is what ``datasets.load_dataset`` builds.
    ``sizes="headers"`` (default) reads each image's oriented size from its header.
    ``sizes="manifest"`` takes them from a parquet manifest's ``width``/``height`` columns
    (``column_map={"width": ..., "height": ...}``), one file or many shards, and touches no
    image file at all (no header, no stat; ``workers`` and ``cache`` are not used): the sizes
    must be the oriented ones, and a missing or changed file is found when the dataset
    loads it (substituted). Every rank reads the manifest itself. Tar shards (see
    :mod:`bucketing.sources.tar`) take their sizes from each key's json or the shard's
    sibling parquet.
    Bad files never raise; they become rejections. The returned index carries
    :class:`ScanStats` as ``index.scan_stats``.
    """
    if sizes not in ("headers", "manifest"):
        raise ValueError(f"sizes must be 'headers' or 'manifest', got {sizes!r}")
    source = load_source(source, data_files, data_dir, split)
    with _gc_paused():
        if sizes == "manifest":
            return _scan_manifest(source, max_pixels, column_map, base_dir)
        return _scan(
            source, workers, cache, progress, max_pixels, column_map, base_dir, download_dir
        )


def _scan_manifest(
    source: Any,
    max_pixels: int | None,
    column_map: dict[str, str] | None,
    base_dir: str | os.PathLike | None,
) -> ImageIndex:
    """The index of a parquet manifest with sizes, built column-wise (no row objects)."""
    t0 = time.perf_counter()
    limit = default_max_pixels() if max_pixels is None else int(max_pixels)
    base = os.fspath(base_dir) if base_dir is not None else None
    tars = tar_shards(source)
    if tars is not None:
        refuse_pairs(dict(column_map or {}), "tar shards")
        got = tar_columns(tars, base)
    else:
        got = read_manifest_columns(source, dict(column_map or {}), base)
    rejections = got.rejections
    # as for a header scan: the entries listed, counting those whose size is unusable
    listed = len(got.width) + sum(r.reason == "bad_row" for r in rejections)
    big = got.width * got.height > limit if limit is not None else np.zeros(len(got.width), bool)
    for i in np.flatnonzero(big):
        detail = f"{got.width[i]}x{got.height[i]} is more than max_pixels={limit}"
        rejections.append(Rejection(got.paths[int(i)].as_py(), "too_many_pixels", detail))
    paths, captions, width, height = got.paths, got.captions, got.width, got.height
    if big.any():
        ok = pa.array(~big)
        paths, captions, width, height = (
            pc.filter(paths, ok),
            pc.filter(captions, ok),
            width[~big],
            height[~big],
        )
    del got
    index = ImageIndex(
        TextColumn.from_arrow(paths),
        width,
        height,
        CaptionColumn.from_arrow(captions),
        rejections,
    )
    index.scan_stats = ScanStats(
        files=listed,
        read=0,
        reused=0,
        read_local=0,
        rejected=len(rejections),
        cache="none",
        seconds=time.perf_counter() - t0,
    )
    return index


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: a scan allocates a few small objects per file and
    none of them form cycles, yet on large folders the collector's repeated passes over
    them cost as much as the rescan itself."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _scan(
    source: Any,
    workers: int | None,
    cache: str | os.PathLike | None,
    progress: bool | None,
    max_pixels: int | None,
    column_map: dict[str, str] | None,
    base_dir: str | os.PathLike | None,
    download_dir: str | os.PathLike | None,
) -> ImageIndex:
    t0 = time.perf_counter()
    check_cache_path(cache, source)
    limit = default_max_pixels() if max_pixels is None else int(max_pixels)
    resolved = resolve_source(
        source, column_map=column_map, base_dir=base_dir, download_dir=download_dir
    )
    entries = resolved.entries
    rank, world = _rank_and_world()
    if world > 1:
        _check_same_entries(entries)
    prior = ScanCache.load(cache) if cache is not None else None
    show = (rank == 0 and sys.stderr.isatty()) if progress is None else bool(progress)
    lo, hi = rank * len(entries) // world, (rank + 1) * len(entries) // world
    local = _scan_shard(entries[lo:hi], prior, _resolve_workers(workers), resolved.blobs, show)
    shards = _all_gather(local) if world > 1 else [local]
    headers = [h for shard in shards for h in shard[0]]
    keys = [k for shard in shards for k in shard[1]]
    n_read = sum(shard[2] for shard in shards)

    paths, widths, heights, captions, rows = [], [], [], [], []
    rejections = list(resolved.rejections)
    # paired files are read by shard too: each rank checks its own rows' pairs
    problems = _pair_problems(entries[lo:hi], headers[lo:hi], _resolve_workers(workers),
                              resolved.blobs)  # fmt: skip
    if world > 1:
        problems = [p for shard in _all_gather(problems) for p in shard]
    k = max((len(e.conditioning) for e in entries), default=0)
    conditioning: list[list[str]] = [[] for _ in range(k)]
    masks: list[str] = []
    for entry, h, problem in zip(entries, headers, problems, strict=True):
        if h.ok and limit is not None and h.width * h.height > limit:
            detail = f"{h.width}x{h.height} is more than max_pixels={limit}"
            rejections.append(Rejection(entry.label, "too_many_pixels", detail))
        elif h.ok and problem is not None:
            rejections.append(Rejection(entry.label, *problem))
        elif h.ok:
            paths.append(entry.path)
            widths.append(h.width)
            heights.append(h.height)
            captions.append(list(entry.captions))
            rows.append(entry.row)
            for column, path in zip(conditioning, entry.conditioning, strict=True):
                column.append(path)
            masks.append(entry.mask or "")
        else:
            rejections.append(Rejection(entry.label, h.reason, h.detail))
    blob = resolved.blobs.take(rows) if resolved.blobs is not None else None
    index = ImageIndex(paths, widths, heights, captions, rejections, blob=blob,
                       conditioning=conditioning,
                       loss_mask=masks if any(e.mask for e in entries) else None)  # fmt: skip

    reused = sum(shard[3] for shard in shards)
    if cache is not None and _local_rank(rank) == 0:  # one writer per node
        _update_cache(cache, prior, entries, headers, keys, reused)
    index.scan_stats = ScanStats(
        files=len(entries),
        read=n_read,
        reused=reused,
        read_local=local[2],
        rejected=len(rejections),
        cache="none" if prior is None else prior.status,
        seconds=time.perf_counter() - t0,
    )
    return index


def _pair_problems(
    entries: Sequence[Entry],
    headers: Sequence[Header],
    workers: int,
    blobs: Callable[[int], bytes] | None,
) -> list[tuple[str, str] | None]:
    """Per entry, why its paired files cannot be used (see :mod:`bucketing.pairs`), or None.
    Their headers are read like the images' (in worker processes when there are many)."""
    files = [pair_files(e.conditioning, e.mask) if h.ok else [] for e, h in
             zip(entries, headers, strict=True)]  # fmt: skip
    if not any(files) and not any(e.mask == ALPHA_MASK for e in entries):
        return [None] * len(entries)
    read = iter(_read_all([(p, None) for named in files for _, p in named], workers, None, False))
    out: list[tuple[str, str] | None] = []
    for entry, h, named in zip(entries, headers, files, strict=True):
        got = [next(read) for _ in named]
        problem = pair_problem(h, named, got) if h.ok else None
        if problem is None and h.ok and entry.mask == ALPHA_MASK:
            try:
                source = blobs(entry.row) if blobs is not None else entry.path
            except Exception:  # the image's own read fails too, and says why
                source = b""
            if not has_alpha(source):
                problem = ("no_alpha", "loss_mask='alpha' but the image has no alpha channel")
        out.append(problem)
    return out


# --------------------------------------------------------------------------- one shard


def _scan_shard(
    shard: Sequence[Entry],
    prior: ScanCache | None,
    workers: int,
    blobs: Callable[[int], bytes] | None,
    show: bool,
) -> tuple[list[Header], list[tuple[int, int] | None], int, int]:
    """Headers for ``shard``, their stat keys, how many were read and how many came from
    the cache.

    An entry is read through ``blobs(entry.row)`` only when there is a blob reader: a
    dataset whose images are all files on disk has rows but no ``blobs``, and its
    entries are read (and cached) by path like any other file.
    """
    rows = [e.row if blobs is not None else None for e in shard]
    headers: list[Header | None] = [None] * len(shard)
    keys: list[tuple[int, int] | None] = [None] * len(shard)
    todo: list[int] = []
    reused = 0
    for i, entry in enumerate(shard):
        if prior is not None and rows[i] is None:
            try:
                st = os.stat(stat_path(entry.path))  # a tar member: its shard
            except FileNotFoundError:
                headers[i] = Header(reason="missing_file", detail="no such file", io_error=True)
                continue
            except OSError as e:
                headers[i] = Header(reason="unreadable", detail=str(e), io_error=True)
                continue
            keys[i] = (st.st_size, st.st_mtime_ns)
            hit = prior.lookup(entry.path, *keys[i])
            if hit is not None:
                headers[i] = hit
                reused += 1
                continue
        todo.append(i)
    fresh = _read_all([(shard[i].path, rows[i]) for i in todo], workers, blobs, show)
    for i, h in zip(todo, fresh, strict=True):
        headers[i] = h
    return headers, keys, len(todo), reused  # type: ignore[return-value]


def _update_cache(
    cache: str | os.PathLike,
    prior: ScanCache | None,
    entries: Sequence[Entry],
    headers: Sequence[Header],
    keys: Sequence[tuple[int, int] | None],
    reused: int,
) -> None:
    """Rewrite the cache with this scan's files (deleted ones drop out) unless nothing changed:
    every cached row was a hit (``reused``) and nothing new joined."""
    rows = [
        CacheRow(e.path, k[0], k[1], h)
        for e, h, k in zip(entries, headers, keys, strict=True)
        if k is not None and not h.io_error
    ]
    unchanged = prior is not None and prior.status == "loaded" and reused == len(rows) == len(prior)
    if not unchanged:
        ScanCache.save(cache, rows)


# --------------------------------------------------------------------------- reading


def _read_all(
    items: Sequence[tuple[str, int | None]],
    workers: int,
    blobs: Callable[[int], bytes] | None,
    show: bool,
) -> list[Header]:
    """Read ``items`` in order, over ``workers`` processes when there are enough of them."""
    from tqdm.auto import tqdm

    n = len(items)
    with tqdm(total=n, disable=not show or n == 0, unit="file", desc="scan") as bar:
        if workers <= 1 or n < _MIN_PER_WORKER * workers:
            out: list[Header] = []
            for k in range(0, n, 256):
                out.extend(read_many(items[k : k + 256], blobs))
                bar.update(min(256, n - k))
            return out
        size = min(1024, max(16, math.ceil(n / (workers * 8))))
        chunks = [items[k : k + size] for k in range(0, n, size)]
        done: list[list[Header] | None] = [None] * len(chunks)
        ctx = _mp_context()
        try:
            with ProcessPoolExecutor(
                workers, mp_context=ctx, initializer=worker_init, initargs=(blobs,)
            ) as pool:
                futures = {pool.submit(worker_read, c): j for j, c in enumerate(chunks)}
                for future in as_completed(futures):
                    j = futures[future]
                    done[j] = future.result()
                    bar.update(len(chunks[j]))
        except BrokenProcessPool:  # a file crashed a worker: find it, reject it, go on
            for j, got in enumerate(done):
                if got is None:
                    done[j] = _read_isolated(chunks[j], ctx, blobs)
                    bar.update(len(chunks[j]))
        return [h for got in done for h in got]  # type: ignore[union-attr]


def _read_isolated(
    items: Sequence[tuple[str, int | None]], ctx: Any, blobs: Callable[[int], bytes] | None
) -> list[Header]:
    """Read in a fresh one-worker pool, bisecting down to the file that kills the worker."""
    try:
        with ProcessPoolExecutor(
            1, mp_context=ctx, initializer=worker_init, initargs=(blobs,)
        ) as pool:
            return pool.submit(worker_read, items).result()
    except BrokenProcessPool:
        if len(items) == 1:
            return [Header(reason="unreadable", detail="reading the header crashed a worker")]
        mid = len(items) // 2
        return _read_isolated(items[:mid], ctx, blobs) + _read_isolated(items[mid:], ctx, blobs)


def _mp_context() -> Any:
    """``fork`` on Linux: workers start in milliseconds and only read files (no threads,
    locks or torch state of the parent are used in them). Elsewhere ``forkserver`` or
    ``spawn``, which re-import the main module in each worker (slower to start)."""
    methods = multiprocessing.get_all_start_methods()
    if sys.platform.startswith("linux") and "fork" in methods:
        return multiprocessing.get_context("fork")
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["bucketing.headers"])
        return ctx
    return multiprocessing.get_context("spawn")


def _resolve_workers(workers: int | None) -> int:
    if workers is not None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        return workers
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(1, local_ranks))


# --------------------------------------------------------------------------- distributed


def _dist() -> Any:
    """``torch.distributed`` if the program already uses it and it is initialised, else None."""
    if "torch" not in sys.modules:
        return None
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _rank_and_world() -> tuple[int, int]:
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)


def _local_rank(rank: int) -> int:
    """This process's rank on its node (torchrun's ``LOCAL_RANK``), else its global rank."""
    return int(os.environ.get("LOCAL_RANK", rank)) if rank else 0


def _all_gather(obj: Any) -> list[Any]:
    dist = _dist()
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _check_same_entries(entries: Sequence[Entry]) -> None:
    digest = hashlib.sha256("\0".join(e.path for e in entries).encode("utf-8", "replace"))
    mine = (len(entries), digest.hexdigest())
    seen = _all_gather(mine)
    if any(s != mine for s in seen):
        counts = ", ".join(f"rank {r}: {s[0]} files" for r, s in enumerate(seen))
        raise RuntimeError(
            f"ranks listed different files for the same source ({counts}); every rank must "
            "see the same source (a shared file system, the same manifest)"
        )
