"""atomic_path: all or nothing, no temp litter on failure, ordinary file permissions."""

from __future__ import annotations

import os
import stat

import pytest

from bucketing.atomic import atomic_path, atomic_write_bytes


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
