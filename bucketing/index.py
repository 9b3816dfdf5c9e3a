"""The columnar result of a scan: accepted images with oriented sizes and captions,
plus every rejected file with a reason.

Columns are plain lists and numpy arrays so that millions of rows stay cheap and
everything downstream (``assign``, the sampler) can work vectorised.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bucketing.atomic import atomic_path

INDEX_FORMAT = "aspect-bucketing/index"
INDEX_VERSION = 2


def utf8_text(text: str) -> str:
    """``text`` as valid UTF-8 for parquet string columns: lone surrogates (a file name that
    is not UTF-8, decoded with ``surrogateescape``; a JSON ``\\udce9`` escape) become
    backslash escapes such as ``\\udce9``, readable and never a crash on save."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class Rejection(NamedTuple):
    """A file that will not be trained on, and why (``reason`` is a short stable code)."""

    path: str
    reason: str
    detail: str


@dataclass
class ImageIndex:
    """Accepted images (``paths``, oriented ``width``/``height``, ``captions``) and ``rejections``.

    ``blob`` optionally maps a row to its encoded bytes, for sources whose images
    live inside another container (a ``datasets.Dataset`` without file paths).
    Such an index cannot be saved (:meth:`save` says so); rebuild it with ``scan``.
    ``scan_stats`` is the :class:`bucketing.scan.ScanStats` of the ``scan`` call that built
    the index; None for an index built otherwise or loaded from disk.
    """

    paths: list[str]
    width: np.ndarray
    height: np.ndarray
    captions: list[list[str]]
    rejections: list[Rejection] = field(default_factory=list)
    blob: Callable[[int], bytes] | None = None
    scan_stats: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.width = np.asarray(self.width, dtype=np.int64).reshape(-1)
        self.height = np.asarray(self.height, dtype=np.int64).reshape(-1)
        self.rejections = [Rejection(*r) for r in self.rejections]
        n = len(self.paths)
        if not (len(self.width) == len(self.height) == len(self.captions) == n):
            raise ValueError(
                f"ImageIndex columns differ in length: paths={n}, width={len(self.width)}, "
                f"height={len(self.height)}, captions={len(self.captions)}"
            )

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def sizes(self) -> np.ndarray:
        """(N, 2) int64 array of oriented (width, height)."""
        return np.stack([self.width, self.height], axis=1)

    def image_source(self, i: int) -> str | bytes:
        """What ``transforms.load_image`` should open for row ``i``: a path or encoded bytes."""
        return self.blob(i) if self.blob is not None else self.paths[i]

    def rejection_counts(self) -> dict[str, int]:
        """Number of rejected files per reason, most common first."""
        counts: dict[str, int] = {}
        for r in self.rejections:
            counts[r.reason] = counts.get(r.reason, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def save(self, path: str | os.PathLike) -> None:
        """Write accepted rows and rejections to one parquet file, atomically.

        Paths are stored as the bytes ``os.fsencode`` gives, so any file name round-trips;
        captions, reasons and details as UTF-8 text (see :func:`utf8_text`). An index that
        reads its images through ``blob`` (a ``datasets.Dataset`` with embedded bytes) is
        refused: its paths are labels, so a loaded copy could not read a single image.
        """
        if self.blob is not None:
            raise ValueError(
                "this index reads its images from inside a datasets.Dataset (embedded bytes, "
                "paths such as 'dataset[12]' are only labels), so a saved copy could not read "
                "them; rebuild it with scan(dataset) instead of saving it"
            )
        n, rej = len(self), self.rejections
        captions = [[utf8_text(c) for c in caps] for caps in self.captions]
        table = pa.table(
            {
                # Paths go through os.fsencode: file names need not be valid UTF-8.
                "path": pa.array(
                    [os.fsencode(p) for p in list(self.paths) + [r.path for r in rej]], pa.binary()
                ),
                "width": pa.array(np.concatenate([self.width, np.zeros(len(rej), np.int64)])),
                "height": pa.array(np.concatenate([self.height, np.zeros(len(rej), np.int64)])),
                "captions": pa.array(captions + [[]] * len(rej), pa.list_(pa.string())),
                "reason": pa.array([None] * n + [utf8_text(r.reason) for r in rej], pa.string()),
                "detail": pa.array([None] * n + [utf8_text(r.detail) for r in rej], pa.string()),
            }
        )
        table = table.replace_schema_metadata(
            {"format": INDEX_FORMAT, "version": str(INDEX_VERSION)}
        )
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ImageIndex:
        """Read an index written by :meth:`save`; refuses files of another format or version."""
        table = pq.read_table(path)
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        if meta.get("format") != INDEX_FORMAT or meta.get("version") != str(INDEX_VERSION):
            raise ValueError(
                f"{os.fspath(path)} is not an aspect-bucketing index (version {INDEX_VERSION}); "
                f"found format={meta.get('format')!r} version={meta.get('version')!r}"
            )
        cols = table.to_pydict()
        cols["path"] = [os.fsdecode(p) for p in cols["path"]]
        accepted = [i for i, r in enumerate(cols["reason"]) if r is None]
        rejected = [i for i, r in enumerate(cols["reason"]) if r is not None]
        return cls(
            paths=[cols["path"][i] for i in accepted],
            width=np.asarray([cols["width"][i] for i in accepted], dtype=np.int64),
            height=np.asarray([cols["height"][i] for i in accepted], dtype=np.int64),
            captions=[list(cols["captions"][i] or []) for i in accepted],
            rejections=[
                Rejection(cols["path"][i], cols["reason"][i], cols["detail"][i] or "")
                for i in rejected
            ],
        )
