"""Paired files (conditioning images, loss masks): scanned with their rows, fitted with the
image's own crop and flip, rejected with reasons when they cannot be."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from bucketing import (
    ImageIndex,
    TextToImageDataset,
    assign,
    collate,
    loss_weight_for,
    scan,
    text_to_image_dataset,
    to_model_input,
)
from bucketing.ladder import BucketLadder
from transforms.gpu_decode import EncodedFit
from transforms.paired import fit_mask
from transforms.resize_crop import fit, fit_params

W, H = 160, 120  # 4:3; the mask's rectangle is in the red channel of the image
BOX = (30, 20, 110, 80)  # x0, y0, x1, y1


def _picture(seed: int, size=(W, H)) -> np.ndarray:
    """A smooth random picture (so a half-size copy stays close) with the mask's rectangle
    as red = 255 inside, 0 outside."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)).copy()
    red = np.zeros(size[::-1], np.uint8)
    red[BOX[1] : BOX[3], BOX[0] : BOX[2]] = 255
    pixels[..., 0] = red
    return pixels


def _mask() -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    mask[BOX[1] : BOX[3], BOX[0] : BOX[2]] = 255
    return mask


@pytest.fixture
def paired_manifest(tmp_path: Path) -> Path:
    """Rows: an inverted copy as the conditioning image (one full size, one at half size),
    a mask file; a missing paired file; a conditioning image of another aspect."""
    rows = []
    for i in range(4):
        pixels = _picture(i)
        Image.fromarray(pixels).save(tmp_path / f"img{i}.png")
        inverted = Image.fromarray(255 - pixels)
        if i % 2:
            inverted = inverted.resize((W // 2, H // 2), Image.Resampling.LANCZOS)
        inverted.save(tmp_path / f"cond{i}.png")
        Image.fromarray(_mask()).save(tmp_path / f"mask{i}.png")
        rows.append({"image": f"img{i}.png", "conditioning_image": f"cond{i}.png",
                     "loss_mask": f"mask{i}.png", "caption": f"row {i}"})
    Image.fromarray(_picture(9)).save(tmp_path / "lonely.png")
    rows.append({"image": "lonely.png", "conditioning_image": "gone.png",
                 "loss_mask": "mask0.png", "caption": "missing pair"})
    Image.fromarray(_picture(8, (W, W))).save(tmp_path / "square.png")
    rows.append({"image": "img0.png", "conditioning_image": "square.png",
                 "loss_mask": "mask0.png", "caption": "other aspect"})
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_conditioning_and_mask_share_the_images_crop_and_flip(paired_manifest: Path):
    ds = text_to_image_dataset(source=paired_manifest, model="sdxl",
                               ladder={"max_area": 64 * 64, "step": 64}, crop="random",
                               flip_p=0.5, workers=0, seed=3)  # fmt: skip
    assert len(ds) == 4
    reasons = {r.reason: r for r in ds.index.rejections}
    assert set(reasons) == {"missing_pair", "pair_aspect"}
    assert "gone.png" in reasons["missing_pair"].detail
    assert "square.png" in reasons["pair_aspect"].detail
    flips, crops = set(), set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            s = ds[i]
            image, cond, mask = s["pixel_values"], s["conditioning_pixel_values"], s["loss_mask"]
            assert cond.shape == (1, *image.shape) and cond.dtype == torch.uint8
            assert mask.shape == (1, *image.shape[1:]) and mask.dtype == torch.uint8
            flips.add(s["flipped"])
            crops.add(s["crop_top_left"])
            expected = 255 - image.int()
            diff = (cond[0].int() - expected).abs().float()
            assert diff.mean() < (6 if i % 2 else 1.5), (i, epoch, diff.mean())
            # the other flip of the same crop would be far off: the flip really is shared
            assert (cond[0].int() - expected.flip(-1)).abs().float().mean() > 3 * diff.mean()
            red = image[0]
            assert (red[mask[0] == 255] > 200).all() and (red[mask[0] == 0] < 55).all()
            assert (mask[0] == 255).any() and (mask[0] == 0).any()
    assert flips == {True, False} and len(crops) > 2


def test_alpha_masks_and_images_without_alpha(tmp_path: Path):
    pixels = _picture(1)
    pixels[..., 1] = 0  # green: 0 where opaque, 255 (the white background) where transparent
    Image.fromarray(np.dstack([pixels, _mask()]), "RGBA").save(tmp_path / "cut.png")
    Image.fromarray(pixels).save(tmp_path / "opaque.png")
    (tmp_path / "m.csv").write_text("image,caption\ncut.png,a cut-out\nopaque.png,no alpha\n")
    ds = text_to_image_dataset(source=tmp_path / "m.csv", column_map={"loss_mask": "alpha"},
                               model="sdxl", ladder={"max_area": 64 * 64}, crop="random",
                               flip_p=0.5, workers=0)  # fmt: skip
    assert len(ds) == 1 and [r.reason for r in ds.index.rejections] == ["no_alpha"]
    for epoch in range(4):
        ds.set_epoch(epoch)
        s = ds[0]
        green, mask = s["pixel_values"][1], s["loss_mask"][0]
        assert (green[mask == 255] < 55).all() and (green[mask == 0] > 200).all()
        assert (mask == 255).any() and (mask == 0).any()


def test_several_conditioning_images_from_parquet_and_blank_masks(tmp_path: Path):
    pixels = _picture(2)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(255 - pixels).save(tmp_path / "inv.png")
    Image.fromarray(pixels).resize((W * 2, H * 2)).save(tmp_path / "big.png")
    Image.fromarray(_mask()).save(tmp_path / "m.png")
    table = pa.table({"file": ["a.png", "a.png"], "ref_a": ["inv.png", "big.png"],
                      "ref_b": ["big.png", "inv.png"], "m": ["m.png", None], "caption": ["a", "b"]})
    pq.write_table(table, tmp_path / "rows.parquet")
    column_map = {"image": "file", "conditioning_image_0": "ref_a",
                  "conditioning_image_1": "ref_b", "loss_mask": "m"}
    index = scan(tmp_path / "rows.parquet", column_map=column_map, workers=0)
    assert len(index) == 2  # the same image with other references is another row
    assert len(index.conditioning) == 2 and list(index.loss_mask)[1] == ""
    ds = TextToImageDataset(index, assign(index, BucketLadder.for_model("sdxl",
                            max_area=64 * 64)), image_transform=_crop())  # fmt: skip
    first, second = ds[0], ds[1]
    assert first["conditioning_pixel_values"].shape[0] == 2
    assert (second["loss_mask"] == 255).all()  # a row without a mask trains everywhere
    batch = collate([first, second])
    assert batch["conditioning_pixel_values"].shape == (2, 2, 3, 64, 64)
    assert batch["loss_mask"].shape == (2, 1, 64, 64)
    moved = to_model_input(batch, "cpu", torch.float32)
    assert moved["conditioning_pixel_values"].min() >= -1 and moved["loss_mask"].max() == 1
    # normalised alike: the inverted copy is the image's negative in [-1, 1]
    assert (moved["conditioning_pixel_values"][0, 0] + moved["pixel_values"][0]).abs().mean() < 0.05
    saved = tmp_path / "index.arrow"
    index.save(saved)
    again = ImageIndex.load(saved)
    assert [list(c) for c in again.conditioning] == [list(c) for c in index.conditioning]
    assert list(again.loss_mask) == list(index.loss_mask)


def _crop():
    from transforms.resize_crop import BucketResizeCrop

    return BucketResizeCrop(crop="random", flip_p=0.5)


def test_folder_pairing_is_opt_in(tmp_path: Path):
    pixels = _picture(4)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    Image.fromarray(_mask()).save(tmp_path / "x_mask.png")
    (tmp_path / "control").mkdir()
    Image.fromarray(255 - pixels).save(tmp_path / "control" / "x.png")
    plain = scan(tmp_path, workers=0)
    assert sorted(Path(p).name for p in plain.paths) == ["x.png", "x.png", "x_mask.png"]
    paired = scan(tmp_path, workers=0, column_map={"conditioning_image": "control/{stem}.png",
                                                   "loss_mask": "{stem}_mask.png"})
    # control/x.png has no control/control/x.png: a missing pair, not an image of its own
    assert [Path(p).name for p in paired.paths] == ["x.png"]
    assert Path(paired.conditioning[0][0]).parent.name == "control"
    assert Path(paired.loss_mask[0]).name == "x_mask.png"
    with pytest.raises(ValueError, match="stem"):
        scan(tmp_path, workers=0, column_map={"loss_mask": "mask.png"})


def test_loss_weight_for_downsamples_and_packs():
    mask = torch.zeros(2, 1, 64, 96)
    mask[..., :, :48] = 1.0  # the left half
    flux = loss_weight_for(mask, "flux")
    assert flux.shape == (2, (64 // 16) * (96 // 16), 1)
    grid = flux[0, :, 0].reshape(4, 6)
    assert torch.equal(grid[:, :3], torch.ones(4, 3))
    assert torch.equal(grid[:, 3:], torch.zeros(4, 3))
    sdxl = loss_weight_for(mask, "sdxl")
    assert sdxl.shape == (2, 1, 8, 12) and sdxl[0, 0, 0, 5] == 1 and sdxl[0, 0, 0, 6] == 0
    cached = loss_weight_for((mask[..., ::8, ::8] * 255).to(torch.uint8), "sdxl",
                             latent_hw=(8, 12))  # fmt: skip
    assert torch.equal(cached, sdxl)


def test_gpu_decode_path_refuses_pairs(paired_manifest: Path):
    index = scan(paired_manifest, workers=0)
    with pytest.raises(ValueError, match="GPU decode path"):
        TextToImageDataset(index, assign(index, BucketLadder.for_model("sdxl", max_area=64 * 64)),
                           image_transform=EncodedFit())


@pytest.mark.slow  # the tiny VAE runs a dozen times: ~15 s on a loaded 2-core machine
def test_cache_round_trips_conditioning_latents_and_masks(paired_manifest, tmp_path,
                                                          tiny_encoders_dirs):
    from bucketing import build_cache
    from bucketing.pipeline.encoder_cache.pairs import latent_mask
    from transforms import BucketResizeCrop, FluxEncoders

    flux = FluxEncoders.from_pretrained(tiny_encoders_dirs["flux"], dtype=torch.float32,
                                        max_sequence_length=16)  # fmt: skip
    index = scan(paired_manifest, workers=0)
    assignment = assign(index, BucketLadder.for_model("flux", max_area=64 * 64))
    cache = build_cache(index, assignment, flux, tmp_path / "c", flip_p=0.5, progress=False)
    assert cache.build_stats["failed"] == []
    cached = TextToImageDataset(index, assignment, encoder_cache=cache, seed=5)
    pixels = TextToImageDataset(index, assignment, seed=5,
                                image_transform=BucketResizeCrop(flip_p=0.5))
    flips = set()
    for epoch in range(2):
        cached.set_epoch(epoch)
        pixels.set_epoch(epoch)
        for i in range(len(index)):
            a, b = cached[i], pixels[i]
            assert a["fit"] == b["fit"]
            flips.add(a["flipped"])
            expected = flux.encode_images(b["conditioning_pixel_values"])
            assert a["conditioning_latents"].shape == (1, 16, *a["latents"].shape[-2:])
            torch.testing.assert_close(a["conditioning_latents"], expected, rtol=1e-5,
                                       atol=1e-5)  # fmt: skip
            mask = latent_mask(b["loss_mask"], tuple(a["latents"].shape[-2:]))
            assert torch.equal(a["loss_mask"], mask) and a["loss_mask"].dtype == torch.uint8
    assert flips == {True, False}
    batch = collate([cached[0], cached[2]])
    assert batch["conditioning_latents"].shape[:2] == (2, 1)
    weights = loss_weight_for(to_model_input(batch, "cpu", torch.float32)["loss_mask"], "flux",
                              latent_hw=batch["latents"].shape[-2:])  # fmt: skip
    assert weights.shape[1] == batch["latents"].shape[-2] * batch["latents"].shape[-1] // 4


def test_report_counts_pairs_and_the_preview_shows_them(paired_manifest, tmp_path, capsys):
    from bucketing.cli.report import main, preview_tiles

    out, png = tmp_path / "r.json", tmp_path / "p.png"
    code = main([str(paired_manifest), "--model", "sdxl", "--max-area", "16384", "--workers", "1",
                 "--json", str(out), "--preview", str(png)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    pairs = json.loads(out.read_text())["pairs"]
    assert pairs == {"conditioning_images": 1, "rows_with_conditioning": 4,
                     "rows_with_mask": 4, "alpha_masks": 0,
                     "rejected": {"missing_pair": 1, "pair_aspect": 1}}  # fmt: skip
    assert "rows rejected for their pairs: 1 missing_pair" in capsys.readouterr().out
    assert Image.open(png).size[0] > 0
    index = scan(paired_manifest, workers=0)
    assignment = assign(index, BucketLadder.for_model("sdxl", max_area=64 * 64))
    buckets = [{"id": int(b)} for b in np.unique(assignment.bucket_id)]
    tiles = preview_tiles(index, assignment, buckets, seed=1)
    for tile in tiles:  # the conditioning image is cut like the model input: its negative
        assert tile.mask.shape == tile.model_input.shape[:2]
        diff = np.abs(255 - tile.model_input.astype(int) - tile.conditioning[0].astype(int))
        assert diff.mean() < 6


def test_hf_datasets_carry_pairs_and_bad_pairs_are_rejections(tmp_path: Path):
    datasets = pytest.importorskip("datasets")
    pixels = _picture(5)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(255 - pixels).save(tmp_path / "c.png")
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    Image.fromarray(_mask()).save(tmp_path / "m.png")
    paths = [str(tmp_path / n) for n in ("a.png", "a.png", "a.png")]
    ds = datasets.Dataset.from_dict(
        {"image": paths, "control": [str(tmp_path / "c.png"), str(tmp_path / "broken.png"),
                                     str(tmp_path / "c.png")],
         "mask": [str(tmp_path / "m.png"), str(tmp_path / "m.png"), str(tmp_path / "gone.png")],
         "text": ["ok", "broken control", "missing mask"]},
    ).cast_column("image", datasets.Image()).cast_column("control", datasets.Image())
    index = scan(ds, workers=0, column_map={"conditioning_image": "control", "loss_mask": "mask"})
    assert len(index) == 1 and list(index.captions) == [["ok"]]
    assert sorted(r.reason for r in index.rejections) == ["missing_pair", "unreadable_pair"]
    sample = TextToImageDataset(index, assign(index, BucketLadder.for_model(
        "sdxl", max_area=64 * 64)), image_transform=_crop())[0]  # fmt: skip
    diff = (255 - sample["pixel_values"].int() - sample["conditioning_pixel_values"][0].int())
    assert diff.abs().float().mean() < 1.5


def test_column_map_mistakes_are_clear_errors(paired_manifest: Path):
    with pytest.raises(ValueError, match="numbered 0..K-1"):
        scan(paired_manifest, workers=0,
             column_map={"conditioning_image_0": "conditioning_image",
                         "conditioning_image_2": "conditioning_image"})
    with pytest.raises(ValueError, match="no column 'controls'"):
        scan(paired_manifest, workers=0, column_map={"conditioning_image": "controls"})


@settings(max_examples=30, deadline=None)
@given(w=st.integers(16, 90), h=st.integers(16, 90), bw=st.integers(4, 16),
       bh=st.integers(4, 16), flip=st.booleans(), seed=st.integers(0, 2**16))
def test_masks_are_cut_with_the_images_geometry(w, h, bw, bh, flip, seed):
    """A mask and an image holding the same picture land on the same pixels: fit_mask's box
    filter over the crop box equals the image kernel run with the box filter."""
    rng = np.random.default_rng(seed)
    mask = (rng.random((h, w)) < 0.5).astype(np.uint8) * 255
    params = fit_params((w, h), (bw, bh), crop="random", flip=flip, rng=rng)
    image = fit(Image.fromarray(mask).convert("RGB"), params, resample="box")
    got = fit_mask(Image.fromarray(mask), params)
    assert got.shape == (1, bh, bw) and torch.equal(got[0], image[0])


def test_header_less_lists_take_alpha_masks(tmp_path: Path):
    rgba = np.dstack([_picture(6), _mask()])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cut.png")
    (tmp_path / "list.tsv").write_text("cut.png\ta cut-out\n")
    index = scan(tmp_path / "list.tsv", workers=0, column_map={"loss_mask": "alpha"})
    assert len(index) == 1 and index.loss_mask is not None
    with pytest.raises(ValueError, match="no column 'controls'"):
        scan(tmp_path / "list.tsv", workers=0, column_map={"conditioning_image": "controls"})


def test_a_pair_changed_after_the_scan_is_substituted_or_named(paired_manifest: Path):
    from bucketing.pipeline.dataset import SubstitutionWarning
    from transforms.image import ImageDecodeError

    index = scan(paired_manifest, workers=0)
    assignment = assign(index, BucketLadder.for_model("sdxl", max_area=64 * 64))
    Image.fromarray(_picture(7, (W, W))).save(paired_manifest.parent / "cond0.png")  # square now
    row = [Path(c).name for c in index.conditioning[0]].index("cond0.png")
    strict = TextToImageDataset(index, assignment, image_transform=_crop(), on_error="raise")
    with pytest.raises(ImageDecodeError, match="conditioning image 0"):
        strict[row]
    lenient = TextToImageDataset(index, assignment, image_transform=_crop())
    with pytest.warns(SubstitutionWarning):
        sample = lenient[row]
    assert sample["substituted"] and sample["index"] != row
    assert sample["conditioning_pixel_values"].shape[0] == 1


def test_sources_without_pairs_refuse_paired_column_maps(tmp_path: Path):
    Image.fromarray(_picture(3)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="lists of paths do not carry"):
        scan([str(tmp_path / "a.png")], workers=0, column_map={"loss_mask": "alpha"})


def test_paired_sizes_are_the_oriented_ones(tmp_path: Path):
    """A conditioning JPEG stored a quarter turn with an EXIF orientation is read upright."""
    pixels = _picture(11)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    stored = Image.fromarray(255 - pixels).transpose(Image.Transpose.ROTATE_90)  # 120x160
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90° clockwise: 160x120 again
    stored.save(tmp_path / "c.jpg", quality=95, exif=exif)
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.png", "caption": "upright",
                                                  "conditioning_image": "c.jpg"}))
    index = scan(tmp_path / "m.jsonl", workers=0)
    assert len(index) == 1, index.rejections
    sample = TextToImageDataset(index, assign(index, BucketLadder.for_model(
        "sdxl", max_area=64 * 64)), image_transform=_crop())[0]  # fmt: skip
    diff = (255 - sample["pixel_values"].int() - sample["conditioning_pixel_values"][0].int())
    assert diff.abs().float().mean() < 4
