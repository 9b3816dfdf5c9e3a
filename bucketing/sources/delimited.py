"""Delimited manifests: ``.csv`` and ``.tsv``, with a header row or without one."""

from __future__ import annotations

import csv
import io
import itertools
from collections.abc import Iterable

from bucketing.download import is_url
from bucketing.index import Rejection
from bucketing.sources.entries import image_extensions, read_text
from bucketing.sources.rows import Record, pick_columns


def _looks_like_image_ref(cell: str) -> bool:
    cell = cell.strip().lower()
    return is_url(cell) or cell.endswith(image_extensions()) or cell.endswith(".avif")


def _read_delimited(
    path: str, delimiter: str, column_map: dict[str, str]
) -> tuple[str, str | None, Iterable[Record]]:
    """(image column, caption column, records) of a CSV/TSV. Without a header (the first cell
    is an image path or URL) the columns are ``image`` then ``caption`` (every further cell
    is another caption) and ``column_map`` does not apply."""
    csv.field_size_limit(1 << 30)
    reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter=delimiter)
    first = next(reader, None)
    if not first:  # no rows, or a blank first row
        raise ValueError(f"{path} is empty; it needs one row per image")
    if _looks_like_image_ref(first[0]):
        lines = itertools.chain([first], reader)
        records = (
            (f"line {reader.line_num}", {"image": row[0], "caption": row[1:]})
            for row in lines
            if row
        )
        if "image" not in column_map.values():
            column_map = {}
        return (*pick_columns(["image", "caption"], column_map, path), records)
    columns = [c.strip() for c in first]
    records = ((f"line {reader.line_num}", dict(zip(columns, row, strict=False))) for row in reader)
    return (*pick_columns(columns, column_map, path), records)


def read_csv(
    path: str, column_map: dict[str, str], rejections: list[Rejection]
) -> tuple[str, str | None, Iterable[Record]]:
    """(image column, caption column, records) of a comma-separated manifest."""
    return _read_delimited(path, ",", column_map)


def read_tsv(
    path: str, column_map: dict[str, str], rejections: list[Rejection]
) -> tuple[str, str | None, Iterable[Record]]:
    """(image column, caption column, records) of a tab-separated manifest."""
    return _read_delimited(path, "\t", column_map)
