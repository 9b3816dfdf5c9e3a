"""Manifest files: a reader per format (see ``MANIFEST_READERS`` in
:mod:`bucketing.sources`) gives records; here they become entries."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from bucketing.download import Downloader
from bucketing.index import Rejection
from bucketing.sources.entries import ResolvedSource
from bucketing.sources.rows import PairedColumns, Record, collect, manifest_rows

ManifestReader = Callable[
    [str, dict[str, str], list[Rejection]],
    tuple[str, str | None, Iterable[Record], PairedColumns],
]


def resolve_manifest(
    path: str,
    reader: ManifestReader,
    column_map: dict[str, str],
    base_dir: str | None,
    downloader: Downloader | None,
    download_dir: str | None,
) -> ResolvedSource:
    """Entries for the manifest at ``path``, read by ``reader``; relative paths resolve
    against the manifest's folder."""
    path = os.path.abspath(path)
    rejections: list[Rejection] = []
    image, caption, records, paired = reader(path, column_map, rejections)
    rows = manifest_rows(records, image, caption, path, rejections, paired)
    entries, more = collect(rows, path, os.path.dirname(path), base_dir, downloader, download_dir)
    if not entries and not rejections and not more:
        raise ValueError(f"{path} lists no images; it needs one row per image")
    return ResolvedSource(entries, rejections + more)
