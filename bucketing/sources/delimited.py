"""Delimited manifests: ``.csv`` and ``.tsv``, with a header row or without one.

Rows that do not fit are never cut silently. Without a header (the first cell is an image
path or URL) a row is ``image<sep>caption`` and everything after the first separator is
that one caption, separators included (``a.jpg,a red car, parked``). With a header, cells
past the last column are joined back into it when it is the caption column (empty
trailing cells, as spreadsheets write them, are dropped); any other extra cell, and a row
whose quoting is broken, is a ``bad_row`` rejection naming its line. An image or caption
column named twice in the header is an error.
"""

from __future__ import annotations

import csv
import io
import itertools
from collections.abc import Iterator

from bucketing.download import is_url
from bucketing.index import Rejection
from bucketing.sources.entries import image_extensions, read_text
from bucketing.sources.rows import PairedColumns, Record, pick_columns, pick_paired


def _looks_like_image_ref(cell: str) -> bool:
    cell = cell.strip().lower()
    return is_url(cell) or cell.endswith(image_extensions()) or cell.endswith(".avif")


def _parse(
    text: str, delimiter: str, origin: str, rejections: list[Rejection]
) -> Iterator[tuple[int, list[str]]]:
    """(first line number, cells) per non-blank row. A row whose quoting is broken (a
    quote never closed, text after a closing quote) is a ``bad_row`` and reading goes on
    at the next line, so one stray quote cannot swallow the rest of the file."""
    lines = io.StringIO(text, newline="").readlines()
    start = 0
    while start < len(lines):
        reader = csv.reader(iter(lines[start:]), delimiter=delimiter, strict=True)
        done = 0  # lines consumed by complete rows
        try:
            for cells in reader:
                if cells:
                    yield start + done + 1, cells
                done = reader.line_num
            return
        except csv.Error as e:
            line = start + done + 1
            rejections.append(Rejection(f"{origin}:line {line}", "bad_row", f"bad quoting: {e}"))
            start = line  # skip the row's first line, read on from the next one


def _fit(
    cells: list[str], columns: list[str], caption: str | None, delimiter: str
) -> dict[str, str] | str:
    """The row as column -> cell, or why it does not fit the header."""
    if len(cells) <= len(columns):
        return dict(zip(columns, cells, strict=False))
    extra = cells[len(columns) :]
    while extra and not extra[-1].strip():
        extra.pop()  # trailing empty cells hold nothing
    if not extra:
        return dict(zip(columns, cells, strict=False))
    if columns[-1] != caption:
        return (
            f"{len(columns) + len(extra)} cells under the {len(columns)} columns "
            f"{columns}; quote cells that hold {delimiter!r}"
        )
    last = delimiter.join(cells[len(columns) - 1 : len(columns) + len(extra)])
    return {**dict(zip(columns[:-1], cells, strict=False)), columns[-1]: last}


def _read_delimited(
    path: str, delimiter: str, column_map: dict[str, str], rejections: list[Rejection]
) -> tuple[str, str | None, Iterator[Record], PairedColumns]:
    """(image column, caption column, records, paired columns) of a CSV/TSV (see the
    module's rules)."""
    csv.field_size_limit(1 << 30)
    rows = _parse(read_text(path), delimiter, path, rejections)
    first = next(rows, None)
    if first is None:
        raise ValueError(f"{path} is empty; it needs one row per image")
    if _looks_like_image_ref(first[1][0]):
        # only the image's own alpha can pair with a header-less row; a named column is an error
        paired = pick_paired(["image", "caption"], column_map, path)
        if "image" not in column_map.values():
            column_map = {}
        image, caption = pick_columns(["image", "caption"], column_map, path)

        def header_less() -> Iterator[Record]:
            for line, cells in itertools.chain([first], rows):
                rest = delimiter.join(cells[1:])
                yield f"line {line}", {"image": cells[0], "caption": rest}

        return image, caption, header_less(), paired
    columns = [c.strip() for c in first[1]]
    other = next((sep for sep in ";|\t," if sep != delimiter and sep in first[1][0]), None)
    if len(columns) == 1 and other is not None:
        raise ValueError(
            f"{path}: the first row {first[1][0]!r} is one cell split on {delimiter!r}, but it "
            f"looks separated by {other!r}; save it with {delimiter!r} between cells (a .csv "
            "uses commas, a .tsv tabs)"
        )
    image, caption = pick_columns(columns, column_map, path)

    def with_header() -> Iterator[Record]:
        for line, cells in rows:
            record = _fit(cells, columns, caption, delimiter)
            if isinstance(record, str):
                rejections.append(Rejection(f"{path}:line {line}", "bad_row", record))
            else:
                yield f"line {line}", record

    return image, caption, with_header(), pick_paired(columns, column_map, path)


def read_csv(
    path: str, column_map: dict[str, str], rejections: list[Rejection]
) -> tuple[str, str | None, Iterator[Record], PairedColumns]:
    """(image column, caption column, records, paired columns) of a comma-separated
    manifest."""
    return _read_delimited(path, ",", column_map, rejections)


def read_tsv(
    path: str, column_map: dict[str, str], rejections: list[Rejection]
) -> tuple[str, str | None, Iterator[Record], PairedColumns]:
    """(image column, caption column, records, paired columns) of a tab-separated
    manifest."""
    return _read_delimited(path, "\t", column_map, rejections)
