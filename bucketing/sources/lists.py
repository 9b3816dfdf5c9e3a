"""In-memory sources: a list or tuple of local paths and ``http(s)://`` URLs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from bucketing.download import Downloader
from bucketing.index import Rejection
from bucketing.sources.entries import ResolvedSource
from bucketing.sources.rows import NO_PAIRS, Row, collect, source_folder


def resolve_list(
    items: Sequence[Any],
    base_dir: str | None,
    downloader: Downloader | None,
    download_dir: str | None,
) -> ResolvedSource:
    """Entries for a list of paths/URLs (relative paths against ``base_dir`` or the cwd)."""
    rows: list[Row] = []
    rejections: list[Rejection] = []
    for i, item in enumerate(items):
        if not isinstance(item, (str, bytes, os.PathLike)):
            raise TypeError(
                f"list sources hold paths or URLs (str, bytes or os.PathLike); item {i} is "
                f"{type(item).__name__}"
            )
        value = os.fspath(item)
        if isinstance(value, bytes):
            value = os.fsdecode(value)
        if not value.strip():
            rejections.append(Rejection(f"<list item {i}>", "no_image", "empty path"))
            continue
        rows.append((value, [], f"item {i}", NO_PAIRS))
    entries, more = collect(
        rows, "list", source_folder(base_dir), base_dir, downloader, download_dir
    )
    return ResolvedSource(entries, rejections + more)
