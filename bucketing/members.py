"""Images read in place from inside an uncompressed tar shard, named by one string.

A tar member's image is never extracted: the index stores it as
``"<shard path>#<offset>:<length>:<member name>"`` (``/data/00012.tar#1536:20480:000123.jpg``),
the byte range of the member's data in the shard. :func:`read_member` reads exactly those
bytes by one positioned read, so a DataLoader worker opens the shard, reads one member and
closes it; ``ImageIndex.image_source`` hands the bytes to ``load_image``. The scan cache and
the encoder cache identify such a row by the shard's size and mtime (:func:`stat_path`) and
the member's offset (part of the string).

The spelling is reserved: a path whose ``.tar`` component is followed by ``#N:N`` names a
member, not a file.
"""

from __future__ import annotations

import errno
import os
import re
import stat

__all__ = ["member_path", "parse_member", "read_member", "stat_path"]

_MEMBER = re.compile(r"^(?P<shard>.+?\.tar)#(?P<offset>\d+):(?P<length>\d+)(?::.*)?$", re.I | re.S)


def member_path(shard: str, offset: int, length: int, name: str) -> str:
    """The index path of the member ``name`` whose data is ``length`` bytes at ``offset``
    of ``shard`` (an absolute path)."""
    return f"{shard}#{int(offset)}:{int(length)}:{name}"


def parse_member(path: str) -> tuple[str, int, int] | None:
    """(shard, offset, length) when ``path`` names a tar member, else None."""
    found = _MEMBER.match(path)
    if found is None:
        return None
    return found["shard"], int(found["offset"]), int(found["length"])


def stat_path(path: str) -> str:
    """The file whose size and mtime identify ``path``: its shard for a member, else itself."""
    member = parse_member(path)
    return path if member is None else member[0]


def read_member(path: str) -> bytes:
    """The bytes of the tar member ``path`` names, read by one ``pread``. ``OSError`` when
    the shard is not a regular file or ends before the member does (a truncated shard)."""
    member = parse_member(path)
    if member is None:
        raise ValueError(f"{path!r} names no tar member")
    shard, offset, length = member
    fd = os.open(shard, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", shard)
        data = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    if len(data) != length:
        raise OSError(
            errno.EIO,
            f"truncated tar member: {len(data)} of {length} bytes at offset {offset}",
            shard,
        )
    return data
