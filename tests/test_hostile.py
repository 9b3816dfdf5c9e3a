"""Hostile input end to end: scan -> assign -> TextToImageDataset -> DataLoader workers ->
collate, on one folder holding every kind of bad file we could think of.

One module fixture builds the folder (the 69 files of tests/data/odd plus files written
here), scans it with worker processes and a cache, assigns it, then damages some files
*after* the scan (deleted, garbage, truncated, shrunk, swapped, a FIFO, a folder) and runs
one DataLoader epoch with two workers over every accepted row. The tests below then check,
class by class, that each bad file became a rejection with its specific reason, or the
right oriented size, and that every sample is its bucket's uint8 RGB tensor: the file's
own pixels, or a flagged substitute from the same bucket. ``HOSTILE_TABLE`` at the end is
docs/robustness.md's "bad input -> what happens" table; a test keeps the two in step.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import random
import re
import resource
import select
import shutil
import signal
import stat
import struct
import tempfile
import warnings
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

from bucketing.assign import assign
from bucketing.headers import default_max_pixels, read_header
from bucketing.index import ImageIndex
from bucketing.ladder import MAX_SIDE, BucketLadder
from bucketing.pipeline.dataset import SubstitutionWarning, TextToImageDataset
from bucketing.scan import scan
from bucketing.scan_cache import CACHE_FORMAT
from transforms.collate import collate
from transforms.image import ImageDecodeError, decode_bytes, load_image
from transforms.resize_crop import BucketResizeCrop

# Pillow's own complaints about the hostile files are expected; ours are asserted on.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Corrupt EXIF data",
    "ignore:Metadata Warning",
    "ignore:Tag data larger than file",
    "ignore::PIL.Image.DecompressionBombWarning",
)

LADDER = BucketLadder.from_buckets([(32, 32), (48, 16), (16, 48), (64, 16), (16, 64)])
TRANSFORM = BucketResizeCrop(crop="random", flip_p=0.5)
REASONS = {"empty_file", "not_an_image", "unreadable", "too_many_pixels", "missing_file"}

# -- writing hostile files ------------------------------------------------------------------


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _picture(w: int, h: int) -> Image.Image:
    """An asymmetric picture, so that a wrong rotation or flip changes the pixels."""
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    a[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    a[: h // 4, : w // 4, 2] = 255
    return Image.fromarray(a)


def _chunk(cid: bytes, data: bytes) -> bytes:
    return struct.pack(">L", len(data)) + cid + data + struct.pack(">L", zlib.crc32(cid + data))


def _png_declaring(w: int, h: int) -> bytes:
    """A PNG whose IHDR claims w x h; its one tiny IDAT could never fill that."""
    ihdr = struct.pack(">LLBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def _jpeg_declaring(w: int, h: int) -> bytes:
    data = bytearray(_encode(Image.new("RGB", (16, 16)), "JPEG"))
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, h, w)
    return bytes(data)


def _gif_small_screen() -> bytes:
    """A GIF whose logical screen says 16x16 but whose first frame is 64x48."""
    data = bytearray(_encode(_picture(64, 48).convert("P"), "GIF"))
    struct.pack_into("<HH", data, 6, 16, 16)
    return bytes(data)


def _broken_avif() -> bytes:
    """An AVIF whose header reads (64x64) but whose decoder raises RuntimeError."""
    data = bytearray(
        (Path(__file__).parent / "data" / "odd" / "avif__transparency.avif").read_bytes()
    )
    data[122] = 0
    return bytes(data)


def _exif(entries: list[tuple[int, int, int, bytes]], ifd: int = 8, tail: bytes = b"") -> bytes:
    """A little-endian TIFF-structured EXIF block with one IFD of (tag, type, count, value)."""
    body = struct.pack("<H", len(entries))
    body += b"".join(struct.pack("<HHL", t, ty, n) + v for t, ty, n, v in entries)
    return b"Exif\x00\x00II*\x00" + struct.pack("<L", ifd) + body + b"\x00" * 4 + tail


def _orientation(value: int, typ: int = 3) -> bytes:
    raw = struct.pack("<H", value) + b"\x00\x00" if typ == 3 else struct.pack("<L", value)
    return _exif([(274, typ, 1, raw)])


EXIF_CASES = {
    # name: (exif block, oriented size of a 64x40 picture as PIL.ImageOps.exif_transpose says)
    "exif_o0.jpg": (_orientation(0), (64, 40)),
    "exif_o9.jpg": (_orientation(9), (64, 40)),
    "exif_o65535.jpg": (_orientation(65535), (64, 40)),
    "exif_o6_long.jpg": (_orientation(6, typ=4), (40, 64)),
    "exif_o6_as_text.jpg": (_exif([(274, 2, 2, b"6\x00\x00\x00")]), (64, 40)),
    # RATIONAL 6/1 (its 8 bytes after the IFD, at offset 26) and FLOAT 6.0: Pillow reads 6.0
    "exif_o6_rational.jpg": (
        _exif([(274, 5, 1, struct.pack("<L", 26))], tail=struct.pack("<LL", 6, 1)),
        (40, 64),
    ),
    "exif_o6_float.jpg": (_exif([(274, 11, 1, struct.pack("<f", 6.0))]), (40, 64)),
    "exif_ifd_past_end.jpg": (b"Exif\x00\x00II*\x00" + struct.pack("<L", 10**6), (64, 40)),
    "exif_count_65535.jpg": (
        b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff" + struct.pack("<HHLHH", 274, 3, 1, 6, 0),
        (40, 64),
    ),
    "exif_ifd_loop.jpg": (
        _exif([(274, 3, 1, b"\x08\x00\x00\x00")], tail=b"\x08\x00\x00\x00"),
        (40, 64),
    ),
    "exif_random.jpg": (b"Exif\x00\x00" + random.Random(8).randbytes(80), (64, 40)),
    "exif_o9.png": (_orientation(9), (64, 40)),
    "exif_o6.png": (_orientation(6), (40, 64)),
    "exif_o65535.png": (_orientation(65535), (64, 40)),
}

SCAN_REJECTS = {  # file -> the reason scan records (the file is never decoded)
    # tests/data/odd
    "odd/bmp__b__badbitcount.bmp": "unreadable",
    "odd/bmp__b__badwidth.bmp": "too_many_pixels",
    "odd/bmp__b__reallybig.bmp": "too_many_pixels",
    "odd/broken.png": "unreadable",
    "odd/decompression_bomb.gif": "too_many_pixels",
    "odd/hopper_unknown_pixel_mode.tif": "unreadable",
    "odd/libtiff_segfault.tif": "unreadable",
    "odd/not_an_image.png": "not_an_image",
    "odd/zero_bytes.jpg": "empty_file",
    "odd/zero_width.gif": "unreadable",
    "odd/unknown_compression_method.png": "unreadable",  # Pillow refuses its iCCP chunk
    # written here
    "zero.png": "empty_file",
    "random.jpg": "not_an_image",
    "random.webp": "not_an_image",
    "text.jpg": "not_an_image",
    "html_error_page.png": "not_an_image",
    "png_magic_then_random.png": "unreadable",
    "jpeg_cut_in_header.jpg": "unreadable",
    "declares_100000x100000.png": "too_many_pixels",
    "declares_65500x65500.jpg": "too_many_pixels",
    "declares_0x5.png": "unreadable",
    "fifo.jpg": "not_a_file",
    "dangling.png": "missing_file",
    "self_loop.jpg": "symlink_loop",
    "sub/up": "symlink_loop",
    "fifo_caption.txt": "unreadable_caption",  # the image is kept, caption-less
}

# Accepted by scan (the header is fine) but no pixels come out: substituted at load time.
HEADER_OK_DECODE_FAILS = {
    "odd/bmp__b__shortfile.bmp": "truncated",
    "odd/broken_data_stream.png": "unrecognized data stream",
    "odd/hopper_webp.tif": "decoder error",
    "odd/l2rgb_read.bmp": "truncated",
    "odd/truncated_end_chunk.png": "Truncated File Read",
    "odd/truncated_image.png": "truncated",
    "odd/truncated_jpeg.jpg": "truncated",
    "jpeg_cut_in_pixels.jpg": "truncated",
    "avif_decoder_fails.avif": "RuntimeError",
}

# Damaged after the scan, before the epoch: file -> what the substitution warning says.
CHANGED_AFTER_SCAN = {
    "later_deleted.jpg": "No such file",
    "later_garbage.png": "not a recognised image format",
    "later_truncated.jpg": "truncated",
    "later_shrunk.png": "changed after the scan",
    "later_swapped.png": "changed after the scan",
    "later_huge_header.png": "too_many_pixels",
    "later_a_folder.jpg": "not a regular file",
    "later_a_fifo.jpg": "not a regular file",
}

TOO_SMALL = {  # no bucket fits inside (the smallest sides are 32x32, 48x16, 16x48): too_small
    "dot_1x1.png": (1, 1),
    "line_1x9.png": (1, 9),
    "line_300x1.png": (300, 1),
    "line_1x300.png": (1, 300),
    "odd/orientation_rectangle.jpg": (1, 2),
    "odd/png_decompression_dos.png": (1, 1),
    "odd/lab.tif": (10, 10),
    "odd/empty_gps_ifd.jpg": (10, 10),
}

LATIN1_NAME = b"caf\xe9 cr\xe8me \xff.png"
LATIN1_CAPTION = "café crème brûlée, naïve"


def _write_folder(root: Path, odd_dir: Path) -> set[str]:
    """Write the hostile folder; return the paths (relative to ``root``) scan must account for."""
    shutil.copytree(odd_dir, root / "odd", ignore=shutil.ignore_patterns("*.json"))
    rnd = random.Random(0)
    files = {
        "zero.png": b"",
        "random.jpg": rnd.randbytes(4096),
        "random.webp": rnd.randbytes(300),
        "text.jpg": b"just some text, saved with the wrong extension\n",
        "html_error_page.png": b"<html><body>404 Not Found</body></html>",
        "png_magic_then_random.png": b"\x89PNG\r\n\x1a\n" + rnd.randbytes(500),
        "jpeg_cut_in_header.jpg": _encode(_picture(64, 48), "JPEG")[:40],
        "jpeg_cut_in_pixels.jpg": _encode(_picture(256, 192), "JPEG", quality=95)[:4000],
        "declares_100000x100000.png": _png_declaring(100_000, 100_000),
        "declares_65500x65500.jpg": _jpeg_declaring(65_500, 65_500),
        "declares_0x5.png": _png_declaring(0, 5),
        "gif_small_screen_big_frame.gif": _gif_small_screen(),
        "dot_1x1.png": _encode(Image.new("RGB", (1, 1)), "PNG"),
        "line_1x9.png": _encode(Image.new("RGB", (1, 9)), "PNG"),
        "line_300x1.png": _encode(Image.new("RGB", (300, 1)), "PNG"),
        "line_1x300.png": _encode(Image.new("RGB", (1, 300)), "PNG"),
        "strip_1x50.png": _encode(_picture(20, 1000), "PNG"),
        "strip_50x1.jpg": _encode(_picture(1500, 30), "JPEG"),
        "folder.jpg/inside.png": _encode(_picture(40, 40), "PNG"),
        "fifo_caption.png": _encode(_picture(40, 40), "PNG"),
        "avif_decoder_fails.avif": _broken_avif(),
    }
    for name in CHANGED_AFTER_SCAN:
        files[name] = _encode(_picture(64, 64), "PNG" if name.endswith(".png") else "JPEG")
    for name, (exif, _) in EXIF_CASES.items():
        fmt = "PNG" if name.endswith(".png") else "JPEG"
        files[name] = _encode(_picture(64, 40), fmt, exif=exif)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    os.mkfifo(root / "fifo.jpg")
    os.mkfifo(root / "fifo_caption.txt")  # a caption sidecar nobody will ever write to
    os.symlink("nowhere.png", root / "dangling.png")
    os.symlink("self_loop.jpg", root / "self_loop.jpg")
    (root / "sub").mkdir()
    os.symlink("..", root / "sub" / "up")
    latin1 = os.path.join(os.fsencode(root), LATIN1_NAME)
    with open(latin1, "wb") as f:
        f.write(_encode(_picture(48, 48), "PNG"))
    with open(latin1[: -len(b".png")] + b".txt", "wb") as f:
        f.write(LATIN1_CAPTION.encode("latin-1") + b"\n")
    odd = {f"odd/{p.name}" for p in odd_dir.iterdir() if p.suffix != ".json"}
    links = {"fifo.jpg", "dangling.png", "self_loop.jpg", "sub/up"}
    links |= {"fifo_caption.txt"}
    return odd | set(files) | links | {os.fsdecode(LATIN1_NAME)}


def _damage(root: Path) -> None:
    (root / "later_deleted.jpg").unlink()
    (root / "later_garbage.png").write_bytes(random.Random(1).randbytes(2000))
    data = (root / "later_truncated.jpg").read_bytes()
    (root / "later_truncated.jpg").write_bytes(data[: len(data) // 3])
    (root / "later_shrunk.png").write_bytes(_encode(_picture(12, 12), "PNG"))
    (root / "later_swapped.png").write_bytes(_encode(_picture(400, 40), "PNG"))
    (root / "later_huge_header.png").write_bytes(_png_declaring(100_000, 100_000))
    (root / "later_a_folder.jpg").unlink()
    (root / "later_a_folder.jpg").mkdir()
    (root / "later_a_fifo.jpg").unlink()
    os.mkfifo(root / "later_a_fifo.jpg")


class _Blocked(Exception):
    """Not an OSError (as TimeoutError is), so no ``except OSError`` can swallow it."""


@contextlib.contextmanager
def _deadline(seconds: float, what: str):
    """Raise :class:`_Blocked` in the main thread if the block runs longer than ``seconds``."""

    def expire(signum, frame):
        raise _Blocked(f"{what} took more than {seconds} s: something blocked")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _rel(root: Path, path: str) -> str:
    return os.path.relpath(path, root)


@pytest.fixture(scope="module")
def world(tmp_path_factory, odd_dir, odd_expected):
    """The folder, its scan and assignment, and one two-worker DataLoader epoch over it."""
    base = tmp_path_factory.mktemp("hostile")
    root = base / "data"
    root.mkdir()
    written = _write_folder(root, odd_dir)
    cache = base / "scan-cache.parquet"
    with _deadline(60, "scan"):  # a hang on a hostile file fails here, not forever
        index = scan(root, workers=2, cache=cache)
    index_path = base / "index.parquet"
    index.save(index_path)
    assignment = assign(index, LADDER)
    names = [_rel(root, p) for p in index.paths]
    _damage(root)

    ds = TextToImageDataset(index, assignment, image_transform=TRANSFORM, seed=7)
    buckets: dict[int, list[int]] = {}
    for i in np.flatnonzero(assignment.accepted).tolist():
        buckets.setdefault(int(assignment.bucket_id[i]), []).append(i)
    batches = [rows[k : k + 3] for rows in buckets.values() for k in range(0, len(rows), 3)]
    loader = DataLoader(ds, batch_sampler=batches, num_workers=2, collate_fn=collate, timeout=120)
    samples: dict[int, dict] = {}
    for rows, batch in zip(batches, loader, strict=True):
        assert batch["original_index"].tolist() == rows
        for k, row in enumerate(rows):
            samples[row] = {key: value[k] for key, value in batch.items()}
    return SimpleNamespace(
        root=root, base=base, cache=cache, index_path=index_path, index=index,
        assignment=assignment, names=names, row={n: i for i, n in enumerate(names)},
        rejected={_rel(root, r.path): r for r in index.rejections}, dataset=ds,
        samples=samples, batches=batches, odd_expected=odd_expected, written=written,
    )  # fmt: skip


# -- scan: every bad file is a rejection with its specific reason ---------------------------


def test_scan_rejects_each_unusable_file_with_its_reason(world):
    got = {name: world.rejected[name].reason for name in SCAN_REJECTS if name in world.rejected}
    assert got == SCAN_REJECTS
    for name in SCAN_REJECTS:
        assert world.rejected[name].detail, name  # a human-readable why, always
    assert set(world.rejected) == set(SCAN_REJECTS)  # nothing else was dropped
    # every file is either in the index or rejected, exactly once: no silent drop
    assert len(world.names) + len(world.rejected) == len(world.written)
    assert set(world.names) | set(world.rejected) == world.written


def test_huge_declared_dimensions_are_refused_from_the_header(world):
    assert "100000x100000" in world.rejected["declares_100000x100000.png"].detail
    assert "65500x65500" in world.rejected["declares_65500x65500.jpg"].detail
    # the odd files' bombs (a BMP of 6e12 pixels, a GIF frame far larger than its screen)
    assert "4364696535" in world.rejected["odd/decompression_bomb.gif"].detail


def test_accepted_files_have_their_oriented_size(world):
    sizes = {n: (int(w), int(h)) for n, w, h in zip(
        world.names, world.index.width, world.index.height, strict=True)}  # fmt: skip
    for name, exp in world.odd_expected.items():
        key = f"odd/{name}"
        if exp["expect"] == "ok":
            assert sizes[key] == tuple(exp["oriented_size"]), name
        elif key in sizes:  # the header reads; the pixels do not, or there is just one
            assert key in HEADER_OK_DECODE_FAILS or key in TOO_SMALL, name
            want = exp.get("header_size") or TOO_SMALL[key]
            assert sizes[key] == tuple(want), name
    for name, (_, oriented) in EXIF_CASES.items():
        assert sizes[name] == oriented, name
    assert sizes["gif_small_screen_big_frame.gif"] == (64, 48)  # the frame, not the screen
    assert sizes["strip_1x50.png"] == (20, 1000) and sizes["strip_50x1.jpg"] == (1500, 30)
    assert sizes["folder.jpg/inside.png"] == (40, 40)  # a folder named like an image is walked
    for name in CHANGED_AFTER_SCAN:
        assert sizes[name] == (64, 64)  # what the file was when it was scanned


def test_a_rescan_through_the_cache_sees_the_damage(world):
    warm = scan(world.root, workers=0, cache=world.cache)
    cold = scan(world.root, workers=0)
    assert warm.scan_stats.cache == "loaded" and warm.scan_stats.reused > 80
    assert warm.paths == cold.paths and np.array_equal(warm.sizes, cold.sizes)
    assert warm.rejections == cold.rejections
    now = {_rel(world.root, r.path): r.reason for r in warm.rejections}
    assert (
        "later_deleted.jpg" not in now and str(world.root / "later_deleted.jpg") not in warm.paths
    )
    assert now["later_garbage.png"] == "not_an_image"
    assert now["later_a_fifo.jpg"] == "not_a_file"
    assert now["later_huge_header.png"] == "too_many_pixels"
    sizes = {_rel(world.root, p): wh for p, wh in zip(warm.paths, warm.sizes.tolist(), strict=True)}
    assert sizes["later_swapped.png"] == [400, 40] and sizes["later_shrunk.png"] == [12, 12]


def test_scan_size_is_what_the_decoder_gives_for_absurd_exif(world):
    for name, (_, oriented) in EXIF_CASES.items():
        path = world.root / name
        with Image.open(path) as im:
            try:
                expected = ImageOps.exif_transpose(im).convert("RGB")
            except Exception:  # Pillow cannot apply this EXIF: the image stays as stored
                expected = im.convert("RGB")
        got = load_image(path)
        assert got.size == expected.size == oriented, name
        assert np.array_equal(np.asarray(got), np.asarray(expected)), name


def test_non_utf8_name_and_latin1_caption_survive_the_pipeline(world):
    name = os.fsdecode(LATIN1_NAME)
    row = world.row[name]
    assert world.index.captions[row] == [LATIN1_CAPTION]
    s = world.samples[row]
    assert not s["substituted"] and s["captions"] == LATIN1_CAPTION
    loaded = ImageIndex.load(world.index_path)  # the saved index keeps the undecodable bytes
    assert os.fsencode(loaded.paths[row]).endswith(LATIN1_NAME)
    assert loaded.captions[row] == [LATIN1_CAPTION]
    assert load_image(loaded.paths[row]).size == (48, 48)


def test_messy_manifest_through_scan_and_dataset(tmp_path):
    """Blank rows, a short row, duplicates, a missing file and a path out of base_dir."""
    for name, size in {"a.png": (64, 64), "b.png": (64, 48), "c.jpg": (48, 64)}.items():
        _picture(*size).save(tmp_path / name)
    (tmp_path / "m.csv").write_text(
        "image,caption\na.png,first\n,\n   ,  \nb.png,\na.png,second\nmissing.png,gone\n"
        ',orphan caption\nc.jpg\n"b.png","third, with a comma"\n../outside.png,x\n'
    )
    index = scan(tmp_path / "m.csv", workers=0, base_dir=tmp_path)
    assert [os.path.basename(p) for p in index.paths] == ["a.png", "b.png", "c.jpg"]
    assert index.captions == [["first", "second"], ["third, with a comma"], []]
    got = sorted((os.path.basename(r.path), r.reason) for r in index.rejections)
    assert got == [
        ("a.png", "duplicate"), ("b.png", "duplicate"), ("m.csv:line 8", "no_image"),
        ("missing.png", "missing_file"), ("outside.png", "outside_base_dir"),
    ]  # fmt: skip
    a = assign(index, LADDER)
    ds = TextToImageDataset(index, a, image_transform=TRANSFORM)
    out = [ds[i] for i in range(len(ds))]
    assert [s["caption"] for s in out] == ["first", "third, with a comma", ""]
    assert [tuple(s["pixel_values"].shape) for s in out] == [(3, 32, 32)] * 3
    assert not any(s["substituted"] for s in out)


def test_caption_sidecars_that_never_end_are_refused(tmp_path):
    """A sidecar linked to /dev/zero (endless) or a FIFO (blocks on open) must not hang the
    scan or eat the memory: the image is kept without a caption, the sidecar rejected."""
    for stem in ("endless", "fifo", "plain"):
        _picture(40, 40).save(tmp_path / f"{stem}.png")
    os.symlink("/dev/zero", tmp_path / "endless.txt")
    os.mkfifo(tmp_path / "fifo.caption")
    (tmp_path / "plain.txt").write_text("a plain caption\n")

    def scan_it() -> dict:
        index = scan(tmp_path, workers=0)
        return {"captions": list(index.captions), "rejections": [list(r) for r in index.rejections]}

    out = _in_child(scan_it, timeout=30)
    assert "error" not in out, out
    assert out["captions"] == [[], [], ["a plain caption"]]
    got = [(os.path.basename(p), reason) for p, reason, _ in out["rejections"]]
    assert got == [("endless.txt", "unreadable_caption"), ("fifo.caption", "unreadable_caption")]


# -- assign: too small and extreme aspect ----------------------------------------------------


def test_tiny_images_are_too_small_and_never_sampled(world):
    a = world.assignment
    for name, size in TOO_SMALL.items():
        i = world.row[name]
        assert (world.index.width[i], world.index.height[i]) == size, name
        assert a.bucket_id[i] == -1 and a.reasons[i] == "too_small", name
        assert i not in world.samples
        with pytest.raises(ValueError, match="too_small"):
            world.dataset[i]
    assert set(world.samples) == set(np.flatnonzero(a.accepted).tolist())
    assert int((~a.accepted).sum()) == len(TOO_SMALL)


def test_extreme_aspect_is_cropped_with_the_loss_recorded_or_rejected(world):
    a = world.assignment
    for name, bucket in (("strip_1x50.png", (16, 64)), ("strip_50x1.jpg", (64, 16))):
        i = world.row[name]
        assert tuple(a.bucket_wh[i]) == bucket  # the most elongated bucket of the ladder
        assert a.crop_loss[i] > 0.9  # 1:50 into 1:4 keeps under a tenth of the picture
        assert world.samples[i]["pixel_values"].shape == (3, bucket[1], bucket[0])
        assert not world.samples[i]["substituted"]
    strict = assign(world.index, LADDER, on_extreme="reject")
    extreme = {world.names[i] for i in np.flatnonzero(strict.reasons == "extreme_aspect")}
    assert extreme == {
        "strip_1x50.png", "strip_50x1.jpg", "odd/l2rgb_read.bmp",
        "odd/g4_orientation_3.tif", "odd/g4_orientation_5.tif", "odd/g4_orientation_6.tif",
        "line_1x9.png", "line_300x1.png", "line_1x300.png",  # too thin for any bucket, too
    }  # fmt: skip
    assert np.isnan(strict.crop_loss[strict.reasons == "extreme_aspect"]).all()


# -- the epoch: right tensors, or flagged substitutes; nothing raised out of a worker --------


def test_every_sample_is_its_buckets_uint8_rgb_tensor(world):
    a = world.assignment
    for row, s in world.samples.items():
        bw, bh = a.bucket_wh[row]
        px = s["pixel_values"]
        assert px.dtype == torch.uint8 and px.shape == (3, bh, bw), world.names[row]
        assert s["target_size"].tolist() == [bh, bw]


def test_exactly_the_files_that_cannot_load_are_substituted(world):
    bad = set(HEADER_OK_DECODE_FAILS) | set(CHANGED_AFTER_SCAN)
    substituted = {world.names[r] for r, s in world.samples.items() if s["substituted"]}
    assert substituted == bad
    for row, s in world.samples.items():
        used = int(s["index"])
        assert int(s["original_index"]) == row
        if s["substituted"]:
            assert used != row and world.names[used] not in bad
            assert world.assignment.bucket_id[used] == world.assignment.bucket_id[row]
        else:
            assert used == row


def test_unsubstituted_samples_are_the_files_own_pixels(world):
    """Spot check: the tensor is this file's picture fitted to the bucket (same crop/flip)."""
    for name in ("odd/hopper_orientation_6.jpg", "exif_o6.png", "odd/pil_sample_cmyk.jpg",
                 "gif_small_screen_big_frame.gif", os.fsdecode(LATIN1_NAME)):  # fmt: skip
        row = world.row[name]
        s = world.samples[row]
        fresh = world.dataset[row]  # in-process, same (seed, epoch, index) -> same draw
        assert torch.equal(s["pixel_values"], fresh["pixel_values"]), name
        assert s["original_size"].tolist() == [world.index.height[row], world.index.width[row]]


def test_substitution_warns_once_per_file_naming_it(world):
    ds = world.dataset
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in CHANGED_AFTER_SCAN:
            for _ in range(2):
                assert ds[world.row[name]]["substituted"] is True
    messages = [str(w.message) for w in caught if w.category is SubstitutionWarning]
    assert len(messages) == len(CHANGED_AFTER_SCAN)  # once per file, not per access
    for name, why in CHANGED_AFTER_SCAN.items():
        (msg,) = [m for m in messages if name in m]
        assert why in msg, msg


def test_on_error_raise_names_the_file_in_process_and_from_a_worker(world):
    strict = TextToImageDataset(
        world.index, world.assignment, image_transform=TRANSFORM, on_error="raise"
    )
    for name, why in {**CHANGED_AFTER_SCAN, **HEADER_OK_DECODE_FAILS}.items():
        with pytest.raises(ImageDecodeError, match=re.escape(why)) as info:
            strict[world.row[name]]
        assert name in info.value.source
    row = world.row["later_garbage.png"]
    loader = DataLoader(strict, sampler=[row], batch_size=None, num_workers=2, timeout=60)
    with pytest.raises(ImageDecodeError, match=r"later_garbage\.png"):  # the type survives
        list(loader)


# -- decompression bombs: the limit from the header, and again at decode time ---------------


def test_bomb_limit_holds_at_scan_and_at_decode(tmp_path):
    limit = default_max_pixels()
    assert limit == 2 * Image.MAX_IMAGE_PIXELS  # the limit Pillow itself enforces on decode
    side = int(limit**0.5) + 1
    data = _png_declaring(side, side)
    assert read_header(data).ok  # the header is fine; only its size is refused
    assert read_header(data, max_pixels=limit).reason == "too_many_pixels"
    with pytest.raises(ImageDecodeError, match="too_many_pixels"):
        load_image(data)  # default: Pillow's own limit, checked before any pixel is decoded

    # the same explicit limit in scan and in the dataset, the file growing in between
    for k in range(3):
        Image.new("RGB", (40, 40), (60 * k, 0, 0)).save(tmp_path / f"{k}.png")
    index = scan(tmp_path, workers=0, max_pixels=40 * 40)
    assert len(index) == 3
    Image.new("RGB", (41, 40)).save(tmp_path / "1.png")
    assert [r.reason for r in scan(tmp_path, workers=0, max_pixels=40 * 40).rejections] == [
        "too_many_pixels"
    ]
    a = assign(index, LADDER)
    ds = TextToImageDataset(index, a, image_transform=TRANSFORM, max_pixels=40 * 40)
    with pytest.warns(SubstitutionWarning, match="too_many_pixels"):
        assert ds[1]["substituted"] is True
    strict = TextToImageDataset(
        index, a, image_transform=TRANSFORM, max_pixels=40 * 40, on_error="raise"
    )
    with pytest.raises(ImageDecodeError, match=r"1\.png.*too_many_pixels"):
        strict[1]


# -- unreadable permissions (as an unprivileged user) ----------------------------------------


def _in_child(fn, *, as_nobody: bool = False, timeout: float = 60.0) -> dict:
    """Run ``fn() -> dict`` in a forked child (optionally as uid 65534, root dropped) that
    may map at most 2 GiB more than it inherited; one still running after ``timeout`` s is
    killed."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            os.close(read_end)
            mapped = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf(
                "SC_PAGESIZE"
            )
            hard = resource.getrlimit(resource.RLIMIT_AS)[1]
            resource.setrlimit(resource.RLIMIT_AS, (mapped + (2 << 30), hard))
            try:
                if as_nobody:
                    os.setgroups([])
                    os.setgid(65534)
                    os.setuid(65534)
            except OSError as e:
                out = {"cannot_drop": str(e)}
            else:
                out = fn()
        except BaseException as e:
            out = {"error": f"{type(e).__name__}: {e}"}
        os.write(write_end, json.dumps(out).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        ready, _, _ = select.select([f], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        data = f.read() if ready else b""
    os.waitpid(pid, 0)
    if not ready:
        pytest.fail(f"{fn.__name__} did not finish within {timeout} s: something blocked")
    return json.loads(data)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to drop privileges")
def test_unreadable_files_at_scan_and_at_load(odd_dir):
    root = Path(tempfile.mkdtemp(prefix="hostile-perm-"))  # under /tmp: reachable by nobody
    try:
        os.chmod(root, 0o755)
        for k in range(4):
            shutil.copy(odd_dir / "hopper.jpg", root / f"{k}.jpg")
        os.chmod(root / "0.jpg", 0o000)  # unreadable before the scan
        index = scan(root, workers=0)  # as root: everything reads
        a = assign(index, LADDER)
        ds = TextToImageDataset(index, a, image_transform=TRANSFORM)
        load_image(root / "1.jpg")  # import every plugin before dropping privileges

        def child() -> dict:
            seen = scan(root, workers=0)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                s = ds[0]
            return {
                "rejections": [list(r) for r in seen.rejections],
                "accepted": len(seen),
                "substituted": s["substituted"],
                "shape": list(s["pixel_values"].shape),
                "warnings": [str(w.message) for w in caught],
            }

        if os.geteuid() == 0:
            out = _in_child(child, as_nobody=True)
            if "cannot_drop" in out:
                pytest.skip(f"root, and cannot drop privileges here: {out['cannot_drop']}")
        else:
            pytest.skip("the unprivileged branch is what the forked child runs")
        assert "error" not in out, out
        [[path, reason, detail]] = out["rejections"]
        assert (os.path.basename(path), reason) == ("0.jpg", "unreadable")
        assert "ermission" in detail and out["accepted"] == 3
        # the row scanned as root, loaded as nobody: substituted, not fatal
        assert out["substituted"] is True and out["shape"] == [3, 32, 32]
        assert any("0.jpg" in w and "ermission" in w for w in out["warnings"]), out
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- random bytes and random truncations at the scanner and the loader ----------------------

_BASES = {
    "jpeg": _encode(_picture(48, 32), "JPEG", exif=_orientation(6)),
    "progressive": _encode(_picture(48, 32), "JPEG", progressive=True),
    "png": _encode(_picture(48, 32), "PNG", exif=_orientation(8)),
    "webp": _encode(_picture(48, 32), "WEBP", exif=_orientation(5)),
    "gif": _encode(_picture(48, 32).convert("P"), "GIF"),
    "bmp": _encode(_picture(48, 32), "BMP"),
    "tiff": _encode(_picture(48, 32), "TIFF"),
}
_BASES["avif"] = (Path(__file__).parent / "data" / "odd" / "avif__transparency.avif").read_bytes()
_GOOD = _encode(_picture(40, 40), "PNG")


@st.composite
def _hostile_bytes(draw) -> bytes:
    kind = draw(st.sampled_from(["random", "cut", "mutate"]))
    if kind == "random":
        return draw(st.binary(max_size=2048))
    base = _BASES[draw(st.sampled_from(sorted(_BASES)))]
    if kind == "cut":
        return base[: draw(st.integers(0, len(base)))] + draw(st.binary(max_size=16))
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, min(len(data), 600) - 1))
        data[i] = draw(st.integers(0, 255))
    return bytes(data)


def test_a_decoder_runtime_error_is_an_image_decode_error():
    data = _broken_avif()
    assert read_header(data)[:2] == (64, 64)  # the header still reads
    with pytest.raises(ImageDecodeError, match="RuntimeError"):  # not a bare RuntimeError
        load_image(data)


class _Blobs:
    """A picklable row -> bytes reader for an ImageIndex (row 0 hostile, row 1 good)."""

    def __init__(self, *blobs: bytes) -> None:
        self.blobs = blobs

    def __call__(self, row: int) -> bytes:
        return self.blobs[row]


@settings(deadline=None, max_examples=120, suppress_health_check=[HealthCheck.too_slow])
@given(data=_hostile_bytes())
@example(data=_png_declaring(48, 2**31 + 32))  # sized by its header, too large to assign
def test_random_bytes_and_truncations_at_scanner_and_loader(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.jpg")
        with open(path, "wb") as f:
            f.write(data)
        index = scan([path], workers=0)  # never raises
    header = read_header(data)
    event(f"scan: {header.reason or 'sized'}")
    if len(index):
        assert header.ok and (index.width[0], index.height[0]) == (header.width, header.height)
    else:
        (rejection,) = index.rejections
        assert rejection.reason in REASONS and rejection.detail
        assert rejection.reason == header.reason or rejection.reason == "too_many_pixels"
    try:
        img = load_image(data)
    except ImageDecodeError as e:
        assert e.reason
        img = None
    else:  # what the loader can decode, the scanner sized right
        assert img.mode == "RGB" and header.ok and img.size == (header.width, header.height)
    event(f"load: {'failed' if img is None else 'decoded'}")
    if not header.ok or min(header.width, header.height) < 16:
        return
    # the dataset yields this image fitted to its bucket, or the good one flagged
    both = ImageIndex(["x", "good"], [header.width, 40], [header.height, 40], [["x"], ["g"]],
                      blob=_Blobs(data, _GOOD))  # fmt: skip
    a = assign(both, BucketLadder.from_buckets([(16, 16)]))
    if max(header.width, header.height) > MAX_SIDE:  # never a row: assign refuses it by name
        assert int(a.bucket_id[0]) == -1 and a.reasons[0] == "too_large"
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SubstitutionWarning)
        s = TextToImageDataset(both, a, image_transform=TRANSFORM)[0]
    assert s["pixel_values"].shape == (3, 16, 16) and s["pixel_values"].dtype == torch.uint8
    assert s["substituted"] == (img is None) and s["caption"] == ("g" if img is None else "x")


# -- what is written to disk: never pickle ---------------------------------------------------

_LIBRARY = ("bucketing", "samplers", "transforms")
_UNSAFE = re.compile(
    r"^\s*(import|from)\s+(pickle|cPickle|dill|joblib|shelve|marshal)\b|torch\.load\(|"
    r"allow_pickle\s*=\s*True|yaml\.load\(|\beval\(|\bexec\(",
    re.M,
)


def test_nothing_written_or_read_back_is_pickle(world, repo_root):
    written = [world.cache, world.index_path]
    for path in written:
        data = path.read_bytes()
        assert data[:4] == b"PAR1" and data[-4:] == b"PAR1", path  # parquet, both ends
        assert b"\x80\x04\x95" not in data and b"\x80\x05\x95" not in data  # no pickle frame
    leftovers = [p for p in world.base.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []  # atomic writes left no temporary files behind
    for package in _LIBRARY:
        for source in (repo_root / package).rglob("*.py"):
            hit = _UNSAFE.search(source.read_text())
            assert hit is None, f"{source}: {hit.group(0)!r}"


class _Payload:
    """Unpickling this creates ``marker``: proof that something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_parquet_file_carrying_a_pickle_payload_is_never_executed(tmp_path, odd_dir):
    """Old pyarrow unpickled ``arrow.py_extension_type`` field metadata when reading a
    file (CVE-2023-47248). Neither the scan cache nor a saved index may run it."""
    marker = tmp_path / "payload-ran"
    payload = pickle.dumps(_Payload(marker))
    pickle.loads(payload)  # the payload is live ...
    assert marker.exists()
    marker.unlink()  # ... and reading the files below must not run it
    meta = {
        b"ARROW:extension:name": b"arrow.py_extension_type",
        b"ARROW:extension:metadata": payload,
    }
    field = pa.field("path", pa.binary()).with_metadata(meta)
    hostile = tmp_path / "hostile.parquet"
    pq.write_table(
        pa.table({"path": pa.array([b"x"], pa.binary())}).cast(pa.schema([field])), hostile
    )
    assert pq.read_schema(hostile).field("path").metadata == meta  # the payload is in the file

    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(odd_dir / "hopper.jpg", folder / "a.jpg")
    cache = tmp_path / "cache.parquet"
    shutil.copy(hostile, cache)
    with pytest.raises(FileExistsError, match="not the scan cache"):
        scan(folder, workers=0, cache=cache)  # not our format: never read, never replaced
    assert cache.read_bytes() == hostile.read_bytes()
    forged = pq.read_table(hostile).replace_schema_metadata(
        {"format": CACHE_FORMAT, "version": "1"}  # carries our mark: read, then ignored
    )
    pq.write_table(forged, cache)
    with pytest.warns(RuntimeWarning, match="ignoring scan cache"):
        index = scan(folder, workers=0, cache=cache)
    assert len(index) == 1 and index.scan_stats.cache == "rebuilt"
    assert scan(folder, workers=0, cache=cache).scan_stats.cache == "loaded"
    with pytest.raises(ValueError, match="not an aspect-bucketing index"):
        ImageIndex.load(hostile)
    assert not marker.exists()


def test_one_bad_manifest_row_costs_one_rejection_through_scan(tmp_path, odd_dir):
    """Rows no file can name, nested beyond the JSON reader, or not fitting the header are
    rejections naming their row; the scan goes on and its index saves and loads."""
    shutil.copy(odd_dir / "hopper.jpg", tmp_path / "a.jpg")
    deep = "[" * 50_000 + '"x"' + "]" * 50_000
    (tmp_path / "m.jsonl").write_text(
        '{"image": "a\\u0000b.jpg"}\n{"image": "\\ud800.jpg"}\n'
        f'{{"image": "a.jpg", "caption": {deep}}}\n{{"image": "a.jpg", "caption": "ok"}}\n'
    )
    (tmp_path / "m.csv").write_text(
        'image,caption,score\na.jpg,a red car, parked,1\na.jpg,"x"y,2\n'
    )
    for name, bad in [("m.jsonl", ["line 1", "line 2", "line 3"]), ("m.csv", ["line 2", "line 3"])]:
        index = scan(tmp_path / name, workers=0)
        got = sorted((r.path, r.reason) for r in index.rejections)
        assert got == [(f"{tmp_path / name}:{w}", "bad_row") for w in bad], name
        index.save(tmp_path / "index.parquet")
        assert ImageIndex.load(tmp_path / "index.parquet").rejections == index.rejections
    assert index.captions == [] and len(scan(tmp_path / "m.jsonl", workers=0)) == 1


def _state(path: Path) -> tuple:
    """What a path is and holds (kind, bytes or listing), to prove nothing changed."""
    st = os.lstat(path)
    if path.is_symlink():
        return ("link", os.readlink(path))
    if path.is_dir():
        return ("dir", sorted(p.name for p in path.iterdir()))
    return (stat.S_IFMT(st.st_mode), path.read_bytes() if path.is_file() else None)


def test_a_scan_cache_path_never_clobbers_user_files(tmp_path, odd_dir):
    """The cache path is checked before any work: the source itself, a file the scan
    lists, a saved index, any file not in the scan-cache format, a FIFO, a folder, a
    device or a symlink to one are refused, and left exactly as they were."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(odd_dir / "hopper.jpg", folder / "a.jpg")
    (folder / "a.txt").write_text("a red car")
    (folder / "empty.png").write_bytes(b"")
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"image,caption\n{folder / 'a.jpg'},a red car\n")
    saved = tmp_path / "index.parquet"
    scan(folder, workers=0).save(saved)
    data = tmp_path / "data.parquet"
    pq.write_table(pa.table({"image": ["imgs/a.jpg"]}), data)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "to-fifo").symlink_to(tmp_path / "fifo")
    (tmp_path / "to-manifest").symlink_to(manifest)
    cases = [
        (manifest, manifest), (manifest, tmp_path / "to-manifest"), (folder, folder),
        (folder, folder / "a.jpg"), (folder, folder / "a.txt"), (folder, folder / "empty.png"),
        (manifest, folder / "a.jpg"), (data, data), (folder, saved), (folder, data),
        (folder, tmp_path / "fifo"), (folder, tmp_path / "to-fifo"),
        (tmp_path / "missing-source", tmp_path / "fifo"),  # refused before listing anything
    ]
    if os.geteuid() == 0:  # a private copy of /dev/null, never the real one
        os.mknod(tmp_path / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        cases.append((folder, tmp_path / "null"))
    for source, cache in cases:
        before = _state(cache)
        with pytest.raises(FileExistsError, match="refusing to write over"):
            scan(source, workers=0, cache=cache)
        assert _state(cache) == before, (source, cache)
    assert not [p for p in tmp_path.rglob("*.tmp")]
    cache = tmp_path / "scan.parquet"  # our own cache file is replaced as before
    assert scan(folder, workers=0, cache=cache).scan_stats.cache == "absent"
    assert scan(manifest, workers=0, cache=cache).scan_stats.cache == "loaded"


# -- the docs table ------------------------------------------------------------------------

HOSTILE_CASES = [  # (bad input, what happens): docs/robustness.md's table, row by row
    (
        "zero-byte file (`.jpg`, `.png`)",
        "scan rejects `empty_file`",
    ),
    (
        "random bytes / text / an HTML error page with an image extension",
        "scan rejects `not_an_image`",
    ),
    (
        "image magic followed by junk; JPEG cut inside its header; zero-width GIF; broken"
        " PNG/TIFF headers; a BMP of 30000 bits per pixel; a PNG whose iCCP chunk Pillow "
        "refuses at open",
        'scan rejects `unreadable` (detail: "corrupt or truncated PNG header", ...)',
    ),
    (
        "header declaring 0 x 5 pixels",
        'scan rejects `unreadable` ("header declares a 0x5 image")',
    ),
    (
        "header declaring 100000 x 100000 (PNG), 65500 x 65500 (JPEG), a 6e12-pixel BMP, "
        "a GIF frame far larger than its screen",
        "scan rejects `too_many_pixels` from the header; no pixel decoded",
    ),
    (
        "a file growing past `max_pixels` after the scan",
        "load refuses it before decoding (`too_many_pixels`): substituted, or "
        '`ImageDecodeError` with `on_error="raise"`',
    ),
    (
        "GIF whose logical screen (16x16) is smaller than its frame (64x48)",
        "scan reports 64x48, what the decoder yields",
    ),
    (
        "EXIF orientation 0, 9, 65535, orientation stored as text or as a rational/float, "
        "IFD offset past the end, 65535 IFD entries, an IFD pointing at itself, random EXIF "
        "bytes (JPEG and PNG)",
        "scan size = `exif_transpose` size; load gives the same pixels as `exif_transpose`",
    ),
    (
        "1x1, 1x9, 300x1, 1x300, 10x10 images",
        "`assign` rejects `too_small` (the thin ones `extreme_aspect` with "
        '`on_extreme="reject"`); never sampled (the dataset refuses the row by name)',
    ),
    (
        "1:50 and 50:1 strips",
        "cropped into the most elongated bucket, `crop_loss` > 0.9 recorded; "
        '`assign(on_extreme="reject")` gives `extreme_aspect`',
    ),
    (
        "header fine, pixels truncated or corrupt (JPEG cut mid-scan, truncated PNG/BMP, "
        "broken zlib stream, unsupported TIFF codec, an AVIF decoder failure)",
        "accepted by scan; at load substituted by another image of the same bucket "
        "(`substituted=True`, `SubstitutionWarning` naming the file once)",
    ),
    (
        "file deleted, replaced by garbage, truncated, or turned into a folder after the scan",
        'substituted (reason in the warning); `on_error="raise"`: `ImageDecodeError` '
        "naming the file and the reason",
    ),
    (
        "file replaced after the scan by a valid image of another size (smaller or larger)",
        'substituted ("changed after the scan": its bucket was chosen for another '
        "picture); never upscaled, never cropped to a stale bucket",
    ),
    (
        "FIFO in the folder",
        "scan rejects `not_a_file`; nothing blocks",
    ),
    (
        "file replaced by a FIFO after the scan",
        'substituted ("not a regular file"), the worker never blocks',
    ),
    (
        "symlink loop (`sub/up -> ..`, `a -> a`), dangling symlink",
        "scan rejects `symlink_loop` / `missing_file`; the walk ends",
    ),
    (
        "a folder named `x.jpg`",
        "walked as a folder; its images are scanned",
    ),
    (
        "file unreadable (mode 000, scanned as an unprivileged user)",
        'scan rejects `unreadable` ("Permission denied")',
    ),
    (
        "file readable at scan, unreadable at load",
        'substituted ("Permission denied")',
    ),
    (
        "non-UTF-8 file name; caption file in Latin-1",
        "scanned, loaded, caption decoded; the saved index keeps the exact bytes",
    ),
    (
        "caption sidecar that is a FIFO, a symlink to `/dev/zero`, or over 1 MiB",
        "image kept without a caption; the sidecar rejected `unreadable_caption` (only "
        "regular files are read: nothing blocks, nothing reads forever)",
    ),
    (
        "CSV manifest with blank rows, a short row, a row without a path, a repeated path, "
        "a missing file, a path out of `base_dir`",
        "blank rows skipped; short row: no caption; `no_image`; `duplicate` (captions "
        "merged, image kept once); `missing_file`; `outside_base_dir`; the rest train",
    ),
    (
        "CSV/TSV row with more cells than the header (`a.jpg,a red car, parked` under "
        "`image,caption`), header-less rows with separators in the caption, a quote never "
        "closed",
        "the caption is read whole when it is the last column (trailing empty cells "
        "dropped); header-less: all after the first separator is one caption; any other "
        "extra cell or broken quoting: `bad_row` naming the line, the rows after it read",
    ),
    (
        "a `.csv` separated by `;` or `|` (spreadsheet exports), a `.tsv` with commas",
        "`ValueError` naming the separator the first row looks split by",
    ),
    (
        "a CSV/TSV header or parquet schema naming the image or caption column twice "
        "(`image,image,caption`); a JSON row naming a key twice",
        "`ValueError` naming the column and its positions; the JSON row: `bad_row`",
    ),
    (
        "a caption nested 50,000 lists deep (`.jsonl` line or `.json` item), a folder "
        "nested 1,000 levels deep",
        "that row: `bad_row` (\"nested deeper than the JSON reader allows\"), the others "
        "read; shallower nesting flattened; the deep folder walked without recursion",
    ),
    (
        "a NUL or a lone surrogate in a manifest, list or dataset path",
        "`bad_row` named by the row (`m.jsonl:line 2`, `list:item 0`), never a "
        "`ValueError`/`UnicodeEncodeError` ending the scan; the index still saves",
    ),
    (
        "a dataset or manifest whose caption column has an unrecognised name (`prompt_en`), "
        "or two caption columns",
        "a `UserWarning` naming the columns found and the ones used (pass `column_map`)",
    ),
    (
        "a server dripping one byte per 50 ms, sending headers that slowly, or chunks "
        "forever; a TLS handshake never answered; a name lookup that hangs; a stall on every "
        "retry",
        "the download ends at `deadline` (a watchdog cuts the connection; retries included): "
        "`download_failed` (\"too slow\")",
    ),
    (
        "a redirect to `ftp://` or `file://`; a `gzip`/`deflate` body, a gzip bomb, "
        "`Content-Encoding: br`",
        "redirect refused (`download_failed`, only http(s) at every hop); decoded; "
        "`too large` after decoding past `max_bytes`; refused by name",
    ),
    (
        "a download-cache record that is a FIFO or names a file outside the cache",
        "a miss: fetched again; nothing blocks, nothing outside the cache is served, the "
        "FIFO is never replaced (`download_failed`: \"cannot store\")",
    ),
    (
        "a downloaded body that is no image",
        "rejected `not_an_image` under its URL, not the cache file's path",
    ),
    (
        "random bytes, truncations and byte flips of JPEG/PNG/WebP/GIF/BMP/TIFF/AVIF (hypothesis)",
        "scan: a size or one of the rejection reasons, never an exception; load: RGB of "
        "exactly the scanned size, or `ImageDecodeError`; dataset: the tensor or a "
        "flagged substitute",
    ),
    (
        'error in a DataLoader worker with `on_error="raise"`',
        "re-raised in the main process as `ImageDecodeError` naming the file and the reason",
    ),
    (
        "a scan cache or saved index carrying a pickled pyarrow extension-type payload "
        "(CVE-2023-47248)",
        "cache: refused as not ours (below), or, forging our format mark, ignored with a "
        "`RuntimeWarning` and rebuilt; index: `ValueError` (not our format); the payload "
        "never runs",
    ),
    (
        "`scan(..., cache=P)` where P is the source, a file the scan lists (image, caption, "
        "manifest), a saved index or any file not in the scan-cache format",
        "`FileExistsError` naming P before any work; P left as it was (a scan cache of "
        "another version is rebuilt)",
    ),
    (
        "an output path (scan cache, saved index, download cache, report files) that is a "
        "folder, FIFO, socket, character device (`/dev/null`) or a symlink to one",
        "`FileExistsError` before anything is written; a symlink to a regular file: that "
        "file is replaced, the link kept",
    ),
    (
        "anything the library writes (scan cache, saved index)",
        "parquet (magic at both ends), no temporary files left behind; no pickle, "
        "`torch.load`, `eval` or `exec` anywhere in the library",
    ),
    (
        "a small file declaring a huge 16-bit or float image (a few hundred bytes declaring "
        "12000 x 12000 16-bit pixels), or any image whose decoding needs more memory than "
        "`max_decode_bytes` (1 GiB)",
        "load refuses it from the header, before decoding (`too_many_bytes`): substituted, or "
        '`ImageDecodeError` with `on_error="raise"`; 16-bit, 32-bit and float images are '
        "converted in bands of rows, no full-size float copies",
    ),
    (
        "a seed of 2**32 or more, `set_epoch(2**63)`, a negative occurrence",
        "every (seed, epoch, index, occurrence) has its own generator (integers mixed at "
        "full width: `seed=2**32` is not `seed=0` of epoch 1); an epoch beyond 2**63 - 1 or "
        "a negative value is a `ValueError` naming it",
    ),
    (
        "`caption_transform=...`, a string, or an old `(img, bucket_wh, rng)` function as a "
        "dataset transform",
        "`TypeError` when the dataset is built, naming the argument and the "
        "`transform(sample) -> sample` signature; nothing fails later in a worker",
    ),
    (
        "an absurd size in an index or a sizes list (2**62 x 2**62, any side above 2**31 - 1)",
        "`assign` rejects `too_large` (`bucketing.ladder.MAX_SIDE`), never an overflow into "
        "a wrong bucket or `too_small`; a size that is not a whole number is a `ValueError`",
    ),
    (
        "`index.save(P)` where P is an image, a manifest, a scan cache or another program's "
        "parquet/Arrow file",
        "`FileExistsError` naming P; P left as it was (an index saved there before is replaced)",
    ),
]
HOSTILE_TABLE = "| Bad input | What happens |\n|---|---|\n" + "".join(
    f"| {what} | {result} |\n" for what, result in HOSTILE_CASES
)


def test_docs_table_is_this_one(repo_root):
    readme = (repo_root / "docs" / "robustness.md").read_text()
    block = readme.split("<!-- section:robustness -->", 1)[1].split("<!--", 1)[0]
    assert HOSTILE_TABLE in block


# -- decode memory, key widths, transform signatures -----------------------------------------


def test_decode_memory_is_refused_by_bytes_before_decoding(tmp_path):
    for k in range(3):  # two 8-bit pictures and, between them, a 16-bit one of the same size
        img = Image.fromarray(np.full((40, 40), 300 * k, np.uint16)) if k == 1 else _picture(40, 40)
        img.save(tmp_path / f"{k}.png")
    index = scan(tmp_path, workers=0)
    a = assign(index, LADDER)
    limit = decode_bytes("RGB", (40, 40))  # enough for 8-bit RGB, not for 16-bit
    ds = TextToImageDataset(index, a, image_transform=TRANSFORM, max_decode_bytes=limit)
    with pytest.warns(SubstitutionWarning, match="too_many_bytes"):
        assert ds[1]["substituted"] is True
    assert ds[0]["substituted"] is False
    strict = TextToImageDataset(
        index, a, image_transform=TRANSFORM, max_decode_bytes=limit, on_error="raise"
    )
    with pytest.raises(ImageDecodeError, match=r"1\.png.*too_many_bytes.*40x40 I;16"):
        strict[1]
    assert TextToImageDataset(index, a, image_transform=TRANSFORM)[1]["substituted"] is False


def test_wide_seeds_and_epochs_are_distinct_or_refused(tmp_path):
    for k in range(2):
        _picture(200, 40).save(tmp_path / f"{k}.png")
    index = scan(tmp_path, workers=0)
    a = assign(index, LADDER)
    crops = {}
    for seed, epoch in ((2**32, 0), (0, 1), (2**64, 0), (0, 2**32)):
        ds = TextToImageDataset(index, a, image_transform=TRANSFORM, seed=seed)
        ds.set_epoch(epoch)
        crops[seed, epoch] = [ds[_Repeat(i, r)]["fit"] for i in range(2) for r in range(8)]
    assert len({tuple(c) for c in crops.values()}) == len(crops)
    with pytest.raises(ValueError, match=r"epoch must be in \[0, 2\*\*63 - 1\]"):
        ds.set_epoch(2**63)
    with pytest.raises(ValueError, match="occurrence must be >= 0"):
        ds[_Repeat(0, -1)]


class _Repeat(int):
    """A row number with an ``occurrence``, as the sampler yields repeats."""

    def __new__(cls, row: int, occurrence: int):
        self = super().__new__(cls, row)
        self.occurrence = occurrence
        return self


@pytest.mark.parametrize(
    "kw",
    [
        {"caption_transform": ...},
        {"caption_transform": "first"},
        {"image_transform": lambda img, bucket_wh, rng: {}},
    ],
)
def test_a_transform_of_the_wrong_shape_is_refused_when_the_dataset_is_built(tmp_path, kw):
    _picture(40, 40).save(tmp_path / "0.png")
    index = scan(tmp_path, workers=0)
    kw = {"image_transform": TRANSFORM, **kw}
    with pytest.raises(TypeError, match=r"_transform must .*transform\(sample\) -> sample"):
        TextToImageDataset(index, assign(index, LADDER), **kw)
