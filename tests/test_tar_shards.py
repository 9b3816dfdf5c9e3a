"""Tar shards read in place: a .tar, a folder, a glob, a brace range or a list of them scans to
the index the extracted files give, loads the same pixels (in DataLoader workers too), writes
nothing beside the shards, and turns corrupt or truncated members into rejections."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from bucketing import ImageIndex, scan, text_to_image_dataset
from bucketing.cli.caption import caption_folder
from bucketing.members import parse_member, read_member
from bucketing.pipeline.encoder_cache.keys import file_identity
from bucketing.sources.braces import expand_braces
from bucketing.sources.tar import _members
from transforms.image import load_image

FORMATS = ("jpg", "png", "webp")


def encoded(size: tuple[int, int], fmt: str, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format={"jpg": "JPEG"}.get(fmt, fmt.upper()))
    return out.getvalue()


def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def make_shards(root: Path, shards: int = 3, per: int = 4) -> Path:
    """``root/shards/0000k.tar`` (img2dataset layout: image, txt, json; shard 1 keeps its
    captions and sizes in a sibling parquet only) and the same files extracted under
    ``root/extracted`` with ``.txt`` sidecars."""
    folder, extracted = root / "shards", root / "extracted"
    folder.mkdir()
    extracted.mkdir()
    for s in range(shards):
        rows = []
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tf:
            for i in range(per):
                key, fmt = f"{s:05d}{i:04d}", FORMATS[(s + i) % 3]
                size = (24 + 8 * i, 40 - 4 * s)
                data = encoded(size, fmt, 10 * s + i)
                caption = f"a photo {key}"
                add(tf, f"{key}.{fmt}", data)
                (extracted / f"{key}.{fmt}").write_bytes(data)
                (extracted / f"{key}.txt").write_text(caption)
                if s == 1:
                    rows.append({"key": key, "caption": caption, "width": size[0],
                                 "height": size[1], "status": "success"})  # fmt: skip
                    continue
                add(tf, f"{key}.txt", caption.encode())
                add(tf, f"{key}.json", json.dumps({"width": size[0], "height": size[1]}).encode())
        if rows:
            pq.write_table(pa.Table.from_pylist(rows), folder / f"{s:05d}.parquet")
    return folder


def pixels(source: str | bytes) -> np.ndarray:
    return np.asarray(load_image(source))


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.mark.parametrize("spelling", ["file", "folder", "glob", "braces", "list"])
def test_shards_read_in_place_give_the_extracted_pixels(tmp_path: Path, spelling: str) -> None:
    folder = make_shards(tmp_path)
    names = sorted(str(p) for p in folder.glob("*.tar"))
    source = {
        "file": names[0],
        "folder": str(folder),
        "glob": str(folder / "*.tar"),
        "braces": str(folder / "{00000..00002}.tar"),
        "list": names,
    }[spelling]
    before = listing(folder)
    index = scan(source, workers=0)
    extracted = scan(tmp_path / "extracted", workers=0)
    n = 4 if spelling == "file" else 12
    assert len(index) == n and not index.rejections
    assert index.sizes.tolist() == extracted.sizes[:n].tolist()
    assert list(index.captions) == list(extracted.captions)[:n]
    for i in range(n):
        shard, offset, length = parse_member(index.paths[i])
        assert shard in names and index.paths[i].endswith(os.path.basename(extracted.paths[i]))
        assert np.array_equal(pixels(index.image_source(i)), pixels(extracted.paths[i]))
    assert listing(folder) == before  # nothing extracted, nothing written beside the shards


def test_dataloader_workers_read_members_by_seek(tmp_path: Path) -> None:
    folder = make_shards(tmp_path, shards=2, per=3)
    before = listing(folder)
    kwargs = dict(model="flux", ladder={"max_area": 32 * 32, "step": 16}, crop="center", workers=0)
    in_place = text_to_image_dataset(source=str(folder), **kwargs)
    extracted = text_to_image_dataset(source=str(tmp_path / "extracted"), **kwargs)
    loader = torch.utils.data.DataLoader(in_place, batch_size=None, num_workers=2)
    got = [sample["pixel_values"] for sample in loader]
    assert len(got) == len(extracted) == 6
    for i, tensor in enumerate(got):
        assert torch.equal(tensor, extracted[i]["pixel_values"])
    assert listing(folder) == before


def test_manifest_sizes_come_from_the_json_and_the_parquet(tmp_path: Path) -> None:
    folder = make_shards(tmp_path)
    headers, manifest = scan(folder, workers=0), scan(folder, sizes="manifest")
    assert manifest.sizes.tolist() == headers.sizes.tolist()
    assert list(manifest.paths) == list(headers.paths)
    assert list(manifest.captions) == list(headers.captions)
    assert manifest.scan_stats.read == 0
    with tarfile.open(folder / "00000.tar", "a") as tf:  # a key with no size anywhere
        add(tf, "zzz.png", encoded((9, 9), "png", 0))
    again = scan(folder, sizes="manifest")
    assert [(os.path.basename(r.path).split(":")[-1], r.reason) for r in again.rejections] == [
        ("zzz.png", "bad_row")
    ]


def test_scan_cache_and_encoder_identity_use_the_shard_and_the_offset(tmp_path: Path) -> None:
    folder = make_shards(tmp_path, shards=2, per=3)
    cache = tmp_path / "scan.parquet"
    first = scan(folder, workers=0, cache=cache)
    assert first.scan_stats.read == 6
    assert scan(folder, workers=0, cache=cache).scan_stats.read == 0
    os.utime(folder / "00001.tar", ns=(1, 1))  # one shard touched: its members read again
    again = scan(folder, workers=0, cache=cache)
    assert (again.scan_stats.read, again.scan_stats.reused) == (3, 3)
    identities = [file_identity(again, i) for i in range(len(again))]
    st = (folder / "00001.tar").stat()
    assert identities[3][1:] == [st.st_size, 1]
    assert len({tuple(x) for x in identities}) == 6  # the offset tells members apart


def test_a_saved_index_reads_its_members(tmp_path: Path) -> None:
    index = scan(make_shards(tmp_path, shards=1, per=2), workers=0)
    index.save(tmp_path / "index.arrow")
    loaded = ImageIndex.load(tmp_path / "index.arrow")
    assert loaded.image_source(1) == index.image_source(1) == read_member(index.paths[1])


def corrupt_shards(folder: Path) -> None:
    """Every way a shard can be broken, one shard each."""
    good = [(f"k{i}.png", encoded((12, 10 + i), "png", i)) for i in range(3)]
    with tarfile.open(folder / "a_truncated.tar", "w") as tf:
        for name, data in good:
            add(tf, name, data)
    whole = (folder / "a_truncated.tar").read_bytes()
    cut = whole.index(good[2][1]) + len(good[2][1]) // 2
    (folder / "a_truncated.tar").write_bytes(whole[:cut])  # the last member cut short
    with tarfile.open(folder / "b_members.tar", "w") as tf:
        add(tf, "bad.jpg", b"\xff\xd8\xff\xe0 not really a jpeg")
        add(tf, "half.png", good[0][1][:40])
        add(tf, "dup.png", good[0][1])
        add(tf, "dup.jpg", encoded((5, 5), "jpg", 1))
        add(tf, "orphan.txt", b"a caption without an image")
        link = tarfile.TarInfo("link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "dup.png"
        tf.addfile(link)
    (folder / "c_not_a_tar.tar").write_bytes(b"this is not a tar archive at all" * 40)
    (folder / "d_gzip.tar").write_bytes(gzip.compress(whole))
    with tarfile.open(folder / "e_garbage.tar", "w") as tf:
        for name, data in good[:2]:
            add(tf, name, data)
    data = bytearray((folder / "e_garbage.tar").read_bytes())
    second = data.index(b"k1.png")  # the second member's header: overwritten with junk
    data[second : second + 512] = b"\x07" * 512
    (folder / "e_garbage.tar").write_bytes(bytes(data))


def test_corrupt_and_truncated_members_are_rejections(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    corrupt_shards(folder)
    index = scan(folder, workers=0)
    got = {}
    for r in index.rejections:
        name = r.path.rsplit(":", 1)[-1] if "#" in r.path else os.path.basename(r.path)
        got[name] = (r.reason, r.detail)
    assert sorted(os.path.basename(p).split(":")[-1] for p in index.paths) == [
        "dup.png", "k0.png", "k0.png", "k1.png"
    ]
    assert got["k2.png"][0] == "unreadable" and "truncated tar member" in got["k2.png"][1]
    assert got["bad.jpg"][0] in ("unreadable", "not_an_image")
    assert got["half.png"][0] == "unreadable"
    assert got["dup.jpg"][0] == "duplicate"
    assert got["link.png"][0] == "not_a_file"
    assert got["b_members.tar:orphan"][0] == "no_image"
    assert got["c_not_a_tar.tar"][0] == "unreadable"
    assert "compressed" in got["d_gzip.tar"][1]
    assert "unreadable tar header" in got["e_garbage.tar"][1]


def test_a_shard_truncated_after_the_scan_is_substituted(tmp_path: Path) -> None:
    folder = make_shards(tmp_path, shards=2, per=3)
    dataset = text_to_image_dataset(source=str(folder), model="flux", workers=0,
                                    ladder={"max_area": 32 * 32, "step": 16})  # fmt: skip
    last = folder / "00001.tar"
    last.write_bytes(last.read_bytes()[:2048])  # the shard's later members are gone
    with pytest.raises(OSError, match="truncated tar member"):
        read_member(dataset.index.paths[5])
    with pytest.warns(Warning, match="truncated tar member"):
        samples = [dataset[i] for i in range(len(dataset))]
    assert samples[5]["substituted"] and not samples[0]["substituted"]


def test_captioning_refuses_shards(tmp_path: Path) -> None:
    folder = make_shards(tmp_path, shards=1, per=1)
    before = listing(folder)
    with pytest.raises(ValueError, match="caption file cannot be written beside a member"):
        caption_folder(folder, tmp_path)  # refused before any model is loaded
    assert listing(folder) == before


def test_missing_shards(tmp_path: Path) -> None:
    folder = make_shards(tmp_path, shards=2, per=2)
    index = scan(str(folder / "{00000..00002}.tar"), workers=0)
    assert len(index) == 4
    assert [(os.path.basename(r.path), r.reason) for r in index.rejections] == [
        ("00002.tar", "missing_file")
    ]
    with pytest.raises(FileNotFoundError):
        scan(str(folder / "{00007..00009}.tar"))
    with pytest.raises(FileNotFoundError, match="no .tar file matches"):
        scan(str(folder / "nothing*.tar"))
    (folder / "stray.png").write_bytes(encoded((4, 4), "png", 0))
    with pytest.raises(ValueError, match="both tar shards"):
        scan(folder)
    assert len(scan(str(folder / "*.tar"), workers=0)) == 4


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("a{8..11}.tar", ["a8.tar", "a9.tar", "a10.tar", "a11.tar"]),
        ("{0008..0010}", ["0008", "0009", "0010"]),
        ("{3..1}", ["3", "2", "1"]),
        ("{x,y}/{0..1}.tar", ["x/0.tar", "x/1.tar", "y/0.tar", "y/1.tar"]),
        ("plain.tar", ["plain.tar"]),
        ("{not a group}", ["{not a group}"]),
    ],
)
def test_brace_ranges(pattern: str, expected: list[str]) -> None:
    assert expand_braces(pattern) == expected


member_names = st.lists(
    st.tuples(
        st.text(st.sampled_from("ab/é_.-x1"), min_size=1, max_size=8).filter(
            lambda s: not s.startswith("/") and "//" not in s and not s.endswith("/")
        ),
        st.integers(0, 160),  # a long directory prefix: ustar prefix, GNU or pax long names
        st.sampled_from(["file", "dir", "link"]),
        st.binary(max_size=1500),
    ),
    max_size=6,
)


@settings(max_examples=40, deadline=None)
@given(members=member_names, fmt=st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT,
                                                  tarfile.PAX_FORMAT]))  # fmt: skip
def test_the_member_walk_agrees_with_tarfile(members, fmt) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for i, (name, long, kind, data) in enumerate(members):
            info = tarfile.TarInfo(("d" * long + "/" if long else "") + f"{i}{name}")
            if kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "link":
                info.type, info.linkname = tarfile.SYMTYPE, "elsewhere"
            else:
                info.size = len(data)
            try:
                tf.addfile(info, io.BytesIO(data) if kind == "file" else None)
            except ValueError:  # a name this format cannot hold
                continue
    raw = buf.getvalue()
    with tempfile.TemporaryFile() as f:
        f.write(raw)
        f.flush()
        got, end = _members(f.fileno(), len(raw))
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        kinds = {tarfile.DIRTYPE: "dir", tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file"}
        expected = [(m.name, m.offset_data, m.size, kinds.get(m.type, "other"))
                    for m in tf.getmembers()]  # fmt: skip
    assert [(m.name.rstrip("/"), m.offset, m.size, m.kind) for m in got] == expected
    assert not raw[end:].strip(b"\0")
