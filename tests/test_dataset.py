"""TextToImageDataset with real files, the real assign and real DataLoader worker processes:
shapes, determinism across workers/restarts/epochs, substitution of files that fail at
training time, and the whole pipeline end to end through BucketBatchSampler and collate."""

from __future__ import annotations

import warnings
import zlib
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

from bucketing.assign import assign
from bucketing.index import ImageIndex
from bucketing.ladder import BucketLadder
from bucketing.pipeline.builders import MixedDataset
from bucketing.pipeline.dataset import SubstitutionWarning, TextToImageDataset
from bucketing.scan import scan
from samplers import BucketBatchSampler, SampleIndex
from transforms.caption import CaptionTransform
from transforms.collate import collate
from transforms.image import ImageDecodeError
from transforms.resize_crop import BucketResizeCrop, resized_size
from transforms.rng import sample_rng
from transforms.tokenize import FluxTokenizer

SMALL = BucketLadder.for_model("flux", max_area=128 * 128)


def _captions(path: Path) -> list[str]:
    for ext in (".txt", ".caption"):
        side = path.with_suffix(ext)
        if side.exists():
            return [line.strip() for line in side.read_text().splitlines() if line.strip()]
    return []


def _index(paths: list[Path], sizes: list[tuple[int, int]] | None = None) -> ImageIndex:
    if sizes is None:
        sizes = [ImageOps.exif_transpose(Image.open(p)).size for p in paths]
    return ImageIndex(
        paths=[str(p) for p in paths],
        width=[w for w, _ in sizes],
        height=[h for _, h in sizes],
        captions=[_captions(p) for p in paths],
    )


@pytest.fixture(scope="module")
def photos(examples_dir):
    paths = sorted(p for p in examples_dir.iterdir() if p.suffix in (".jpg", ".png"))
    index = _index(paths)
    return index, assign(index, SMALL)


def _dataset(index, assignment, **kw) -> TextToImageDataset:
    kw.setdefault("image_transform", BucketResizeCrop(crop="random", flip_p=0.5))
    return TextToImageDataset(index, assignment, **kw)


def _load_all(dataset, rows, num_workers) -> list[dict]:
    loader = DataLoader(dataset, sampler=list(rows), batch_size=None, num_workers=num_workers)
    return list(loader)


def test_items_have_their_bucket_shape_and_caption(photos):
    index, assignment = photos
    assert assignment.accepted.all()
    ds = _dataset(index, assignment)
    assert len(ds) == len(index)
    for i in range(len(ds)):
        s = ds[i]
        bw, bh = assignment.bucket_wh[i]
        assert s["pixel_values"].shape == (3, bh, bw) and s["pixel_values"].dtype == torch.uint8
        assert s["target_size"] == (bh, bw)
        assert s["original_size"] == (index.height[i], index.width[i])
        assert s["caption"] == (index.captions[i][0] if index.captions[i] else "")
        assert s["index"] == s["original_index"] == i and s["substituted"] is False


def test_same_tensors_in_any_worker_after_a_restart_and_per_epoch(photos):
    index, assignment = photos
    rows = range(len(index))
    caption = CaptionTransform(shuffle_parts=True)
    inline = _load_all(_dataset(index, assignment, caption_transform=caption, seed=3), rows, 0)
    restarted = _dataset(index, assignment, caption_transform=caption, seed=3)
    workers = _load_all(restarted, rows, 2)
    for a, b in zip(inline, workers, strict=True):
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert a["crop_top_left"] == b["crop_top_left"] and a["flipped"] == b["flipped"]
        assert a["caption"] == b["caption"]
    restarted.set_epoch(1)
    epoch1 = _load_all(restarted, rows, 0)
    moved = sum(
        a["crop_top_left"] != b["crop_top_left"] or a["flipped"] != b["flipped"]
        for a, b in zip(inline, epoch1, strict=True)
    )
    assert moved >= len(rows) // 2  # a new epoch draws new crops and flips


def test_set_epoch_reaches_persistent_workers(photos):
    index, assignment = photos
    rows = list(range(len(index)))
    ds = _dataset(index, assignment, seed=5)
    loader = DataLoader(ds, sampler=rows, batch_size=None, num_workers=2, persistent_workers=True)
    for epoch in range(3):  # the same two worker processes serve all three epochs
        ds.set_epoch(epoch)
        seen = [(tuple(s["crop_top_left"]), s["flipped"]) for s in loader]
        expected = [(ds[i]["crop_top_left"], ds[i]["flipped"]) for i in rows]
        assert seen == expected, f"epoch {epoch}: workers drew with a stale epoch"


def test_rejected_rows_and_bad_arguments_are_clear_errors(examples_dir, tmp_path):
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (8, 8)).save(tiny)
    index = _index([examples_dir / "china.jpg", tiny])
    assignment = assign(index, SMALL)
    assert assignment.bucket_id[1] == -1
    ds = _dataset(index, assignment)
    with pytest.raises(ValueError, match="tiny.png.*rejected.*too_small"):
        ds[1]
    with pytest.raises(IndexError):
        ds[2]
    with pytest.raises(ValueError, match="on_error"):
        _dataset(index, assignment, on_error="skip")
    with pytest.raises(ValueError, match="rows"):
        TextToImageDataset(_index([tiny]), assignment, image_transform=BucketResizeCrop())


def test_upscaled_rows_need_a_transform_that_upscales(tmp_path):
    paths = _jpeg_folder(tmp_path, 3)  # 96x64, smaller than the only bucket
    index = _index(paths)
    assignment = assign(index, BucketLadder.from_buckets([(192, 128)]), allow_upscale=True)
    assert assignment.upscaled.all()
    with pytest.raises(ValueError, match=r"3 rows.*upscaled.*BucketResizeCrop\(allow_upscale=True"):
        _dataset(index, assignment, image_transform=BucketResizeCrop())
    ds = _dataset(index, assignment, image_transform=BucketResizeCrop(allow_upscale=True))
    s = ds[1]
    assert s["pixel_values"].shape == (3, 128, 192) and not s["substituted"]
    # a transform without the attribute is trusted; one that upscales needs nothing more
    _dataset(index, assignment, image_transform=lambda sample: sample)


def _jpeg_folder(tmp_path: Path, n: int) -> list[Path]:
    paths = []
    for k in range(n):
        p = tmp_path / f"img{k}.jpg"
        a = np.zeros((64, 96, 3), np.uint8)
        a[..., 0] = 40 * k
        Image.fromarray(a).save(p, quality=95)
        p.with_suffix(".txt").write_text(f"image number {k}\n")
        paths.append(p)
    return paths


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header intact, pixels cut


def test_a_file_failing_at_training_time_is_substituted_once_warned(tmp_path):
    paths = _jpeg_folder(tmp_path, 5)
    index = _index(paths)
    assignment = assign(index, BucketLadder.from_buckets([(48, 32)]))
    _truncate(paths[2])
    paths[4].unlink()  # deleted between scan and load
    ds = _dataset(index, assignment)
    with pytest.warns(SubstitutionWarning, match="img2.jpg"):
        s = ds[2]
    assert s["substituted"] is True and s["original_index"] == 2
    assert s["index"] in (0, 1, 3) and s["pixel_values"].shape == (3, 32, 48)
    assert s["caption"] == f"image number {s['index']}"  # the caption of the image used
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = ds[2]  # deterministic, and no second warning for the same file
    assert again["index"] == s["index"] and torch.equal(again["pixel_values"], s["pixel_values"])
    with pytest.warns(SubstitutionWarning, match="img4.jpg"):
        assert ds[4]["substituted"] is True
    # In worker processes nothing raises; every sample keeps its bucket's shape.
    out = _load_all(ds, range(5), 2)
    assert [o["substituted"] for o in out] == [False, False, True, False, True]
    assert all(o["pixel_values"].shape == (3, 32, 48) for o in out)

    strict = _dataset(index, assignment, on_error="raise")
    with pytest.raises(ImageDecodeError, match=r"img2\.jpg.*(?i:truncated)"):
        strict[2]
    with pytest.raises(ImageDecodeError, match=r"img4\.jpg"):
        strict[4]


def test_a_bucket_with_nothing_loadable_leaves_the_batch_with_a_warning(tmp_path):
    paths = _jpeg_folder(tmp_path, 3)
    index = _index(paths)
    assignment = assign(index, BucketLadder.from_buckets([(48, 32)]))
    for p in paths:
        _truncate(p)
    with pytest.warns(SubstitutionWarning, match=r"img1\.jpg.*2 tried.*leaves its batch"):
        sample = _dataset(index, assignment)[1]
    assert sample["dropped"] is True and sample["index"] == 1


def test_every_odd_file_yields_its_bucket_or_a_substitute(odd_dir, odd_expected):
    names = [n for n, e in odd_expected.items() if e["expect"] in ("ok", "decode_error")]
    sizes = [
        tuple(odd_expected[n].get("oriented_size") or odd_expected[n]["header_size"]) for n in names
    ]
    index = _index([odd_dir / n for n in names], sizes)
    assignment = assign(index, BucketLadder.from_buckets([(16, 16), (32, 16), (16, 32)]))
    rows = np.flatnonzero(assignment.accepted)
    assert len(rows) == len(names) - 3  # only the two 10x10 files and the 1x2 one are too small
    ds = _dataset(index, assignment)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = _load_all(ds, rows, 2)
    for row, s in zip(rows, out, strict=True):
        bw, bh = assignment.bucket_wh[row]
        assert s["pixel_values"].shape == (3, bh, bw)
        assert s["substituted"] == (odd_expected[names[row]]["expect"] == "decode_error"), names[
            row
        ]


def test_end_to_end_with_scan_sampler_collate_and_tokenizer(examples_dir, flux_tokenizer_dir):
    index = scan(examples_dir, workers=1)
    assert len(index) == 14
    assignment = assign(index, SMALL)
    sampler = BucketBatchSampler(assignment, batch_size=2, seed=5)
    ds = TextToImageDataset(
        index,
        assignment,
        image_transform=BucketResizeCrop(crop="random", flip_p=0.5),
        caption_transform=CaptionTransform(dropout=0.0),
        model_transform=FluxTokenizer.from_flux_dir(flux_tokenizer_dir, t5_max_length=64),
        seed=5,
    )
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=2, collate_fn=collate)
    expected = list(sampler)
    seen = set()
    for rows, batch in zip(expected, loader, strict=True):
        b = len(rows)
        assert batch["original_index"].tolist() == list(rows)
        wh = {tuple(assignment.bucket_wh[r]) for r in rows}
        assert len(wh) == 1
        bw, bh = wh.pop()
        assert batch["pixel_values"].shape == (b, 3, bh, bw)
        assert batch["pixel_values"].dtype == torch.uint8 and batch["pixel_values"].is_contiguous()
        assert batch["target_size"].tolist() == [[bh, bw]] * b
        assert batch["clip_input_ids"].shape == (b, 77) and batch["t5_input_ids"].shape == (b, 64)
        assert batch["t5_attention_mask"].shape == (b, 64)
        assert not batch["substituted"].any()
        for r, cap in zip(rows, batch["captions"], strict=True):
            assert cap in index.captions[r]
        seen.update(rows)
    assert seen == set(range(len(index)))


def test_samples_record_the_fit_params_behind_their_sizes(photos):
    index, assignment = photos
    ds = _dataset(index, assignment, seed=2)
    for i in range(len(ds)):
        s = ds[i]
        params = s["fit"]
        assert params.bucket == tuple(assignment.bucket_wh[i])
        assert s["crop_top_left"] == params.crop_top_left and s["flipped"] is params.flip
        assert s["target_size"] == params.crop[2:]
        # made from the full oriented size, whatever size the JPEG draft decoded
        assert params.resized == resized_size(index.width[i], index.height[i], params.bucket)
        assert not {"image", "rng", "captions"} & set(s)  # transform inputs do not leak


def test_transforms_take_and_return_the_sample(photos):
    index, assignment = photos
    seen = {}

    def image(sample):
        seen["image"] = sorted(sample)
        return BucketResizeCrop()(sample)

    def caption(sample):
        seen["caption"] = sorted(sample)
        return {**sample, "caption": " | ".join(sample["captions"]).upper()}

    ds = _dataset(index, assignment, image_transform=image, caption_transform=caption)
    s = ds[0]
    assert s["caption"] == " | ".join(index.captions[0]).upper()
    assert {"image", "bucket", "rng", "index", "occurrence"} <= set(seen["image"])
    assert {"captions", "rng", "pixel_values", "fit", "index"} <= set(seen["caption"])
    bad = _dataset(index, assignment, caption_transform=lambda sample: sample)
    with pytest.raises(TypeError, match=r"caption_transform must set sample\['caption'\]"):
        bad[0]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"caption_transform": ...}, "caption_transform must be a callable"),
        ({"image_transform": None}, "image_transform must be a callable"),
        ({"model_transform": "flux"}, "model_transform must be a callable"),
        ({"image_transform": lambda img, wh, rng: {}}, "image_transform must take one argument"),
        ({"caption_transform": lambda caps, rng: ""}, "caption_transform must take one argument"),
    ],
)
def test_a_transform_that_cannot_take_the_sample_is_refused_at_construction(photos, kw, match):
    index, assignment = photos
    with pytest.raises(TypeError, match=match):
        _dataset(index, assignment, **kw)


class _Occurrence(int):
    """A row number carrying which occurrence of the row in the epoch it is (what the
    sampler yields for repeats and padding duplicates)."""

    def __new__(cls, row: int, occurrence: int):
        self = super().__new__(cls, row)
        self.occurrence = occurrence
        return self

    def __reduce__(self):
        return (type(self), (int(self), self.occurrence))


def test_each_occurrence_of_a_row_draws_its_own_crop_flip_and_caption(tmp_path):
    img = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 400, 3), np.uint8)).save(img)
    img.with_suffix(".txt").write_text("".join(f"caption {k}\n" for k in range(50)))
    index = _index([img])
    assignment = assign(index, BucketLadder.from_buckets([(64, 64)]))
    ds = _dataset(index, assignment, caption_transform=CaptionTransform(), seed=9)
    rows = [_Occurrence(0, k) for k in range(3)]
    draws = [(s["crop_top_left"], s["flipped"], s["caption"]) for s in map(ds.__getitem__, rows)]
    for a, b in [(0, 1), (0, 2), (1, 2)]:  # 337 crops x 2 flips x 50 captions: all differ
        assert draws[a][0] != draws[b][0] and draws[a][2] != draws[b][2], draws
    assert len({flip for _, flip, _ in draws} | {ds[_Occurrence(0, 3)]["flipped"]}) == 2
    assert [ds[r]["occurrence"] for r in rows] == [0, 1, 2]
    assert draws[0] == (ds[0]["crop_top_left"], ds[0]["flipped"], ds[0]["caption"])
    # the same in worker processes: the occurrence survives pickling into the worker
    out = _load_all(ds, rows, 2)
    assert [(tuple(s["crop_top_left"]), s["flipped"], s["caption"]) for s in out] == draws
    assert [s["occurrence"] for s in out] == [0, 1, 2]


_KEY = st.integers(0, 2**70) | st.integers(0, 3) | st.sampled_from([2**32 - 1, 2**32, 2**64])


@settings(deadline=None, max_examples=200)
@given(a=st.tuples(_KEY, _KEY, _KEY, _KEY), b=st.tuples(_KEY, _KEY, _KEY, _KEY))
def test_sample_generators_never_collide_across_keys_of_any_width(a, b):
    def draws(seed, epoch, index, occurrence):
        rng = sample_rng(seed, epoch, index, "image", occurrence)
        return rng.integers(0, 2**63, 4).tolist()

    assert (draws(*a) == draws(*b)) == (a == b)


def test_small_keys_keep_their_draws_and_wide_ones_are_distinct(photos):
    old = np.random.Generator(np.random.PCG64(np.random.SeedSequence([7, 2, 5, 4135340389])))
    assert zlib.crc32(b"caption") == 4135340389
    assert sample_rng(7, 2, 5, "caption").random() == old.random()
    # seed 2**32 at epoch 0 was seed 0 at epoch 1 when only 32-bit words were mixed
    assert sample_rng(2**32, 0, 5, "image").random() != sample_rng(0, 1, 5, "image").random()
    with pytest.raises(ValueError, match="occurrence must be >= 0"):
        sample_rng(0, 0, 0, "image", -1)
    with pytest.raises(TypeError):
        sample_rng(0, 0.5, 0, "image")

    index, assignment = photos
    ds = _dataset(index, assignment, seed=2**64 + 3)
    ds.set_epoch(2**63 - 1)  # the largest epoch the workers' shared int64 holds
    assert ds.epoch == 2**63 - 1 and ds[0]["pixel_values"].dtype == torch.uint8
    with pytest.raises(ValueError, match=r"epoch must be in \[0, 2\*\*63 - 1\]"):
        ds.set_epoch(2**63)
    assert ds.epoch == 2**63 - 1  # unchanged by the refused call
    wide, narrow = _dataset(index, assignment, seed=2**32), _dataset(index, assignment, seed=0)
    narrow.set_epoch(1)
    assert [wide[i]["fit"] for i in range(len(ds))] != [narrow[i]["fit"] for i in range(len(ds))]


def _epoch_draws(ds, epoch: int, set_dataset: bool, num_workers: int) -> list:
    """(row, crop, flip, caption) of every sample of ``epoch`` through a DataLoader driven by a
    BucketBatchSampler, with or without also calling ``dataset.set_epoch``."""
    sampler = BucketBatchSampler(ds, batch_size=2, seed=1)
    sampler.set_epoch(epoch)
    if set_dataset:
        ds.set_epoch(epoch)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=num_workers, collate_fn=list)
    return sorted(
        (s["index"], tuple(s["crop_top_left"]), s["flipped"], s["caption"])
        for batch in loader for s in batch
    )


def test_sampler_set_epoch_alone_changes_augmentation_as_calling_both(photos, recwarn):
    index, assignment = photos
    make = partial(_dataset, index, assignment, caption_transform=CaptionTransform(
        shuffle_parts=True), seed=3)  # fmt: skip
    both = _epoch_draws(make(), 1, set_dataset=True, num_workers=0)
    alone = _epoch_draws(make(), 1, set_dataset=False, num_workers=2)  # through worker pickling
    assert alone == both
    epoch0 = _epoch_draws(make(), 0, set_dataset=False, num_workers=0)
    assert sum(a != b for a, b in zip(epoch0, alone, strict=True)) >= len(alone) // 2
    assert not [w for w in recwarn if "disagrees" in str(w.message)]
    # a dataset epoch that disagrees with the index's loses, with one warning
    stale = make()
    stale.set_epoch(0)
    with pytest.warns(UserWarning, match=r"set_epoch\(0\) disagrees with the epoch 1") as caught:
        assert _epoch_draws(stale, 1, set_dataset=False, num_workers=0) == both
    assert len([w for w in caught if "disagrees" in str(w.message)]) == 1
    # plain int indices (another sampler) still follow dataset.set_epoch
    stale.set_epoch(1)
    plain = [stale[i] for i in range(len(index))]
    assert sorted((s["index"], tuple(s["crop_top_left"]), s["flipped"], s["caption"])
                  for s in plain) == both  # fmt: skip


def test_mixed_dataset_passes_the_epoch_to_its_parts(photos):
    index, assignment = photos
    mixed = MixedDataset({"a": _dataset(index, assignment, seed=4)})
    part = _dataset(index, assignment, seed=4)
    for i in range(len(index)):
        got = mixed[SampleIndex(i, 1, 5)]
        want = part[SampleIndex(i, 1, 5)]
        assert (got["crop_top_left"], got["flipped"]) == (want["crop_top_left"], want["flipped"])
    part.set_epoch(5)
    assert [part[SampleIndex(i, 1)]["flipped"] for i in range(len(index))] == [
        mixed[SampleIndex(i, 1, 5)]["flipped"] for i in range(len(index))
    ]
