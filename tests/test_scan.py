"""scan(): oriented sizes, rejections with reasons, order independent of workers,
worker crashes contained, progress bar, datasets blobs, and a real 2-rank gloo scan."""

from __future__ import annotations

import importlib
import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from bucketing import scan
from bucketing.headers import read_header
from bucketing.scan import _read_all
from bucketing.sources import image_extensions

scan_module = importlib.import_module("bucketing.scan")  # the package exports the function
REASONS = {"missing_file", "empty_file", "not_an_image", "unreadable", "too_many_pixels"}


def write_image(path: Path, size: tuple[int, int], orientation: int | None = None) -> None:
    im = Image.new("RGB", size, (10, 120, 200))
    exif = Image.Exif()
    if orientation is not None:
        exif[274] = orientation
    fmt = {".jpg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".tif": "TIFF"}[path.suffix]
    im.save(path, fmt, exif=exif if fmt == "TIFF" else exif.tobytes())


def png_bomb(side: int) -> bytes:
    def chunk(cid: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + cid + data + struct.pack(">I", zlib.crc32(cid + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def oriented(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).size


@pytest.fixture
def mixed_dir(tmp_path, exif_dir, odd_dir) -> Path:
    """Real photos, the odd files, written images with every orientation, junk; captions."""
    root = tmp_path / "mixed"
    shutil.copytree(exif_dir, root / "exif")
    shutil.copytree(odd_dir, root / "odd")
    rng = random.Random(1)
    gen = root / "gen"
    gen.mkdir()
    for i in range(48):
        ext = [".jpg", ".png", ".webp", ".tif"][i % 4]
        write_image(gen / f"{i:03d}{ext}", (rng.randint(8, 90), rng.randint(8, 90)), i % 9 or None)
        (gen / f"{i:03d}.txt").write_text(f"caption {i}\nsecond {i}\n")
    (gen / "empty.jpg").write_bytes(b"")
    (gen / "junk.png").write_bytes(os.urandom(100))
    (gen / "bomb.png").write_bytes(png_bomb(20_000))
    return root


def signature(index) -> tuple:
    return (
        index.paths,
        index.width.tolist(),
        index.height.tolist(),
        index.captions,
        sorted(index.rejections),
    )


def test_exif_folder(exif_dir):
    index = scan(exif_dir, workers=0)
    assert [Path(p).name for p in index.paths] == sorted(p.name for p in exif_dir.glob("*.jpg"))
    for path, w, h in zip(index.paths, index.width, index.height, strict=True):
        assert (w, h) == ((1800, 1200) if "Landscape" in path else (1200, 1800))
    assert index.rejections == []
    assert index.scan_stats.read == 18 and index.scan_stats.cache == "none"


def test_odd_folder_every_file_accounted_for(odd_dir, odd_expected):
    index = scan(odd_dir, workers=0)
    accepted = dict(zip(index.paths, zip(index.width, index.height, strict=True), strict=True))
    rejected = {r.path: r for r in index.rejections}
    listed = [n for n in odd_expected if n.lower().endswith(image_extensions())]
    assert len(listed) >= 60
    for name in listed:
        path = str(odd_dir / name)
        assert (path in accepted) != (path in rejected), name
        spec = odd_expected[name]
        if spec["expect"] == "ok":
            assert list(accepted[path]) == spec["oriented_size"], name
        elif path in rejected:
            assert rejected[path].reason in REASONS and rejected[path].detail, name


def test_index_is_independent_of_workers(mixed_dir, monkeypatch):
    monkeypatch.setattr(scan_module, "_MIN_PER_WORKER", 1)  # use the pool on a small folder
    serial = scan(mixed_dir, workers=0)
    parallel = scan(mixed_dir, workers=2)
    assert signature(serial) == signature(parallel)
    assert parallel.scan_stats.read == parallel.scan_stats.files
    # sizes are the oriented ones, captions stay with their image
    for path, w, h, caps in zip(*signature(serial)[:4], strict=True):
        if "/gen/" in path:
            assert (w, h) == oriented(Path(path))
            stem = Path(path).stem
            assert caps == [f"caption {int(stem)}", f"second {int(stem)}"]
    reasons = {Path(r.path).name: r.reason for r in serial.rejections}
    assert reasons["empty.jpg"] == "empty_file"
    assert reasons["junk.png"] in {"not_an_image", "unreadable"}
    assert reasons["bomb.png"] == "too_many_pixels"


def test_max_pixels(mixed_dir):
    small = scan(mixed_dir / "gen", workers=0, max_pixels=30 * 30)
    assert all(w * h <= 900 for w, h in small.sizes)
    too_big = [r for r in small.rejections if r.reason == "too_many_pixels"]
    assert len(too_big) == 48 - len(small) + 1  # + the bomb
    assert all("max_pixels=900" in r.detail for r in too_big if "bomb" not in r.path)
    allowed = scan(mixed_dir / "gen", workers=0, max_pixels=10**9)
    assert any(Path(p).name == "bomb.png" for p in allowed.paths)


def test_list_source_rejections(tmp_path):
    good = tmp_path / "a.jpg"
    write_image(good, (30, 20), 6)
    (tmp_path / "b.jpg").write_bytes(b"not an image at all")
    index = scan([str(good), str(tmp_path / "b.jpg"), str(tmp_path / "gone.jpg")], workers=0)
    assert index.paths == [str(good)] and index.sizes.tolist() == [[20, 30]]
    assert {Path(r.path).name: r.reason for r in index.rejections} == {
        "b.jpg": "not_an_image",
        "gone.jpg": "missing_file",
    }


def test_progress_bar(exif_dir, capsys):
    scan(exif_dir, workers=0, progress=True)
    err = capsys.readouterr().err
    assert "scan" in err and "18/18" in err
    scan(exif_dir, workers=0, progress=False)
    assert capsys.readouterr().err == ""


class CrashingBlobs:
    """Encoded images by row; row ``bad`` kills the process reading it (like a segfault)."""

    def __init__(self, data: bytes, bad: int) -> None:
        self.data, self.bad = data, bad

    def __call__(self, row: int) -> bytes:
        if row == self.bad:
            os._exit(1)
        return self.data


def test_a_crashing_file_is_rejected_not_fatal(monkeypatch):
    monkeypatch.setattr(scan_module, "_MIN_PER_WORKER", 1)  # the pool, never this process
    buf = io.BytesIO()
    Image.new("RGB", (7, 5)).save(buf, "PNG")
    items = [(f"row{i}", i) for i in range(40)]
    headers = _read_all(items, workers=2, blobs=CrashingBlobs(buf.getvalue(), 13), show=False)
    assert [h.reason for h in headers].count(None) == 39
    assert headers[13].reason == "unreadable" and "crashed" in headers[13].detail
    assert all((h.width, h.height) == (7, 5) for i, h in enumerate(headers) if i != 13)


def test_dataset_with_image_bytes(exif_dir):
    datasets = pytest.importorskip("datasets")
    files = sorted(exif_dir.glob("Portrait_*.jpg"))[:4]
    rows = [{"bytes": f.read_bytes(), "path": None} for f in files] + [
        {"bytes": b"garbage", "path": None}
    ]
    ds = datasets.Dataset.from_dict(
        {"image": rows, "text": [f"c{i}" for i in range(5)]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    index = scan(ds, workers=0)
    assert len(index) == 4 and index.sizes.tolist() == [[1200, 1800]] * 4
    assert index.captions == [["c0"], ["c1"], ["c2"], ["c3"]]
    assert [r.reason for r in index.rejections] == ["not_an_image"]
    for i, f in enumerate(files):
        assert index.image_source(i) == f.read_bytes()


def test_dataset_of_image_paths_on_disk(exif_dir, tmp_path, monkeypatch):
    """An Image column of files on disk (no bytes): scanned from the files, with or without a
    cache, in-process and in workers; the index reads the files by path (no blob reader)."""
    monkeypatch.setattr(scan_module, "_MIN_PER_WORKER", 1)  # use the pool on 3 files
    datasets = pytest.importorskip("datasets")
    files = sorted(exif_dir.glob("Landscape_*.jpg"))[:3]
    ds = datasets.Dataset.from_dict(
        {"image": [str(f) for f in files], "text": ["a", "b", "c"]}
    ).cast_column("image", datasets.Image())
    for kw in ({"workers": 0}, {"workers": 0, "cache": tmp_path / "c.parquet"}, {"workers": 2}):
        index = scan(ds, **kw)
        assert index.rejections == [], kw
        assert index.paths == [str(f) for f in files] and index.blob is None
        assert index.sizes.tolist() == [[1800, 1200]] * 3
        assert index.captions == [["a"], ["b"], ["c"]]
    again = scan(ds, workers=0, cache=tmp_path / "c.parquet")
    assert again.scan_stats.reused == 3 and again.scan_stats.read == 0


@settings(
    deadline=None,
    max_examples=10,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=6), st.integers(0, 5))
def test_scan_never_raises_on_hostile_files(tmp_path_factory, blobs, cut):
    folder = tmp_path_factory.mktemp("hostile")
    good = io.BytesIO()
    Image.new("RGB", (9, 4)).save(good, "JPEG", exif=b"Exif\x00\x00" + Image.Exif().tobytes())
    for i, blob in enumerate(blobs):
        ext = [".jpg", ".png", ".webp", ".gif", ".tif", ".bmp"][i % 6]
        (folder / f"{i}{ext}").write_bytes(blob if i % 2 else good.getvalue()[: 30 * cut] + blob)
    index = scan(folder, workers=0)
    assert len(index) + len(index.rejections) == len(blobs)
    assert all(r.reason in REASONS for r in index.rejections)
    for path, w, h in zip(index.paths, index.width, index.height, strict=True):
        assert (w, h) == read_header(path)[:2] and w > 0 and h > 0


# --------------------------------------------------------------------------- distributed

RANK_SCRIPT = """
import json, os, sys
import torch.distributed as dist
from bucketing.scan import scan

rank, tmp, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
index = scan(folder, workers=0, cache=f"{tmp}/cache.parquet")
out = {
    "paths": list(index.paths),
    "sizes": index.sizes.tolist(),
    "rejections": [list(r) for r in index.rejections],
    "read_local": index.scan_stats.read_local,
    "read": index.scan_stats.read,
}
with open(f"{tmp}/rank{rank}.json", "w") as f:
    json.dump(out, f)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_distributed_ranks_share_one_index(tmp_path, mixed_dir):
    """Two real processes in a gloo group (as torchrun starts them) scan one folder."""
    folder = str(mixed_dir / "gen")
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "LOCAL_WORLD_SIZE": "2"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, str(rank), str(tmp_path), folder],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode(errors="replace")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    local = scan(folder, workers=0)
    for got in ranks:
        assert got["paths"] == local.paths and got["sizes"] == local.sizes.tolist()
        assert got["rejections"] == [list(r) for r in local.rejections]
        assert got["read"] == local.scan_stats.files
    # each rank read its own shard only, and rank 0 wrote the cache for everyone
    assert sorted(g["read_local"] for g in ranks) == [25, 26]
    warm = scan(folder, workers=0, cache=tmp_path / "cache.parquet")
    assert warm.scan_stats.read == 0 and signature(warm) == signature(local)
