"""The cache folder on disk: its metadata, the table of contents and the safetensors
shards, each written atomically."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bucketing.atomic import atomic_path
from bucketing.pipeline.encoder_cache.keys import CACHE_FORMAT, CACHE_VERSION, SHARD_BYTES

if TYPE_CHECKING:
    pass

TABLES = ("rows.parquet", "texts.parquet")  # the view, named by cache.json's "build"
LOCK_FILE = "build.lock"


# --------------------------------------------------------------------------- the store


def start_mark() -> dict[str, Any]:
    """cache.json of a folder a first build is filling: ours, not yet a cache."""
    return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "build": None}


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    """Write cache.json atomically."""
    with atomic_path(path / "cache.json") as tmp, open(tmp, "wb") as f:
        f.write(json.dumps(meta, indent=1).encode())


def table_build(table_file: Path) -> str | None:
    """The build id a view table was written by (its parquet metadata), None if absent."""
    meta = pq.read_schema(table_file).metadata or {}
    build = meta.get(b"build")
    return build.decode() if build is not None else None


def check_view(path: Path, meta: dict[str, Any]) -> None:
    """Raise ValueError unless cache.json names a finished build and every view table was
    written by that build (a build killed between the tables and cache.json mixes them)."""
    build = meta.get("build")
    if not isinstance(build, str):
        raise FileNotFoundError(f"{path} is not an encoder cache yet: a build into it did not "
                                "finish; rerun it (build_cache or bucket-cache resumes)")
    for name in TABLES:
        try:
            written_by = table_build(path / name)
        except (OSError, pa.ArrowException) as error:
            raise ValueError(f"{path} is a damaged encoder cache ({name}: {error}); rebuild "
                             "it") from error
        if written_by != build:
            raise ValueError(f"{path}: {name} belongs to another build than cache.json (a "
                             "rebuild was interrupted); rerun the build")


@contextlib.contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """Hold the folder's build lock; a second build of the same folder is refused."""
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{path}: another build is writing this cache (it holds "
                               f"{LOCK_FILE}); wait for it to finish") from None
        yield
    finally:
        os.close(fd)


def read_meta(path: Path) -> dict[str, Any]:
    """cache.json of a cache folder, validated; a clear error for anything else."""
    meta_file = path / "cache.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not an encoder cache (no cache.json); build one with "
                                "bucketing.build_cache or bucket-cache")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{meta_file} is unreadable: {error}") from error
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path} is not an aspect-bucketing encoder cache "
                         f"(format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") != CACHE_VERSION:
        raise ValueError(f"{path} is an encoder cache of version {meta.get('version')}, this "
                         f"library reads version {CACHE_VERSION}: rebuild it (bucket-cache)")
    return meta


def _shard_keys(shard: Path) -> list[str]:
    with safe_open(str(shard), "pt") as f:
        names = f.keys()
    return sorted({n.rsplit(".", 1)[0] for n in names})


def load_entries(path: Path) -> dict[str, str]:
    """key -> shard name for every entry of every complete shard (the table of contents,
    plus shards a killed build wrote after it). A shard whose header does not read (cut
    short, overwritten) holds no entries: a rebuild encodes them again."""
    shards_dir = path / "shards"
    present = {p.name for p in shards_dir.glob("*.safetensors")} if shards_dir.is_dir() else set()
    readable: dict[str, set[str]] = {}
    for shard in sorted(present):
        try:
            readable[shard] = set(_shard_keys(shards_dir / shard))
        except Exception:  # noqa: BLE001 - a shard that cannot be read is not an entry
            continue
    entries: dict[str, str] = {}
    listed: set[str] = set()
    toc = path / "entries.parquet"
    if toc.is_file():
        table = pq.read_table(toc).to_pydict()
        for key, shard in zip(table["key"], table["shard"], strict=True):
            listed.add(shard)
            if key in readable.get(shard, ()):
                entries[key] = shard
    for shard in sorted(set(readable) - listed):
        for key in sorted(readable[shard]):
            entries.setdefault(key, shard)
    return entries


def write_entries(path: Path, entries: dict[str, str]) -> None:
    keys = sorted(entries)
    table = pa.table({"key": pa.array(keys, pa.string()),
                      "shard": pa.array([entries[k] for k in keys], pa.string())})
    with atomic_path(path / "entries.parquet") as tmp:
        pq.write_table(table, tmp)


class ShardWriter:
    """Collects encoded tensors (already on the host) and writes them as shards of
    ``shard_size`` entries, or sooner when they reach ``SHARD_BYTES``."""

    def __init__(self, shards_dir: Path, shard_size: int, rank: int) -> None:
        self.dir, self.size, self.rank = shards_dir, shard_size, rank
        self.tensors: dict[str, torch.Tensor] = {}
        self.keys: set[str] = set()
        self.written: dict[str, str] = {}
        self.nbytes = 0

    def add(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            # a packed copy, not a view that would keep its whole batch alive
            self.tensors[f"{key}.{name}"] = t.clone(memory_format=torch.contiguous_format)
            self.nbytes += t.nbytes
        self.keys.add(key)
        if len(self.keys) >= self.size or self.nbytes >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.keys:
            return
        name = f"r{self.rank}-{uuid.uuid4().hex}.safetensors"
        with atomic_path(self.dir / name) as tmp:
            save_file(self.tensors, tmp, metadata={"format": CACHE_FORMAT,
                                                   "version": str(CACHE_VERSION)})
        self.written.update(dict.fromkeys(self.keys, name))
        self.tensors, self.keys, self.nbytes = {}, set(), 0


