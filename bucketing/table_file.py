"""Versioned table files: every table this library writes (the scan cache, a saved index) is
saved and read back through here.

A file carries its identity in the schema metadata (``format``, ``version`` and whatever
else the writer pins, e.g. the header reader's version). :func:`load_table` checks the
container's magic bytes, then that identity, then the columns, and raises
:class:`TableFileError` (a ``ValueError``) saying what it found instead: a file of another
format, another version, another program, or no table at all is never misread. Writes are
atomic (``bucketing.atomic``). Two containers, told apart by their magic bytes:

- parquet (``PAR1``): compact; read into memory;
- Arrow IPC (``ARROW1``; an index saved to a ``.arrow`` path): uncompressed and memory-mapped
  on load, so every process on a machine that opens the same file shares its pages.

Only strings, integers and lists of them are stored; nothing in a file can execute code
(no pickle, and pyarrow's extension types are never registered here).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from bucketing.atomic import atomic_path, check_replaceable

__all__ = [
    "ARROW_SUFFIX", "TableFileError", "column_names", "has_format", "load_table", "save_table",
]

ARROW_SUFFIX = ".arrow"
_MAGIC = {b"PAR1": "parquet", b"ARROW1": "arrow"}


class TableFileError(ValueError):
    """A file that is not the table asked for (another format, version or program, or no
    parquet/Arrow file at all)."""


def save_table(
    path: str | os.PathLike, table: pa.Table, meta: Mapping[str, str], arrow: bool = False
) -> None:
    """Write ``table`` with ``meta`` as its schema metadata, atomically: parquet, or with
    ``arrow`` an Arrow IPC file (uncompressed, memory-mappable). An existing file at ``path``
    is replaced only if it is a table of the same ``meta["format"]`` (any version): anything
    else (an image, a manifest, another program's parquet) raises ``FileExistsError``."""
    check_replaceable(path, ours=lambda real: has_format(real, meta["format"]),
                      what=f"a {meta['format']} file")
    table = table.replace_schema_metadata(dict(meta))
    with atomic_path(path) as tmp:
        if arrow:
            with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
        else:
            pq.write_table(table, tmp)


def load_table(
    path: str | os.PathLike,
    meta: Mapping[str, str],
    columns: Sequence[str],
    what: str,
    types: Mapping[str, pa.DataType] | None = None,
) -> pa.Table:
    """Read a table written by :func:`save_table` whose metadata holds ``meta``, whose
    columns are ``columns`` and, for those in ``types``, of those types; ``what`` names the
    expected file in errors (e.g. ``"an aspect-bucketing index"``). Arrow files come back
    memory-mapped (zero-copy) after a full validation of every buffer (offsets monotone and
    within their buffers, lengths, UTF-8): a damaged file is a :class:`TableFileError`,
    never a crash or bytes read from outside a buffer."""
    path = os.fspath(path)
    kind = _container(path)
    if kind is None:
        raise TableFileError(f"{path} is not {what}: neither a parquet nor an Arrow file")
    try:
        if kind == "parquet":
            schema = pq.read_schema(path)
        else:
            reader = pa.ipc.open_file(pa.memory_map(path, "r"))
            schema = reader.schema
    except (pa.ArrowException, OSError) as e:
        raise TableFileError(f"{path} is not {what}: unreadable {kind} file ({e})") from None
    found = {k.decode(errors="replace"): v.decode(errors="replace")
             for k, v in (schema.metadata or {}).items()}  # fmt: skip
    wrong = {k: found.get(k) for k, v in meta.items() if found.get(k) != v}
    if wrong:
        said = " ".join(f"{k}={v!r}" for k, v in wrong.items())
        wanted = " ".join(f"{k}={meta[k]!r}" for k in wrong)
        raise TableFileError(f"{path} is not {what} ({wanted}); found {said}")
    if list(schema.names) != list(columns):
        raise TableFileError(
            f"{path} is not {what}: columns {schema.names}, expected {list(columns)}"
        )
    for name, want in (types or {}).items():
        if schema.field(name).type != want:
            raise TableFileError(f"{path} is not {what}: column {name} is "
                                 f"{schema.field(name).type}, expected {want}")
    try:
        if kind == "parquet":
            return pq.read_table(path)
        table = reader.read_all()
        table.validate(full=True)
        return table
    except (pa.ArrowException, OSError) as e:
        raise TableFileError(f"{path} is not {what}: unreadable or damaged {kind} file "
                             f"({e})") from None


def has_format(path: str | os.PathLike, fmt: str) -> bool:
    """True if ``path`` is a parquet or Arrow file whose metadata says ``format=fmt`` (any
    version): a file this library wrote and may replace. Reads only the footer/schema."""
    path = os.fspath(path)
    try:
        kind = _container(path)
        if kind == "parquet":
            schema = pq.read_schema(path)
        elif kind == "arrow":
            schema = pa.ipc.open_file(pa.memory_map(path, "r")).schema
        else:
            return False
    except (pa.ArrowException, OSError, ValueError):
        return False
    return (schema.metadata or {}).get(b"format") == fmt.encode()


def column_names(path: str | os.PathLike) -> list[str]:
    """The column names of a parquet or Arrow file (reads only the footer/schema); [] when it
    is neither (:func:`load_table` then says what it is)."""
    path = os.fspath(path)
    try:
        kind = _container(path)
        if kind == "parquet":
            return list(pq.read_schema(path).names)
        if kind == "arrow":
            return list(pa.ipc.open_file(pa.memory_map(path, "r")).schema.names)
    except (pa.ArrowException, OSError, ValueError):
        pass
    return []


def _container(path: str) -> str | None:
    """``"parquet"`` or ``"arrow"`` from the file's leading magic bytes, else None."""
    with open(path, "rb") as f:
        head = f.read(6)
    return next((kind for magic, kind in _MAGIC.items() if head.startswith(magic)), None)
