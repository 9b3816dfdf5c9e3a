"""Sources built by ``datasets.load_dataset``: a builder name with ``data_dir``/``data_files``,
or ``hf:NAME``, read like a ``datasets.Dataset``; offline (packaged builders on local files,
the HF cache in a temporary folder); paths, globs and typos keep their meaning."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bucketing import resolve_source, scan, text_to_image_dataset

datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def photos(root: Path) -> Path:
    """``root/photos``: four images and an imagefolder ``metadata.jsonl`` with ``text``."""
    folder = root / "photos"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(4):
            Image.new("RGB", (32 + 16 * i, 48), (10 * i, 0, 0)).save(folder / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"photo {i}"}) + "\n")
    return folder


def test_imagefolder_with_data_dir_builds_offline(tmp_path: Path) -> None:
    folder = photos(tmp_path)
    dataset = text_to_image_dataset(source="imagefolder", data_dir=str(folder), workers=0,
                                    ladder={"max_area": 32 * 32, "step": 16})  # fmt: skip
    assert len(dataset) == 4
    assert sorted(dataset.index.captions) == [[f"photo {i}"] for i in range(4)]
    assert sorted(dataset.index.paths) == [str(folder / f"{i}.png") for i in range(4)]
    assert dataset[0]["pixel_values"].shape[-2:] == tuple(dataset.bucket_wh[0][::-1])
    named = scan("hf:imagefolder", data_dir=folder, workers=0)
    assert sorted(named.paths) == sorted(dataset.index.paths)


def test_csv_and_parquet_builders_with_data_files(tmp_path: Path) -> None:
    folder = photos(tmp_path)
    rows = [{"path": str(folder / f"{i}.png"), "text": f"row {i}"} for i in range(4)]
    with open(tmp_path / "train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "text"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    for builder, name in (("csv", "train.csv"), ("parquet", "train.parquet")):
        resolved = resolve_source(builder, data_files=str(tmp_path / name))
        assert [e.path for e in resolved.entries] == [r["path"] for r in rows]
        assert [e.captions for e in resolved.entries] == [[r["text"]] for r in rows]
    split = scan("csv", data_files={"holdout": str(tmp_path / "train.csv")}, split="holdout",
                 workers=0, column_map={"image": "path", "caption": "text"})  # fmt: skip
    assert len(split) == 4 and split.captions[3] == ["row 3"]
    sized = [{**r, "width": 32 + 16 * i, "height": 48} for i, r in enumerate(rows)]
    pq.write_table(pa.Table.from_pylist(sized), tmp_path / "sized.parquet")
    manifest = scan("parquet", data_files=str(tmp_path / "sized.parquet"), sizes="manifest")
    assert manifest.sizes.tolist() == [[32 + 16 * i, 48] for i in range(4)]


def test_paths_and_typos_keep_their_meaning(tmp_path: Path) -> None:
    folder = photos(tmp_path)
    assert len(scan(folder, workers=0)) == 4  # a folder is still a folder
    with pytest.raises(FileNotFoundError):
        scan(tmp_path / "phtos")
    with pytest.raises(FileNotFoundError):
        scan("csv", data_files=str(tmp_path / "missing.csv"))
    with pytest.raises(ValueError, match="split"):
        scan(folder, split="test")
    with pytest.raises(TypeError, match="builder name"):
        scan([str(folder / "0.png")], data_dir=str(folder))
    with pytest.raises(ValueError, match="needs a dataset name"):
        scan("hf:")
