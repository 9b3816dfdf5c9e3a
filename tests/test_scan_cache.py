"""The incremental scan cache: rescans read only what changed and equal a cold scan;
bad cache files are ignored with a warning and rebuilt; writes are atomic under
SIGKILL and under two concurrent scans; the file is parquet (no pickle)."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import random
import signal
import time
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bucketing import scan
from bucketing.headers import Header
from bucketing.index import ImageIndex
from bucketing.scan_cache import CacheRow, ScanCache


def write_image(path: Path, size: tuple[int, int], orientation: int = 1) -> None:
    exif = Image.Exif()
    exif[274] = orientation
    fmt = "PNG" if path.suffix == ".png" else "JPEG"
    Image.new("RGB", size, (90, 20, 160)).save(path, fmt, exif=exif.tobytes())


def signature(index: ImageIndex) -> tuple:
    return index.paths, index.sizes.tolist(), index.captions, sorted(index.rejections)


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    rng = random.Random(3)
    for i in range(30):
        ext = ".png" if i % 3 == 0 else ".jpg"
        write_image(root / f"{i:02d}{ext}", (rng.randint(10, 80), rng.randint(10, 80)), i % 8 + 1)
    (root / "07.txt").write_text("a caption\n")
    (root / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def test_rescan_reads_only_what_changed(folder, tmp_path):
    cache = tmp_path / "scan.parquet"
    cold = scan(folder, cache=cache, workers=0)
    assert cold.scan_stats.read == 31 and cold.scan_stats.cache == "absent"
    written = cache.stat().st_mtime_ns

    warm = scan(folder, cache=cache, workers=0)
    assert (warm.scan_stats.read, warm.scan_stats.reused, warm.scan_stats.cache) == (
        0,
        31,
        "loaded",
    )
    assert signature(warm) == signature(cold)
    assert cache.stat().st_mtime_ns == written  # nothing changed: not rewritten

    st = (folder / "03.png").stat()
    os.utime(folder / "03.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touch
    write_image(folder / "04.jpg", (200, 100), 6)  # edit: new size, now a quarter turn
    (folder / "05.jpg").unlink()  # delete
    write_image(folder / "new1.png", (33, 44))  # add two
    write_image(folder / "new2.jpg", (55, 66), 8)
    (folder / "07.txt").write_text("a new caption\n")  # captions are never cached

    rescan = scan(folder, cache=cache, workers=0)
    assert rescan.scan_stats.read == 4  # touched, edited, two new
    assert rescan.scan_stats.reused == 31 - 1 - 2
    assert signature(rescan) == signature(scan(folder, workers=0))
    sizes = dict(zip(map(os.path.basename, rescan.paths), rescan.sizes.tolist(), strict=True))
    assert sizes["04.jpg"] == [100, 200] and sizes["new2.jpg"] == [66, 55]
    assert "05.jpg" not in sizes
    assert rescan.captions[rescan.paths.index(str(folder / "07.jpg"))] == ["a new caption"]
    assert len(ScanCache.load(cache)) == 32  # the deleted file dropped out

    again = scan(folder, cache=cache, workers=0)
    assert again.scan_stats.read == 0 and signature(again) == signature(rescan)


def test_max_pixels_applies_to_cached_sizes(folder, tmp_path):
    cache = tmp_path / "scan.parquet"
    scan(folder, cache=cache, workers=0)
    warm = scan(folder, cache=cache, workers=0, max_pixels=40 * 40)
    assert warm.scan_stats.read == 0
    assert signature(warm) == signature(scan(folder, workers=0, max_pixels=40 * 40))
    assert any(r.reason == "too_many_pixels" for r in warm.rejections)


def foreign_files(tmp_path: Path, good: bytes) -> dict[str, bytes]:
    other = tmp_path / "index.parquet"
    ImageIndex(["a.jpg"], [1], [1], [[]]).save(other)  # our own index: another format
    table = pq.read_table(pa.BufferReader(good))
    old = tmp_path / "old.parquet"
    meta = {**{k.decode(): v.decode() for k, v in table.schema.metadata.items()}, "version": "0"}
    pq.write_table(table.replace_schema_metadata(meta), old)
    reader = tmp_path / "reader.parquet"
    pq.write_table(table.replace_schema_metadata({**meta, "version": "1", "reader": "0"}), reader)
    return {
        "garbage": b"this is not parquet",
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "index": other.read_bytes(),
        "old_version": old.read_bytes(),
        "old_reader": reader.read_bytes(),
        "pickle": pickle.dumps({"path": ["x"]}),
    }


def test_bad_cache_files_are_ignored_and_rebuilt(folder, tmp_path):
    cache = tmp_path / "scan.parquet"
    cold = scan(folder, cache=cache, workers=0)
    for name, data in foreign_files(tmp_path, cache.read_bytes()).items():
        cache.write_bytes(data)
        if name not in ("old_version", "old_reader"):  # not a scan cache: never replaced
            with pytest.raises(FileExistsError, match="not the scan cache"):
                scan(folder, cache=cache, workers=0)
            assert cache.read_bytes() == data, name
            continue
        with pytest.warns(RuntimeWarning, match="ignoring scan cache"):
            index = scan(folder, cache=cache, workers=0)
        assert index.scan_stats.cache == "rebuilt" and index.scan_stats.read == 31, name
        assert signature(index) == signature(cold), name
        assert ScanCache.load(cache).status == "loaded", name  # rewritten, valid


def test_cache_is_parquet_and_never_unpickled(folder, tmp_path, monkeypatch):
    cache = tmp_path / "scan.parquet"
    scan(folder, cache=cache, workers=0)
    data = cache.read_bytes()
    assert data[:4] == data[-4:] == b"PAR1"

    def refuse(*args, **kwargs):
        raise AssertionError("the scan cache must never be unpickled")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    assert scan(folder, cache=cache, workers=0).scan_stats.read == 0


def test_non_utf8_file_names_round_trip(tmp_path):
    root = tmp_path / "names"
    root.mkdir()
    name = os.fsdecode(b"caf\xe9-\xff.jpg")  # Latin-1 bytes, not UTF-8
    write_image(root / name, (21, 12), 6)
    cache = tmp_path / "scan.parquet"
    cold = scan(root, cache=cache, workers=0)
    warm = scan(root, cache=cache, workers=0)
    assert warm.scan_stats.read == 0 and warm.paths == cold.paths == [str(root / name)]
    assert warm.sizes.tolist() == [[12, 21]]


# --------------------------------------------------------------------------- real processes


def rows(n: int) -> list[CacheRow]:
    return [CacheRow(f"/data/{i:07d}.jpg", i, i * 7, Header(i + 1, i + 2)) for i in range(n)]


def keep_saving(path: str) -> None:
    """Rewrite the cache forever, alternating between two contents."""
    a, b = rows(20_000), rows(20_001)
    while True:
        ScanCache.save(path, a)
        ScanCache.save(path, b)


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_sigkill_mid_write_leaves_old_or_new_file(tmp_path):
    path = tmp_path / "scan.parquet"
    ctx = multiprocessing.get_context("fork")
    for _ in range(2):
        proc = ctx.Process(target=keep_saving, args=(str(path),))
        proc.start()
        wait_for(path.exists)
        # kill while a new version is being written (its temporary file exists)
        wait_for(lambda: any(p.suffix == ".tmp" for p in tmp_path.iterdir()))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert proc.exitcode == -signal.SIGKILL
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a torn file would warn and come back empty
            loaded = ScanCache.load(path)
        assert loaded.status == "loaded" and len(loaded) in (20_000, 20_001)
        assert loaded.lookup("/data/0000005.jpg", 5, 35) == Header(6, 7)


def scan_into(folder: str, cache: str, start: multiprocessing.synchronize.Event) -> None:
    start.wait()
    for _ in range(3):
        scan(folder, cache=cache, workers=0)
        os.utime(os.path.join(folder, "01.jpg"))  # keep the two writers busy rewriting


def test_two_processes_scanning_into_one_cache(folder, tmp_path):
    cache = tmp_path / "shared.parquet"
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    procs = [ctx.Process(target=scan_into, args=(str(folder), str(cache), start)) for _ in "ab"]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ScanCache.load(cache).status == "loaded"
        index = scan(folder, cache=cache, workers=0)
    assert index.scan_stats.read <= 1  # at most the file touched after the last write
    assert signature(index) == signature(scan(folder, workers=0))


def test_a_cache_named_arrow_is_still_a_parquet_scan_cache(folder, tmp_path):
    cache = tmp_path / "scan.arrow"  # only a saved index becomes an Arrow file by its name
    cold = scan(folder, cache=cache, workers=0)
    assert cache.read_bytes()[:4] == b"PAR1"
    warm = scan(folder, cache=cache, workers=0)
    assert warm.scan_stats.read == 0 and signature(warm) == signature(cold)
