"""Rows of (image path or URL, captions) from manifests, lists and dataset string columns,
turned into entries: columns picked, blank rows skipped, URLs fetched, local paths checked,
repeated images merged."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from bucketing.download import Downloader, DownloadError, is_url
from bucketing.index import Rejection
from bucketing.sources.entries import (
    Entry,
    captions_of,
    local_path,
    local_problem,
    path_problem,
    real_base,
)

IMAGE_COLUMNS = ("image", "file_name", "path", "url", "image_path", "image_url", "filename")
CAPTION_COLUMNS = ("caption", "captions", "text", "prompt")
CONDITIONING_KEY = "conditioning_image"
MASK_KEY = "loss_mask"
ALPHA = "alpha"  # column_map={"loss_mask": "alpha"}: the mask is the image's own alpha
ALPHA_MASK = "\0alpha"  # what a row's mask holds then (a NUL: no path can be it)
_NUMBERED = re.compile(r"^conditioning_image_(\d+)$")
_KEYS = {"image", "caption", "width", "height", CONDITIONING_KEY, MASK_KEY}

Record = tuple[str, dict]  # (where, e.g. "line 7"; the row as column -> cell)
Pairs = tuple[tuple[str | None, ...], str | None]  # (conditioning values, mask value)
NO_PAIRS: Pairs = ((), None)
Row = tuple[str, list[str], str, Pairs]  # (image value, captions, where, paired values)


@dataclass(frozen=True)
class PairedColumns:
    """The columns of a row's paired files: ``conditioning`` (K columns, in order) and
    ``mask`` (a column, or None); ``alpha``: the mask is the image's alpha channel."""

    conditioning: tuple[str, ...] = ()
    mask: str | None = None
    alpha: bool = False

    def __bool__(self) -> bool:
        return bool(self.conditioning or self.mask or self.alpha)

    @property
    def wanted(self) -> list[str]:
        """The columns to read."""
        return [*self.conditioning, *([self.mask] if self.mask else [])]

    def values(self, record: dict, what: str) -> Pairs:
        """(conditioning values, mask value) of ``record``; None where a cell is blank."""
        conditioning = tuple(_image_value(record.get(c), what) for c in self.conditioning)
        if self.alpha:
            return conditioning, ALPHA_MASK
        return conditioning, (_image_value(record.get(self.mask), what) if self.mask else None)


def pick_paired(columns: Sequence[str], column_map: dict[str, str], what: str) -> PairedColumns:
    """The conditioning-image and mask columns: from ``column_map`` (``conditioning_image``,
    or ``conditioning_image_0`` .. ``conditioning_image_{K-1}``; ``loss_mask``, or
    ``loss_mask="alpha"`` for the image's alpha), else the columns of those names."""
    numbered = {int(m.group(1)): k for k in column_map if (m := _NUMBERED.match(k))}
    if CONDITIONING_KEY in column_map and numbered:
        raise ValueError(
            "column_map names 'conditioning_image' and numbered 'conditioning_image_<k>' "
            "keys; use one or the other"
        )
    if numbered and sorted(numbered) != list(range(len(numbered))):
        raise ValueError(
            f"column_map's conditioning_image_<k> keys must be numbered 0..K-1, got "
            f"{sorted(numbered)}"
        )
    if CONDITIONING_KEY in column_map:
        conditioning = (column_map[CONDITIONING_KEY],)
    elif numbered:
        conditioning = tuple(column_map[numbered[k]] for k in sorted(numbered))
    else:  # the columns named so, if any
        found = {int(m.group(1)): c for c in columns if (m := _NUMBERED.match(c))}
        if CONDITIONING_KEY in columns and found:
            raise ValueError(
                f"{what} has a 'conditioning_image' column and numbered ones "
                f"{sorted(found.values())}; pick with column_map"
            )
        if found and sorted(found) != list(range(len(found))):
            raise ValueError(f"{what}: conditioning_image_<k> columns must be numbered 0..K-1, "
                             f"got {sorted(found.values())}")  # fmt: skip
        conditioning = ((CONDITIONING_KEY,) if CONDITIONING_KEY in columns
                        else tuple(found[k] for k in sorted(found)))  # fmt: skip
    mask = column_map.get(MASK_KEY, MASK_KEY if MASK_KEY in columns else None)
    alpha = mask == ALPHA
    for used in [*conditioning, *([mask] if mask and not alpha else [])]:
        if used not in columns:
            raise ValueError(
                f"{what} has no column {used!r} (columns {list(columns)}); column_map names "
                "the conditioning_image and loss_mask columns"
            )
    return PairedColumns(conditioning, None if alpha else mask, alpha)


def refuse_pairs(column_map: dict[str, str], what: str) -> None:
    """Raise ValueError when ``column_map`` names paired files for a source that cannot carry
    them (``what``: e.g. "tar shards"), instead of dropping them."""
    named = sorted(k for k in column_map if k in (CONDITIONING_KEY, MASK_KEY) or _NUMBERED.match(k))
    if named:
        raise ValueError(
            f"{what} do not carry conditioning images or loss masks (yet), but column_map names "
            f"{named}; list the rows in a manifest file (.jsonl .csv .parquet ...) instead"
        )


def pick_columns(
    columns: Sequence[str], column_map: dict[str, str], what: str
) -> tuple[str, str | None]:
    """(image column, caption column or None) from ``column_map`` or the defaults."""
    unknown = {k for k in set(column_map) - _KEYS if not _NUMBERED.match(k)}
    if unknown:
        raise ValueError(
            f"column_map keys are 'image', 'caption' (and 'width', 'height' for sizes from "
            f"the manifest; 'conditioning_image' or 'conditioning_image_0'.., 'loss_mask' "
            f"for paired files); got {sorted(unknown)}"
        )
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
        caption = _default_caption(columns, image, what)
    for used in (image, caption):
        if used is not None and columns.count(used) > 1:
            where = [i + 1 for i, c in enumerate(columns) if c == used]
            raise ValueError(
                f"{what}: column {used!r} is named {len(where)} times (columns {where}); "
                "rename them so that each is one column, and pick with column_map"
            )
    return image, caption


def _default_caption(columns: Sequence[str], image: str, what: str) -> str | None:
    """The first of ``CAPTION_COLUMNS`` present; a warning says which columns were found and
    which was used when none or several look like captions."""
    candidates = [c for c in CAPTION_COLUMNS if c in columns]
    if not candidates and any(c != image for c in columns):
        warnings.warn(
            f"{what}: no caption column (looked for {list(CAPTION_COLUMNS)}) among the "
            f"columns {list(columns)}; using {image!r} for images and no captions. To use "
            "one, pass column_map={'caption': '<column>'}",
            stacklevel=5,
        )
    elif len(candidates) > 1:
        warnings.warn(
            f"{what}: captions are read from {candidates[0]!r}, not from {candidates[1:]}; "
            "pass column_map={'caption': '<column>'} to choose",
            stacklevel=5,
        )
    return candidates[0] if candidates else None


def _is_blank(value: Any) -> bool:
    """True if ``value`` holds no text at all (None, NaN, blank strings, in any nesting)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, str):
            if item.strip():
                return False
        elif not (item is None or (isinstance(item, float) and item != item)):
            return False
    return True


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


def manifest_rows(
    records: Iterable[Record],
    image: str,
    caption: str | None,
    origin: str,
    rejections: list[Rejection],
    paired: PairedColumns = PairedColumns(),  # noqa: B008 (frozen: never changed)
) -> Iterable[Row]:
    """(image value, captions, where, paired values) per record; blank records are skipped,
    records with content but no usable image value become ``no_image`` rejections."""
    for where, record in records:
        if _is_blank(record):
            continue
        value = _image_value(record.get(image), origin)
        if value is None:
            rejections.append(
                Rejection(f"{origin}:{where}", "no_image", f"no path or URL in column {image!r}")
            )
            continue
        captions = captions_of(record.get(caption)) if caption is not None else []
        yield value, captions, where, paired.values(record, origin)


def collect(
    rows_in: Iterable[Row],
    origin: str,
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
    ``"line 7"``) goes into rejection details; a value that can be no path (a NUL, a lone
    surrogate) is a ``bad_row`` named ``origin:where``.

    Paired files (conditioning images, a mask) resolve the same way; a row whose paired file
    is blank, missing or fails to download is a ``missing_pair`` rejection, one that cannot
    be a file (outside ``base_dir``, not a regular file) an ``unreadable_pair``.
    """
    rows: list[Row] = []
    bad: list[Rejection] = []
    for value, captions, where, pairs in rows_in:
        problem = path_problem(value)
        if problem is None:
            rows.append((value, captions, where, pairs))
        else:
            bad.append(Rejection(f"{origin}:{where}", "bad_row", f"{problem}: {value!a:.200}"))
    urls = [value for value, _, _, _ in rows if is_url(value)]
    urls += [v for _, _, _, (cond, mask) in rows for v in (*cond, mask) if v and is_url(v)]
    fetched: dict[str, str | DownloadError] = {}
    if urls:
        fetched = (downloader or Downloader(download_dir)).fetch_all(urls)
    base = real_base(base_dir)
    entries: list[Entry] = []
    rejections: list[Rejection] = bad
    first: dict[tuple[str, Pairs], tuple[int, str]] = {}
    for value, captions, where, pairs in rows:
        keys = [value] if is_url(value) else [local_path(value, relative_to)]
        if is_url(value) and not isinstance(fetched[value], DownloadError):
            keys.append(fetched[value])
        # a row of paired files is one example of its own: the same image with other
        # conditioning images (an edit dataset) is another row, not a duplicate
        seen = [(k, pairs) for k in keys]
        hit = next((first[k] for k in seen if k in first), None)
        if hit is not None:
            slot, first_where = hit
            merged = entries[slot].captions
            merged.extend(c for c in captions if c not in merged)
            rejections.append(
                Rejection(keys[0], "duplicate", f"{where} repeats {first_where}; captions merged")
            )
            continue
        if is_url(value):
            got = fetched.get(value, DownloadError("not fetched for this kind of source"))
            if isinstance(got, DownloadError):
                rejections.append(Rejection(value, "download_failed", f"{where}: {got}"))
                continue
            path = got
        else:
            path = keys[0]
            problem = local_problem(path, base)
            if problem is not None:
                rejections.append(Rejection(path, problem[0], f"{where}: {problem[1]}"))
                continue
        paired = paired_paths(pairs, relative_to, base, fetched)
        if isinstance(paired, tuple) and isinstance(paired[0], str):
            rejections.append(Rejection(keys[0], paired[0], f"{where}: {paired[1]}"))
            continue
        for k in seen:
            first[k] = (len(entries), where)
        conditioning, mask = paired
        entries.append(Entry(path, list(captions), url=value if is_url(value) else None,
                             conditioning=conditioning, mask=mask))  # fmt: skip
    return entries, rejections


def paired_paths(
    pairs: Pairs, relative_to: str, base: str | None, fetched: dict[str, str | DownloadError]
) -> tuple[tuple[str, ...], str | None] | tuple[str, str]:
    """(conditioning paths, mask path or None) of a row, or (reason, detail) when one of
    them cannot be used. A mask that is the image's alpha stays ``ALPHA_MASK``."""
    conditioning, mask = pairs
    named = [(f"conditioning image {k}", v) for k, v in enumerate(conditioning)]
    if mask is not None and mask != ALPHA_MASK:
        named.append(("loss mask", mask))
    out: list[str] = []
    for what, value in named:
        if value is None:
            return "missing_pair", f"no {what} in its column"
        if is_url(value):
            got = fetched.get(value, DownloadError("not fetched for this kind of source"))
            if isinstance(got, DownloadError):
                return "missing_pair", f"{what} {value}: {got}"
            out.append(got)
            continue
        if (problem := path_problem(value)) is not None:
            return "unreadable_pair", f"{what}: {problem}"
        path = local_path(value, relative_to)
        if (problem := local_problem(path, base)) is not None:
            reason = "missing_pair" if problem[0] == "missing_file" else "unreadable_pair"
            return reason, f"{what} {path}: {problem[0]}: {problem[1]}"
        out.append(path)
    k = len(conditioning)
    return tuple(out[:k]), (out[k] if len(out) > k else mask)


def source_folder(base_dir: str | None) -> str:
    """Where relative paths of lists and datasets resolve: ``base_dir``, else the cwd."""
    return os.path.abspath(base_dir) if base_dir is not None else os.getcwd()
