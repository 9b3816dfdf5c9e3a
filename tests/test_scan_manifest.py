"""scan(sizes="manifest"): sizes from a parquet manifest's columns, no image file touched; the
column-wise reading agrees with the row-by-row header scan on everything but the sizes'
origin; parquet shards (folder, glob, list) are one source in a stable order; a missing file
is found by the dataset (substituted)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bucketing import BucketLadder, TextToImageDataset, assign, scan
from transforms.resize_crop import BucketResizeCrop

SIZES = {"a.png": (40, 30), "b.png": (24, 48), "c.png": (33, 33), "d.png": (64, 16)}
CMAP = {"image": "file", "caption": "text", "width": "WIDTH", "height": "HEIGHT"}


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pictures")
    (root / "sub").mkdir()
    for name, size in SIZES.items():
        Image.new("RGB", size, (200, 40, 40)).save(root / name)
    return root


def write(path: Path, rows: list[dict], schema: pa.Schema | None = None) -> Path:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def described(index) -> tuple:
    return list(index.paths), index.sizes.tolist(), list(index.captions), index.rejections


# values: names, some repeated, some spelled differently (./, sub/.., absolute), some blank
_value = st.sampled_from(list(SIZES) + ["./a.png", "sub/../b.png", "", "  ", None])
_caption = st.one_of(
    st.none(),
    st.sampled_from(["", " x ", "y", "a, b"]),
    st.lists(st.sampled_from([None, "", " p", "q ", "y"]), max_size=3),
)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rows=st.lists(st.tuples(_value, _caption), min_size=1, max_size=14), data=st.data())
def test_manifest_sizes_agree_with_a_header_scan(tmp_path_factory, pictures, rows, data):
    """Same rows, same captions, same duplicates and rejections as reading every header:
    only where the sizes come from differs (here they are the true ones)."""
    as_list = data.draw(st.booleans())
    root = tmp_path_factory.mktemp("m")
    for name in SIZES:
        shutil.copy(pictures / name, root / name)
    (root / "sub").mkdir()
    records = []
    for value, caption in rows:
        name = os.path.basename(os.path.normpath(value)) if value and value.strip() else None
        size = SIZES.get(name, (None, None))
        if caption is not None and as_list and isinstance(caption, str):
            caption = [caption]
        records.append({"file": value, "text": caption, "WIDTH": size[0], "HEIGHT": size[1]})
    text = pa.list_(pa.string()) if as_list else pa.string()
    schema = pa.schema([("file", pa.string()), ("text", text), ("WIDTH", pa.int32()),
                        ("HEIGHT", pa.int64())])  # fmt: skip
    if not as_list:
        for r in records:
            r["text"] = r["text"] if not isinstance(r["text"], list) else None
    manifest = write(root / "manifest.parquet", records, schema)
    try:
        headers = scan(manifest, workers=0, column_map={"image": "file", "caption": "text"})
    except ValueError as e:  # nothing listed: both refuse
        assert "lists no images" in str(e)
        return
    fast = scan(manifest, sizes="manifest", column_map=CMAP)
    assert described(fast) == described(headers)
    assert fast.scan_stats.read == 0 and fast.scan_stats.files == headers.scan_stats.files


def test_no_image_file_is_touched(tmp_path, pictures):
    """Missing files are accepted and a wrong size is believed: nothing was opened or
    stat'ed. The dataset then finds the missing file and substitutes a bucket-mate."""
    shutil.copytree(pictures, tmp_path / "p")
    rows = [
        {"file": "p/a.png", "text": "real", "WIDTH": 40, "HEIGHT": 30},
        {"file": "p/gone.png", "text": "never existed", "WIDTH": 40, "HEIGHT": 30},
        {"file": "p/b.png", "text": "wrong size", "WIDTH": 4000, "HEIGHT": 4000},
        {"file": "p/c.png", "text": "no size", "WIDTH": None, "HEIGHT": 33},
        {"file": "p/d.png", "text": "too big", "WIDTH": 10**5, "HEIGHT": 10**5},
    ]
    index = scan(write(tmp_path / "m.parquet", rows), sizes="manifest", column_map=CMAP,
                 max_pixels=10**8)  # fmt: skip
    assert [Path(p).name for p in index.paths] == ["a.png", "gone.png", "b.png"]
    assert index.sizes.tolist() == [[40, 30], [40, 30], [4000, 4000]]
    assert [(Path(r.path).name, r.reason) for r in index.rejections] == [
        ("c.png", "bad_row"),
        ("d.png", "too_many_pixels"),
    ]
    a = assign(index, BucketLadder.from_buckets([(16, 16)]))
    ds = TextToImageDataset(index, a, image_transform=BucketResizeCrop())
    with pytest.warns(UserWarning, match="gone.png"):
        sample = ds[1]
    assert sample["substituted"] and sample["index"] == 0 and sample["caption"] == "real"
    assert tuple(sample["pixel_values"].shape) == (3, 16, 16)


def test_shards_are_one_source_in_a_stable_order(tmp_path):
    rows = [{"file": f"/data/{i:04d}.jpg", "text": f"c{i}", "WIDTH": 64 + i, "HEIGHT": 48}
            for i in range(30)]  # fmt: skip
    (tmp_path / "shards").mkdir()
    cuts = [0, 7, 8, 21, 30]
    names = ["b.parquet", "d.parquet", "a.parquet", "c.parquet"]  # sorted order: a b c d
    order = sorted(names)
    for (lo, hi), name in zip(zip(cuts, cuts[1:], strict=False), order, strict=True):
        write(tmp_path / "shards" / name, rows[lo:hi])
    whole = scan(write(tmp_path / "whole.parquet", rows), sizes="manifest", column_map=CMAP)
    for source in (
        tmp_path / "shards",
        str(tmp_path / "shards" / "*.parquet"),
        [tmp_path / "shards" / n for n in order],
    ):
        got = scan(source, sizes="manifest", column_map=CMAP)
        assert described(got) == described(whole), source
    headers = scan(tmp_path / "shards", workers=0, column_map={"image": "file"})
    assert {r.reason for r in headers.rejections} == {"missing_file"}  # listed, then checked
    assert [r.path for r in headers.rejections] == [r["file"] for r in rows]
    with pytest.raises(FileNotFoundError, match="no .parquet file matches"):
        scan(str(tmp_path / "nothing" / "*.parquet"), sizes="manifest", column_map=CMAP)


def test_manifest_sizes_configuration_errors(tmp_path, pictures):
    manifest = write(tmp_path / "m.parquet", [{"file": "x.png", "text": "", "WIDTH": 1}])
    with pytest.raises(ValueError, match="sizes must be 'headers' or 'manifest'"):
        scan(manifest, sizes="exif")
    with pytest.raises(ValueError, match=r"needs a height column.*column_map"):
        scan(manifest, sizes="manifest", column_map={"image": "file", "width": "WIDTH"})
    with pytest.raises(ValueError, match="reads parquet manifests"):
        scan(pictures, sizes="manifest")
    url = {"file": "https://example.com/x.png", "text": "", "WIDTH": 1, "HEIGHT": 1}
    urls = write(tmp_path / "u.parquet", [url])
    with pytest.raises(ValueError, match="local files only"):
        scan(urls, sizes="manifest", column_map=CMAP)
    floats = write(
        tmp_path / "f.parquet", [{"file": "x.png", "text": "", "WIDTH": 1.5, "HEIGHT": 1.0}]
    )
    with pytest.raises(ValueError, match="not whole pixel counts"):
        scan(floats, sizes="manifest", column_map=CMAP)


def test_base_dir_confines_manifest_paths(tmp_path):
    rows = [{"file": "in/a.jpg", "text": "", "WIDTH": 8, "HEIGHT": 8},
            {"file": "../../etc/passwd", "text": "", "WIDTH": 8, "HEIGHT": 8}]  # fmt: skip
    index = scan(write(tmp_path / "m.parquet", rows), sizes="manifest", column_map=CMAP,
                 base_dir=tmp_path)  # fmt: skip
    assert list(index.paths) == [str(tmp_path / "in" / "a.jpg")]
    assert [r.reason for r in index.rejections] == ["outside_base_dir"]
    assert np.array_equal(index.width, [8])


def test_sizes_from_a_dataset_and_impossible_paths(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.chdir(tmp_path)
    ds = datasets.Dataset.from_dict({
        "file": ["a.png", "/x/b.png", "c\0.png", "a.png"],
        "text": ["x", None, "z", "x2"],
        "WIDTH": [4, 5, 6, 7],
        "HEIGHT": [7, 8, 9, 10],
    })  # fmt: skip
    index = scan(ds, sizes="manifest", column_map=CMAP)
    assert list(index.paths) == [str(tmp_path / "a.png"), "/x/b.png"]
    assert list(index.captions) == [["x", "x2"], []] and index.sizes.tolist() == [[4, 7], [5, 8]]
    assert [(r.path, r.reason) for r in index.rejections] == [
        (str(tmp_path / "a.png"), "duplicate"),
        ("dataset:row 2", "bad_row"),
    ]
    assert "NUL" in index.rejections[1].detail
