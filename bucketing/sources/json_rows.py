"""JSON manifests: ``.jsonl`` (one object per line) and ``.json`` (a list of objects)."""

from __future__ import annotations

import json

from bucketing.index import Rejection
from bucketing.sources.entries import read_text
from bucketing.sources.rows import Record, pick_columns


def read_jsonl(path: str, rejections: list[Rejection]) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; bad lines become ``bad_row`` rejections."""
    rows = []
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            rejections.append(Rejection(f"{path}:line {lineno}", "bad_row", f"invalid JSON: {e}"))
            continue
        if not isinstance(obj, dict):
            rejections.append(
                Rejection(
                    f"{path}:line {lineno}", "bad_row", f"expected an object, got {obj!r:.60}"
                )
            )
            continue
        rows.append((lineno, obj))
    return rows


def read_jsonl_manifest(
    path: str, column_map: dict[str, str], rejections: list[Rejection]
) -> tuple[str, str | None, list[Record]]:
    """(image column, caption column, records) of a ``.jsonl`` manifest."""
    records = [(f"line {n}", row) for n, row in read_jsonl(path, rejections)]
    columns = list(dict.fromkeys(k for _, row in records for k in row))
    return (*pick_columns(columns, column_map, path), records)


def read_json_manifest(
    path: str, column_map: dict[str, str], rejections: list[Rejection]
) -> tuple[str, str | None, list[Record]]:
    """(image column, caption column, records) of a ``.json`` list of objects."""
    try:
        data = json.loads(read_text(path))
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path} must hold a JSON list of objects, one per image")
    columns = list(dict.fromkeys(k for row in data for k in row))
    if not columns:
        raise ValueError(f"{path} has no rows; it needs one row per image")
    records = [(f"item {i}", row) for i, row in enumerate(data)]
    return (*pick_columns(columns, column_map, path), records)
