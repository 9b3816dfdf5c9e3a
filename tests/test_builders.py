"""Builders: text_to_image_dataset from Python and from a torchtune-style YAML; MixedDataset."""

from __future__ import annotations

import io
import shutil
import struct
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

import bucketing
from bucketing import BucketLadder, MixedDataset, TextToImageDataset, assign, fitted_ladder, scan
from bucketing.pipeline.builders import make_ladder, text_to_image_dataset
from samplers import BucketBatchSampler
from transforms import BucketResizeCrop, CaptionTransform, FluxTokenizer, collate

YAML = """
tokenizer:
  _component_: transforms.FluxTokenizer.from_flux_dir
  path: {tokenizers}
  t5_max_length: 64

dataset:
  _component_: bucketing.text_to_image_dataset
  source: {source}
  model: flux
  ladder:
    max_area: 65536
  captions:
    dropout: 0.0
    template: "a photo, {{caption}}"
  crop: center
  seed: 7
  workers: 0

sampler:
  _component_: samplers.bucket_batch_sampler
  batch_size: 2
  seed: 3

collate_fn: transforms.collate
"""


@pytest.fixture(scope="module")
def photos(tmp_path_factory, examples_dir) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for path in sorted(examples_dir.iterdir()):
        if path.suffix in (".jpg", ".png", ".txt", ".caption"):
            shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def torchtune():
    """torchtune's ``config`` module and its component resolver, imported on first use (a few
    seconds: it imports torchao), or a skip saying why it cannot be imported."""
    try:  # torchtune 0.6 imports torchao, which must match the installed torch
        from torchtune import config
        from torchtune.config._utils import _get_component_from_path
    except Exception as error:  # an ImportError, or torchao failing against another torch
        pytest.skip(
            f"torchtune cannot be imported here ({type(error).__name__}: {error}); the dev "
            "extra installs torchtune 0.6.1 with a torchao built for the pinned torch"
        )
    return config, _get_component_from_path


@pytest.mark.slow  # importing torchtune (and torchao) takes seconds
def test_builder_from_a_torchtune_yaml(photos, flux_tokenizer_dir, torchtune):
    """torchtune's own config.instantiate, as a recipe's _setup_data would call it."""
    torchtune_config, _get_component_from_path = torchtune
    cfg = OmegaConf.create(YAML.format(tokenizers=flux_tokenizer_dir, source=photos))
    tokenizer = torchtune_config.instantiate(cfg.tokenizer)
    assert isinstance(tokenizer, FluxTokenizer) and tokenizer.t5_max_length == 64
    dataset = torchtune_config.instantiate(cfg.dataset, tokenizer)  # as a recipe does
    sampler = torchtune_config.instantiate(cfg.sampler, dataset)
    collate_fn = partial(_get_component_from_path(cfg.collate_fn), padding_idx=0,
                         ignore_idx=-100)  # fmt: skip
    assert isinstance(dataset, TextToImageDataset) and isinstance(sampler, BucketBatchSampler)

    # The same objects built by hand, with the library's own parts.
    index = scan(photos, workers=0)
    assignment = assign(index, fitted_ladder(BucketLadder.for_model("flux", max_area=65536),
                                             index))
    by_hand = TextToImageDataset(
        index, assignment, image_transform=BucketResizeCrop(crop="center"),
        caption_transform=CaptionTransform(template="a photo, {caption}"),
        model_transform=tokenizer, seed=7,
    )
    assert np.array_equal(dataset.bucket_id, assignment.bucket_id)
    assert list(sampler) == list(BucketBatchSampler(assignment.bucket_id, batch_size=2, seed=3))
    batch = next(iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn)))
    first = list(sampler)[0]
    expected = collate([by_hand[i] for i in first])
    assert torch.equal(batch["pixel_values"], expected["pixel_values"])
    assert torch.equal(batch["t5_input_ids"], expected["t5_input_ids"])
    assert batch["t5_input_ids"].shape == (len(first), 64)
    assert all(c.startswith("a photo, ") for c in batch["captions"])


def test_builder_options_and_errors(photos):
    ds = text_to_image_dataset(source=photos, model="sdxl", ladder={"max_area": 256 * 256},
                               crop="center", flip_p=0.0, workers=0)
    accepted = ds.bucket_id >= 0
    assert accepted.any() and (ds.bucket_wh[accepted] % 64 == 0).all()
    assert (ds.bucket_wh[accepted].prod(axis=1) <= 256 * 256).all()
    sample = ds[int(np.flatnonzero(accepted)[0])]
    assert sample["caption"] and sample["pixel_values"].dtype == torch.uint8
    ladder = BucketLadder.for_model("flux", max_area=128 * 128)
    assert make_ladder("flux", ladder) is ladder
    with pytest.raises(ValueError, match="unknown ladder keys"):
        make_ladder("flux", {"area": 5})
    with pytest.raises(ValueError, match="unknown model"):
        make_ladder("flux2", None)
    with pytest.raises(ValueError, match="template"):
        text_to_image_dataset(source=photos, captions={"template": "no placeholder"}, workers=0)


# A personal set: phone photos (12 MP 4:3, 16:9, 8 MP), screens and screenshots, web images.
PERSONAL_SIZES = np.array([
    (4032, 3024), (4032, 3024), (3024, 4032), (3024, 4032), (4000, 3000), (3000, 4000),
    (4032, 2268), (2268, 4032), (3264, 2448), (2048, 1536), (1536, 2048), (1920, 1080),
    (2560, 1440), (2880, 1800), (1440, 900), (1170, 2532), (1179, 2556), (1080, 2400),
    (1080, 1080), (1080, 1350), (1200, 800), (800, 600), (1280, 720), (1024, 683),
    (640, 480), (700, 500), (1600, 900), (960, 1280),
], dtype=np.int64)


def jpeg_header(width: int, height: int) -> bytes:
    """A real 16x16 JPEG whose frame header declares ``width`` x ``height`` (scan reads only
    headers, so a 12 MP photo costs a few hundred bytes)."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 80, 40)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    struct.pack_into(">HH", data, data.index(b"\xff\xc0") + 5, height, width)
    return bytes(data)


@pytest.mark.parametrize("model", ["flux", "sd3"])
def test_default_builder_keeps_the_pixels_of_a_personal_set(tmp_path, model):
    for i, (w, h) in enumerate(PERSONAL_SIZES.tolist()):
        (tmp_path / f"photo{i:02d}.jpg").write_bytes(jpeg_header(w, h))
    ds = text_to_image_dataset(source=tmp_path, model=model, workers=0)
    preset = BucketLadder.for_model(model)
    sizes = np.stack([ds.index.width, ds.index.height], axis=1)
    assert sorted(map(tuple, sizes.tolist())) == sorted(map(tuple, PERSONAL_SIZES.tolist()))
    wh = ds.bucket_wh
    assert (ds.bucket_id >= 0).all() and (wh <= sizes).all()
    res = 1 - wh.prod(axis=1) / np.minimum(sizes.prod(axis=1), preset.max_area)
    assert res.max() <= 0.05, f"{res.max():.1%}"
    # No more buckets than the preset uses, and the preset loses far more.
    by_preset = assign(sizes, preset)
    assert len(np.unique(ds.bucket_id)) <= int((by_preset.counts > 0).sum())
    assert by_preset.resolution_loss.max() > 2 * res.max()
    # The same buckets as the core function on the sizes alone, and the preset on request.
    fitted = BucketLadder.from_data(sizes, base=model)
    assert np.array_equal(assign(sizes, fitted).bucket_wh, wh)
    kept = text_to_image_dataset(source=tmp_path, model=model, ladder={"fit": "preset"},
                                 workers=0)
    assert np.array_equal(kept.bucket_wh, by_preset.bucket_wh)


def test_make_ladder_fit_modes():
    sizes = PERSONAL_SIZES
    preset = BucketLadder.for_model("flux")
    assert make_ladder("flux").buckets.tolist() == preset.buckets.tolist()  # no sizes: preset
    assert make_ladder("flux", {"fit": "preset"}, sizes).buckets.tolist() == \
        preset.buckets.tolist()
    assert len(make_ladder("flux", {"max_buckets": 3}, sizes)) <= 3
    native = make_ladder("flux", {"fit": "native"}, sizes)
    assert assign(sizes, native).resolution_loss.max() < 0.03
    # Nothing the lattice fits: the preset, which rejects the images "too_small".
    tiny = np.array([[40, 30], [100, 60]])
    for fit in ("data", "native"):
        ladder = make_ladder("flux", {"fit": fit}, tiny)
        assert ladder.buckets.tolist() == preset.buckets.tolist()
        assert set(assign(tiny, ladder).reasons.tolist()) == {"too_small"}
    for bad, match in (({"fit": "best"}, "fit must be"), ({"max_buckets": 0}, "max_buckets"),
                       ({"fit": "native", "max_buckets": 4}, "max_buckets")):
        with pytest.raises(ValueError, match=match):
            make_ladder("flux", bad)


def test_lazy_exports():
    assert bucketing.text_to_image_dataset is text_to_image_dataset
    assert bucketing.MixedDataset is MixedDataset


def _two_parts(photos: Path, tmp_path: Path) -> dict[str, TextToImageDataset]:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for i, path in enumerate(sorted(photos.glob("*.jpg")) + sorted(photos.glob("*.png"))):
        for file in photos.glob(path.stem + ".*"):  # the image and its caption sidecar
            shutil.copy(file, (a if i % 2 else b) / file.name)
    return {
        "a": text_to_image_dataset(source=a, ladder={"max_area": 128 * 128}, seed=1, workers=0),
        "b": text_to_image_dataset(source=b, ladder={"max_area": 192 * 192}, seed=2,
                                   captions={"template": "B {caption}"}, workers=0),
    }


def test_mixed_dataset_keeps_each_dataset_in_its_own_buckets(photos, tmp_path):
    parts = _two_parts(photos, tmp_path)
    mixed = MixedDataset(parts)
    assert len(mixed) == len(parts["a"]) + len(parts["b"])
    na = len(parts["a"])
    # Both ladders share shapes (128² and 192² levels of one preset), yet no bucket is shared.
    assert set(mixed.bucket_id[:na][mixed.bucket_id[:na] >= 0]).isdisjoint(
        mixed.bucket_id[na:][mixed.bucket_id[na:] >= 0])
    for b in np.unique(mixed.bucket_id[mixed.bucket_id >= 0]):
        rows = np.flatnonzero(mixed.bucket_id == b)
        assert len(set(mixed.dataset_of[rows].tolist())) == 1
        assert (mixed.bucket_wh[rows] == mixed.ladder.buckets[b]).all()
    sampler = BucketBatchSampler(mixed, max_pixels_per_batch=3 * 128 * 128, seed=0)
    mixed.set_epoch(0)
    seen = []
    for batch in DataLoader(mixed, batch_sampler=sampler, collate_fn=collate, num_workers=2):
        names = set(batch["dataset"]) if "dataset" in batch else None
        assert names is None or len(names) == 1
        seen += batch["index"].tolist()
        if all(i >= na for i in batch["index"].tolist()):
            assert all(c.startswith("B ") for c in batch["captions"])
    assert set(seen) == set(np.flatnonzero(mixed.bucket_id >= 0).tolist())  # (+ padding)
    # Item i is the part's item, renumbered; the part's own seed and captions.
    row = int(np.flatnonzero(mixed.bucket_id[na:] >= 0)[0])
    sample, own = mixed[na + row], parts["b"][row]
    assert sample["dataset"] == "b" and sample["index"] == na + row
    assert torch.equal(sample["pixel_values"], own["pixel_values"])
    assert sample["caption"] == own["caption"]
    with pytest.raises(IndexError):
        mixed[len(mixed)]
    with pytest.raises(ValueError, match="one repeats value per dataset"):
        mixed.row_repeats([1])
    assert mixed.row_repeats([2, 0.5]).tolist() == [2.0] * na + [0.5] * len(parts["b"])
    assert "MixedDataset" in repr(mixed)


class _Occ(int):
    occurrence = 2


def test_mixed_dataset_keeps_the_occurrence(photos, tmp_path):
    """A repeat's draws differ from the first occurrence's, exactly as in the part itself."""
    parts = {"a": text_to_image_dataset(source=photos, ladder={"max_area": 128 * 128},
                                        flip_p=0.5, captions={"dropout": 0.5}, workers=0)}
    mixed = MixedDataset(parts)
    rows = np.flatnonzero(mixed.bucket_id >= 0)[:6].tolist()
    for i in rows:
        again, own = mixed[_Occ(i)], parts["a"][_Occ(i)]
        assert again["fit"] == own["fit"] if "fit" in own else again["flipped"] == own["flipped"]
        assert again["caption"] == own["caption"]


def test_caption_extension_picks_the_sidecar(tmp_path, examples_dir):
    for name in ("flower.jpg", "coffee.png", "rocket.jpg"):
        shutil.copy(examples_dir / name, tmp_path / name)
    (tmp_path / "flower.txt").write_text("a flower\n")
    (tmp_path / "flower.caption").write_text("dahlia, pink, close-up\n")
    (tmp_path / "coffee.caption").write_text("cup\nsaucer\n")
    (tmp_path / "rocket.txt").write_text("a rocket\n")
    by_default = text_to_image_dataset(source=tmp_path, workers=0)
    chosen = text_to_image_dataset(source=tmp_path, workers=0, caption_extension=".caption")
    names = [Path(p).stem for p in chosen.index.paths]
    assert dict(zip(names, by_default.index.captions, strict=True)) == {
        "coffee": ["cup", "saucer"], "flower": ["a flower"], "rocket": ["a rocket"]}
    assert dict(zip(names, chosen.index.captions, strict=True)) == {
        "coffee": ["cup", "saucer"], "flower": ["dahlia, pink, close-up"], "rocket": []}
    with pytest.raises(ValueError, match="caption_extension must look like"):
        text_to_image_dataset(source=tmp_path, workers=0, caption_extension="caption")
