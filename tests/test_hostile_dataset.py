"""A photo that breaks at training time and is alone in its bucket: a substitute from the
nearest bucket whose image covers its shape without upscaling (fitted to it, flagged), or,
where no image can, the sample leaves its batch with a warning naming the file. The run
never ends on one file."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from bucketing import BucketLadder, TextToImageDataset, assign, scan
from bucketing.pipeline.dataset import SubstitutionWarning
from samplers import BucketBatchSampler
from transforms import BucketResizeCrop, collate
from transforms.gpu_decode import EncodedFit, collate_encoded, decode_batch

LADDER = BucketLadder.from_buckets([(32, 32), (48, 32), (64, 32), (32, 48)], multiple=16)


def _folder(tmp_path, sizes):
    rng = np.random.default_rng(0)
    for k, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            tmp_path / f"p{k}.png")
    index = scan(tmp_path, workers=0)
    return index, assign(index, LADDER)


def _break(path: str) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


def test_a_lone_broken_photo_takes_an_image_of_the_nearest_covering_bucket(tmp_path):
    index, a = _folder(tmp_path, [(50, 34), (96, 64), (96, 64), (40, 40), (130, 66)])
    lone = index.paths.index(str(tmp_path / "p0.png"))  # alone in 48x32
    assert int(np.count_nonzero(a.bucket_id == a.bucket_id[lone])) == 1
    _break(index.paths[lone])
    ds = TextToImageDataset(index, a, image_transform=BucketResizeCrop())
    with pytest.warns(SubstitutionWarning, match="p0.png"):
        sample = ds[lone]
    assert sample["substituted"] and sample["original_index"] == lone
    assert sample["pixel_values"].shape == (3, 32, 48)  # its own bucket's shape
    stand_in = index.paths[sample["index"]]
    assert stand_in.endswith(("p1.png", "p2.png"))  # 96x64 in 48x32: same aspect, covering


def test_where_nothing_covers_the_sample_leaves_its_batch_and_the_epoch_runs(tmp_path):
    index, a = _folder(tmp_path, [(130, 66), (40, 40), (36, 36), (33, 50)])
    lone = index.paths.index(str(tmp_path / "p0.png"))  # the only image covering 64x32
    _break(index.paths[lone])
    ds = TextToImageDataset(index, a, image_transform=BucketResizeCrop())
    sampler = BucketBatchSampler(a, batch_size=2, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(DataLoader(ds, batch_sampler=sampler, collate_fn=collate))
    assert [w for w in caught if "p0.png" in str(w.message)
            and "leaves its batch" in str(w.message)]
    short = [b for b in batches if "dropped" in b]
    assert short and all(lone in b["dropped"].tolist() for b in short)
    for b in short:
        assert lone not in b["index"].tolist()
        assert b["pixel_values"].shape[0] == len(b["index"]) == len(b["captions"])
    served = {i for b in batches for i in b["index"].tolist()}
    assert served == set(np.flatnonzero(a.bucket_id >= 0).tolist()) - {lone}
    assert all(b["pixel_values"].dtype == torch.uint8 for b in batches)


def test_the_device_decode_path_takes_short_and_empty_batches(tmp_path):
    index, a = _folder(tmp_path, [(130, 66), (40, 40), (36, 36), (33, 50)])
    lone = index.paths.index(str(tmp_path / "p0.png"))
    _break(index.paths[lone])
    ds = TextToImageDataset(index, a, image_transform=EncodedFit(BucketResizeCrop()))
    sampler = BucketBatchSampler(a, batch_size=2, seed=0)
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SubstitutionWarning)
        for batch in DataLoader(ds, batch_sampler=sampler, collate_fn=collate_encoded):
            out = decode_batch(batch, "cpu", torch.float32)
            assert out["pixel_values"].shape[0] == len(out["index"])
            if "dropped" in out:
                assert out["dropped"].tolist() and lone not in out["index"].tolist()
            seen += out["index"].tolist()
    assert set(seen) == set(np.flatnonzero(a.bucket_id >= 0).tolist()) - {lone}
