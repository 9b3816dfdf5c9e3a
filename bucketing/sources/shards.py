"""Parquet manifests as columns: one file or many shards read as one source.

A source of shards is a folder holding ``.parquet`` files and no images or subfolders, a
glob such as ``"laion/**/*.parquet"``, or a list of ``.parquet`` paths. Shards are read
in parallel (pyarrow threads), in sorted path order, and normalised with pyarrow compute
(trimmed paths made absolute against their shard's folder, captions trimmed and blanks
dropped): no Python object per row.

:func:`read_manifest_columns` is what ``scan(..., sizes="manifest")`` indexes: image paths,
captions and the manifest's ``width``/``height``, never touching an image file;
repeated paths are merged (captions of the repeats added to the first row) and recorded
as ``duplicate``. :func:`resolve_shards` lists shards as entries for a header scan.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bucketing.download import Downloader
from bucketing.index import Rejection
from bucketing.sources.braces import brace_list
from bucketing.sources.entries import (
    ResolvedSource,
    image_extensions,
    local_path,
    path_problem,
    real_base,
)
from bucketing.sources.rows import NO_PAIRS, Row, collect, pick_columns, pick_paired, source_folder

SIZE_COLUMNS = {"width": ("width", "WIDTH"), "height": ("height", "HEIGHT")}
_BATCH_ROWS = 1 << 15  # rows of a shard normalised at a time
_READERS = 4  # shards read at once: each holds one batch's intermediate copies
_GLOB_CHARS = ("*", "?", "[")
_URL = r"^(?i:https?://)"
_NOT_NORMAL = r"//|/\.\.?(/|$)|/$"  # what os.path.normpath would change in an absolute path


def parquet_shards(source: Any) -> list[str] | None:
    """The sorted ``.parquet`` files of ``source`` when it is a set of shards (a folder
    holding ``.parquet`` files and no images or subfolders, a glob, a list of ``.parquet``
    paths, a brace range), else None. A glob that matches no ``.parquet`` file raises."""
    names = brace_list(source)
    if names is not None:
        source = names
    if isinstance(source, (list, tuple)):
        names = [os.fspath(s) for s in source if isinstance(s, (str, os.PathLike))]
        if source and len(names) == len(source) and all(_is_parquet(n) for n in names):
            return [os.path.abspath(n) for n in names]
        return None
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = os.fspath(source)
    if os.path.isdir(path):
        return _folder_shards(path)
    if os.path.exists(path) or not any(c in path for c in _GLOB_CHARS):
        return None
    shards = sorted(os.path.abspath(f) for f in glob.glob(path, recursive=True) if _is_parquet(f))
    if not shards:
        raise FileNotFoundError(f"no .parquet file matches {path!r}")
    return shards


def _folder_shards(folder: str) -> list[str] | None:
    """The ``.parquet`` files of ``folder`` if it holds nothing else that a folder scan
    would list (no image, no subfolder, nothing unreadable); else None."""
    shards = []
    try:
        with os.scandir(folder) as it:
            for child in it:
                if child.is_dir() or child.name.lower().endswith(image_extensions()):
                    return None
                if _is_parquet(child.name) and child.is_file():
                    shards.append(os.path.abspath(child.path))
    except OSError:  # a link loop, an unreadable folder: the folder scan reports it
        return None
    return sorted(shards) or None


def _is_parquet(name: str) -> bool:
    return name.lower().endswith(".parquet")


@dataclass
class _Shard:
    """One shard, or one batch of its rows, normalised: ``values`` (trimmed image values,
    absolute for local paths, null where blank), ``captions`` (``large_list<large_string>``),
    optional sizes, and ``rows`` (the shard's row number of each kept row; blank rows
    dropped)."""

    path: str
    values: pa.Array
    captions: pa.Array
    width: np.ndarray | None
    height: np.ndarray | None
    rows: np.ndarray


def _read_shards(
    files: Sequence[str], column_map: dict[str, str], sizes: bool
) -> tuple[str, list[_Shard]]:
    """(image column, every shard normalised as batches of rows), read in parallel in the
    order of ``files``. Each shard streams in batches of ``_BATCH_ROWS`` rows: what is kept
    of a batch is its normalised columns, never the whole table's intermediate copies."""
    schema = pq.read_schema(files[0])
    image, caption = pick_columns(schema.names, column_map, files[0])
    _refuse_pairs(schema.names, column_map, files[0])
    size_columns = [_size_column(schema.names, column_map, k, files[0]) for k in SIZE_COLUMNS]
    wanted = [image] + ([caption] if caption else []) + (size_columns if sizes else [])

    def read(path: str) -> list[_Shard]:
        with pq.ParquetFile(path) as reader:
            names = reader.schema_arrow.names
            missing = [c for c in wanted if c not in names]
            if missing:
                raise ValueError(f"shard {path} has no column {missing[0]!r} (columns {names})")
            pieces, first = [], 0
            for batch in reader.iter_batches(_BATCH_ROWS, columns=wanted, use_threads=False):
                table = pa.Table.from_batches([batch])
                pieces.append(_normalise(path, os.path.dirname(path), table, image, caption,
                                         size_columns if sizes else None, first))  # fmt: skip
                first += batch.num_rows
                del batch, table
                _release()  # this thread's freed intermediates, back to the system
        if not pieces:  # no rows: one empty piece keeps the column types
            table = pq.read_table(path, columns=wanted)
            pieces.append(_normalise(path, os.path.dirname(path), table, image, caption,
                                     size_columns if sizes else None, 0))  # fmt: skip
        return pieces

    workers = min(len(files), os.cpu_count() or 1, _READERS)
    with ThreadPoolExecutor(workers) as pool:
        return image, [piece for pieces in pool.map(read, files) for piece in pieces]


def _read_dataset(
    dataset: Any, column_map: dict[str, str], base_dir: str | None
) -> tuple[str, list[_Shard]]:
    """A ``datasets.Dataset`` with a column of paths and size columns, as one shard (its
    Arrow table, memory-mapped by ``datasets``); relative paths against ``base_dir`` or the
    current folder."""
    names = list(dataset.column_names)
    image, caption = pick_columns(names, column_map, "the dataset")
    _refuse_pairs(names, column_map, "the dataset")
    size_columns = [_size_column(names, column_map, k, "the dataset") for k in SIZE_COLUMNS]
    wanted = [image] + ([caption] if caption else []) + size_columns
    table = dataset.select_columns(wanted).with_format("arrow")[:]
    return image, [_normalise("dataset", source_folder(base_dir), table, image, caption,
                              size_columns)]  # fmt: skip


def _refuse_pairs(names: Sequence[str], column_map: dict[str, str], what: str) -> None:
    """Paired files (conditioning images, masks) are read from single manifests with headers;
    shards and sizes from the manifest would drop them, so they raise instead."""
    paired = pick_paired(names, column_map, what)
    if paired:
        raise ValueError(
            f"{what} names conditioning images or a loss mask ({paired.wanted or ['alpha']}); "
            "paired files are read from one manifest file scanned with sizes='headers', not "
            "from parquet shards or sizes='manifest' (yet)"
        )


def _size_column(names: Sequence[str], column_map: dict[str, str], key: str, what: str) -> str:
    name = column_map.get(key) or next((c for c in SIZE_COLUMNS[key] if c in names), None)
    if name is None or name not in names:
        wanted = repr(name) if name else f"any of {list(SIZE_COLUMNS[key])}"
        raise ValueError(
            f"sizes='manifest' needs a {key} column, {what} has no {wanted} (columns "
            f"{list(names)}); name it with column_map={{'{key}': '<column>'}}"
        )
    return name


def _sizes(column: pa.ChunkedArray, path: str) -> np.ndarray:
    """int64 sizes with -1 for nulls; non-integral values raise."""
    try:
        values = pc.cast(column, pa.int64())
    except pa.ArrowInvalid as e:
        raise ValueError(f"{path}: column {column.type} is not whole pixel counts ({e})") from None
    return pc.fill_null(values, -1).to_numpy()


def _text(column: pa.ChunkedArray) -> pa.Array:
    """A string-like column as trimmed ``large_string``; blanks become null."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_struct(column.type):  # an HF Image column: {"bytes", "path"}
        column = column.field("path")
    trimmed = pc.utf8_trim_whitespace(column.cast(pa.large_string()))
    return pc.if_else(pc.equal(trimmed, ""), pa.scalar(None, pa.large_string()), trimmed)


def _captions(column: pa.ChunkedArray | None, n: int) -> pa.Array:
    """Captions per row as ``large_list<large_string>``: trimmed, blanks and nulls dropped;
    a string column gives one caption per row, a list column its items."""
    if column is None:
        return pa.array([[]] * n, pa.large_list(pa.large_string()))
    column = column.combine_chunks()
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        texts, parents = _text(pc.list_flatten(column)), pc.list_parent_indices(column)
    else:
        texts, parents = _text(column), pa.array(np.arange(n))
    keep = pc.is_valid(texts)
    counts = np.bincount(pc.filter(parents, keep).to_numpy(), minlength=n)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return pa.LargeListArray.from_arrays(pa.array(offsets), pc.filter(texts, keep))


def _normalise(
    path: str,
    folder: str,
    table: pa.Table,
    image_column: str,
    caption_column: str | None,
    size_columns: list[str] | None,
    first_row: int = 0,
) -> _Shard:
    """``table``'s rows (rows ``first_row`` on of the shard) as a shard labelled ``path``;
    relative paths against ``folder``."""
    width = height = None
    if size_columns is not None:
        width, height = (_sizes(table[c], path) for c in size_columns)
    caption = table[caption_column] if caption_column else None
    image = table[image_column].combine_chunks()
    if pa.types.is_struct(image.type) and "bytes" in image.type.names:
        embedded = pc.and_(pc.is_null(image.field("path")), pc.is_valid(image.field("bytes")))
        if pc.any(embedded).as_py():
            raise ValueError(
                f"{path} embeds image bytes without paths; scan it with sizes='headers' "
                "(a parquet file: load it with datasets.Dataset.from_parquet(...) first)"
            )
    values = _text(image)
    captions = _captions(caption, len(image))
    blank = pc.and_(pc.is_null(values), pc.equal(pc.list_value_length(captions), 0))
    keep = pc.invert(blank)
    values, captions = pc.filter(values, keep), pc.filter(captions, keep)
    rows = np.flatnonzero(keep.to_numpy(zero_copy_only=False))
    if width is not None:
        width, height = width[rows], height[rows]
    return _Shard(path, _absolute(values, folder), captions, width, height, rows + first_row)


def _absolute(values: pa.Array, folder: str) -> pa.Array:
    """Local values as absolute normalised paths (``entries.local_path``) against
    ``folder``; URLs and nulls unchanged. Vectorised; only rows that ``os.path.normpath``
    would change (``..``, ``//``, ``~``) go through Python."""
    url = pc.fill_null(pc.match_substring_regex(values, _URL), True)
    relative = pc.and_(pc.invert(url), pc.invert(pc.starts_with(values, "/")))
    prefix, slash = pa.scalar(folder, pa.large_string()), pa.scalar("/", pa.large_string())
    joined = pc.if_else(relative, pc.binary_join_element_wise(prefix, values, slash), values)
    odd = pc.and_(pc.invert(url), pc.or_(pc.match_substring_regex(joined, _NOT_NORMAL),
                                         pc.starts_with(values, "~")))  # fmt: skip
    odd = pc.fill_null(odd, False)
    if not pc.any(odd).as_py():
        return joined
    fixed = [local_path(v, folder) for v in pc.filter(values, odd).to_pylist()]
    return pc.replace_with_mask(joined, odd, pa.array(fixed, pa.large_string()))


@dataclass
class ManifestColumns:
    """What a parquet manifest says, as columns: accepted ``paths`` (absolute, normalised),
    ``captions`` (``large_list<large_string>``), ``width``/``height`` (int64, from the
    manifest) and the ``rejections`` of listing (``no_image``, ``duplicate``, ``bad_row``,
    ``outside_base_dir``)."""

    paths: pa.Array
    captions: pa.Array
    width: np.ndarray
    height: np.ndarray
    rejections: list[Rejection]


def read_manifest_columns(
    source: Any, column_map: dict[str, str], base_dir: str | None
) -> ManifestColumns:
    """Paths, captions and sizes of a parquet manifest (one file, or shards: see
    :func:`parquet_shards`) without touching any image file: no stat, no header. Rows
    without a usable width and height are ``bad_row``; URLs are refused (sizes from a
    manifest are for local files: download first or scan with ``sizes="headers"``)."""
    files = parquet_shards(source)
    if files is None and isinstance(source, (str, os.PathLike)) and _is_parquet(os.fspath(source)):
        files = [os.path.abspath(os.fspath(source))] if os.path.isfile(source) else None
    if files is not None:
        image, shards = _read_shards(files, column_map, sizes=True)
    elif type(source).__module__.startswith("datasets") and type(source).__name__ == "Dataset":
        image, shards = _read_dataset(source, column_map, base_dir)
    else:
        raise ValueError(
            f"sizes='manifest' reads parquet manifests (a .parquet file, a folder or glob of "
            f".parquet shards, a list of .parquet paths) and datasets.Dataset; got "
            f"{source!r:.80}. Use sizes='headers' for other sources"
        )
    several = len({shard.path for shard in shards}) > 1
    rejections: list[Rejection] = []
    for k, shard in enumerate(shards):
        valid = pc.is_valid(shard.values)
        for j in np.flatnonzero(~valid.to_numpy(zero_copy_only=False)):
            row = int(shard.rows[j])
            rejections.append(
                Rejection(
                    f"{shard.path}:row {row}", "no_image", f"no path or URL in column {image!r}"
                )
            )
        urls = pc.fill_null(pc.match_substring_regex(shard.values, _URL), False)
        if pc.any(urls).as_py():
            first = pc.filter(shard.values, urls)[0].as_py()
            raise ValueError(
                f"{shard.path} lists URLs ({first}); sizes='manifest' reads local files only: "
                "download them first, or scan with sizes='headers' (which fetches URLs)"
            )
        if not pc.all(valid).as_py() and len(valid):
            ok = valid.to_numpy(zero_copy_only=False)
            shards[k] = _Shard(shard.path, pc.filter(shard.values, valid),
                               pc.filter(shard.captions, valid), shard.width[ok],
                               shard.height[ok], shard.rows[ok])  # fmt: skip
    # one column at a time, each piece freed as soon as it is copied into the column (whose
    # pages are touched only as they are written): the peak stays near the pieces' bytes
    width = np.concatenate([shard.width for shard in shards])
    height = np.concatenate([shard.height for shard in shards])
    wheres = [(shard.path, shard.rows) for shard in shards]
    values, pieces = [shard.values for shard in shards], [shard.captions for shard in shards]
    del shards
    paths = _concat_text(values)
    first_of = _first_rows(paths)
    captions = _concat_lists(pieces)

    def label(i: int) -> str:  # "shard:row N", naming a row
        for shard, rows in wheres:
            if i < len(rows):
                return f"{shard}:row {rows[i]}"
            i -= len(rows)
        raise IndexError(i)

    def where(i: int) -> str:  # in details: the shard is said only when there are several
        return label(i) if several else label(i).rsplit(":", 1)[1]

    keep, captions, dup = _merge_duplicates(first_of, captions)
    for i in dup:
        rejections.append(Rejection(paths[int(i)].as_py(), "duplicate",
                                    f"{where(int(i))} repeats {where(int(first_of[i]))}; "
                                    "captions merged"))  # fmt: skip
    bad = (width <= 0) | (height <= 0)
    for i in np.flatnonzero(bad & keep):
        rejections.append(Rejection(paths[int(i)].as_py(), "bad_row",
                                    f"{where(int(i))}: width/height {width[i]}x{height[i]} "
                                    "missing or not positive"))  # fmt: skip
    keep &= ~bad
    nul = pc.fill_null(pc.match_substring(paths, "\0"), False).to_numpy(zero_copy_only=False)
    for i in np.flatnonzero(nul & keep):
        value = paths[int(i)].as_py()
        rejections.append(Rejection(label(int(i)), "bad_row",
                                    f"{path_problem(value)}: {value!a:.200}"))  # fmt: skip
    keep &= ~nul
    if base_dir is not None:
        base = real_base(base_dir)
        for i in np.flatnonzero(keep):
            path = paths[int(i)].as_py()
            real = os.path.realpath(path)
            if os.path.commonpath([real, base]) != base:
                keep[i] = False
                rejections.append(Rejection(path, "outside_base_dir",
                                            f"{where(int(i))}: resolves to {real}, outside "
                                            f"{base}"))  # fmt: skip
    if keep.all():
        return ManifestColumns(paths, captions, width, height, rejections)
    mask = pa.array(keep)
    return ManifestColumns(
        pc.filter(paths, mask), pc.filter(captions, mask), width[keep], height[keep], rejections
    )


def _text_buffers(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets relative to the first, the bytes they index) of a large string/binary array."""
    if not len(array):
        return np.zeros(1, np.int64), np.zeros(0, np.uint8)
    _, offsets, data = array.buffers()
    offsets = np.frombuffer(offsets, np.int64)[array.offset : array.offset + len(array) + 1]
    data = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    return offsets - offsets[0], data[offsets[0] : offsets[-1]]


def _concat_text(pieces: list[pa.Array]) -> pa.Array:
    """``large_string`` ``pieces`` (no nulls) as one array, emptying the list: each piece is
    freed once copied, and the result's pages are touched only as they are written."""
    n = sum(len(p) for p in pieces)
    size = sum(int(_text_buffers(p)[0][-1]) for p in pieces)
    offsets, data = np.empty(n + 1, np.int64), np.empty(size, np.uint8)
    offsets[0] = row = at = 0
    for k in range(len(pieces)):
        piece_offsets, piece_data = _text_buffers(pieces[k])
        rows = len(piece_offsets) - 1
        offsets[row + 1 : row + rows + 1] = piece_offsets[1:] + at
        data[at : at + len(piece_data)] = piece_data
        row, at = row + rows, at + len(piece_data)
        pieces[k] = piece_offsets = piece_data = None
        _release()
    pieces.clear()
    return pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))


def _concat_lists(pieces: list[pa.Array]) -> pa.Array:
    """``large_list<large_string>`` ``pieces`` (no nulls) as one array, emptying the list as
    :func:`_concat_text` does."""
    counts = [pc.list_value_length(p).to_numpy() for p in pieces]
    rows = np.zeros(sum(len(c) for c in counts) + 1, np.int64)
    np.cumsum(np.concatenate(counts), out=rows[1:])
    texts = [pc.list_flatten(p) for p in pieces]
    del counts
    pieces.clear()
    return pa.LargeListArray.from_arrays(pa.array(rows), _concat_text(texts))


def _release() -> None:
    """Hand memory that Arrow's pool holds but no longer uses back to the system."""
    pa.default_memory_pool().release_unused()


def _first_rows(paths: pa.Array) -> np.ndarray:
    """For each row, the first row holding the same path. Rows are told apart by a 64-bit
    hash of their bytes (8 bytes a row, where a hash table of the strings would copy them);
    rows whose hashes collide are compared as strings, so the answer is exact."""
    n = len(paths)
    first = np.arange(n)
    hashes = _hashes(paths)
    order = np.argsort(hashes, kind="stable")
    sorted_hashes = hashes[order]
    del hashes
    same = sorted_hashes[1:] == sorted_hashes[:-1]
    del sorted_hashes
    if not same.any():
        return first
    candidate = np.zeros(n, dtype=bool)
    candidate[1:] |= same
    candidate[:-1] |= same
    seen: dict[bytes, int] = {}
    for i in np.sort(order[candidate]).tolist():
        first[i] = seen.setdefault(paths[i].as_buffer().to_pybytes(), i)
    return first


_HASH_BASE = np.uint64(0x100000001B3)  # odd: invertible modulo 2**64
_HASH_INVERSE = np.uint64(pow(0x100000001B3, -1, 2**64))
_HASH_ROWS = 8192  # rows hashed at a time: a few MB of temporaries


def _hashes(values: pa.Array) -> np.ndarray:
    """A polynomial hash modulo 2**64 of each string's bytes (uint64), vectorised a block of
    rows at a time; equal strings hash equal wherever they lie in the buffer."""
    values = values.cast(pa.large_binary()) if not pa.types.is_large_binary(values.type) else values
    _, offsets, data = values.buffers()
    n = len(values)
    offsets = np.frombuffer(offsets, np.int64)[values.offset : values.offset + n + 1]
    data = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    out = np.empty(n, np.uint64)
    with np.errstate(over="ignore"):
        for lo in range(0, n, _HASH_ROWS):
            hi = min(n, lo + _HASH_ROWS)
            a, b = int(offsets[lo]), int(offsets[hi])
            powers = np.cumprod(np.full(b - a + 1, _HASH_BASE, np.uint64))
            powers[1:] = powers[:-1]
            powers[0] = 1  # base ** j for byte j of the block
            inverse = np.cumprod(np.full(b - a + 1, _HASH_INVERSE, np.uint64))
            inverse[1:] = inverse[:-1]
            inverse[0] = 1
            prefix = np.zeros(b - a + 1, np.uint64)
            np.cumsum((data[a:b].astype(np.uint64) + 1) * powers[:-1], out=prefix[1:])
            starts, ends = offsets[lo:hi] - a, offsets[lo + 1 : hi + 1] - a
            lengths = (ends - starts).astype(np.uint64)
            out[lo:hi] = (prefix[ends] - prefix[starts]) * inverse[starts] + lengths
    return out


def _merge_duplicates(
    first: np.ndarray, captions: pa.Array
) -> tuple[np.ndarray, pa.Array, np.ndarray]:
    """(rows to keep, captions with each repeat's new captions appended to its first row,
    the repeated rows), given each row's ``first`` row of the same path. A repeat's
    caption already on the first row is not added again."""
    rows = np.arange(len(first))
    dup = np.flatnonzero(first != rows)
    keep = first == rows
    if not len(dup):
        return keep, captions, dup
    texts, parents = pc.list_flatten(captions), pc.list_parent_indices(captions).to_numpy()
    target = first[parents]
    from_repeat = target != parents
    code = pc.dictionary_encode(texts).indices.to_numpy().astype(np.int64)
    pair = target * (int(code.max(initial=0)) + 1) + code
    _, first_pair = np.unique(pair, return_index=True)
    seen_before = np.ones(len(pair), dtype=bool)
    seen_before[first_pair] = False
    kept = np.flatnonzero(~(from_repeat & seen_before))
    order = kept[np.argsort(target[kept], kind="stable")]
    counts = np.bincount(target[order], minlength=len(first))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    merged = pa.LargeListArray.from_arrays(pa.array(offsets), pc.take(texts, pa.array(order)))
    return keep, merged, dup


def resolve_shards(
    files: Sequence[str],
    column_map: dict[str, str],
    base_dir: str | None,
    downloader: Downloader | None,
    download_dir: str | None,
) -> ResolvedSource:
    """Entries for parquet shards (read in parallel), for a scan that reads headers: local
    paths are checked and URLs fetched like any manifest's."""
    image, shards = _read_shards(files, column_map, sizes=False)
    several = len(files) > 1
    rejections: list[Rejection] = []
    rows: list[Row] = []
    for shard in shards:
        values, captions = shard.values.to_pylist(), shard.captions.to_pylist()
        for value, caps, row in zip(values, captions, shard.rows.tolist(), strict=True):
            if value is None:
                rejections.append(Rejection(f"{shard.path}:row {row}", "no_image",
                                            f"no path or URL in column {image!r}"))  # fmt: skip
            else:
                where = f"{shard.path}:row {row}" if several else f"row {row}"
                rows.append((value, caps, where, NO_PAIRS))
    origin = files[0] if len(files) == 1 else "parquet shards"
    entries, more = collect(rows, origin, "/", base_dir, downloader, download_dir)
    if not entries and not rejections and not more:
        raise ValueError(f"{files[0]} lists no images; it needs one row per image")
    return ResolvedSource(entries, rejections + more)
