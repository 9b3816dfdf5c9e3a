"""Turn what the user points at into a flat list of (image path, captions) entries.

``resolve_source`` accepts a folder, a manifest file, an in-memory list of paths or
a ``datasets.Dataset``. It only lists files and reads captions; it never opens an
image (that is ``scan``'s job). Problems with single entries become
:class:`~bucketing.index.Rejection` records; only configuration errors raise.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

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
    has no file on disk; read such an entry with ``blobs(entry.row)`` instead of
    opening ``entry.path`` (which is then only a label).
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
    Latin-1 (which accepts every byte), so legacy Windows/Latin-1 captions read correctly."""
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

    def __init__(self, dataset: Any, column: str, rows: Sequence[int] | None = None) -> None:
        self.dataset = dataset
        self.column = column
        self.rows = list(range(len(dataset))) if rows is None else [int(r) for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __call__(self, row: int) -> bytes:
        value = self.dataset[self.rows[row]][self.column]
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            with open(value["path"], "rb") as f:
                return f.read()
        raise ValueError(f"dataset row {self.rows[row]} has neither image bytes nor a path")

    def take(self, rows: Iterable[int]) -> RowBytes:
        """A reader whose row ``i`` is this reader's row ``rows[i]``."""
        return RowBytes(self.dataset, self.column, [self.rows[int(r)] for r in rows])


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
                reason = "symlink_loop" if e.errno == 40 else "unreadable"
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
            rejections.append(Rejection(f"{path}:{lineno}", "bad_row", f"invalid JSON: {e}"))
            continue
        if not isinstance(obj, dict):
            rejections.append(
                Rejection(f"{path}:{lineno}", "bad_row", f"expected an object, got {obj!r:.60}")
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


def _check_files(
    items: Iterable[tuple[str, list[str], str]],
) -> tuple[list[Entry], list[Rejection]]:
    """Keep existing regular files, merging duplicates (captions appended to the first).

    ``items`` are (absolute path, captions, where) with ``where`` naming the origin
    (e.g. ``"row 7"``) for rejection details. Missing paths are ``missing_file``.
    """
    entries: list[Entry] = []
    rejections: list[Rejection] = []
    first: dict[str, tuple[int, str]] = {}
    for path, captions, where in items:
        if path in first:
            slot, first_where = first[path]
            merged = entries[slot].captions
            merged.extend(c for c in captions if c not in merged)
            rejections.append(
                Rejection(path, "duplicate", f"{where} repeats {first_where}; captions merged")
            )
            continue
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            rejections.append(Rejection(path, "missing_file", f"{where}: no such file"))
            continue
        except OSError as e:
            rejections.append(Rejection(path, "unreadable", f"{where}: {e}"))
            continue
        if not stat.S_ISREG(mode):
            rejections.append(Rejection(path, "not_a_file", f"{where}: not a regular file"))
            continue
        first[path] = (len(entries), where)
        entries.append(Entry(path, list(captions)))
    return entries, rejections


def _local_path(value: str, relative_to: str) -> str:
    """Absolute, normalised path (symlinks kept) for a manifest or list value."""
    value = os.path.expanduser(value)
    return os.path.normpath(os.path.join(relative_to, value))


# --------------------------------------------------------------------------- lists


def _resolve_list(items: Sequence[Any], base_dir: str | None) -> ResolvedSource:
    relative_to = os.path.abspath(base_dir) if base_dir is not None else os.getcwd()
    rows: list[tuple[str, list[str], str]] = []
    rejections: list[Rejection] = []
    for i, item in enumerate(items):
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(
                f"list sources hold paths (str or os.PathLike); item {i} is {type(item).__name__}"
            )
        value = os.fspath(item)
        if not value.strip():
            rejections.append(Rejection(f"<list item {i}>", "no_image", "empty path"))
            continue
        rows.append((_local_path(value, relative_to), [], f"item {i}"))
    entries, more = _check_files(rows)
    return _contain(ResolvedSource(entries, rejections + more), base_dir)


# --------------------------------------------------------------------------- entry point


def resolve_source(
    source: Any,
    *,
    column_map: dict[str, str] | None = None,
    base_dir: str | os.PathLike | None = None,
    download_dir: str | os.PathLike | None = None,
) -> ResolvedSource:
    """List the images (and captions) of ``source`` without opening any image.

    ``source`` is a folder, a manifest (``.jsonl .json .csv .tsv .parquet``), a list or
    tuple of paths, or a ``datasets.Dataset`` with an ``Image`` column. Relative paths
    resolve against the manifest's folder (lists: ``base_dir`` or the current folder).
    With ``base_dir``, entries whose real path lies outside it are rejected
    ``outside_base_dir``. Missing files are rejected ``missing_file`` here already for
    manifests and lists (``scan`` still handles files that vanish afterwards).
    Raises ``FileNotFoundError``/``ValueError``/``TypeError`` for configuration errors.
    """
    base = os.fspath(base_dir) if base_dir is not None else None
    if isinstance(source, (list, tuple)):
        return _resolve_list(source, base)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            return _resolve_folder(path, base)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"source {path!r} does not exist; pass a folder of images, a manifest file "
                "(.jsonl .json .csv .tsv .parquet), a list of paths or a datasets.Dataset"
            )
        raise ValueError(
            f"cannot read {path!r}: expected a folder or a manifest with extension "
            ".jsonl, .json, .csv, .tsv or .parquet"
        )
    raise TypeError(
        f"unsupported source type {type(source).__name__}; pass a folder, a manifest file, "
        "a list of paths or a datasets.Dataset"
    )
