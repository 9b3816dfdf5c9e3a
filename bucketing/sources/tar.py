"""WebDataset / img2dataset tar shards, read in place: nothing extracted, nothing copied.

A source of shards is one ``.tar`` file, a folder holding ``.tar`` files (and no images),
a glob (``"shards/*.tar"``), a brace range (``"shards/{00000..00099}.tar"``, see
:mod:`bucketing.sources.braces`) or a list of ``.tar`` paths. Members are grouped by key
as WebDataset does (the member name up to the first dot of its base name): ``{key}.jpg``
(or any image extension) is the image, ``{key}.txt`` its captions (one per line), else
the ``caption`` of ``{key}.json``, else the ``caption`` column of the shard's sibling
``.parquet`` (img2dataset writes ``00012.parquet`` next to ``00012.tar``, keyed by
``key``). Sizes for ``scan(..., sizes="manifest")`` come from the json's, else the
parquet's, ``width``/``height``.

Each image becomes the path :func:`bucketing.members.member_path` spells (the shard, the
member's data offset and length, its name): the scan reads its header in place, and
``ImageIndex.image_source`` reads its bytes by one positioned read.

Problems become rejections: a shard that is not an uncompressed tar or has an unreadable
header part-way (what follows it is not read: ``unreadable``), a member cut short by the
end of the shard (``unreadable``, truncated), a member that is a link (``not_a_file``), a
second image for one key (``duplicate``), captions or metadata without an image
(``no_image``).
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bucketing.index import Rejection
from bucketing.members import member_path
from bucketing.sources.braces import brace_list
from bucketing.sources.entries import (
    MAX_CAPTION_FILE_BYTES,
    Entry,
    ResolvedSource,
    caption_lines,
    captions_of,
    decode_text,
    image_extensions,
    local_problem,
    real_base,
)
from bucketing.sources.shards import ManifestColumns

__all__ = ["resolve_tars", "tar_columns", "tar_shards"]

_GLOB_CHARS = ("*", "?", "[")
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$", re.S)  # WebDataset's base_plus_ext
_ZEROS_CHUNK = 1 << 20
_BLOCK = 512
_MAX_EXTENDED = 1 << 20  # a long name or pax header larger than this is no header
_ZERO_BLOCK = bytes(_BLOCK)


def _is_tar(name: str) -> bool:
    return name.lower().endswith(".tar")


def tar_shards(source: Any) -> list[str] | None:
    """The ``.tar`` shards of ``source`` (absolute paths, in order: sorted for a folder or a
    glob, as given for a list or brace range) when it names tar shards, else None. A glob
    ending in ``.tar`` that matches nothing raises ``FileNotFoundError``."""
    names = brace_list(source)
    if names is not None:
        source = names
    if isinstance(source, (list, tuple)):
        items = [os.fspath(s) for s in source if isinstance(s, (str, os.PathLike))]
        if source and len(items) == len(source) and all(_is_tar(str(n)) for n in items):
            return [os.path.abspath(n) for n in items]
        return None
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = os.fspath(source)
    if isinstance(path, bytes):
        return None
    if os.path.isdir(path):
        return _folder_tars(path)
    if os.path.exists(path):
        return [os.path.abspath(path)] if _is_tar(path) else None
    if not any(c in path for c in _GLOB_CHARS):
        return None
    found = sorted(os.path.abspath(f) for f in glob.glob(path, recursive=True) if _is_tar(f))
    if not found and _is_tar(path):
        raise FileNotFoundError(f"no .tar file matches {path!r}")
    return found or None


def _folder_tars(folder: str) -> list[str] | None:
    """The ``.tar`` files directly in ``folder`` (its subfolders are not searched), or None
    when it holds none. A folder holding both shards and images raises: which is meant?"""
    tars, images = [], []
    try:
        with os.scandir(folder) as it:
            for child in it:
                if child.name.lower().endswith(image_extensions()):
                    images.append(child.name)
                elif _is_tar(child.name) and not child.is_dir():
                    tars.append(os.path.abspath(child.path))
    except OSError:  # a link loop, an unreadable folder: the folder scan reports it
        return None
    if tars and images:
        raise ValueError(
            f"{folder} holds both tar shards ({os.path.basename(tars[0])}, ...) and images "
            f"({images[0]}, ...); pass the shards (a glob such as '{folder}/*.tar') or move "
            "them to a folder of their own"
        )
    return sorted(tars) or None


@dataclass
class _Sample:
    """One key of a shard: its image member (name, data offset, length), captions, sizes."""

    key: str
    image: tuple[str, int, int] | None = None
    captions: list[str] | None = None
    width: int = -1
    height: int = -1
    others: list[str] = field(default_factory=list)  # member names without an image


def _member_text(fd: int, member: _Member) -> str | None:
    """A small member's text; None when it is larger than a caption file may be."""
    if member.size > MAX_CAPTION_FILE_BYTES:
        return None
    return decode_text(os.pread(fd, member.size, member.offset))


def _json_fields(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _size(value: Any) -> int:
    """A whole positive pixel count, else -1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return -1
    return int(value) if value == int(value) and value > 0 else -1


def _list_shard(shard: str, images: frozenset[str]) -> tuple[list[_Sample], list[Rejection]]:
    """The keys of ``shard`` in order, and the rejections of listing it."""
    samples: dict[str, _Sample] = {}
    rejections: list[Rejection] = []
    try:
        fd = os.open(shard, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        return [], [Rejection(shard, "unreadable", e.strerror or str(e))]
    try:
        size = os.fstat(fd).st_size
        if os.pread(fd, 2, 0) == b"\x1f\x8b":
            return [], [Rejection(shard, "unreadable", "a compressed (gzip) tar cannot be "
                                  "read in place: decompress the shard")]  # fmt: skip
        members, end = _members(fd, size)
        if not members and end == 0 and not _zeros(fd, 0, min(size, _BLOCK)):
            return [], [Rejection(shard, "unreadable", "not an uncompressed tar archive (no "
                                  "valid header at byte 0)")]  # fmt: skip
        _group(members, fd, shard, size, images, samples, rejections)
        if end < size and not _zeros(fd, end, size):
            rejections.append(Rejection(shard, "unreadable", f"unreadable tar header at byte "
                                        f"{end}: the {size - end} bytes after it were not "
                                        "read"))  # fmt: skip
    except OSError as e:
        return [], [Rejection(shard, "unreadable", e.strerror or str(e))]
    finally:
        os.close(fd)
    _add_parquet(shard, samples)
    return list(samples.values()), rejections


class _Member(NamedTuple):
    """One tar member: its ``name``, data ``offset`` and ``size`` in the shard, and its
    ``kind``: ``"file"``, ``"dir"`` or ``"other"`` (links, devices, sparse files)."""

    name: str
    offset: int
    size: int
    kind: str


def _number(field: bytes) -> int:
    """A tar header number: octal digits, or GNU base-256 (high bit of the first byte)."""
    if field[:1] and field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[0] & 0x40 else value
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _pax(data: bytes) -> dict[bytes, bytes]:
    """The ``length key=value\\n`` records of a pax extended header."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        if length <= 0:
            break
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key] = value
        pos += length
    return out


def _members(fd: int, size: int) -> tuple[list[_Member], int]:
    """The members of the tar at ``fd`` (ustar, GNU long names, pax paths and sizes), and
    the offset where the walk stopped: the end-of-archive block, the end of the file, or a
    header that is not one (a bad checksum)."""
    members: list[_Member] = []
    pos = 0
    long_name: bytes | None = None
    pax: dict[bytes, bytes] = {}
    while pos + _BLOCK <= size:
        block = os.pread(fd, _BLOCK, pos)
        if len(block) < _BLOCK or block == _ZERO_BLOCK:
            return members, pos
        try:
            stored = _number(block[148:156])
            length = _number(block[124:136])
        except ValueError:
            return members, pos
        checksum = sum(block[:148]) + 256 + sum(block[156:])
        if stored != checksum or length < 0:
            return members, pos
        flag = block[156:157]
        data = pos + _BLOCK
        after = data + (length + _BLOCK - 1) // _BLOCK * _BLOCK
        if flag in (b"L", b"x", b"g"):  # a header for the next member (or global: skipped)
            if length > _MAX_EXTENDED:
                return members, pos
            payload = os.pread(fd, length, data)
            if flag == b"L":
                long_name = payload.split(b"\0", 1)[0]
            elif flag == b"x":
                pax = _pax(payload)
            pos = after
            continue
        name = block[:100].split(b"\0", 1)[0]
        if block[257:262] == b"ustar":
            prefix = block[345:500].split(b"\0", 1)[0]
            name = prefix + b"/" + name if prefix else name
        name = pax.get(b"path", long_name or name)
        if b"size" in pax:
            length = int(pax[b"size"])
            after = data + (length + _BLOCK - 1) // _BLOCK * _BLOCK
        kind = "file" if flag in (b"0", b"\0", b"7") else "dir" if flag == b"5" else "other"
        members.append(_Member(name.decode("utf-8", "surrogateescape"), data, length, kind))
        long_name, pax = None, {}
        pos = after
    return members, pos


def _group(
    members: list[_Member],
    fd: int,
    shard: str,
    size: int,
    images: frozenset[str],
    samples: dict[str, _Sample],
    rejections: list[Rejection],
) -> None:
    """Group ``members`` by key into ``samples``: images, captions, sizes."""
    for m in members:
        found = _KEY.match(m.name)
        if m.kind == "dir" or found is None:
            continue
        key, ext = found[1], found[2].lower()
        sample = samples.setdefault(key, _Sample(key))
        is_image = "." + ext in images
        if m.kind != "file":
            if is_image:
                rejections.append(Rejection(member_path(shard, m.offset, m.size, m.name),
                                            "not_a_file", "a link or special member, not the "
                                            "image's bytes"))  # fmt: skip
            continue
        if m.offset + m.size > size:
            end = m.offset + m.size
            rejections.append(Rejection(member_path(shard, m.offset, m.size, m.name),
                                        "unreadable", f"truncated tar member: the shard ends "
                                        f"at byte {size}, the member at {end}"))  # fmt: skip
            continue
        if is_image:
            if sample.image is not None:
                rejections.append(Rejection(member_path(shard, m.offset, m.size, m.name),
                                            "duplicate", f"key {key!r} already has the image "
                                            f"{sample.image[0]}"))  # fmt: skip
            else:
                sample.image = (m.name, m.offset, m.size)
            continue
        if ext == "txt":
            text = _member_text(fd, m)
            sample.captions = caption_lines(text) if text is not None else []
        elif ext == "json":
            meta = _json_fields(_member_text(fd, m))
            if sample.captions is None and "caption" in meta:
                sample.captions = captions_of(meta["caption"])
            sample.width, sample.height = _size(meta.get("width")), _size(meta.get("height"))
        else:
            continue
        sample.others.append(m.name)


def _zeros(fd: int, start: int, end: int) -> bool:
    """Whether bytes ``start:end`` are all zero (tar's end-of-archive padding)."""
    for offset in range(start, end, _ZEROS_CHUNK):
        if os.pread(fd, min(_ZEROS_CHUNK, end - offset), offset).strip(b"\0"):
            return False
    return True


def _add_parquet(shard: str, samples: dict[str, _Sample]) -> None:
    """Captions and sizes the keys lack, from the shard's sibling ``.parquet`` (img2dataset's
    ``key``, ``caption``, ``width``, ``height`` columns) when it has a ``key`` column."""
    path = os.path.splitext(shard)[0] + ".parquet"
    if not os.path.isfile(path):
        return
    names = pq.read_schema(path).names
    if "key" not in names:
        return
    wanted = ["key"] + [c for c in ("caption", "width", "height") if c in names]
    table = pq.read_table(path, columns=wanted).to_pydict()
    keys = table["key"]
    for i, key in enumerate(keys):
        sample = samples.get(str(key).rsplit("/", 1)[-1]) or samples.get(str(key))
        if sample is None:
            continue
        if sample.captions is None and "caption" in table:
            sample.captions = captions_of(table["caption"][i])
        if sample.width < 0 and "width" in table and "height" in table:
            sample.width, sample.height = _size(table["width"][i]), _size(table["height"][i])


def _listings(
    shards: Sequence[str], base_dir: str | None
) -> tuple[list[tuple[str, _Sample]], list[Rejection]]:
    """(shard, sample with an image) for every key of every shard, in order, and the
    rejections. A missing shard is a rejection unless every shard is missing (raises)."""
    if not any(os.path.exists(s) for s in shards):
        raise FileNotFoundError(f"tar shard {shards[0]!r} does not exist"
                                + (f" (nor do the {len(shards) - 1} others)" if len(shards) > 1
                                   else ""))  # fmt: skip
    base = real_base(base_dir)
    images = frozenset(image_extensions())
    found: list[tuple[str, _Sample]] = []
    rejections: list[Rejection] = []
    for shard in shards:
        problem = local_problem(shard, base)
        if problem is not None:
            rejections.append(Rejection(shard, *problem))
            continue
        samples, more = _list_shard(shard, images)
        rejections.extend(more)
        for sample in samples:
            if sample.image is None:
                rejections.append(Rejection(f"{shard}:{sample.key}", "no_image",
                                            f"{', '.join(sample.others)} without an image "
                                            "member"))  # fmt: skip
            else:
                found.append((shard, sample))
    return found, rejections


def resolve_tars(shards: Sequence[str], base_dir: str | None) -> ResolvedSource:
    """Entries for the images of tar ``shards``, for a scan that reads their headers in
    place (no file is extracted)."""
    found, rejections = _listings(shards, base_dir)
    entries = [Entry(member_path(shard, s.image[1], s.image[2], s.image[0]), s.captions or [])
               for shard, s in found]  # fmt: skip
    return ResolvedSource(entries, rejections)


def tar_columns(shards: Sequence[str], base_dir: str | None) -> ManifestColumns:
    """Paths, captions and sizes of tar ``shards`` for ``scan(..., sizes="manifest")``:
    sizes from each key's json or the shard's parquet; a key without them is ``bad_row``.
    No image member is read."""
    found, rejections = _listings(shards, base_dir)
    paths, captions, width, height = [], [], [], []
    for shard, s in found:
        path = member_path(shard, s.image[1], s.image[2], s.image[0])
        if s.width <= 0 or s.height <= 0:
            rejections.append(Rejection(path, "bad_row", "no width/height in the member's json "
                                        "or the shard's parquet"))  # fmt: skip
            continue
        paths.append(path)
        captions.append(s.captions or [])
        width.append(s.width)
        height.append(s.height)
    return ManifestColumns(
        pa.array(paths, pa.large_string()),
        pa.array(captions, pa.large_list(pa.large_string())),
        np.asarray(width, np.int64),
        np.asarray(height, np.int64),
        rejections,
    )
