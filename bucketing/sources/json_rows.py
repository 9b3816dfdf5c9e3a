"""JSON manifests: ``.jsonl`` (one object per line) and ``.json`` (a list of objects).

One bad row costs one ``bad_row`` rejection: a line or list item that is not valid JSON,
not an object, names a key twice (which value would count?) or nests deeper than Python's
JSON reader goes. A ``.json`` file that fails as a whole is read item by item to find them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from bucketing.index import Rejection
from bucketing.sources.entries import read_text
from bucketing.sources.rows import PairedColumns, Record, pick_columns, pick_paired


class _RepeatedKey(ValueError):
    pass


def _object(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _RepeatedKey(f"key {key!r} appears more than once")
    return obj


def _load(text: str) -> Any:
    """``json.loads`` refusing repeated keys; raises ValueError or RecursionError."""
    return json.loads(text, object_pairs_hook=_object)


def _row(text: str) -> dict | str:
    """The object in ``text``, or why it is not a usable row."""
    try:
        obj = _load(text)
    except RecursionError:
        return "nested deeper than the JSON reader allows"
    except _RepeatedKey as e:
        return str(e)
    except ValueError as e:
        return f"invalid JSON: {e}"
    return obj if isinstance(obj, dict) else f"expected an object, got {obj!r:.60}"


def read_jsonl(path: str, rejections: list[Rejection]) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; bad lines become ``bad_row`` rejections."""
    rows = []
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        row = _row(line)
        if isinstance(row, str):
            rejections.append(Rejection(f"{path}:line {lineno}", "bad_row", row))
        else:
            rows.append((lineno, row))
    return rows


def read_jsonl_manifest(
    path: str, column_map: dict[str, str], rejections: list[Rejection]
) -> tuple[str, str | None, list[Record], PairedColumns]:
    """(image column, caption column, records, paired columns) of a ``.jsonl`` manifest."""
    records = [(f"line {n}", row) for n, row in read_jsonl(path, rejections)]
    return _pick(records, column_map, path, rejections)


def _pick(
    records: list[Record], column_map: dict[str, str], path: str, rejections: list[Rejection]
) -> tuple[str, str | None, list[Record], PairedColumns]:
    """The columns of ``records`` picked; with only bad rows, nothing to pick (the rows'
    rejections say what was wrong)."""
    if not records and rejections:
        return column_map.get("image", "image"), None, [], PairedColumns()
    columns = list(dict.fromkeys(k for _, row in records for k in row))
    image, caption = pick_columns(columns, column_map, path)
    return image, caption, records, pick_paired(columns, column_map, path)


# strings (escapes included), brackets and commas: all a top-level split needs to see
_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|"|[\[\]{},]', re.S)


def _items(text: str) -> Iterator[str] | None:
    """The texts of the items of a top-level JSON list, found without parsing them (no
    recursion, however deep they nest); None if ``text`` is not a list whose brackets and
    strings balance."""
    body = text.strip()
    if not body.startswith("["):
        return None
    spans, depth, start = [], 0, 1
    for m in _TOKENS.finditer(body):
        token = m.group()
        if token == '"':
            return None  # a string never closed
        if token in "[{":
            depth += 1
        elif token in "]}":
            depth -= 1
            if depth == 0:
                if body[m.end() :].strip():
                    return None
                spans.append(body[start : m.start()])
                break
        elif token == "," and depth == 1:
            spans.append(body[start : m.start()])
            start = m.end()
    if depth != 0:
        return None
    if len(spans) == 1 and not spans[0].strip():
        return iter([])
    return iter(spans)


def read_json_manifest(
    path: str, column_map: dict[str, str], rejections: list[Rejection]
) -> tuple[str, str | None, list[Record], PairedColumns]:
    """(image column, caption column, records, paired columns) of a ``.json`` list."""
    text = read_text(path)
    try:
        data = _load(text)
        items = None
    except (ValueError, RecursionError) as e:
        items = _items(text)
        if items is None:
            raise ValueError(f"{path} is not a valid JSON list: {e}") from None
    records: list[Record] = []
    if items is None:
        if not isinstance(data, list):
            raise ValueError(f"{path} must hold a JSON list of objects, one per image")
        rows: Iterator[dict | str] = (
            r if isinstance(r, dict) else f"expected an object, got {r!r:.60}" for r in data
        )
    else:
        rows = (_row(item) for item in items)
    for i, row in enumerate(rows):
        if isinstance(row, str):
            rejections.append(Rejection(f"{path}:item {i}", "bad_row", row))
        else:
            records.append((f"item {i}", row))
    if not any(row for _, row in records) and not rejections:
        raise ValueError(f"{path} has no rows; it needs one row per image")
    return _pick(records, column_map, path, rejections)
