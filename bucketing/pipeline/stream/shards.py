"""What a streaming dataset reads: shards of raw rows, each read in order from a position.

A shard is read front to back and never indexed; ``rows(ordinal, token)`` starts at the row
numbered ``ordinal`` (0 for the shard's first row), found through ``token`` (what the previous
read said comes next: a byte offset in a tar file, the ordinal itself elsewhere), and yields
:class:`RawRow` s that say where the next row starts. ``fetch(tokens)`` reads again the rows
at some tokens (a restore refills its buffers so). Three kinds:

- :class:`TarShard`: a WebDataset / img2dataset tar, read with ``tarfile``'s streaming mode;
  consecutive members sharing a key (``dir/name`` up to the first dot of the file name) are
  one row: the image (any extension a folder scan takes: ``jpg``, ``png``, ``webp``, ...),
  its captions (``txt`` or ``caption``, one per non-empty line, as the map-style tar source
  reads them; else the ``caption`` of the ``json``) and the ``json``'s ``width`` /
  ``height``. A resume seeks to the byte offset of the next row's first member. A shard that
  is cut short or corrupt (or gone) ends with one row carrying ``shard_error``: the rows read
  before it are served, the rest is rejected with that reason.
- :class:`HFShard`: one shard of a ``datasets.IterableDataset`` (``dataset.shard``), its
  image column read with ``decode=False``; a resume skips rows (``dataset.skip``).
- :class:`RowsShard`: an in-memory sequence of row mappings (``row[i]`` is row ``i``).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bucketing.sources.entries import caption_lines, image_extensions

_HF_READ = 64  # rows fetched from a streaming dataset per read


@dataclass(frozen=True)
class RawRow:
    """One row as its shard stores it: ``ordinal`` (its number in the shard), ``token``
    (where it starts: pass it to ``fetch``), ``next_token`` (where the next row starts;
    None at the shard's end) and ``data`` (the row's fields)."""

    ordinal: int
    token: int
    next_token: int | None
    data: Mapping[str, Any]


class RowsShard:
    """A sequence of row mappings held in memory."""

    def __init__(self, rows: Sequence[Mapping[str, Any]], name: str = "rows") -> None:
        self.rows_ = rows
        self.name = name

    def rows(self, ordinal: int = 0, token: int | None = None) -> Iterator[RawRow]:
        """Rows from ``ordinal`` on."""
        n = len(self.rows_)
        for i in range(ordinal, n):
            yield RawRow(i, i, i + 1 if i + 1 < n else None, self.rows_[i])

    def fetch(self, tokens: Iterable[int]) -> dict[int, Mapping[str, Any]]:
        """The rows at ``tokens`` (ordinals)."""
        return {int(t): self.rows_[int(t)] for t in tokens}


class HFShard:
    """Shard ``index`` of a ``datasets.IterableDataset`` (``dataset.shard(num_shards,
    index)``), its image column ``image_column`` read as ``{"bytes", "path"}``.

    Rows are read with ``dataset.iter`` (never ``iter(dataset)``, which splits a dataset again
    by DataLoader worker inside a worker): this stream's split is its own."""

    def __init__(self, dataset: Any, index: int, image_column: str | None) -> None:
        self.dataset = dataset
        self.index = index
        self.image_column = image_column
        self.name = f"shard{index}"

    def _shard(self) -> Any:
        return self.dataset.shard(num_shards=self.dataset.num_shards, index=self.index)

    def rows(self, ordinal: int = 0, token: int | None = None) -> Iterator[RawRow]:
        """Rows from ``ordinal`` on (the first ``ordinal`` rows are read and skipped)."""
        shard = self._shard()
        if ordinal:
            shard = shard.skip(ordinal)
        pending: RawRow | None = None
        i = ordinal
        for batch in shard.iter(batch_size=_HF_READ):
            columns = list(batch)
            for values in zip(*(batch[c] for c in columns), strict=True):
                if pending is not None:
                    yield pending
                pending = RawRow(i, i, i + 1, dict(zip(columns, values, strict=True)))
                i += 1
        if pending is not None:
            yield RawRow(pending.ordinal, pending.token, None, pending.data)

    def fetch(self, tokens: Iterable[int]) -> dict[int, Mapping[str, Any]]:
        """The rows at ``tokens`` (ordinals), read in one pass from the smallest."""
        wanted = sorted({int(t) for t in tokens})
        found: dict[int, Mapping[str, Any]] = {}
        if not wanted:
            return found
        for row in self.rows(wanted[0]):
            if row.ordinal in wanted:
                found[row.ordinal] = row.data
                if len(found) == len(wanted):
                    break
        return found


def tar_key(name: str) -> tuple[str, str]:
    """A WebDataset member name's (key, extension): the path up to the first dot of the file
    name, and the rest, lower-cased (``"a/000012.jpg"`` -> ``("a/000012", "jpg")``)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class TarShard:
    """A WebDataset / img2dataset tar file read front to back (``tarfile`` mode ``"r|"``)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.name = os.path.basename(self.path)

    def rows(self, ordinal: int = 0, token: int | None = None) -> Iterator[RawRow]:
        """Rows from ``ordinal``, the one starting at byte ``token`` (0: the file's start)."""
        start = int(token or 0)
        group: list[tuple[str, bytes]] = []
        key = None
        row_start = start
        i = ordinal
        try:
            with open(self.path, "rb") as f:
                f.seek(start)
                with tarfile.open(fileobj=f, mode="r|") as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        member_key, ext = tar_key(member.name)
                        if key is not None and member_key != key:
                            here = start + member.offset
                            yield RawRow(i, row_start, here, _tar_row(key, group))
                            i += 1
                            group, row_start = [], here
                        key = member_key
                        reader = tar.extractfile(member)
                        group.append((ext, reader.read() if reader is not None else b""))
        except (OSError, tarfile.TarError, EOFError) as error:
            # a cut or corrupt shard: what was read is served, the rest is one rejection
            where = f"{self.name}@{row_start}"
            yield RawRow(i, row_start, None, {"__key__": key or where, "shard_error": (
                f"unreadable_shard: {self.path} from byte {row_start}: "
                f"{type(error).__name__}: {error}")})
            return
        if key is not None:
            yield RawRow(i, row_start, None, _tar_row(key, group))

    def fetch(self, tokens: Iterable[int]) -> dict[int, Mapping[str, Any]]:
        """The rows starting at the byte offsets ``tokens`` (one seek each)."""
        found: dict[int, Mapping[str, Any]] = {}
        for token in sorted({int(t) for t in tokens}):
            row = next(self.rows(0, token), None)
            if row is None:
                raise ValueError(f"{self.path}: no row at byte {token} (the file changed?)")
            found[token] = row.data
        return found


def _tar_row(key: str, members: list[tuple[str, bytes]]) -> dict[str, Any]:
    """The fields of one tar sample: ``__key__``, ``image`` (bytes) and ``image_ext``, and
    ``caption``, ``width``, ``height`` when the ``txt`` / ``json`` members say them."""
    row: dict[str, Any] = {"__key__": key}
    meta: Any = None
    for ext, data in members:
        if "." + ext in image_extensions() and "image" not in row:
            row["image"], row["image_ext"] = data, ext
        elif ext in ("txt", "caption"):
            row["caption"] = caption_lines(data.decode("utf-8", errors="replace"))
        elif ext == "json":
            try:
                meta = json.load(io.BytesIO(data))
            except ValueError as error:
                row["json_error"] = f"unreadable json: {error}"
    if isinstance(meta, dict):
        for field in ("width", "height"):
            if field in meta:
                row[field] = meta[field]
        if "caption" not in row and meta.get("caption") is not None:
            row["caption"] = meta["caption"]
    return row
