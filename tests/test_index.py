"""ImageIndex.save/load: text that is not valid UTF-8 (names decoded with surrogateescape) in
paths, rejection details and captions; an index whose images live inside a dataset refuses to
be saved (load() could not read them), and its rows never enter the scan cache."""

from __future__ import annotations

import io
import os

import pytest
from PIL import Image

from bucketing.index import ImageIndex, Rejection, utf8_text
from bucketing.scan import scan

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
