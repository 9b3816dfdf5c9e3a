"""A raw streamed row made uniform: its key, the image (encoded bytes or a local path), its
captions and, when the row says it, its (w, h); or the reason it cannot be used.

Columns: ``column_map`` names the ``image``, ``caption``, ``width``, ``height`` and ``key``
columns; otherwise the first present of the usual names (``image``, ``file_name``, ``path``,
... ; ``caption``, ``captions``, ``text``, ``prompt``; ``width`` / ``height``; ``__key__``,
``key``, ``id``; without a key column, the image's path, else ``shard:ordinal``). An image
cell may be bytes, a path (relative paths against ``base_dir``), or a ``datasets`` image cell
(``{"bytes": ..., "path": ...}``). A caption cell may hold one caption or a list (a row with
several prompts: one is picked per occurrence).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bucketing.sources.entries import captions_of, path_problem
from bucketing.sources.rows import CAPTION_COLUMNS, IMAGE_COLUMNS

KEY_COLUMNS = ("__key__", "key", "id")
COLUMN_ROLES = ("image", "caption", "width", "height", "key")


@dataclass(frozen=True)
class StreamRow:
    """One usable row: ``key`` (names it in rejections and seeds its randomness: the row's key
    column, else its image's path, else ``shard:ordinal``), ``image``
    (encoded bytes or a local path), ``captions`` and ``size`` (w, h) when the row carries
    it (img2dataset's ``width`` / ``height``), else None (read from the image's header)."""

    key: str
    image: bytes | str
    captions: list[str]
    size: tuple[int, int] | None


def _path_of(cell: Any) -> str | None:
    """The path an image cell names (a str, or a ``datasets`` cell's ``path``), else None."""
    if isinstance(cell, Mapping):
        cell = cell.get("path")
    return cell if isinstance(cell, str) and cell else None


class RowReader:
    """Turns raw row mappings into :class:`StreamRow` s (or a reason string)."""

    def __init__(
        self, column_map: Mapping[str, str] | None = None, base_dir: str | None = None
    ) -> None:
        column_map = dict(column_map or {})
        unknown = sorted(set(column_map) - set(COLUMN_ROLES))
        if unknown:
            raise ValueError(f"unknown column_map keys {unknown}; known: {', '.join(COLUMN_ROLES)}")
        self.column_map = column_map
        self.base_dir = base_dir

    def _column(self, data: Mapping[str, Any], role: str, defaults: tuple[str, ...]) -> str | None:
        if role in self.column_map:
            return self.column_map[role]
        return next((c for c in defaults if c in data), None)

    def __call__(self, data: Mapping[str, Any], default_key: str) -> StreamRow | tuple[str, str]:
        """The row, or ``(key, reason)`` when it cannot be used."""
        key_column = self._column(data, "key", KEY_COLUMNS)
        key = str(data[key_column]) if key_column and data.get(key_column) is not None else None
        key = key or _path_of(data.get(self._column(data, "image", IMAGE_COLUMNS) or "")) \
            or default_key
        if data.get("shard_error"):
            return key, data["shard_error"]
        if data.get("json_error"):
            return key, f"unreadable_metadata: {data['json_error']}"
        image_column = self._column(data, "image", IMAGE_COLUMNS)
        if image_column is None or data.get(image_column) is None:
            return key, "no_image: the row has no image" + (
                f" (column {image_column!r})" if image_column else "")
        image = self._image(data[image_column])
        if isinstance(image, tuple):
            return key, image[0]
        caption_column = self._column(data, "caption", CAPTION_COLUMNS)
        captions = captions_of(data.get(caption_column)) if caption_column else []
        size = self._size(data)
        if isinstance(size, str):
            return key, size
        return StreamRow(key, image, captions, size)

    def _image(self, value: Any) -> bytes | str | tuple[str]:
        if isinstance(value, Mapping):
            if value.get("bytes"):
                return bytes(value["bytes"])
            value = value.get("path")
            if not value:
                return ("no_image: the image cell has neither bytes nor a path",)
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        if isinstance(value, (str, os.PathLike)):
            path = os.fspath(value)
            problem = path_problem(path)
            if problem:
                return (f"bad_path: {problem}",)
            return path if os.path.isabs(path) or not self.base_dir else os.path.join(
                self.base_dir, path)
        return (f"unsupported_image: an image cell of type {type(value).__name__} (give "
                "bytes, a path, or a datasets image read with decode=False)",)

    def _size(self, data: Mapping[str, Any]) -> tuple[int, int] | None | str:
        w_col = self.column_map.get("width", "width")
        h_col = self.column_map.get("height", "height")
        w, h = data.get(w_col), data.get(h_col)
        if w is None or h is None:
            return None
        try:
            fw, fh = float(w), float(h)
        except (TypeError, ValueError):
            fw = fh = float("nan")
        if not (fw >= 1 and fh >= 1 and fw.is_integer() and fh.is_integer()):
            return f"bad_size: width/height {w!r} x {h!r} are not positive integers"
        return int(fw), int(fh)
