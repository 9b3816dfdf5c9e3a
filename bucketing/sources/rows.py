"""Rows of (image path or URL, captions) from manifests, lists and dataset string columns,
turned into entries: columns picked, blank rows skipped, URLs fetched, local paths checked,
repeated images merged."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

from bucketing.download import Downloader, DownloadError, is_url
from bucketing.index import Rejection
from bucketing.sources.entries import (
    Entry,
    captions_of,
    local_path,
    local_problem,
    path_problem,
    real_base,
)

IMAGE_COLUMNS = ("image", "file_name", "path", "url", "image_path", "image_url", "filename")
CAPTION_COLUMNS = ("caption", "captions", "text", "prompt")

Record = tuple[str, dict]  # (where, e.g. "line 7"; the row as column -> cell)
Row = tuple[str, list[str], str]  # (image value, captions, where)


def pick_columns(
    columns: Sequence[str], column_map: dict[str, str], what: str
) -> tuple[str, str | None]:
    """(image column, caption column or None) from ``column_map`` or the defaults."""
    unknown = set(column_map) - {"image", "caption", "width", "height"}
    if unknown:
        raise ValueError(
            f"column_map keys are 'image', 'caption' (and 'width', 'height' for sizes from "
            f"the manifest); got {sorted(unknown)}"
        )
    hint = (
        f"{what} has columns {list(columns)}; say which to use with "
        "column_map={'image': '<column with paths or URLs>', 'caption': '<column>'}"
    )
    image = column_map.get("image") or next((c for c in IMAGE_COLUMNS if c in columns), None)
    if image is None or image not in columns:
        wanted = repr(image) if image else f"any of {list(IMAGE_COLUMNS)}"
        raise ValueError(f"no image column {wanted}: {hint}")
    caption = column_map.get("caption")
    if caption is not None and caption not in columns:
        raise ValueError(f"no caption column {caption!r}: {hint}")
    if caption is None:
        candidates = [c for c in CAPTION_COLUMNS if c in columns]
        caption = candidates[0] if candidates else None
        others = [c for c in dict.fromkeys(columns) if c != image]
        if caption is None and others:
            warnings.warn(
                f"{what}: no caption column (looked for {list(CAPTION_COLUMNS)}) among the "
                f"columns {list(columns)}; using {image!r} for images and no captions. To use "
                "one, pass column_map={'caption': '<column>'}",
                stacklevel=4,
            )
        elif len(candidates) > 1:
            warnings.warn(
                f"{what}: captions are read from {caption!r}, not from {candidates[1:]}; "
                "pass column_map={'caption': '<column>'} to choose",
                stacklevel=4,
            )
    return image, caption


def _is_blank(value: Any) -> bool:
    """True if ``value`` holds no text at all (None, NaN, blank strings, in any nesting)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, str):
            if item.strip():
                return False
        elif not (item is None or (isinstance(item, float) and item != item)):
            return False
    return True


def _image_value(value: Any, what: str) -> str | None:
    """The path/URL string of a manifest image cell (a string or an HF ``{"path", "bytes"}``)."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, dict):
        if isinstance(value.get("path"), str) and value["path"].strip():
            return value["path"].strip()
        if value.get("bytes"):
            raise ValueError(
                f"{what} embeds image bytes without paths; load it with "
                "datasets.Dataset.from_parquet(...) and pass the Dataset to scan"
            )
    return None


def manifest_rows(
    records: Iterable[Record],
    image: str,
    caption: str | None,
    origin: str,
    rejections: list[Rejection],
) -> Iterable[Row]:
    """(image value, captions, where) per record; blank records are skipped, records with
    content but no usable image value become ``no_image`` rejections."""
    for where, record in records:
        if _is_blank(record):
            continue
        value = _image_value(record.get(image), origin)
        if value is None:
            rejections.append(
                Rejection(f"{origin}:{where}", "no_image", f"no path or URL in column {image!r}")
            )
            continue
        captions = captions_of(record.get(caption)) if caption is not None else []
        yield value, captions, where


def collect(
    rows_in: Iterable[Row],
    origin: str,
    relative_to: str,
    base_dir: str | None,
    downloader: Downloader | None,
    download_dir: str | None,
) -> tuple[list[Entry], list[Rejection]]:
    """Entries for (image value, captions, where) rows of a manifest or list.

    URLs are fetched (in parallel) into the download cache and their entry is the
    local copy; local paths must exist (``missing_file``) and, with ``base_dir``,
    stay inside it (``outside_base_dir``). A path or URL seen before is a
    ``duplicate``: its captions are merged into the first entry and the row is
    recorded as a rejection, so nothing disappears silently. ``where`` (e.g.
    ``"line 7"``) goes into rejection details; a value that can be no path (a NUL, a lone
    surrogate) is a ``bad_row`` named ``origin:where``.
    """
    rows: list[Row] = []
    bad: list[Rejection] = []
    for value, captions, where in rows_in:
        problem = path_problem(value)
        if problem is None:
            rows.append((value, captions, where))
        else:
            bad.append(Rejection(f"{origin}:{where}", "bad_row", f"{problem}: {value!a:.200}"))
    urls = [value for value, _, _ in rows if is_url(value)]
    fetched: dict[str, str | DownloadError] = {}
    if urls:
        fetched = (downloader or Downloader(download_dir)).fetch_all(urls)
    base = real_base(base_dir)
    entries: list[Entry] = []
    rejections: list[Rejection] = bad
    first: dict[str, tuple[int, str]] = {}
    for value, captions, where in rows:
        keys = [value] if is_url(value) else [local_path(value, relative_to)]
        if is_url(value) and not isinstance(fetched[value], DownloadError):
            keys.append(fetched[value])
        hit = next((first[k] for k in keys if k in first), None)
        if hit is not None:
            slot, first_where = hit
            merged = entries[slot].captions
            merged.extend(c for c in captions if c not in merged)
            rejections.append(
                Rejection(keys[0], "duplicate", f"{where} repeats {first_where}; captions merged")
            )
            continue
        if is_url(value):
            got = fetched[value]
            if isinstance(got, DownloadError):
                rejections.append(Rejection(value, "download_failed", f"{where}: {got}"))
                continue
            path = got
        else:
            path = keys[0]
            problem = local_problem(path, base)
            if problem is not None:
                rejections.append(Rejection(path, problem[0], f"{where}: {problem[1]}"))
                continue
        for k in keys:
            first[k] = (len(entries), where)
        entries.append(Entry(path, list(captions), url=value if is_url(value) else None))
    return entries, rejections


def source_folder(base_dir: str | None) -> str:
    """Where relative paths of lists and datasets resolve: ``base_dir``, else the cwd."""
    return os.path.abspath(base_dir) if base_dir is not None else os.getcwd()
