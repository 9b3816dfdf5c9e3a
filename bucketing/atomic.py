"""Atomic file writes: write to a temporary file beside the target, fsync, rename.

A process killed mid-write leaves either the old file or the new one, never a
torn one; every file this library writes goes through here. Only a regular file is
ever replaced: a device, FIFO, socket or folder at the target (or behind a symlink
there) is refused with ``FileExistsError`` before anything is written, and a symlink
to a regular file is followed (the file it points at is replaced, the link stays).
Callers that know more (the scan cache: "only a file in our format, never the
source") check that early with :func:`check_replaceable`, before doing any work.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


def _refuse(target: str, why: str) -> FileExistsError:
    """``[Errno 17] refusing to write over it: <why>: '<target>'``."""
    return FileExistsError(errno.EEXIST, f"refusing to write over it: {why}", target)


def check_replaceable(
    target: str | os.PathLike,
    *,
    keep: Iterable[str | os.PathLike] = (),
    ours: Callable[[str], bool] | None = None,
    what: str = "this output",
) -> str:
    """The path a write to ``target`` would replace (symlinks resolved); raises
    ``FileExistsError`` if that is not a regular file, is one of ``keep`` (the same file,
    whatever path names it), or exists and ``ours(path)`` says we did not write it."""
    real = os.path.realpath(os.fspath(target))
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        return real  # nothing there yet (a dangling symlink is created where it points)
    except (OSError, ValueError) as e:
        raise _refuse(os.fspath(target), f"cannot look at it ({e})") from None
    for is_kind, kind in _KINDS:
        if is_kind(mode):
            raise _refuse(real, f"it is {kind}, not a regular file")
    for path in keep:
        if _same_file(real, path):
            raise _refuse(real, f"it is the input {os.fspath(path)}; put {what} elsewhere")
    if ours is not None and not ours(real):
        raise _refuse(
            real,
            f"it exists and is not {what} written by this library; delete it or choose "
            "another path",
        )
    return real


def _same_file(a: str, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # b missing or not a valid path: not the same file
        return False


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path in the target's folder; on success fsync and rename it over
    target. Refuses (``FileExistsError``) a target that is not a regular file, up front."""
    target = Path(check_replaceable(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        f.write(data)
