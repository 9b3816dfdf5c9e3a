"""Turn what the user points at into a flat list of (image path, captions) entries.

``resolve_source`` accepts a folder, a manifest file, an in-memory list of paths or
a ``datasets.Dataset``. It only lists files and reads captions; it never opens an
image (that is ``scan``'s job). Problems with single entries become
:class:`~bucketing.index.Rejection` records; only configuration errors raise.
"""

from __future__ import annotations

import csv
import errno
import io
import itertools
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from bucketing.download import Downloader, DownloadError, is_url
from bucketing.index import Rejection

__all__ = ["Entry", "ResolvedSource", "RowBytes", "image_extensions", "resolve_source"]

_BASE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
CAPTION_SUFFIXES = (".txt", ".caption")


class Entry(NamedTuple):
    """One image to scan: an absolute local ``path``, its ``captions`` (possibly empty) and,
    for ``datasets.Dataset`` sources, the dataset ``row`` it came from (else ``None``)."""

    path: str
    captions: list[str]
    row: int | None = None


@dataclass
class ResolvedSource:
    """The entries to scan, the entries already rejected, and a byte reader for blob rows.

    ``blobs`` is set only for a ``datasets.Dataset`` with at least one row whose image
    has no file on disk. Then every entry has a ``row`` and ``blobs(entry.row)`` returns
    its encoded bytes (embedded bytes, or the file's bytes for path rows); a bytes-only
    entry's ``path`` is a label such as ``"dataset[12]"`` (no file, nothing to stat or
    cache by mtime). For the index: ``blobs.take([e.row for e in accepted_entries])``.
    """

    entries: list[Entry]
    rejections: list[Rejection] = field(default_factory=list)
    blobs: RowBytes | None = None


def image_extensions() -> tuple[str, ...]:
    """Lower-case extensions listed from folders; ``.avif`` only where Pillow can read it."""
    from PIL import Image

    Image.init()
    avif = (".avif",) if ".avif" in Image.registered_extensions() else ()
    return _BASE_EXTENSIONS + avif


def read_text(path: str) -> str:
    """Read a caption file as UTF-8 (a BOM is dropped), falling back to cp1252 and then
    Latin-1 (which accepts every byte), so legacy Windows/Latin-1 captions read correctly.
    Only regular files are read: a FIFO would block and a device may never end (OSError)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(errno.EINVAL, "not a regular file", path)
    with open(path, "rb") as f:
        data = f.read()
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1")


def caption_lines(text: str) -> list[str]:
    """One caption per non-empty line, stripped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


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
        """The encoded image bytes of row ``row`` (embedded bytes, else its file's)."""
        value = self.dataset[int(self.rows[row])][self.column]
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            with open(os.path.join(self.root, value["path"]), "rb") as f:
                return f.read()
        raise ValueError(f"dataset row {self.rows[row]} has neither image bytes nor a path")

    def take(self, rows: Iterable[int]) -> RowBytes:
        """A reader whose row ``i`` is this reader's row ``rows[i]``."""
        return RowBytes(
            self.dataset, self.column, self.rows[np.asarray(list(rows), np.int64)], self.root
        )


# --------------------------------------------------------------------------- folders


def _walk_folder(
    root: str, extensions: tuple[str, ...]
) -> tuple[list[str], list[str], list[Rejection]]:
    """Recursively list image files and other files under ``root`` (sorted, deterministic).

    Symlinked folders are followed once; a link back to a folder already being walked
    is a ``symlink_loop`` rejection and a second link to the same folder a ``duplicate``.
    A folder that cannot be listed is an ``unreadable`` rejection.
    """
    images: list[str] = []
    others: list[str] = []
    rejections: list[Rejection] = []
    seen: set[tuple[int, int]] = set()

    def visit(folder: str, ancestors: frozenset[tuple[int, int]]) -> None:
        try:
            st = os.stat(folder)
        except OSError as e:
            rejections.append(Rejection(folder, "unreadable", f"cannot stat folder: {e}"))
            return
        key = (st.st_dev, st.st_ino)
        if key in ancestors:
            rejections.append(
                Rejection(folder, "symlink_loop", "links back to a folder above it; not followed")
            )
            return
        if key in seen:
            rejections.append(
                Rejection(folder, "duplicate", "a second link to a folder already listed")
            )
            return
        seen.add(key)
        try:
            with os.scandir(folder) as it:
                children = sorted(it, key=lambda d: d.name)
        except OSError as e:
            rejections.append(Rejection(folder, "unreadable", f"cannot list folder: {e}"))
            return
        for child in children:
            path = child.path
            try:
                is_dir = child.is_dir()  # follows symlinks
            except OSError as e:  # e.g. ELOOP on a self-referencing link
                rejections.append(Rejection(path, "symlink_loop", str(e)))
                continue
            if is_dir:
                visit(path, ancestors | {key})
                continue
            if not child.name.lower().endswith(extensions):
                others.append(path)
                continue
            try:
                mode = os.stat(path).st_mode
            except FileNotFoundError:
                rejections.append(Rejection(path, "missing_file", "broken symbolic link"))
                continue
            except OSError as e:
                reason = "symlink_loop" if e.errno == errno.ELOOP else "unreadable"
                rejections.append(Rejection(path, reason, str(e)))
                continue
            if stat.S_ISREG(mode):
                images.append(path)
            else:
                rejections.append(Rejection(path, "not_a_file", "not a regular file"))

    visit(root, frozenset())
    return images, others, rejections


def _resolve_folder(folder: str, base_dir: str | None) -> ResolvedSource:
    root = os.path.abspath(folder)
    images, others, rejections = _walk_folder(root, image_extensions())
    sidecars = {p for p in others if p.lower().endswith(CAPTION_SUFFIXES)}
    metadata = _folder_metadata(others, rejections)
    entries = []
    for path in images:
        captions = _sidecar_captions(path, sidecars, rejections)
        if captions is None:
            captions = metadata.get(os.path.normpath(path), [])
        entries.append(Entry(path, captions))
    if not entries and not rejections:
        raise ValueError(
            f"no images found in {folder!r} (looked recursively for "
            f"{', '.join(image_extensions())}); point scan at the folder holding the images "
            "or pass a manifest file"
        )
    return _contain(ResolvedSource(entries, rejections), base_dir)


def _sidecar_captions(
    image: str, sidecars: set[str], rejections: list[Rejection]
) -> list[str] | None:
    """Captions from ``<stem>.txt`` (first choice) or ``<stem>.caption``; None if neither."""
    stem = os.path.splitext(image)[0]
    for suffix in CAPTION_SUFFIXES:
        for candidate in (stem + suffix, stem + suffix.upper()):
            if candidate in sidecars:
                try:
                    return caption_lines(read_text(candidate))
                except OSError as e:
                    rejections.append(Rejection(candidate, "unreadable_caption", str(e)))
                    return []
    return None


def _folder_metadata(others: list[str], rejections: list[Rejection]) -> dict[str, list[str]]:
    """Captions from HF-imagefolder ``metadata.jsonl`` files, keyed by normalised image path
    (``file_name`` is relative to the metadata file's folder)."""
    out: dict[str, list[str]] = {}
    for path in others:
        if os.path.basename(path) != "metadata.jsonl":
            continue
        folder = os.path.dirname(path)
        try:
            rows = _read_jsonl(path, rejections)
        except OSError as e:
            rejections.append(Rejection(path, "unreadable", str(e)))
            continue
        for _, row in rows:
            name = row.get("file_name")
            if isinstance(name, str) and name:
                key = os.path.normpath(os.path.join(folder, name))
                out[key] = _captions_of(row.get("text", row.get("caption")))
    return out


# --------------------------------------------------------------------------- helpers


def _captions_of(value: Any) -> list[str]:
    """Normalise a caption cell (string, list of strings, None/NaN) to a list of strings."""
    if value is None:
        return []
    if isinstance(value, float) and value != value:  # NaN from parquet/pandas
        return []
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        items = value.tolist() if hasattr(value, "tolist") else value
        return [c for item in items for c in _captions_of(item)]
    return [str(value)]


def _read_jsonl(path: str, rejections: list[Rejection]) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; bad lines become ``bad_row`` rejections."""
    import json

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


def _is_within(path: str, base: str) -> bool:
    try:
        return os.path.commonpath([path, base]) == base
    except ValueError:  # different drives on Windows
        return False


def _contain(resolved: ResolvedSource, base_dir: str | None) -> ResolvedSource:
    """Reject entries whose real path (after symlinks) lies outside ``base_dir``."""
    if base_dir is None:
        return resolved
    base = os.path.realpath(base_dir)
    kept = []
    for entry in resolved.entries:
        real = os.path.realpath(entry.path)
        if _is_within(real, base):
            kept.append(entry)
        else:
            resolved.rejections.append(
                Rejection(entry.path, "outside_base_dir", f"resolves to {real}, outside {base}")
            )
    resolved.entries = kept
    return resolved


def _local_path(value: str, relative_to: str) -> str:
    """Absolute, normalised path (symlinks kept) for a manifest or list value."""
    return os.path.normpath(os.path.join(relative_to, os.path.expanduser(value)))


def _collect(
    rows: Iterable[tuple[str, list[str], str]],
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
    ``"line 7"``) goes into rejection details.
    """
    rows = list(rows)
    urls = [value for value, _, _ in rows if is_url(value)]
    fetched: dict[str, str | DownloadError] = {}
    if urls:
        fetched = (downloader or Downloader(download_dir)).fetch_all(urls)
    base = os.path.realpath(base_dir) if base_dir is not None else None
    entries: list[Entry] = []
    rejections: list[Rejection] = []
    first: dict[str, tuple[int, str]] = {}
    for value, captions, where in rows:
        keys = [value] if is_url(value) else [_local_path(value, relative_to)]
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
            reason = _local_problem(path, base)
            if reason is not None:
                rejections.append(Rejection(path, reason[0], f"{where}: {reason[1]}"))
                continue
        for k in keys:
            first[k] = (len(entries), where)
        entries.append(Entry(path, list(captions)))
    return entries, rejections


def _local_problem(path: str, base: str | None) -> tuple[str, str] | None:
    """(reason, detail) if ``path`` escapes ``base`` or is not an existing regular file."""
    if base is not None:
        real = os.path.realpath(path)
        if not _is_within(real, base):
            return "outside_base_dir", f"resolves to {real}, outside {base}"
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing_file", "no such file"
    except OSError as e:
        return ("symlink_loop" if e.errno == errno.ELOOP else "unreadable"), str(e)
    if not stat.S_ISREG(mode):
        return "not_a_file", "not a regular file"
    return None


# --------------------------------------------------------------------------- manifests

IMAGE_COLUMNS = ("image", "file_name", "path", "url", "image_path", "image_url", "filename")
CAPTION_COLUMNS = ("caption", "captions", "text", "prompt")
MANIFEST_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


def _pick_columns(
    columns: Sequence[str], column_map: dict[str, str], what: str
) -> tuple[str, str | None]:
    """(image column, caption column or None) from ``column_map`` or the defaults."""
    unknown = set(column_map) - {"image", "caption"}
    if unknown:
        raise ValueError(f"column_map keys are 'image' and 'caption'; got {sorted(unknown)}")
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
        caption = next((c for c in CAPTION_COLUMNS if c in columns), None)
    return image, caption


def _is_blank(value: Any) -> bool:
    if value is None or (isinstance(value, float) and value != value):
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, (list, tuple, dict)):
        return all(_is_blank(v) for v in (value.values() if isinstance(value, dict) else value))
    return False


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


def _manifest_rows(
    records: Iterable[tuple[str, dict]],
    image: str,
    caption: str | None,
    origin: str,
    rejections: list[Rejection],
) -> Iterable[tuple[str, list[str], str]]:
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
        captions = _captions_of(record.get(caption)) if caption is not None else []
        yield value, captions, where


def _looks_like_image_ref(cell: str) -> bool:
    cell = cell.strip().lower()
    return is_url(cell) or cell.endswith(image_extensions()) or cell.endswith(".avif")


def _read_delimited(path: str, delimiter: str) -> tuple[list[str], Iterable[tuple[str, dict]]]:
    """Columns and records of a CSV/TSV. Without a header (the first cell is an image path or
    URL) the columns are ``image`` then ``caption`` (every further cell is another caption)."""
    csv.field_size_limit(1 << 30)
    reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter=delimiter)
    first = next(reader, None)
    if first is None:
        return [], []
    if first and _looks_like_image_ref(first[0]):
        lines = itertools.chain([first], reader)
        records = (
            (f"line {reader.line_num}", {"image": row[0], "caption": row[1:]})
            for row in lines
            if row
        )
        return ["image", "caption"], records
    columns = [c.strip() for c in first]
    records = ((f"line {reader.line_num}", dict(zip(columns, row, strict=False))) for row in reader)
    return columns, records


def _read_manifest(
    path: str, column_map: dict[str, str], rejections: list[Rejection]
) -> tuple[str, str | None, Iterable[tuple[str, dict]]]:
    """(image column, caption column, records) of a manifest file, by extension."""
    import json

    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".jsonl":
        records = [(f"line {n}", row) for n, row in _read_jsonl(path, rejections)]
        columns = list(dict.fromkeys(k for _, row in records for k in row))
    elif suffix == ".json":
        try:
            data = json.loads(read_text(path))
        except ValueError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ValueError(f"{path} must hold a JSON list of objects, one per image")
        records = [(f"item {i}", row) for i, row in enumerate(data)]
        columns = list(dict.fromkeys(k for row in data for k in row))
    elif suffix in (".csv", ".tsv"):
        columns, records = _read_delimited(path, "," if suffix == ".csv" else "\t")
        if not columns:
            raise ValueError(f"{path} is empty; it needs one row per image")
        if columns == ["image", "caption"] and "image" not in column_map.values():
            column_map = {}
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        file = pq.ParquetFile(path)
        columns = file.schema_arrow.names
        image, caption = _pick_columns(columns, column_map, path)
        wanted = [image] + ([caption] if caption else [])
        records = (
            (f"row {n}", row)
            for n, row in enumerate(
                r for batch in file.iter_batches(columns=wanted) for r in batch.to_pylist()
            )
        )
        return image, caption, records
    else:
        raise ValueError(
            f"unknown manifest type {suffix!r} for {path}; "
            f"use one of {', '.join(MANIFEST_SUFFIXES)} or a folder"
        )
    if not columns and suffix != ".jsonl":
        raise ValueError(f"{path} has no rows; it needs one row per image")
    image, caption = _pick_columns(columns, column_map, path)
    return image, caption, records


def _resolve_manifest(
    path: str,
    column_map: dict[str, str],
    base_dir: str | None,
    downloader: Downloader | None,
    download_dir: str | None,
) -> ResolvedSource:
    path = os.path.abspath(path)
    rejections: list[Rejection] = []
    image, caption, records = _read_manifest(path, column_map, rejections)
    rows = _manifest_rows(records, image, caption, path, rejections)
    entries, more = _collect(rows, os.path.dirname(path), base_dir, downloader, download_dir)
    if not entries and not rejections and not more:
        raise ValueError(f"{path} lists no images; it needs one row per image")
    return ResolvedSource(entries, rejections + more)


# --------------------------------------------------------------------------- lists


def _resolve_list(
    items: Sequence[Any],
    base_dir: str | None,
    downloader: Downloader | None,
    download_dir: str | None,
) -> ResolvedSource:
    relative_to = os.path.abspath(base_dir) if base_dir is not None else os.getcwd()
    rows: list[tuple[str, list[str], str]] = []
    rejections: list[Rejection] = []
    for i, item in enumerate(items):
        if not isinstance(item, (str, bytes, os.PathLike)):
            raise TypeError(
                f"list sources hold paths or URLs (str, bytes or os.PathLike); item {i} is "
                f"{type(item).__name__}"
            )
        value = os.fspath(item)
        if isinstance(value, bytes):
            value = os.fsdecode(value)
        if not value.strip():
            rejections.append(Rejection(f"<list item {i}>", "no_image", "empty path"))
            continue
        rows.append((value, [], f"item {i}"))
    entries, more = _collect(rows, relative_to, base_dir, downloader, download_dir)
    return ResolvedSource(entries, rejections + more)


# --------------------------------------------------------------------------- datasets


def _resolve_dataset(
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
    """
    import datasets
    import pyarrow.compute as pc

    columns = list(dataset.column_names)
    image_columns = [c for c in columns if isinstance(dataset.features[c], datasets.Image)]
    if "image" not in column_map and image_columns:
        column_map = {**column_map, "image": image_columns[0]}
    image, caption = _pick_columns(columns, column_map, "the dataset")
    relative_to = os.path.abspath(base_dir) if base_dir is not None else os.getcwd()
    if not isinstance(dataset.features[image], datasets.Image):
        rejections: list[Rejection] = []
        records = (
            (f"row {i}", row)
            for i, row in enumerate(
                dataset.select_columns([image] + ([caption] if caption else []))
            )
        )
        rows = _manifest_rows(records, image, caption, "dataset", rejections)
        entries, more = _collect(rows, relative_to, base_dir, downloader, download_dir)
        return ResolvedSource(entries, rejections + more)

    images = dataset.cast_column(image, datasets.Image(decode=False)).select_columns([image])
    table = images.with_format("arrow")
    base = os.path.realpath(base_dir) if base_dir is not None else None
    entries: list[Entry] = []
    rejections = []
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
            captions = _captions_of(caps[offset])
            local = _local_path(stored, relative_to) if stored else None
            # with bytes at hand, a relative stored path is only a name (HF embeds the
            # basename): trust a path over the bytes only when it is absolute
            trusted = local is not None and (not blob or os.path.isabs(stored))
            if trusted and os.path.isfile(local):
                problem = _local_problem(local, base)
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


# --------------------------------------------------------------------------- entry point


def resolve_source(
    source: Any,
    *,
    column_map: dict[str, str] | None = None,
    base_dir: str | os.PathLike | None = None,
    download_dir: str | os.PathLike | None = None,
    downloader: Downloader | None = None,
) -> ResolvedSource:
    """List the images (and captions) of ``source`` without opening any image.

    ``source`` is a folder, a manifest (``.jsonl .json .csv .tsv .parquet``), a list or
    tuple of paths/URLs, or a ``datasets.Dataset``. ``column_map={"image": ...,
    "caption": ...}`` names manifest/dataset columns (defaults: the first of
    ``IMAGE_COLUMNS`` / ``CAPTION_COLUMNS`` present). Relative paths resolve against
    the manifest's folder (lists and datasets: ``base_dir``, else the current folder).
    ``http(s)://`` values are fetched once into ``download_dir`` (default: the user
    cache, see :mod:`bucketing.download`; pass ``downloader=`` for timeouts/retries).

    Per-entry problems are rejections: ``missing_file`` (checked here for manifests,
    lists and datasets; ``scan`` still handles files that vanish later),
    ``outside_base_dir`` (with ``base_dir``: the real path, after symlinks, escapes
    it), ``download_failed``, ``duplicate``, ``no_image``, ``bad_row``,
    ``symlink_loop``, ``unreadable``, ``not_a_file``. Configuration errors raise
    ``FileNotFoundError``/``ValueError``/``TypeError`` saying what to do.
    """
    base = os.fspath(base_dir) if base_dir is not None else None
    ddir = os.fspath(download_dir) if download_dir is not None else None
    columns = dict(column_map or {})
    if isinstance(source, (list, tuple)):
        return _resolve_list(source, base, downloader, ddir)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            return _resolve_folder(path, base)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"source {path!r} does not exist; pass a folder of images, a manifest file "
                f"({' '.join(MANIFEST_SUFFIXES)}), a list of paths or a datasets.Dataset"
            )
        return _resolve_manifest(path, columns, base, downloader, ddir)
    if type(source).__module__.startswith("datasets"):
        if type(source).__name__ == "Dataset":
            return _resolve_dataset(source, columns, base, downloader, ddir)
        raise TypeError(
            f"a {type(source).__name__} is not supported; pass a datasets.Dataset "
            "(pick a split, e.g. ds['train']; streaming datasets are not supported yet)"
        )
    raise TypeError(
        f"unsupported source type {type(source).__name__}; pass a folder, a manifest file, "
        "a list of paths or a datasets.Dataset"
    )
