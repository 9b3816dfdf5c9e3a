"""Oriented image size from the file header, without decoding a single pixel.

``read_header(path_or_bytes)`` returns the width and height a user sees after
``PIL.ImageOps.exif_transpose``: the stored size, swapped when the orientation is a
quarter turn (EXIF tag 274 values 5-8, or XMP ``tiff:Orientation`` where Pillow
honours it). JPEG and PNG, the bulk of any photo set, are parsed here by a marker /
chunk walk that mirrors what Pillow's plugins and ``Image.getexif`` read: for JPEG the
last SOF before SOS, the concatenated ``Exif`` APP1 segments, the last XMP APP1; for
PNG the IHDR and every ``eXIf``/text chunk before *and after* the image data (Pillow
reads the latter when it loads). Anything unusual on that path, and every other format
(WebP, TIFF, AVIF, GIF, BMP, ...), goes through ``PIL.Image.open`` (lazy: header only)
and ``Image.getexif`` instead, so the two paths can only disagree on files Pillow
itself cannot decode.

The reader never raises on bad input: every failure is a :class:`Header` with a
``reason`` (``missing_file``, ``empty_file``, ``not_an_image``, ``unreadable``,
``too_many_pixels``) and a human ``detail``.
"""

from __future__ import annotations

import io
import os
import re
import stat
import struct
import warnings
import zlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from bucketing.members import parse_member

__all__ = [
    "READER_VERSION", "SWAPS_AXES", "Header", "default_max_pixels", "orientation_code",
    "read_header", "read_many", "worker_init", "worker_read",
]  # fmt: skip

READER_VERSION = 1
"""Bumped whenever a header could be read differently; scan caches of another version
are rebuilt."""

_WINDOW = 4096
# non-blocking: a FIFO put where an image was must not hang the scan
_OPEN_FLAGS = getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
_MAX_TEXT = 64 * 2**20  # Pillow refuses PNGs with more text than this (MAX_TEXT_MEMORY)
SWAPS_AXES = frozenset({5, 6, 7, 8})
"""Orientation codes that turn the image a quarter turn (width and height swap)."""
_CODES = {code: code for code in range(1, 9)}
_ABSENT = object()  # an EXIF directory without an orientation entry
_ASK_PILLOW = object()  # an orientation entry the fast parser leaves to Pillow

_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE,
                       0xCF, 0xDE})  # fmt: skip
_JPEG_SEGMENT = frozenset({0xC4, 0xCC, 0xDA, 0xDB, 0xDC, 0xDD, 0xDF, 0xFE, *range(0xE0, 0xF0)})
_JPEG_BARE = frozenset({0xC8, *range(0xD0, 0xDA), *range(0xF0, 0xFE)})  # markers without length
_XMP_PREFIX = b"http://ns.adobe.com/xap/1.0/\x00"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_TEXT = frozenset({b"tEXt", b"zTXt", b"iTXt", b"eXIf"})
_PNG_KEYS = frozenset({b"exif", b"xmp", b"Raw profile type exif", b"XML:com.adobe.xmp"})
_is_cid = re.compile(rb"\w\w\w\w").match
_XMP_STR = re.compile(r'tiff:Orientation(="|>)([0-9])')
_XMP_BYTES = re.compile(rb'tiff:Orientation(="|>)([0-9])')
_SIGNATURES = (
    (0, b"\xff\xd8\xff", "JPEG"), (0, _PNG_MAGIC, "PNG"), (0, b"GIF8", "GIF"),
    (0, b"BM", "BMP"), (0, b"II*\x00", "TIFF"), (0, b"MM\x00*", "TIFF"), (8, b"WEBP", "WebP"),
    (4, b"ftyp", "AVIF/HEIF"), (0, b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (0, b"\xff\x4f\xff\x51", "JPEG 2000"),
)  # fmt: skip


class Header(NamedTuple):
    """Oriented ``width`` x ``height`` of an image, or why there is none.

    ``reason`` is None when the header was read; otherwise a short code and ``detail``
    says what went wrong. ``io_error`` marks failures of the file system (permission,
    vanished file) rather than of the content: they may pass on retry and are never cached.
    """

    width: int = 0
    height: int = 0
    reason: str | None = None
    detail: str = ""
    io_error: bool = False

    @property
    def ok(self) -> bool:
        return self.reason is None


def default_max_pixels() -> int | None:
    """Pillow's decompression-bomb *error* limit: ``2 * Image.MAX_IMAGE_PIXELS`` (None: off)."""
    from PIL import Image

    return None if Image.MAX_IMAGE_PIXELS is None else 2 * int(Image.MAX_IMAGE_PIXELS)


def read_header(source: str | os.PathLike | bytes, *, max_pixels: int | None = None) -> Header:
    """Read the oriented size of the image at ``source`` (a path or the encoded bytes).

    Only the header is parsed. With ``max_pixels``, a larger image is rejected as
    ``too_many_pixels`` (a decompression bomb) before anything else is done with it.
    Never raises for bad input.
    """
    header = _read(source)
    if header.ok and max_pixels is not None and header.width * header.height > max_pixels:
        return Header(
            reason="too_many_pixels",
            detail=f"{header.width}x{header.height} is more than {max_pixels} pixels",
        )
    return header


def read_many(
    items: Sequence[tuple[str, int | None]], blobs: Callable[[int], bytes] | None = None
) -> list[Header]:
    """Headers for ``(path, row)`` items: the file at ``path``, or ``blobs(row)`` when
    ``row`` is not None (images stored inside a dataset). Never raises for bad input."""
    out = []
    for path, row in items:
        if row is None:
            out.append(read_header(path))
            continue
        try:
            data = blobs(row)  # type: ignore[misc]
        except Exception as e:
            detail = f"cannot read dataset row {row}: {type(e).__name__}: {e}"[:200]
            out.append(Header(reason="unreadable", detail=detail, io_error=True))
            continue
        out.append(read_header(data))
    return out


# Worker-process entry points for ``bucketing.scan``, next to the reader they run. A worker
# started by spawn/forkserver imports the ``bucketing`` package, whose __init__ loads the core
# (numpy, pyarrow, Pillow) and nothing of torch: the upper floors are imported on first use.
_WORKER_BLOBS: Callable[[int], bytes] | None = None


def worker_init(blobs: Callable[[int], bytes] | None) -> None:
    """Process-pool initializer: remember the blob reader for :func:`worker_read`."""
    global _WORKER_BLOBS
    _WORKER_BLOBS = blobs


def worker_read(items: Sequence[tuple[str, int | None]]) -> list[Header]:
    """Process-pool task: :func:`read_many` with the blob reader given at start-up."""
    return read_many(items, _WORKER_BLOBS)


# --------------------------------------------------------------------------- dispatch


class _Reader:
    """Random access to a file (``os.pread`` through one cached window) or to bytes; for a
    tar member, to the ``size`` bytes at ``base`` of its shard."""

    __slots__ = ("fd", "data", "start", "size", "base")

    def __init__(self, fd: int | None, data: bytes, size: int, base: int = 0) -> None:
        self.fd, self.data, self.start, self.size, self.base = fd, data, 0, size, base

    def read(self, offset: int, n: int) -> bytes:
        i = offset - self.start
        if self.fd is None or (i >= 0 and i + n <= len(self.data)):
            return self.data[i : i + n] if i >= 0 else b""
        if offset >= self.size or offset < 0:
            return b""
        window = min(n + _WINDOW, self.size - offset) if self.base else n + _WINDOW
        self.data, self.start = os.pread(self.fd, window, self.base + offset), offset
        return self.data[:n]


def _read(source: str | os.PathLike | bytes) -> Header:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            return Header(reason="empty_file", detail="0 bytes")
        return _parse(_Reader(None, data, len(data)), source=data)
    path = os.fspath(source)
    member = parse_member(path)
    if member is None:
        return _read_file(path, None)
    shard, offset, length = member
    return _read_file(shard, (offset, length))


def _read_file(path: str, member: tuple[int, int] | None) -> Header:
    """The header of the file at ``path``, or of the ``(offset, length)`` bytes of the tar
    shard at ``path`` when ``member`` is given (read in place)."""
    missing = "no such file" if member is None else "no such tar shard"
    try:
        fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
    except FileNotFoundError:
        return Header(reason="missing_file", detail=missing, io_error=True)
    except OSError as e:
        return Header(reason="unreadable", detail=_oserror(e), io_error=True)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return Header(reason="unreadable", detail="not a regular file", io_error=True)
        if member is None:
            head = os.pread(fd, _WINDOW, 0)
            if not head:
                return Header(reason="empty_file", detail="0 bytes")
            return _parse(_Reader(fd, head, max(st.st_size, len(head))), source=path)
        offset, length = member
        if offset + length > st.st_size:
            return Header(reason="unreadable", detail=f"truncated tar member: the shard ends "
                          f"at byte {st.st_size}, the member at {offset + length}")  # fmt: skip
        if not length:
            return Header(reason="empty_file", detail="0 bytes")
        r = _Reader(fd, os.pread(fd, min(_WINDOW, length), offset), length, offset)
        return _parse(r, source=None)
    except OSError as e:
        return Header(reason="unreadable", detail=_oserror(e), io_error=True)
    finally:
        os.close(fd)


def _parse(r: _Reader, source: str | bytes | None) -> Header:
    """The header read through ``r``; ``source`` is what Pillow opens when needed (None:
    the bytes ``r`` reads)."""
    head = r.read(0, 8)
    try:
        if head.startswith(b"\xff\xd8\xff"):
            found = _jpeg(r)
        elif head == _PNG_MAGIC:
            found = _png(r)
        else:
            found = None
    except (OSError, ValueError, IndexError, struct.error):  # odd enough to ask Pillow
        found = None
    if found is None:
        return _pillow(source, r)
    (w, h), info = found
    orientation = _orientation(info)
    return _oriented(w, h, orientation)


def orientation_code(value: Any) -> int:
    """The EXIF orientation (1..8) that ``ImageOps.exif_transpose`` applies for a tag-274
    ``value`` as ``Image.getexif()`` returns it; 1 (as stored) for anything else.

    Pillow looks the raw value up in a dict keyed 2..8, so a RATIONAL or FLOAT entry
    (``IFDRational(6, 1)``, ``6.0``) counts as 6 while ``"6"``, ``6.5``, ``True`` or a
    tuple count as nothing. Unhashable junk, on which ``exif_transpose`` itself raises,
    is 1 here. ``scan`` (the oriented size) and ``load_image`` (the pixels) share this
    one rule, so they cannot disagree.
    """
    try:
        return _CODES.get(value, 1)
    except TypeError:
        return 1


def _oriented(w: int, h: int, orientation: Any) -> Header:
    if w <= 0 or h <= 0:
        return Header(reason="unreadable", detail=f"header declares a {w}x{h} image")
    return Header(h, w) if orientation_code(orientation) in SWAPS_AXES else Header(w, h)


def _oserror(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


# --------------------------------------------------------------------------- JPEG


def _jpeg(r: _Reader) -> tuple[tuple[int, int], dict] | None:
    """Walk the markers as ``JpegImagePlugin`` does, up to SOS; None where it is not plain."""
    pos = 3  # the byte after an 0xFF: Pillow consumes FF D8 and keeps the third FF
    size = None
    exif: list[tuple[int, int]] = []
    xmp: tuple[int, int] | None = None
    while True:
        b = r.read(pos, 3)
        if not b:
            return None
        m = b[0]
        if m == 0xFF:  # fill bytes: skip a run at C speed (a hostile file may hold millions)
            run = r.read(pos, _WINDOW)
            pos += len(run) - len(run.lstrip(b"\xff"))
            continue
        if m in _JPEG_BARE:
            if r.read(pos + 1, 1) != b"\xff":
                return None
            pos += 2
            continue
        if m not in _JPEG_SOF and m not in _JPEG_SEGMENT or len(b) < 3:
            return None
        length = b[1] << 8 | b[2]
        start, end = pos + 3, pos + 1 + length
        if length < 2 or end > r.size:
            return None
        if m in _JPEG_SOF:
            s = r.read(start, 6)
            if len(s) < 6 or s[0] != 8 or s[5] not in (1, 3, 4):
                return None  # Pillow refuses these; let it say why
            size = (s[3] << 8 | s[4], s[1] << 8 | s[2])
        elif m == 0xE1:
            tag = r.read(start, len(_XMP_PREFIX))
            if tag.startswith(b"Exif\x00\x00"):
                exif.append((start, length - 2))
            elif tag == _XMP_PREFIX:
                xmp = (start, length - 2)
        if m == 0xDA:
            break
        if r.read(end, 1) != b"\xff":
            return None
        pos = end + 1
    if size is None:
        return None
    info: dict[str, Any] = {}
    if exif:
        first, n = exif[0]
        info["exif"] = r.read(first, n) + b"".join(r.read(s + 6, k - 6) for s, k in exif[1:])
    if xmp is not None:
        info["xmp"] = r.read(*xmp).split(b"\x00", 1)[1]
    return size, info


# --------------------------------------------------------------------------- PNG


def _png(r: _Reader) -> tuple[tuple[int, int], dict] | None:
    """Walk the chunks as ``PngImagePlugin`` does at open *and* at load, skipping image data."""
    info: dict[str, Any] = {}
    size = None
    pos, in_data, animated = 8, False, False
    while True:
        hdr = r.read(pos, 8)
        if len(hdr) < 8 or not _is_cid(hdr, 4):
            if not in_data:
                return None  # Pillow refuses a broken chunk before the image data
            break
        length, cid = int.from_bytes(hdr[:4], "big"), hdr[4:]
        start = pos + 8
        pos = start + length + 4
        if cid == b"IEND":
            if not in_data:
                return None
            break
        if not in_data:
            if cid == b"IDAT":
                in_data = True
                continue
            if cid == b"IHDR":
                s = r.read(start, 13)
                if length < 13 or len(s) < 13 or s[11]:  # Pillow: "unknown filter category"
                    return None
                size = (int.from_bytes(s[:4], "big"), int.from_bytes(s[4:8], "big"))
            elif cid == b"iCCP":  # Pillow refuses an unknown compression method here
                s = r.read(start, min(length, 81))
                if s[s.find(b"\x00") + 1 :][:1] != b"\x00":
                    return None
            elif cid == b"acTL" and length >= 8:
                n = int.from_bytes(r.read(start, 4), "big")
                animated = not animated and 1 < n <= 0x80000000
        elif cid == b"fcTL" and animated:
            break  # Pillow stops at the next frame
        if cid in _PNG_TEXT and length <= _MAX_TEXT:
            _png_text(cid, r.read(start, length), info)
    return (size, info) if size is not None else None


def _png_text(cid: bytes, s: bytes, info: dict) -> None:
    """Mirror the ``info`` keys Pillow's text/eXIf chunk handlers set that ``getexif`` reads."""
    if cid == b"eXIf":
        info["exif"] = b"Exif\x00\x00" + s
        return
    k, _, v = s.partition(b"\x00")
    if k not in _PNG_KEYS:
        return
    key = k.decode("latin-1")
    if cid == b"tEXt":
        info[key] = v if k == b"exif" else v.decode("latin-1", "replace")
    elif cid == b"zTXt":
        if v[:1] not in (b"", b"\x00"):
            return
        info[key] = _inflate(v[1:]).decode("latin-1", "replace")
    else:  # iTXt
        if len(v) < 2:
            return
        compressed, method, rest = v[0], v[1], v[2:]
        parts = rest.split(b"\x00", 2)
        if len(parts) < 3:
            return
        text = parts[2]
        if compressed:
            if method != 0:
                return
            try:
                text = _inflate(text, strict=True)
            except zlib.error:
                return
        if k == b"XML:com.adobe.xmp":
            info["xmp"] = text
        try:
            parts[0].decode("utf-8"), parts[1].decode("utf-8")  # Pillow drops the chunk if not
            info[key] = text.decode("utf-8")
        except UnicodeDecodeError:
            return


def _inflate(data: bytes, strict: bool = False) -> bytes:
    from PIL import PngImagePlugin

    d = zlib.decompressobj()
    try:
        out = d.decompress(data, PngImagePlugin.MAX_TEXT_CHUNK)
    except zlib.error:
        if strict:
            raise
        return b""
    if d.unconsumed_tail:  # Pillow refuses the file; any answer will do
        raise ValueError("text chunk too large")
    return out


# --------------------------------------------------------------------------- orientation


def _orientation(info: dict) -> Any:
    """What ``Image.getexif().get(274, 1)`` returns for an image with this ``info``."""
    exif_info = info.get("exif")
    found: Any = _ABSENT
    try:
        if exif_info is None and "Raw profile type exif" in info:
            exif_info = bytes.fromhex("".join(info["Raw profile type exif"].split("\n")[3:]))
        if exif_info is not None:
            found = _ifd0_orientation(exif_info) if isinstance(exif_info, bytes) else _ASK_PILLOW
            if found is _ASK_PILLOW:
                found = _pillow_exif_orientation(exif_info)
        if found is not _ABSENT:
            return found
        xmp = info.get("XML:com.adobe.xmp")
        pattern: Any = _XMP_STR
        if not xmp and (xmp := info.get("xmp")):
            pattern = _XMP_BYTES
        if xmp:
            match = pattern.search(xmp)
            if match:
                return int(match[2])
    except Exception:  # Pillow's exif_transpose raises here: decoding fails later anyway
        return 1
    return 1


def _ifd0_orientation(data: bytes) -> Any:
    """Tag 274 of the first IFD of a TIFF-structured EXIF blob, read the way Pillow does.

    Returns the value for the plain encodings (SHORT or LONG, one value), ``_ABSENT``
    when the directory has no entry, ``_ASK_PILLOW`` for everything else.
    """
    for _ in range(2):  # Pillow strips up to two "Exif\0\0" prefixes
        if data.startswith(b"Exif\x00\x00"):
            data = data[6:]
    head = data[:4]
    if head == b"II*\x00":
        e = "<"
    elif head == b"MM\x00*":
        e = ">"
    else:
        return _ASK_PILLOW
    if len(data) < 8:
        return _ASK_PILLOW
    (ifd,) = struct.unpack_from(e + "L", data, 4)
    if ifd + 2 > len(data):
        return _ABSENT
    (count,) = struct.unpack_from(e + "H", data, ifd)
    count = min(count, (len(data) - ifd - 2) // 12)  # Pillow stops at a truncated entry
    for i in range(ifd + 2, ifd + 2 + 12 * count, 12):
        tag, typ, n = struct.unpack_from(e + "HHL", data, i)
        if tag == 274:
            if n == 1 and typ == 3:
                return struct.unpack_from(e + "H", data, i + 8)[0]
            if n == 1 and typ == 4:
                return struct.unpack_from(e + "L", data, i + 8)[0]
            return _ASK_PILLOW
    return _ABSENT


def _pillow_exif_orientation(exif_info: Any) -> Any:
    from PIL import Image

    exif = Image.Exif()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exif.load(exif_info)
    return exif.get(274, _ABSENT)


# --------------------------------------------------------------------------- Pillow


def _pillow(source: str | bytes | None, r: _Reader) -> Header:
    """Open lazily with Pillow (header only) for the formats and oddities not parsed above."""
    from PIL import Image, TiffImagePlugin

    if source is None:  # a tar member: its bytes
        source = r.read(0, r.size)
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(fp) as im:
                w, h = im.size
                if isinstance(im, TiffImagePlugin.TiffImageFile):
                    return _oriented(w, h, 1)  # Pillow already reports TIFF sizes oriented
                try:
                    orientation = im.getexif().get(274, 1)
                except Exception:
                    orientation = 1
                return _oriented(w, h, orientation)
        except Image.DecompressionBombError as e:
            return Header(reason="too_many_pixels", detail=str(e))
        except Image.UnidentifiedImageError:
            kind = _sniff(r.read(0, 16))
            if kind is None:
                return Header(reason="not_an_image", detail="no known image format signature")
            return Header(reason="unreadable", detail=f"corrupt or truncated {kind} header")
        except MemoryError:
            return Header(reason="too_many_pixels", detail="header asks for too much memory")
        except Exception as e:
            detail = f"{type(e).__name__}: {e}"[:200]
            return Header(reason="unreadable", detail=detail)


def _sniff(head: bytes) -> str | None:
    for offset, magic, name in _SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            return name
    return None
