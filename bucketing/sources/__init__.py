"""Turn what the user points at into a flat list of (image path, captions) entries.

``resolve_source`` accepts a folder, a manifest file, an in-memory list of paths or
a ``datasets.Dataset``. It only lists files and reads captions; it never opens an
image (that is ``scan``'s job). Problems with single entries become
:class:`~bucketing.index.Rejection` records; only configuration errors raise.

One module per kind of source, as HF ``datasets`` maps file extensions to its packaged
modules: :mod:`~bucketing.sources.folder`, the manifest readers
(:mod:`~bucketing.sources.delimited`, :mod:`~bucketing.sources.json_rows`,
:mod:`~bucketing.sources.parquet`, picked by ``MANIFEST_READERS``),
:mod:`~bucketing.sources.lists`, :mod:`~bucketing.sources.hf_dataset` and
:mod:`~bucketing.sources.tar` (WebDataset shards read in place).
"""

from __future__ import annotations

import os
from typing import Any

from bucketing.download import Downloader
from bucketing.sources import delimited, json_rows, parquet
from bucketing.sources.braces import brace_list
from bucketing.sources.entries import (
    CAPTION_SUFFIXES,
    Entry,
    ResolvedSource,
    caption_lines,
    image_extensions,
    read_sidecar,
    read_text,
    sidecar_path,
)
from bucketing.sources.folder import resolve_folder
from bucketing.sources.hf_dataset import RowBytes, load_source, resolve_dataset
from bucketing.sources.lists import resolve_list
from bucketing.sources.manifest import ManifestReader, resolve_manifest
from bucketing.sources.rows import CAPTION_COLUMNS, IMAGE_COLUMNS, refuse_pairs
from bucketing.sources.shards import parquet_shards, resolve_shards
from bucketing.sources.tar import resolve_tars, tar_shards

__all__ = [
    "CAPTION_COLUMNS",
    "CAPTION_SUFFIXES",
    "IMAGE_COLUMNS",
    "MANIFEST_READERS",
    "MANIFEST_SUFFIXES",
    "Entry",
    "ResolvedSource",
    "RowBytes",
    "caption_lines",
    "image_extensions",
    "read_sidecar",
    "read_text",
    "resolve_source",
    "sidecar_path",
]

# Manifest file extension -> the reader of that format.
MANIFEST_READERS: dict[str, ManifestReader] = {
    ".jsonl": json_rows.read_jsonl_manifest,
    ".json": json_rows.read_json_manifest,
    ".csv": delimited.read_csv,
    ".tsv": delimited.read_tsv,
    ".parquet": parquet.read_parquet,
}
MANIFEST_SUFFIXES = tuple(MANIFEST_READERS)


def resolve_source(
    source: Any,
    *,
    column_map: dict[str, str] | None = None,
    base_dir: str | os.PathLike | None = None,
    download_dir: str | os.PathLike | None = None,
    downloader: Downloader | None = None,
    data_files: Any = None,
    data_dir: str | os.PathLike | None = None,
    split: str = "train",
) -> ResolvedSource:
    """List the images (and captions) of ``source`` without opening any image.

    ``source`` is a folder, a manifest (``.jsonl .json .csv .tsv .parquet``), a list or
    tuple of paths/URLs, or a ``datasets.Dataset``. Parquet shards (a folder of
    ``.parquet`` files without images, a glob, a list of ``.parquet`` paths) are one
    manifest (see :mod:`bucketing.sources.shards`); tar shards (a ``.tar``, a folder, glob
    or list of them) are read in place (see :mod:`bucketing.sources.tar`). A string with
    brace groups (``shards/{00000..00099}.tar``) is the list of paths it names.
    ``"hf:NAME"``, or a name with ``data_files``/``data_dir``, is the ``split`` (default
    ``"train"``) that ``datasets.load_dataset`` builds (see
    :func:`~bucketing.sources.hf_dataset.load_source`).

    ``column_map={"image": ..., "caption": ...}`` names manifest/dataset columns
    (defaults: the first of ``IMAGE_COLUMNS`` / ``CAPTION_COLUMNS`` present). Relative
    paths resolve against the manifest's folder (lists and datasets: ``base_dir``, else
    the current folder). ``http(s)://`` values are fetched once into ``download_dir``
    (default: the user cache, see :mod:`bucketing.download`; pass ``downloader=`` for
    timeouts/retries).
    Paired files: ``column_map`` also names a row's conditioning images
    (``conditioning_image``, or ``conditioning_image_0`` .. ``_{K-1}``) and loss mask
    (``loss_mask``; ``"alpha"``: the image's alpha); columns of those names are picked up
    without it. For a folder, its values are templates such as ``"{stem}_mask.png"``
    (opt-in; see :mod:`bucketing.sources.folder`). An unusable paired file rejects the
    row (``missing_pair``, ``unreadable_pair``).

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
    source = load_source(source, data_files, data_dir, split)
    names = brace_list(source)
    if names is not None:
        source = names
    tars = tar_shards(source)
    if tars is not None:
        refuse_pairs(columns, "tar shards")
        return resolve_tars(tars, base)
    shards = parquet_shards(source)
    if shards is not None:
        return resolve_shards(shards, columns, base, downloader, ddir)
    if isinstance(source, (list, tuple)):
        refuse_pairs(columns, "lists of paths")
        return resolve_list(source, base, downloader, ddir)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            return resolve_folder(path, base, columns)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"source {path!r} does not exist; pass a folder of images, a manifest file "
                f"({' '.join(MANIFEST_SUFFIXES)}), a list of paths or a datasets.Dataset"
            )
        suffix = os.path.splitext(path)[1].lower()
        if suffix not in MANIFEST_READERS:
            raise ValueError(
                f"unknown manifest type {suffix!r} for {os.path.abspath(path)}; "
                f"use one of {', '.join(MANIFEST_SUFFIXES)} or a folder"
            )
        reader = MANIFEST_READERS[suffix]
        return resolve_manifest(path, reader, columns, base, downloader, ddir)
    if type(source).__module__.startswith("datasets"):
        if type(source).__name__ == "Dataset":
            return resolve_dataset(source, columns, base, downloader, ddir)
        raise TypeError(
            f"a {type(source).__name__} cannot be scanned; pass a datasets.Dataset (pick a "
            "split, e.g. ds['train']), or stream an IterableDataset with "
            "bucketing.StreamingBucketDataset (docs/streaming.md)"
        )
    raise TypeError(
        f"unsupported source type {type(source).__name__}; pass a folder, a manifest file, "
        "a list of paths or a datasets.Dataset"
    )
