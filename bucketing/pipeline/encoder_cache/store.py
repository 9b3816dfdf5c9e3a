"""The cache folder on disk: its metadata, the table of contents and the safetensors
shards, each written atomically."""

from __future__ import annotations

import json
import uuid
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



# --------------------------------------------------------------------------- the store


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
    plus shards a killed build wrote after it)."""
    shards_dir = path / "shards"
    present = {p.name for p in shards_dir.glob("*.safetensors")} if shards_dir.is_dir() else set()
    entries: dict[str, str] = {}
    listed: set[str] = set()
    toc = path / "entries.parquet"
    if toc.is_file():
        table = pq.read_table(toc).to_pydict()
        for key, shard in zip(table["key"], table["shard"], strict=True):
            listed.add(shard)
            if shard in present:
                entries[key] = shard
    for shard in sorted(present - listed):
        try:
            keys = _shard_keys(shards_dir / shard)
        except Exception:  # noqa: BLE001 - a shard that cannot be read is not an entry
            continue
        for key in keys:
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


