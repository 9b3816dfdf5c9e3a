"""The per-process cache of decoded images: same samples bit for bit, bounded by bytes,
keyed by file identity, counted across DataLoader workers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from bucketing import BucketLadder, TextToImageDataset, assign, scan
from samplers import BucketBatchSampler
from transforms import BucketResizeCrop, collate
from transforms.decoded_cache import DecodedImageCache, image_nbytes
from transforms.image import DecodeSettings, decode_image

LADDER = BucketLadder.from_buckets([(64, 64), (96, 64), (64, 96)], multiple=16)
SIZES = [(300, 200), (200, 300), (256, 256), (320, 200), (210, 290)]


def write_photos(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"p{i}.jpg", quality=90)  # JPEG: the draft applies
        (folder / f"p{i}.txt").write_text(f"photo {i}")
    return folder


def epochs(dataset, assignment, n_epochs: int, workers: int) -> list[dict]:
    sampler = BucketBatchSampler(assignment, batch_size=2, seed=3, repeats=4)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers)
    out = []
    for epoch in range(n_epochs):
        sampler.set_epoch(epoch)
        out += list(loader)
    return out


def test_the_cache_gives_the_same_samples_bit_for_bit_and_counts_its_hits(tmp_path):
    index = scan(str(write_photos(tmp_path / "photos")), workers=1)
    assignment = assign(index, LADDER)
    transform = BucketResizeCrop(crop="random", flip_p=0.5)
    cached = TextToImageDataset(index, assignment, image_transform=transform)
    fresh = TextToImageDataset(index, assignment, image_transform=transform,
                               decoded_cache_bytes=0)
    a, b = epochs(cached, assignment, 1, workers=2), epochs(fresh, assignment, 1, workers=2)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["pixel_values"], y["pixel_values"])
        assert torch.equal(x["crop_top_left"], y["crop_top_left"])
    # each occurrence still draws its own crop: the repeats of a row are not all alike
    crops = {}
    for batch in a:
        for i, c in zip(batch["index"].tolist(), batch["crop_top_left"].tolist(), strict=True):
            crops.setdefault(i, set()).add(tuple(c))
    assert any(len(c) > 1 for c in crops.values())
    stats = cached.stats()["decoded_cache"]
    looked = len(SIZES) * 4  # four occurrences of each photo
    assert stats["hits"] + stats["misses"] == looked
    # at most one decode per file in each of the two workers
    assert len(SIZES) <= stats["misses"] <= 2 * len(SIZES)
    assert stats["hits"] >= looked - 2 * len(SIZES)
    assert fresh.stats()["decoded_cache"]["hits"] == fresh.stats()["decoded_cache"]["misses"] == 0


def test_a_repeat_decodes_once_and_returns_the_draft_scale_picture(tmp_path):
    photos = write_photos(tmp_path / "photos")
    settings, cache = DecodeSettings(), DecodedImageCache()
    path = str(photos / "p0.jpg")
    first = decode_image(path, settings, bucket_wh=(64, 64), cache=cache)
    again = decode_image(path, settings, bucket_wh=(64, 64), cache=cache)
    full = decode_image(path, settings, bucket_wh=None, cache=cache)  # another decode size
    assert first.size == (150, 100)  # the JPEG draft decoded at 1/2, before the fit
    assert again is not first and np.array_equal(np.asarray(again), np.asarray(first))
    assert again.info == first.info and full.size == (300, 200)
    assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 2
    again.paste((0, 0, 0), (0, 0, 50, 50))  # a caller changing its copy changes no entry
    assert np.array_equal(np.asarray(decode_image(path, settings, bucket_wh=(64, 64),
                                                  cache=cache)), np.asarray(first))


def test_a_file_replaced_on_disk_is_decoded_again(tmp_path):
    photos = write_photos(tmp_path / "photos")
    path = photos / "p0.jpg"
    cache = DecodedImageCache()
    before = decode_image(str(path), cache=cache)
    Image.new("RGB", (300, 200), (200, 10, 10)).save(path, quality=90)
    os.utime(path, ns=(1, 1))  # a new mtime even on a coarse clock
    after = decode_image(str(path), cache=cache)
    assert cache.stats()["misses"] == 2 and cache.stats()["hits"] == 0
    assert not np.array_equal(np.asarray(before), np.asarray(after))


def test_the_byte_limit_evicts_least_recently_used_first(tmp_path):
    photos = write_photos(tmp_path / "photos")
    paths = [str(photos / f"p{i}.jpg") for i in range(3)]
    one = image_nbytes(decode_image(paths[0]))
    cache = DecodedImageCache(max_bytes=2 * one + one // 2)  # room for two of the three
    for p in (paths[0], paths[1], paths[0], paths[2]):  # p1 is the least recently used
        decode_image(p, cache=cache)
    stats = cache.stats()
    assert stats["evictions"] == 1 and stats["entries"] == 2
    assert stats["bytes"] <= cache.max_bytes
    decode_image(paths[0], cache=cache)  # kept
    decode_image(paths[1], cache=cache)  # evicted: decoded again
    assert cache.stats()["hits"] == 2 and cache.stats()["misses"] == 4


def test_zero_disables_and_a_negative_limit_is_refused(tmp_path):
    photos = write_photos(tmp_path / "photos")
    cache = DecodedImageCache(0)
    for _ in range(2):
        decode_image(str(photos / "p0.jpg"), cache=cache)
    assert len(cache) == 0 and cache.stats()["hits"] == cache.stats()["misses"] == 0
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        DecodedImageCache(-1)
