"""What every kind of source resolves to, and the checks they share.

An :class:`Entry` is one image to scan; a :class:`ResolvedSource` holds the entries, the
rejections and (for datasets holding image bytes) a byte reader. Caption text is read
and normalised here, and every local path goes through one check
(:func:`local_problem`: inside ``base_dir``, existing, a regular file).
"""

from __future__ import annotations

import codecs
import errno
import os
import re
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from bucketing.index import Rejection

if TYPE_CHECKING:
    from bucketing.sources.hf_dataset import RowBytes

_BASE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
CAPTION_SUFFIXES = (".txt", ".caption")
MAX_CAPTION_FILE_BYTES = 1 << 20  # a sidecar caption file larger than this is no caption
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_BOMS = (  # longest first: the UTF-32-LE BOM starts with the UTF-16-LE one
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


class Entry(NamedTuple):
    """One image to scan: an absolute local ``path``, its ``captions`` (possibly empty),
    for ``datasets.Dataset`` sources the dataset ``row`` it came from (else ``None``) and,
    for a download, the ``url`` it came from (``path`` is then the local copy).
    ``conditioning``: the paths of the row's conditioning images (K per dataset; empty
    without); ``mask``: the path of its loss mask, ``ALPHA_MASK`` for the image's alpha
    channel, or None."""

    path: str
    captions: list[str]
    row: int | None = None
    url: str | None = None
    conditioning: tuple[str, ...] = ()
    mask: str | None = None

    @property
    def label(self) -> str:
        """What a rejection of this entry names: the URL of a download, else the path."""
        return self.url or self.path


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


def read_regular_file(path: str, max_bytes: int | None = None) -> bytes:
    """The bytes of ``path``; OSError unless it is a regular file (a FIFO would block, a
    device may never end) of at most ``max_bytes``."""
    # opened without blocking (a FIFO would wait for a writer), then checked: no race
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        if max_bytes is not None and st.st_size > max_bytes:
            raise OSError(errno.EFBIG, f"larger than {max_bytes} bytes", path)
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:  # it grew since the stat
        raise OSError(errno.EFBIG, f"larger than {max_bytes} bytes", path)
    return data


def read_text(path: str, max_bytes: int | None = None) -> str:
    """Read a caption file or manifest as UTF-8 (a BOM is dropped; a UTF-16/32 BOM, as
    spreadsheets write, is honoured), falling back to cp1252 and then Latin-1 (which accepts
    every byte), so legacy Windows/Latin-1 captions read correctly.
    Only regular files are read: a FIFO would block and a device may never end (OSError);
    so is a file over ``max_bytes``."""
    return decode_text(read_regular_file(path, max_bytes))


def decode_text(data: bytes) -> str:
    """Caption or manifest bytes as text, decoded as :func:`read_text` says."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return data[len(bom) :].decode(encoding)
            except UnicodeDecodeError:
                break
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1")


def caption_lines(text: str) -> list[str]:
    """One caption per non-empty line, stripped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def sidecar_path(image: str, suffix: str = CAPTION_SUFFIXES[0]) -> str:
    """The sidecar caption file ``<stem of image><suffix>`` (default ``.txt``, the one a
    folder scan reads first and ``bucket-caption`` writes)."""
    return os.path.splitext(image)[0] + suffix


def read_sidecar(path: str) -> list[str]:
    """The captions of a sidecar caption file, one per non-empty line (:func:`read_text`'s
    encodings); OSError for a file that is not regular or is over
    ``MAX_CAPTION_FILE_BYTES``. Every reader of sidecar files goes through here."""
    return caption_lines(read_text(path, MAX_CAPTION_FILE_BYTES))


def captions_of(value: Any) -> list[str]:
    """Normalise a caption cell (string, list of strings, None/NaN) to a list of strings.
    Nested lists are flattened in order, however deep (no recursion). A lone surrogate (an
    invalid JSON escape such as ``\\ud800``, which tokenizers refuse) becomes U+FFFD."""
    out: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if hasattr(item, "tolist"):  # numpy / pyarrow values
            item = item.tolist()
        if item is None or (isinstance(item, float) and item != item):  # NaN: pandas' None
            continue
        if isinstance(item, str):
            if item.strip():
                out.append(_LONE_SURROGATE.sub("\ufffd", item.strip()))
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
        else:
            out.append(str(item))
    return out


def path_problem(value: str) -> str | None:
    """Why ``value`` can be no file name (a NUL, a lone surrogate), or None."""
    if "\0" in value:
        return "the path holds a NUL character"
    try:
        os.fsencode(value)
    except UnicodeEncodeError as e:
        return f"the path holds {value[e.start : e.end]!a}, which no file name can hold"
    return None


def local_path(value: str, relative_to: str) -> str:
    """Absolute, normalised path (symlinks kept) for a manifest or list value."""
    return os.path.normpath(os.path.join(relative_to, os.path.expanduser(value)))


def real_base(base_dir: str | None) -> str | None:
    """The real path of ``base_dir`` (symlinks resolved), or None without one."""
    return os.path.realpath(base_dir) if base_dir is not None else None


def _is_within(path: str, base: str) -> bool:
    try:
        return os.path.commonpath([path, base]) == base
    except ValueError:  # different drives on Windows
        return False


def local_problem(path: str, base: str | None) -> tuple[str, str] | None:
    """(reason, detail) if ``path`` escapes ``base`` (a real path, see :func:`real_base`)
    or is not an existing regular file; None when it can be scanned."""
    if base is not None:
        real = os.path.realpath(path)
        if not _is_within(real, base):
            return "outside_base_dir", f"resolves to {real}, outside {base}"
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        broken = os.path.lexists(path)
        return "missing_file", "broken symbolic link" if broken else "no such file"
    except OSError as e:
        return ("symlink_loop" if e.errno == errno.ELOOP else "unreadable"), str(e)
    if not stat.S_ISREG(mode):
        return "not_a_file", "not a regular file"
    return None
