"""Decoded images kept in memory, so that a file repeated within an epoch (or across epochs of
persistent workers) is decoded once per process.

:class:`DecodedImageCache` is a least-recently-used store bounded by bytes. Its entries are
the decoded, oriented RGB picture *before* the fit (at the reduced JPEG draft scale when the
draft applies), so every occurrence still draws its own crop and flip from the same pixels:
a sample is bit for bit the one a fresh decode gives. An entry is keyed by the file's
identity (path, size, mtime_ns; for encoded bytes their length and BLAKE2 digest), the draft
target that fixes the decode scale, and the decode settings: a file replaced on disk is a
miss, never a stale picture.

Each DataLoader worker holds its own (the cache is emptied when the dataset is pickled into
a worker); the hit, miss and eviction counts of every process go to one shared-memory
counter table, so ``stats()`` in the main process sums all workers.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import get_worker_info

DEFAULT_DECODED_CACHE_BYTES = 512 << 20  # per process: a few hundred photos at draft scale
_SLOTS = 64  # counter rows: the main process and up to 63 workers (more share rows)
_FIELDS = ("hits", "misses", "evictions", "bytes", "entries")


def source_identity(source: str | os.PathLike | bytes) -> tuple | None:
    """What identifies ``source``'s content: (path, size, mtime_ns) for a file, (length,
    digest) for encoded bytes; None when the file cannot be stat'ed (it is then not cached)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return ("bytes", len(source), hashlib.blake2b(source, digest_size=16).hexdigest())
    try:
        st = os.stat(source)
    except OSError:
        return None
    return (os.fspath(source), int(st.st_size), int(st.st_mtime_ns))


def image_nbytes(img: Image.Image) -> int:
    """The bytes of an image's pixels (width x height x bands)."""
    return img.width * img.height * len(img.getbands())


class DecodedImageCache:
    """Decoded pictures, least recently used evicted first, at most ``max_bytes`` of pixels
    in this process (0: nothing is kept). Read with :meth:`get`, fill with :meth:`put`;
    :meth:`key` builds the key of a decode."""

    def __init__(self, max_bytes: int = DEFAULT_DECODED_CACHE_BYTES) -> None:
        max_bytes = int(max_bytes)
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 (0 disables the cache), got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, Image.Image] = OrderedDict()
        self._bytes = 0
        self._counts = torch.zeros((_SLOTS, len(_FIELDS)), dtype=torch.int64).share_memory_()

    @property
    def enabled(self) -> bool:
        """Whether anything is kept (``max_bytes > 0``)."""
        return self.max_bytes > 0

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)  # a worker starts empty; the shared counters travel
        state["_entries"], state["_bytes"] = OrderedDict(), 0
        return state

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(
        source: str | os.PathLike | bytes, settings: Hashable, draft_size: Sequence[int] | None
    ) -> tuple | None:
        """The key of ``source`` decoded with ``settings`` toward ``draft_size`` (the (w, h)
        the JPEG draft must cover; None: full size); None when the file cannot be stat'ed."""
        identity = source_identity(source)
        if identity is None:
            return None
        draft = None if draft_size is None else tuple(int(v) for v in draft_size)
        return (identity, settings, draft)

    def get(self, key: tuple | None) -> Image.Image | None:
        """A copy of the picture stored under ``key`` (the caller may change it), or None."""
        if not self.enabled or key is None:
            return None
        img = self._entries.get(key)
        if img is None:
            self._count("misses")
            return None
        self._entries.move_to_end(key)
        self._count("hits")
        return img.copy()

    def put(self, key: tuple | None, img: Image.Image) -> None:
        """Keep a copy of ``img`` under ``key``, evicting the least recently used pictures
        beyond ``max_bytes`` (a picture larger than the whole budget is not kept)."""
        size = image_nbytes(img)
        if not self.enabled or key is None or size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= image_nbytes(old)
        self._entries[key] = img.copy()
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= image_nbytes(evicted)
            self._count("evictions")
        self._set_gauges()

    def stats(self) -> dict[str, int]:
        """Hits, misses and evictions summed over every process using this cache (the main
        process and its DataLoader workers), the bytes and entries they held at their last
        store, the hit rate and the limit per process."""
        totals = self._counts.sum(0).tolist()
        out = dict(zip(_FIELDS, (int(v) for v in totals), strict=True))
        looked = out["hits"] + out["misses"]
        return {**out, "hit_rate": round(out["hits"] / looked, 4) if looked else 0.0,
                "max_bytes_per_process": self.max_bytes}

    def reset_stats(self) -> None:
        """Zero the hit, miss and eviction counts (the pictures stay)."""
        self._counts[:, :3] = 0

    def _slot(self) -> int:
        info = get_worker_info()
        return 0 if info is None else 1 + info.id % (_SLOTS - 1)

    def _count(self, field: str) -> None:
        self._counts[self._slot(), _FIELDS.index(field)] += 1

    def _set_gauges(self) -> None:
        slot = self._slot()
        self._counts[slot, 3] = self._bytes
        self._counts[slot, 4] = len(self._entries)
