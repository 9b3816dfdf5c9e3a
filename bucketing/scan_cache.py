"""The incremental scan cache: one parquet file of header results keyed by
(path, file size, mtime_ns), so that a rescan re-reads only new or changed files.

The file is written atomically (``bucketing.atomic``): a scan killed mid-write
leaves the previous cache or the new one, never a torn file. It is versioned: a
file written by another format version, by another header-reader version, by
another program, or one that is not parquet at all is ignored with a warning and
rebuilt by the scan, never misread. It holds only strings and integers and is read
with pyarrow: nothing in it can execute code (no pickle).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from bucketing.atomic import check_replaceable
from bucketing.headers import READER_VERSION, Header
from bucketing.index import utf8_text
from bucketing.table_file import has_format, load_table, save_table

__all__ = ["CACHE_FORMAT", "CACHE_VERSION", "CacheRow", "ScanCache", "check_cache_path"]

CACHE_FORMAT = "aspect-bucketing/scan-cache"
CACHE_VERSION = 1
_COLUMNS = ("path", "size", "mtime_ns", "width", "height", "reason", "detail")


class CacheRow(NamedTuple):
    """One file's header result and the stat key it was read under."""

    path: str
    size: int
    mtime_ns: int
    header: Header


class ScanCache:
    """Header results from an earlier scan, looked up by (path, size, mtime_ns).

    ``status`` says what :meth:`load` found: ``"absent"`` (no file), ``"loaded"``, or
    ``"rebuilt"`` (the file was unusable and will be replaced).
    """

    def __init__(self, rows: Iterable[CacheRow] = (), status: str = "absent") -> None:
        rows = list(rows)
        self._slot = {r.path: i for i, r in enumerate(rows)}
        self._size = np.array([r.size for r in rows], dtype=np.int64)
        self._mtime = np.array([r.mtime_ns for r in rows], dtype=np.int64)
        self._headers = [r.header for r in rows]
        self.status = status

    def __len__(self) -> int:
        return len(self._headers)

    def lookup(self, path: str, size: int, mtime_ns: int) -> Header | None:
        """The cached header of ``path`` if it was read at this size and mtime, else None."""
        i = self._slot.get(path)
        if i is None or self._size[i] != size or self._mtime[i] != mtime_ns:
            return None
        return self._headers[i]

    @classmethod
    def load(cls, path: str | os.PathLike) -> ScanCache:
        """Read a cache file; a missing one is empty, an unusable one warns and is empty."""
        path = os.fspath(path)
        if not os.path.exists(path):
            return cls()
        try:
            table = load_table(
                path,
                {"format": CACHE_FORMAT, "version": str(CACHE_VERSION),
                 "reader": str(READER_VERSION)},
                _COLUMNS,
                "a scan cache of this version",
            )  # fmt: skip
            cols = {name: table.column(name) for name in _COLUMNS}
            paths = [os.fsdecode(p) for p in cols["path"].to_pylist()]
            size, mtime, width, height = (
                cols[c].to_numpy().astype(np.int64) for c in ("size", "mtime_ns", "width", "height")
            )
            reasons = cols["reason"].to_pylist()
            details = cols["detail"].to_pylist()
        except Exception as e:  # not parquet, truncated, foreign, odd columns: start over
            warnings.warn(
                f"ignoring scan cache {path}: {e}; every file will be read again and the "
                "cache rewritten",
                RuntimeWarning,
                stacklevel=3,
            )
            return cls(status="rebuilt")
        columns = zip(paths, size, mtime, width, height, reasons, details, strict=True)
        rows = (
            CacheRow(p, int(s), int(m), Header(int(w), int(h), r, d or ""))
            for p, s, m, w, h, r, d in columns
        )
        return cls(rows, status="loaded")

    @staticmethod
    def save(path: str | os.PathLike, rows: Iterable[CacheRow]) -> None:
        """Write ``rows`` (io errors excluded by the caller) as the new cache, atomically."""
        rows = list(rows)
        table = pa.table(
            {
                # file names need not be UTF-8: store the bytes os.fsencode gives
                "path": pa.array([os.fsencode(r.path) for r in rows], pa.binary()),
                "size": pa.array([r.size for r in rows], pa.int64()),
                "mtime_ns": pa.array([r.mtime_ns for r in rows], pa.int64()),
                "width": pa.array([r.header.width for r in rows], pa.int64()),
                "height": pa.array([r.header.height for r in rows], pa.int64()),
                "reason": pa.array([r.header.reason for r in rows], pa.string()),
                "detail": pa.array([utf8_text(r.header.detail) for r in rows], pa.string()),
            }
        )
        meta = {
            "format": CACHE_FORMAT,
            "version": str(CACHE_VERSION),
            "reader": str(READER_VERSION),
        }
        save_table(path, table, meta)


def check_cache_path(cache: str | os.PathLike | None, source: object) -> None:
    """Before a scan does any work: refuse (``FileExistsError``) a ``cache`` path that is the
    source itself, is not a regular file, or exists and is not a scan cache (an image, a
    manifest, a saved index or any other file the scan would otherwise overwrite)."""
    if cache is not None:
        keep = [source] if isinstance(source, (str, os.PathLike)) else []
        check_replaceable(cache, keep=keep, ours=lambda real: has_format(real, CACHE_FORMAT),
                          what="the scan cache")
