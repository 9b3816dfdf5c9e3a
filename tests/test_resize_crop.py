"""fit_params + fit / BucketResizeCrop: exact bucket shape, no upscaling, exact crop and flip
coordinates (checked with markers), seeded randomness, and the two resize back-ends."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw
from torchvision.transforms.v2 import functional as F

from transforms.image import DecodeSettings, ImageDecodeError, load_image
from transforms.resize_crop import (
    DEFAULT_RESAMPLE,
    RESAMPLE_MODES,
    BucketResizeCrop,
    FitParams,
    decode_and_fit,
    fit,
    fit_params,
    original_size_wh,
    resized_size,
    sample_fields,
)
from transforms.rng import sample_rng


def resize_crop(img, bucket_wh, *, crop="center", flip=False, rng=None,
                resample=DEFAULT_RESAMPLE, allow_upscale=False):
    """The two halves every transform composes: fit_params of the image's full oriented
    size (an explicit (y, x) crop allowed), then the fit kernel."""
    size = original_size_wh(img)
    params = fit_params(size, bucket_wh, crop=crop, flip=flip, rng=rng,
                        allow_upscale=allow_upscale)
    return sample_fields(params, fit(img, params, resample=resample), size)


@st.composite
def image_and_bucket(draw, upscale=False):
    w = draw(st.integers(1, 300))
    h = draw(st.integers(1, 300))
    limit_w, limit_h = (400, 400) if upscale else (w, h)
    bw = draw(st.integers(1, limit_w))
    bh = draw(st.integers(1, limit_h))
    return (w, h), (bw, bh)


@settings(deadline=None, max_examples=60)
@given(
    sizes=image_and_bucket(),
    crop=st.sampled_from(["center", "random"]),
    flip=st.booleans(),
    resample=st.sampled_from(["lanczos", "bicubic"]),
    seed=st.integers(0, 2**32),
)
def test_output_is_exactly_the_bucket_and_never_upscaled(sizes, crop, flip, resample, seed):
    (w, h), (bw, bh) = sizes
    img = Image.new("RGB", (w, h), (10, 20, 30))
    out = resize_crop(
        img, (bw, bh), crop=crop, flip=flip, rng=np.random.default_rng(seed), resample=resample
    )
    pv = out["pixel_values"]
    assert pv.shape == (3, bh, bw) and pv.dtype == torch.uint8
    assert out["target_size"] == (bh, bw) and out["original_size"] == (h, w)
    new_w, new_h = resized_size(w, h, (bw, bh))
    assert bw <= new_w <= w and bh <= new_h <= h  # covers the bucket, never larger than source
    assert new_w == bw or new_h == bh  # only one axis is cropped
    y, x = out["crop_top_left"]
    assert 0 <= y <= new_h - bh and 0 <= x <= new_w - bw
    assert out["flipped"] is flip
    assert (pv[:, bh // 2, bw // 2].tolist()) == [10, 20, 30]


@settings(deadline=None, max_examples=40)
@given(sizes=image_and_bucket(upscale=True))
def test_upscaling_is_refused_unless_allowed(sizes):
    (w, h), (bw, bh) = sizes
    img = Image.new("RGB", (w, h))
    if bw > w or bh > h:
        with pytest.raises(ValueError, match="smaller than its bucket"):
            resize_crop(img, (bw, bh))
        with pytest.raises(ValueError, match="smaller than its bucket"):
            BucketResizeCrop()(img, (bw, bh), np.random.default_rng(0))
    out = resize_crop(img, (bw, bh), allow_upscale=True)
    assert out["pixel_values"].shape == (3, bh, bw)


def _marker_image(w: int, h: int, box: tuple[int, int, int, int]) -> Image.Image:
    img = Image.new("RGB", (w, h), (0, 0, 0))
    ImageDraw.Draw(img).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=(255, 255, 255))
    return img


def _marker_centre(pv: torch.Tensor) -> tuple[float, float]:
    ys, xs = np.nonzero(pv[0].numpy() > 127)
    assert len(ys), "marker not in the output"
    return float(ys.mean()), float(xs.mean())


@pytest.mark.parametrize("resample", RESAMPLE_MODES)
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("crop", ["center", (0, 0), (0, 100), (0, 37)])
def test_marker_lands_where_the_coordinates_say(resample, flip, crop):
    # 400x200 into a 100x100 bucket: scale 0.5, resized 200x100, 100 px of overhang in x.
    # Marker covers x 220..260, y 100..140 in the source, i.e. x 110..130, y 50..70 resized.
    img = _marker_image(400, 200, (220, 100, 260, 140))
    out = resize_crop(img, (100, 100), crop=crop, flip=flip, resample=resample)
    y, x = out["crop_top_left"]
    assert out["flipped"] is flip
    if crop == "center":
        assert (y, x) == (0, 150 - 100 if flip else 50)
    elif not flip:
        assert (y, x) == crop
    else:
        assert (y, x) == (crop[0], 200 - crop[1] - 100)
    # In the (possibly flipped) resized image the marker centre is at (60, 120) or mirrored
    # (60, 200 - 120); crop_top_left is in that image, so the output centre follows exactly.
    cy, cx = 59.5, (200 - 120 if flip else 120) - 0.5
    if 0 <= cx - x < 100:
        oy, ox = _marker_centre(out["pixel_values"])
        assert abs(oy - (cy - y)) <= 1.0 and abs(ox - (cx - x)) <= 1.0


def test_flip_mirrors_the_pixels_of_the_same_crop():
    img = load_image(_gradient_bytes())
    plain = resize_crop(img, (96, 96), crop=(0, 20))
    flipped_full = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    resized_w = resized_size(*img.size, (96, 96))[0]
    mirrored = resize_crop(flipped_full, (96, 96), crop=(0, resized_w - 20 - 96))
    flipped = resize_crop(img, (96, 96), crop=(0, 20), flip=True)
    assert flipped["crop_top_left"] == mirrored["crop_top_left"]
    assert torch.equal(flipped["pixel_values"], plain["pixel_values"].flip(-1))
    diff = (flipped["pixel_values"].int() - mirrored["pixel_values"].int()).abs()
    assert diff.float().mean() < 1.0


def _gradient_bytes() -> bytes:
    import io

    a = np.zeros((160, 300, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, 300, dtype=np.uint8)[None, :]
    a[..., 1] = np.linspace(0, 255, 160, dtype=np.uint8)[:, None]
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def test_random_crop_and_flip_follow_the_generator():
    img = Image.new("RGB", (300, 100))
    t = BucketResizeCrop(crop="random", flip_p=0.5)
    draws = [t(img, (100, 100), sample_rng(0, 0, i, "image")) for i in range(200)]
    xs = {d["crop_top_left"][1] for d in draws}
    assert min(xs) < 10 and max(xs) > 190 and len(xs) > 100  # spread over the whole 0..200
    flips = sum(d["flipped"] for d in draws)
    assert 60 < flips < 140
    again = t(img, (100, 100), sample_rng(0, 0, 7, "image"))
    assert again["crop_top_left"] == draws[7]["crop_top_left"]
    assert again["flipped"] == draws[7]["flipped"]
    # The flip is drawn first: switching the crop mode does not change who is flipped.
    centre = BucketResizeCrop(crop="center", flip_p=0.5)
    assert [
        centre(img, (100, 100), sample_rng(0, 0, i, "image"))["flipped"] for i in range(50)
    ] == [d["flipped"] for d in draws[:50]]
    assert all(
        not BucketResizeCrop(flip_p=0.0)(img, (100, 100), sample_rng(0, 0, i, "image"))["flipped"]
        for i in range(20)
    )


def test_torch_bicubic_matches_pillow_bicubic(examples_dir):
    img = load_image(examples_dir / "china.jpg")  # 640x427
    ours = resize_crop(img, (320, 192), resample="bicubic")
    new_w, new_h = resized_size(*img.size, (320, 192))
    y, x = ours["crop_top_left"]
    ref = img.resize((new_w, new_h), Image.Resampling.BICUBIC).crop((x, y, x + 320, y + 192))
    diff = ours["pixel_values"].permute(1, 2, 0).int() - torch.from_numpy(np.asarray(ref)).int()
    assert diff.abs().max() <= 2 and diff.abs().float().mean() < 0.1


@pytest.mark.parametrize("size", [(640, 427), (2400, 1800)])  # one Pillow block, several
def test_default_kernel_reads_pillows_buffer_in_place_or_copies_equally(size):
    rng = np.random.default_rng(7)
    arr = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    img = Image.fromarray(arr).resize(size, Image.Resampling.BILINEAR)  # smooth, with detail
    assert BucketResizeCrop().resample == "bicubic"
    out = resize_crop(img, (size[0] // 2, size[1] // 2 - 16), flip=True)
    new_w, new_h = resized_size(*img.size, (size[0] // 2, size[1] // 2 - 16))
    packed = torch.from_numpy(np.asarray(img)).permute(2, 0, 1)
    bicubic = F.InterpolationMode.BICUBIC
    ref = F.resize(packed, [new_h, new_w], interpolation=bicubic, antialias=True)
    y, x = out["crop_top_left"]
    expected = ref[:, y : y + size[1] // 2 - 16].flip(-1)[:, :, x : x + size[0] // 2]
    assert torch.equal(out["pixel_values"], expected)


def test_pillow_region_resize_equals_resize_then_crop(examples_dir):
    img = load_image(examples_dir / "china.jpg")
    ours = resize_crop(img, (320, 192), resample="lanczos", crop=(11, 0))
    new_w, new_h = resized_size(*img.size, (320, 192))
    ref = img.resize((new_w, new_h), Image.Resampling.LANCZOS).crop((0, 11, 320, 203))
    diff = ours["pixel_values"].permute(1, 2, 0).int() - torch.from_numpy(np.asarray(ref)).int()
    assert diff.abs().max() <= 1


def test_original_size_comes_from_the_decoder(examples_dir):
    img = load_image(examples_dir / "landscape_exif6.jpg", draft_size=(256, 256))
    out = BucketResizeCrop()(img, (256, 256), sample_rng(0, 0, 0, "image"))
    assert out["original_size"] == (1200, 1800)


def test_clear_errors():
    img = Image.new("RGB", (64, 64))
    with pytest.raises(ValueError, match="resample"):
        BucketResizeCrop(resample="cubic")
    with pytest.raises(ValueError, match="crop"):
        BucketResizeCrop(crop="left")
    with pytest.raises(ValueError, match="flip_p"):
        BucketResizeCrop(flip_p=2)
    with pytest.raises(ValueError, match="RGB"):
        resize_crop(img.convert("L"), (32, 32))
    with pytest.raises(ValueError, match="rng"):
        resize_crop(img, (32, 16), crop="random")
    with pytest.raises(ValueError, match="outside"):
        resize_crop(img, (32, 16), crop=(0, 1))  # resized to 32x32: no spare width
    with pytest.raises(ValueError, match="rng"):
        BucketResizeCrop(flip_p=0.5)(img, (32, 32), None)


# -- params and kernel -----------------------------------------------------------------------


@settings(deadline=None, max_examples=40)
@given(
    sizes=image_and_bucket(),
    crop=st.sampled_from(["center", "random"]),
    flip_p=st.sampled_from([0.0, 0.5, 1.0]),
    resample=st.sampled_from(["lanczos", "bilinear"]),
    seed=st.integers(0, 2**40),
)
def test_make_params_then_fit_is_the_transform(sizes, crop, flip_p, resample, seed):
    (w, h), (bw, bh) = sizes
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))
    t = BucketResizeCrop(crop=crop, flip_p=flip_p, resample=resample)
    params = t.make_params((w, h), (bw, bh), np.random.default_rng(seed))
    assert params.bucket == (bw, bh) and params.crop[2:] == (bh, bw)
    y, x = params.crop[:2]
    assert 0 <= y <= params.resized[1] - bh and 0 <= x <= params.resized[0] - bw
    assert params.resized == resized_size(w, h, (bw, bh))
    assert params.scale == max(bw / w, bh / h) <= 1.0
    if flip_p in (0.0, 1.0):
        assert params.flip is (flip_p == 1.0)
    out = t(img, (bw, bh), np.random.default_rng(seed))
    assert out["fit"] == params  # the same draws, in the same order
    assert torch.equal(fit(img, params, resample=resample), out["pixel_values"])
    assert out["crop_top_left"] == params.crop_top_left and out["flipped"] is params.flip
    # the sample form: the same fields added to the sample, nothing else changed
    sample = t({"image": img, "bucket": (bw, bh), "rng": np.random.default_rng(seed), "k": 1})
    assert sample["fit"] == params and sample["k"] == 1
    assert torch.equal(sample["pixel_values"], out["pixel_values"])


def test_params_come_from_the_full_size_so_a_draft_gets_the_same_crop(examples_dir):
    path = examples_dir / "landscape_exif6.jpg"  # 1800x1200 oriented; the draft is 1/4 of it
    t = BucketResizeCrop(crop="random", flip_p=0.5)
    full = t(load_image(path), (256, 192), sample_rng(1, 0, 3, "image"))
    draft = t(load_image(path, draft_size=(256, 192)), (256, 192), sample_rng(1, 0, 3, "image"))
    params = t.make_params((1800, 1200), (256, 192), sample_rng(1, 0, 3, "image"))
    assert draft["fit"] == full["fit"] == params
    assert full["fit"].resized == (288, 192)


def test_fit_params_refuse_a_box_that_is_not_the_bucket_inside_the_image():
    FitParams(bucket=(4, 3), scale=0.5, resized=(6, 3), crop=(0, 2, 3, 4), flip=True)
    with pytest.raises(ValueError, match="not the bucket"):
        FitParams(bucket=(4, 3), scale=0.5, resized=(6, 3), crop=(0, 2, 3, 3), flip=False)
    with pytest.raises(ValueError, match="outside"):
        FitParams(bucket=(4, 3), scale=0.5, resized=(6, 3), crop=(0, 3, 3, 4), flip=False)
    params = FitParams(bucket=(4, 3), scale=0.5, resized=(6, 3), crop=(0, 0, 3, 4), flip=True)
    assert params.crop_top_left == (0, 2)  # mirrored, SDXL's convention


def test_decode_and_fit_is_decode_then_the_kernel(tmp_path):
    """decode_and_fit with params drawn beforehand: the kernel's pixels on the decoded file;
    two files of one size given one FitParams (a pair) get the same box; a file whose size
    is not the scan's, or over the limits, is refused with the reason."""
    rng = np.random.default_rng(0)
    paths = []
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (120, 200, 3), dtype=np.uint8)).save(tmp_path / name)
        paths.append(tmp_path / name)
    params = BucketResizeCrop(crop="random", flip_p=0.5).make_params(
        (200, 120), (96, 64), sample_rng(3, 0, 0, "image"))
    a = decode_and_fit(paths[0], params, expected_size=(200, 120))
    b = decode_and_fit(paths[1], params)
    assert torch.equal(a["pixel_values"], fit(load_image(paths[0]), params))
    assert a["fit"] == b["fit"] == params and a["crop_top_left"] == b["crop_top_left"]
    assert not torch.equal(a["pixel_values"], b["pixel_values"])
    with pytest.raises(ImageDecodeError, match="changed after the scan"):
        decode_and_fit(paths[0], params, expected_size=(120, 200))
    with pytest.raises(ImageDecodeError, match="too_many_pixels"):
        decode_and_fit(paths[0], params, DecodeSettings(max_pixels=1000))
