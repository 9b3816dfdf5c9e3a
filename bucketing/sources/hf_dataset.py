"""``datasets.Dataset`` sources: an ``Image`` column (files or embedded bytes) or a string
column of paths/URLs, given as a dataset or built by ``datasets.load_dataset``
(:func:`load_source`: ``"hf:NAME"``, or a builder name with ``data_files``/``data_dir``).
``datasets`` is imported only when such a source is resolved."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from bucketing.download import Downloader
from bucketing.index import Rejection
from bucketing.sources.entries import (
    Entry,
    ResolvedSource,
    captions_of,
    local_path,
    local_problem,
    path_problem,
    read_regular_file,
    real_base,
)
from bucketing.sources.rows import (
    PairedColumns,
    collect,
    manifest_rows,
    paired_paths,
    pick_columns,
    pick_paired,
    source_folder,
)

HF_PREFIX = "hf:"


def load_source(
    source: Any,
    data_files: Any = None,
    data_dir: str | os.PathLike | None = None,
    split: str = "train",
    streaming: bool = False,
) -> Any:
    """``source`` itself, or the ``split`` of ``datasets.load_dataset(NAME, data_files=...,
    data_dir=...)`` when ``source`` is written ``"hf:NAME"`` (``"hf:imagefolder"``,
    ``"hf:user/dataset"``) or ``data_files``/``data_dir`` is given (``source`` is then the
    builder name, Hub id or dataset folder: ``"imagefolder"``, ``"csv"``, ``"parquet"``).
    Paths, globs, brace ranges and URLs without those keep their meaning. ``streaming``: load
    a ``datasets.IterableDataset`` (``load_dataset(..., streaming=True)``)."""
    named = isinstance(source, str) and source.startswith(HF_PREFIX)
    if not named and data_files is None and data_dir is None:
        if split != "train":
            raise ValueError(
                f"split={split!r} picks a split of a datasets.load_dataset source: write the "
                "source as 'hf:NAME' or give data_files=/data_dir="
            )
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"data_files=/data_dir= go to datasets.load_dataset with a builder name or dataset "
            f"id as source (e.g. 'imagefolder', 'csv', 'user/dataset'); got a "
            f"{type(source).__name__}"
        )
    name = os.fspath(source)[len(HF_PREFIX) :] if named else os.fspath(source)
    if not name:
        raise ValueError("'hf:' needs a dataset name: 'hf:imagefolder', 'hf:user/dataset'")
    import datasets

    return datasets.load_dataset(
        name,
        data_files=data_files,
        data_dir=None if data_dir is None else os.fspath(data_dir),
        split=split,
        streaming=streaming,
    )


class RowBytes:
    """Picklable ``row -> bytes`` reader over a ``datasets.Dataset`` image column.

    ``rows[i]`` is the dataset row behind row ``i``; a row's embedded bytes are
    returned when present, else its file is read. ``take(rows)`` re-numbers rows
    (e.g. to the accepted subset of a scan) without copying the dataset.
    """

    def __init__(
        self, dataset: Any, column: str, rows: Sequence[int] | None = None, root: str = ""
    ) -> None:
        self.dataset = dataset
        self.column = column
        self.rows = np.arange(len(dataset)) if rows is None else np.asarray(rows, np.int64)
        self.root = root  # folder that relative stored paths are relative to

    def __len__(self) -> int:
        return len(self.rows)

    def __call__(self, row: int) -> bytes:
        """The encoded image bytes of row ``row`` (embedded bytes, else its file's: only a
        regular file is read, so a file swapped for a FIFO cannot block a worker)."""
        value = self.dataset[int(self.rows[row])][self.column]
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            return read_regular_file(local_path(value["path"], self.root))
        raise ValueError(f"dataset row {self.rows[row]} has neither image bytes nor a path")

    def take(self, rows: Iterable[int]) -> RowBytes:
        """A reader whose row ``i`` is this reader's row ``rows[i]``."""
        return RowBytes(
            self.dataset, self.column, self.rows[np.asarray(list(rows), np.int64)], self.root
        )


def resolve_dataset(
    dataset: Any,
    column_map: dict[str, str],
    base_dir: str | None,
    downloader: Downloader | None,
    download_dir: str | None,
) -> ResolvedSource:
    """Entries for a ``datasets.Dataset``: one per row, ``Entry.row`` = the dataset row.

    An ``Image`` column is read with ``decode=False``: a row whose stored path exists
    on disk is scanned from that file, a row with only bytes through ``blobs``. A
    string column holds paths or URLs and is treated like a manifest column
    (relative paths against ``base_dir`` or the current folder; no ``blobs``).
    Conditioning-image and mask columns (see ``pick_paired``) hold paths, or ``Image``
    cells whose file is on disk; a paired image held only as embedded bytes is an
    ``unreadable_pair`` rejection (not supported yet).
    """
    import datasets

    columns = list(dataset.column_names)
    image_columns = [c for c in columns if isinstance(dataset.features[c], datasets.Image)]
    if "image" not in column_map and image_columns:
        column_map = {**column_map, "image": image_columns[0]}
    image, caption = pick_columns(columns, column_map, "the dataset")
    paired = pick_paired(columns, column_map, "the dataset")
    for column in paired.wanted:
        if isinstance(dataset.features[column], datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    relative_to = source_folder(base_dir)
    if not isinstance(dataset.features[image], datasets.Image):
        rejections: list[Rejection] = []
        wanted = list(dict.fromkeys([image] + ([caption] if caption else []) + paired.wanted))
        records = ((f"row {i}", row) for i, row in enumerate(dataset.select_columns(wanted)))
        rows = manifest_rows(records, image, caption, "dataset", rejections, paired)
        entries, more = collect(rows, "dataset", relative_to, base_dir, downloader, download_dir)
        return ResolvedSource(entries, rejections + more)
    images = dataset.cast_column(image, datasets.Image(decode=False)).select_columns([image])
    resolved = _resolve_image_column(images, image, dataset, caption, relative_to, base_dir)
    if paired:
        resolved = _with_pairs(resolved, dataset, paired, relative_to, base_dir)
    return resolved


def _with_pairs(
    resolved: ResolvedSource,
    dataset: Any,
    paired: PairedColumns,
    relative_to: str,
    base_dir: str | None,
) -> ResolvedSource:
    """``resolved`` with each entry's paired files (paths, or ``Image`` cells with a file);
    rows whose paired file is unusable become rejections."""
    base = real_base(base_dir)
    columns = dataset.select_columns(paired.wanted) if paired.wanted else None
    entries: list[Entry] = []
    rejections = list(resolved.rejections)
    for entry in resolved.entries:
        record = columns[int(entry.row)] if columns is not None else {}
        embedded = [c for c in paired.wanted if isinstance(record.get(c), dict)
                    and record[c].get("bytes") and not record[c].get("path")]  # fmt: skip
        if embedded:
            rejections.append(Rejection(entry.label, "unreadable_pair", f"row {entry.row}: "
                              f"{embedded[0]!r} holds embedded bytes without a file; paired "
                              "images are read from files (not supported yet)"))  # fmt: skip
            continue
        got = paired_paths(paired.values(record, "the dataset"), relative_to, base, {})
        if isinstance(got[0], str):
            rejections.append(Rejection(entry.label, got[0], f"row {entry.row}: {got[1]}"))
            continue
        entries.append(entry._replace(conditioning=got[0], mask=got[1]))
    return ResolvedSource(entries, rejections, resolved.blobs)


def _resolve_image_column(
    images: Any,
    image: str,
    dataset: Any,
    caption: str | None,
    relative_to: str,
    base_dir: str | None,
) -> ResolvedSource:
    """Entries for an undecoded ``Image`` column: files on disk, else embedded bytes."""
    import pyarrow.compute as pc

    table = images.with_format("arrow")
    base = real_base(base_dir)
    entries: list[Entry] = []
    rejections: list[Rejection] = []
    any_blob = False
    caption_rows = dataset.select_columns([caption]) if caption else None
    step = 4096
    for start in range(0, len(images), step):
        cells = table[start : start + step][image].combine_chunks()
        paths = cells.field("path").to_pylist()
        has_bytes = pc.fill_null(pc.greater(pc.binary_length(cells.field("bytes")), 0), False)
        caps = caption_rows[start : start + step][caption] if caption else [None] * len(paths)
        for offset, (stored, blob) in enumerate(zip(paths, has_bytes.to_pylist(), strict=True)):
            row = start + offset
            captions = captions_of(caps[offset])
            if stored and (problem := path_problem(stored)) is not None:
                if not blob:  # no file name can be that: no file, no bytes
                    rejections.append(Rejection(f"dataset[{row}]", "bad_row", problem))
                    continue
                stored = None  # only a label: the bytes are the image
            local = local_path(stored, relative_to) if stored else None
            # with bytes at hand, a relative stored path is only a name (HF embeds the
            # basename): trust a path over the bytes only when it is absolute
            trusted = local is not None and (not blob or os.path.isabs(stored))
            if trusted and os.path.isfile(local):
                problem = local_problem(local, base)
                if problem is None:
                    entries.append(Entry(local, captions, row))
                else:
                    rejections.append(Rejection(local, problem[0], f"row {row}: {problem[1]}"))
            elif blob:
                any_blob = True
                label = f"dataset[{row}]" + (f":{stored}" if stored else "")
                entries.append(Entry(label, captions, row))
            elif local is not None:
                rejections.append(Rejection(local, "missing_file", f"row {row}: no such file"))
            else:
                rejections.append(
                    Rejection(f"dataset[{row}]", "no_image", "neither bytes nor path")
                )
    blobs = RowBytes(images, image, root=relative_to) if any_blob else None
    return ResolvedSource(entries, rejections, blobs)
