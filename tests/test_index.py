"""ImageIndex: columns that read back what was stored (any text, any file-name bytes), saved
and loaded as parquet or as a memory-mapped Arrow file; files of another kind or version
refused; a forked worker reading every row copies no pages; text that is not valid UTF-8
(names decoded with surrogateescape) in paths, rejection details and captions; an index whose
images live inside a dataset refuses to be saved (load() could not read them), and its rows
never enter the scan cache."""

from __future__ import annotations

import io
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from bucketing.index import CaptionColumn, ImageIndex, Rejection, TextColumn, utf8_text
from bucketing.scan import scan
from bucketing.table_file import TableFileError

ODD = os.fsdecode(b"/data/caf\xe9/\xff.jpg")  # a Latin-1 name on a UTF-8 system: surrogates


def test_surrogates_in_paths_details_and_captions_round_trip(tmp_path):
    index = ImageIndex(
        paths=[ODD],
        width=[64],
        height=[48],
        captions=[["plain", "from json \udce9"]],
        rejections=[
            Rejection(ODD + ".png", "outside_base_dir", f"resolves to {ODD}"),
            Rejection("/ok.jpg", "empty_file", ""),
        ],
    )
    index.save(tmp_path / "index.parquet")
    loaded = ImageIndex.load(tmp_path / "index.parquet")
    assert loaded.paths == [ODD] and loaded.sizes.tolist() == [[64, 48]]
    assert loaded.captions == [["plain", "from json \\udce9"]]
    assert loaded.rejections == [
        Rejection(ODD + ".png", "outside_base_dir", "resolves to /data/caf\\udce9/\\udcff.jpg"),
        Rejection("/ok.jpg", "empty_file", ""),
    ]
    assert all(utf8_text(r.detail) == r.detail for r in loaded.rejections)


def test_utf8_text_keeps_valid_text():
    for text in ("", "ascii", "café ☕ 𝄞"):
        assert utf8_text(text) == text
    assert utf8_text("\ud800x").encode("utf-8") == b"\\ud800x"


def test_an_index_of_dataset_bytes_is_not_saved(tmp_path):
    datasets = pytest.importorskip("datasets")
    buf = io.BytesIO()
    Image.new("RGB", (32, 24)).save(buf, "PNG")
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": buf.getvalue(), "path": None}] * 2},
        features=datasets.Features({"image": datasets.Image()}),
    )
    index = scan(ds, workers=0, cache=tmp_path / "cache.parquet")
    assert len(index) == 2 and index.blob is not None
    with pytest.raises(ValueError, match=r"inside a datasets.Dataset.*scan\(dataset\)"):
        index.save(tmp_path / "index.parquet")
    assert not (tmp_path / "index.parquet").exists()
    # the rows have no file to stat: the cache holds none of them, a rescan reads them again
    again = scan(ds, workers=0, cache=tmp_path / "cache.parquet")
    assert again.scan_stats.reused == 0 and again.scan_stats.read == 2


# --------------------------------------------------------------------------- columnar storage

_texts = st.text(st.characters(codec="utf-8") | st.sampled_from(["\udce9", "\udcff", "é", "☕"]))


@settings(max_examples=40, deadline=None)
@given(
    captions=st.lists(st.lists(_texts, max_size=3), max_size=12),
    suffix=st.sampled_from([".parquet", ".arrow"]),
)
def test_columns_read_back_what_was_stored(tmp_path_factory, captions, suffix):
    paths = [os.fsdecode(b"/d/\xff") + f"{i}-{c[0] if c else ''}" for i, c in enumerate(captions)]
    index = ImageIndex(paths, range(len(paths)), range(len(paths)), captions)
    assert isinstance(index.paths, TextColumn) and isinstance(index.captions, CaptionColumn)
    assert len(index) == len(paths) and list(index.paths) == paths == index.paths
    assert (
        index.captions == captions and [index.captions[i] for i in range(len(captions))] == captions
    )
    assert index.captions.counts().tolist() == [len(c) for c in captions]
    assert [index.image_source(i) for i in range(len(paths))] == paths
    if paths:
        assert index.paths[-1] == paths[-1] and index.captions[-1] == captions[-1]
        with pytest.raises(IndexError):
            index.paths[len(paths)]
    path = tmp_path_factory.mktemp("idx") / f"index{suffix}"
    index.save(path)
    loaded = ImageIndex.load(path)
    assert loaded.paths == paths and [os.fsencode(p) for p in loaded.paths] == [
        os.fsencode(p) for p in paths
    ]  # the exact bytes of every file name
    assert loaded.captions == [[utf8_text(c) for c in caps] for caps in captions]
    assert loaded.width.tolist() == list(range(len(paths)))


def test_reading_a_row_copies_nothing_but_the_row():
    index = ImageIndex(["/a.jpg", "/bb.jpg"], [1, 2], [3, 4], [["x", "y"], []])
    row = index.captions[0]
    row.append("changed")
    assert index.captions[0] == ["x", "y"]  # a new list per read, the column is unchanged
    assert index.paths[:5] == ["/a.jpg", "/bb.jpg"] and index.paths[::-1] == ["/bb.jpg", "/a.jpg"]
    assert index.paths != ["/a.jpg"] and index.captions != [["x", "y"]]
    assert index.nbytes == 6 + 7 + 2 + 8 * (3 + 3 + 3) + 8 * 4  # text + offsets + sizes


def test_an_arrow_index_is_memory_mapped(tmp_path):
    n = 50_000
    index = ImageIndex([f"/data/{i:07d}.jpg" for i in range(n)], [64] * n, [48] * n,
                       [[f"caption {i}"] for i in range(n)])  # fmt: skip
    path = tmp_path / "index.arrow"
    index.save(path)
    assert path.read_bytes()[:6] == b"ARROW1"
    loaded = ImageIndex.load(path)
    assert loaded.paths == index.paths and loaded.captions[n - 1] == [f"caption {n - 1}"]
    # the text is not copied into this process: its buffer lies inside the mapped file
    lo, hi = (
        int(x, 16)
        for x in next(
            line.split()[0].split("-")
            for line in Path("/proc/self/maps").read_text().splitlines()
            if str(path) in line
        )
    )
    address = loaded.paths.data.__array_interface__["data"][0]
    assert lo <= address < hi


def test_a_file_of_another_kind_or_version_is_refused(tmp_path):
    index = ImageIndex(["/a.jpg"], [1], [1], [[]])
    index.save(tmp_path / "index.parquet")
    table = pq.read_table(tmp_path / "index.parquet")
    for name, meta in {"v1": {"format": "aspect-bucketing/index", "version": "1"},
                       "other": {"format": "something-else", "version": "2"}}.items():  # fmt: skip
        pq.write_table(table.replace_schema_metadata(meta), tmp_path / f"{name}.parquet")
        with pytest.raises(ValueError, match=r"not an aspect-bucketing index \(version 2\).*found"):
            ImageIndex.load(tmp_path / f"{name}.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not a table at all")
    with pytest.raises(TableFileError, match="neither a parquet nor an Arrow file"):
        ImageIndex.load(tmp_path / "junk.parquet")
    (tmp_path / "cut.arrow").write_bytes(b"ARROW1" + b"\0" * 10)
    with pytest.raises(TableFileError, match="unreadable arrow file"):
        ImageIndex.load(tmp_path / "cut.arrow")


def _private_kb() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("Private_"))


def _read_every_row(columns, conn) -> None:
    paths, captions = columns
    before = _private_kb()
    total = 0
    for i in range(len(paths)):
        total += len(paths[i]) + sum(len(c) for c in captions[i])
    conn.send((_private_kb() - before, total))


def _fork_growth_kb(columns) -> int:
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_read_every_row, args=(columns, child))
    proc.start()
    grown, total = parent.recv()
    proc.join()
    assert total > 0
    return grown


def test_a_forked_worker_reading_every_row_copies_no_pages():
    """The copy-on-access problem of Python-object datasets, measured: a forked child that
    reads every row of a list-based index copies the pages its reads touch (reference
    counts); reading the columns touches none."""
    n = 200_000
    paths = [f"/data/shard-{i % 97:03d}/{i:09d}.jpg" for i in range(n)]
    captions = [[f"a photo number {i} of something"] for i in range(n)]
    lists_kb = _fork_growth_kb((paths, captions))
    index = ImageIndex(paths, np.ones(n), np.ones(n), captions)
    del paths, captions
    columns_kb = _fork_growth_kb((index.paths, index.captions))
    assert lists_kb > 10_000, lists_kb  # ~45 MB: every str and list written to
    assert columns_kb < 2_000, columns_kb



@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
def test_save_never_overwrites_a_file_it_did_not_write(tmp_path, examples_dir, suffix):
    """An image, another program's parquet or a scan cache at the target is left as it was
    (FileExistsError); an index saved earlier is replaced."""
    index = scan(examples_dir, workers=0)
    image = tmp_path / f"photo{suffix}"
    image.write_bytes((examples_dir / "china.jpg").read_bytes())
    foreign = tmp_path / f"other{suffix}"
    pq.write_table(pa.table({"a": [1]}), foreign)
    cache = tmp_path / "scan.parquet"
    scan(examples_dir, workers=0, cache=cache)
    for target in (image, foreign, cache):
        before = target.read_bytes()
        with pytest.raises(FileExistsError, match="not .* written by this library"):
            index.save(target)
        assert target.read_bytes() == before
    saved = tmp_path / f"index{suffix}"
    index.save(saved)
    index.save(saved)  # an index written here before: replaced
    assert list(ImageIndex.load(saved).paths) == list(index.paths)
