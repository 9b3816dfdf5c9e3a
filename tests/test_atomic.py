"""atomic_path: all or nothing, no temp litter on failure, ordinary file permissions, and
never a device, FIFO, folder, input or foreign file replaced."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from bucketing.atomic import atomic_path, atomic_write_bytes, check_replaceable


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"half-written")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_new_file_gets_umask_permissions_not_mkstemp_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a" / "report.json", b"{}")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "a" / "report.json").stat().st_mode)
    assert mode == 0o644


def _specials(tmp_path):
    """Things at a target path that are not regular files: (name, path)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "keep.txt").write_text("user data")
    link = tmp_path / "link-to-fifo"
    link.symlink_to(fifo)
    dir_link = tmp_path / "link-to-folder"
    dir_link.symlink_to(folder)
    out = [("fifo", fifo), ("folder", folder), ("symlink to a FIFO", link),
           ("symlink to a folder", dir_link)]
    if os.geteuid() == 0:  # a private copy of /dev/null: never the real one
        dev = tmp_path / "null"
        os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        out.append(("character device", dev))
    return out


def test_refuses_to_replace_anything_but_a_regular_file(tmp_path):
    for name, target in _specials(tmp_path):
        before = os.stat(target).st_mode
        ran = []
        with pytest.raises(FileExistsError, match="not a regular file"), atomic_path(target):
            ran.append(name)  # the caller's work never starts
        assert ran == [], name
        assert os.stat(target).st_mode == before, name  # still a FIFO / folder / device
        with pytest.raises(FileExistsError, match="refusing to write over"):
            atomic_write_bytes(target, b"x")
    assert (tmp_path / "folder" / "keep.txt").read_text() == "user data"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_symlink_to_a_file_replaces_the_file_and_keeps_the_link(tmp_path):
    real = tmp_path / "store" / "cache.bin"
    real.parent.mkdir()
    real.write_bytes(b"old")
    link = tmp_path / "cache.bin"
    link.symlink_to(real)
    atomic_write_bytes(link, b"new")
    assert link.is_symlink() and real.read_bytes() == b"new"


def test_check_replaceable_keeps_inputs_and_foreign_files(tmp_path):
    source = tmp_path / "m.csv"
    source.write_text("image,caption\n")
    alias = tmp_path / "alias.csv"
    os.link(source, alias)  # the same file under another name
    for target in (source, alias):
        with pytest.raises(FileExistsError, match="the input"):
            check_replaceable(target, keep=[source])
    assert check_replaceable(tmp_path / "new.bin", keep=[source]) == str(tmp_path / "new.bin")

    def ours(path: str) -> bool:
        return Path(path).read_bytes().startswith(b"OURS")

    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    mine.write_bytes(b"OURS v1")
    theirs.write_bytes(b"a user's file")
    assert check_replaceable(mine, ours=ours) == str(mine)
    with pytest.raises(FileExistsError, match="not the cache written by this library"):
        check_replaceable(theirs, ours=ours, what="the cache")
    assert theirs.read_bytes() == b"a user's file"
