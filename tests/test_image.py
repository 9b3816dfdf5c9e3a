"""load_image: orientation in pixels, every colour mode to correct 8-bit RGB, the odd files,
the JPEG draft path, the bomb limit, and clean failures on hostile bytes."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageCms, ImageOps

from bucketing.headers import read_header
from transforms.image import DEFAULT_MAX_DECODE_BYTES, ImageDecodeError, decode_bytes, load_image
from transforms.resize_crop import BucketResizeCrop


def _px(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.float64)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# -- orientation ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind, size", [("Landscape", (1800, 1200)), ("Portrait", (1200, 1800))])
def test_exif_set_comes_out_upright_in_pixels(exif_dir, kind, size):
    # Draft to a quarter keeps this quick; the comparison is in pixels at that size.
    ref = load_image(exif_dir / f"{kind}_1.jpg", draft_size=(size[0] // 4, size[1] // 4))
    for n in range(9):
        img = load_image(exif_dir / f"{kind}_{n}.jpg", draft_size=(size[0] // 4, size[1] // 4))
        assert img.mode == "RGB"
        assert img.info["original_size"] == (size[1], size[0])
        assert img.size == ref.size
        diff = np.abs(_px(img) - _px(ref)).mean()
        assert diff < 8, f"{kind}_{n}: mean abs difference {diff:.1f} from {kind}_1"
        # A wrong orientation of the same picture is far off: rotate 180 and compare.
        assert np.abs(_px(img.rotate(180)) - _px(ref)).mean() > 4 * max(diff, 1.0)


@pytest.mark.parametrize("ext, n", [("jpg", n) for n in range(2, 9)] + [("webp", 5), ("webp", 6)])
def test_hopper_orientations_match_upright(odd_dir, ext, n):
    ref = _px(load_image(odd_dir / "hopper.jpg"))
    img = load_image(odd_dir / f"hopper_orientation_{n}.{ext}")
    assert np.abs(_px(img) - ref).mean() < 6


def _jpeg_with_orientation(typ: int, value: bytes) -> bytes:
    """A marked 60x20 JPEG whose EXIF holds tag 274 as TIFF type ``typ`` (little-endian)."""
    entry = struct.pack("<HHL", 274, typ, 1)
    if len(value) > 4:  # stored after the directory; the entry holds its offset
        field, tail = struct.pack("<L", 8 + 2 + 12 + 4), value
    else:
        field, tail = value.ljust(4, b"\x00"), b""
    tiff = b"II*\x00" + struct.pack("<LH", 8, 1) + entry + field + b"\x00" * 4 + tail
    img = Image.new("RGB", (60, 20), (200, 30, 30))
    img.paste((0, 0, 255), (0, 0, 10, 5))
    return _save(img, "JPEG", exif=b"Exif\x00\x00" + tiff)


@pytest.mark.parametrize(
    "typ, value",
    [
        (5, struct.pack("<LL", 6, 1)),  # RATIONAL 6/1: Pillow reads 6.0 and turns the image
        (10, struct.pack("<ll", 16, 2)),  # SRATIONAL 8
        (11, struct.pack("<f", 6.0)),  # FLOAT
        (12, struct.pack("<d", 5.0)),  # DOUBLE
        (5, struct.pack("<LL", 13, 2)),  # 6.5: no orientation, left as stored
    ],
)
def test_orientation_stored_as_rational_or_float(typ, value):
    data = _jpeg_with_orientation(typ, value)
    with Image.open(io.BytesIO(data)) as im:
        want = ImageOps.exif_transpose(im)
    img = load_image(data)
    assert img.size == want.size == tuple(read_header(data)[:2])
    assert np.array_equal(np.asarray(img), np.asarray(want))


def test_orientation_changes_reported_size(odd_dir):
    img = load_image(odd_dir / "orientation_rectangle.jpg")  # stored 2x1, tag 8
    assert img.size == (1, 2)
    assert img.info["original_size"] == (2, 1)


# -- colour modes ---------------------------------------------------------------------------


def test_cmyk_and_lab_become_the_right_rgb():
    cyan = Image.new("CMYK", (8, 8), (255, 0, 0, 0))
    assert np.asarray(load_image(_save(cyan, "JPEG", quality=100)))[4, 4].tolist() == pytest.approx(
        [0, 255, 255], abs=3
    )
    colours = np.array([[[255, 0, 0], [0, 200, 0], [30, 60, 220], [128, 128, 128]]], np.uint8)
    rgb = Image.fromarray(colours)
    to_lab = ImageCms.buildTransform(
        ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB"
    )
    to_rgb = ImageCms.buildTransform(
        ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
    )
    lab = ImageCms.applyTransform(rgb, to_lab)
    out = np.asarray(load_image(_save(lab, "TIFF"))).astype(int)
    assert np.abs(out - np.asarray(ImageCms.applyTransform(lab, to_rgb))).max() <= 2
    assert np.abs(out - colours).max() <= 30  # 8-bit LAB cannot round-trip exactly


def test_alpha_is_composited_on_the_background():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = (200, 40, 0)
    rgba[0, :, 3] = 0  # transparent row
    rgba[1, :, 3] = 255  # opaque row
    rgba[2, :, 3] = 128  # half
    data = _save(Image.fromarray(rgba), "PNG")
    out = np.asarray(load_image(data, background=(0, 0, 255))).astype(int)
    assert out[0, 0].tolist() == [0, 0, 255]
    assert out[1, 0].tolist() == [200, 40, 0]
    assert np.abs(out[2, 0] - [100, 20, 127]).max() <= 1
    alpha = np.array([[0, 255], [255, 0]], np.uint8)
    la = Image.fromarray(np.dstack([np.full((2, 2), 90, np.uint8), alpha])).convert("LA")
    out = np.asarray(load_image(_save(la, "PNG"))).astype(int)
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [90, 90, 90]


def test_palette_transparency_and_colour_keys():
    p = Image.new("P", (4, 4), 0)
    p.putpalette([10, 20, 30] + [250, 0, 0] + [0] * 762)
    p.putpixel((1, 1), 1)
    out = np.asarray(load_image(_save(p, "PNG", transparency=0), background=(0, 255, 0)))
    assert out[0, 0].tolist() == [0, 255, 0]
    assert out[1, 1].tolist() == [250, 0, 0]
    rgb = Image.new("RGB", (2, 1), (5, 6, 7))
    rgb.putpixel((1, 0), (9, 9, 9))
    out = np.asarray(load_image(_save(rgb, "PNG", transparency=(5, 6, 7)), background=(1, 2, 3)))
    assert out[0].tolist() == [[1, 2, 3], [9, 9, 9]]


def test_one_bit_images():
    bw = Image.new("1", (4, 2), 0)
    bw.putpixel((3, 1), 1)
    out = np.asarray(load_image(_save(bw, "PNG")))
    assert out[0, 0].tolist() == [0, 0, 0] and out[1, 3].tolist() == [255, 255, 255]


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.array([[0, 257, 1000, 32896, 65535]], np.uint16)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    out = np.asarray(load_image(_save(img, "PNG")))[0, :, 0].tolist()
    assert out == [0, 1, 4, 128, 255]  # Pillow's own convert would clip 1000 to 255
    big = Image.frombytes("I;16B", (5, 1), values.astype(">u2").tobytes())
    assert np.asarray(load_image(_save(big, "TIFF")))[0, :, 0].tolist() == out


def test_thirty_two_bit_integer_and_float():
    in_16bit_range = Image.fromarray(np.array([[0, 65535]], np.int32))
    assert np.asarray(load_image(_save(in_16bit_range, "TIFF")))[0, :, 0].tolist() == [0, 255]
    wide = Image.fromarray(np.array([[-100, 0, 100]], np.int32))
    assert np.asarray(load_image(_save(wide, "TIFF")))[0, :, 0].tolist() == [0, 127, 255]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0, np.nan]], np.float32))
    assert np.asarray(load_image(_save(unit, "TIFF")))[0, :, 0].tolist() == [0, 128, 255, 0]
    signed = Image.fromarray(np.array([[-2.0, 0.0, 2.0]], np.float32))
    assert np.asarray(load_image(_save(signed, "TIFF")))[0, :, 0].tolist() == [0, 128, 255]


# -- the odd files -------------------------------------------------------------------------


def test_every_odd_file_decodes_to_its_bucket_or_fails_cleanly(odd_dir, odd_expected):
    fit = BucketResizeCrop()
    rng = np.random.default_rng(0)
    for name, exp in odd_expected.items():
        if exp["expect"] == "ok":
            img = load_image(odd_dir / name)
            assert img.mode == "RGB"
            assert list(img.size) == exp["oriented_size"], name
            assert img.size == ImageOps.exif_transpose(Image.open(odd_dir / name)).size
            bucket = (min(img.width, 48), min(img.height, 40))
            out = fit(img, bucket, rng)
            assert out["pixel_values"].shape == (3, bucket[1], bucket[0]), name
        else:
            with pytest.raises(ImageDecodeError, match=name.replace(".", r"\.")) as info:
                load_image(odd_dir / name)
            assert info.value.reason


def test_odd_mode_files_look_right(odd_dir):
    # 16-bit values 291..694 out of 65535: dark, not clipped to white.
    assert np.asarray(load_image(odd_dir / "16bit.MM.deflate.tif")).max() <= 3
    # A float image in [-pi, pi] is min-max scaled to the full range.
    f = np.asarray(load_image(odd_dir / "10ct_32bit_128.tiff"))
    assert f.min() == 0 and f.max() == 255
    # Transparent pixels of a colour-keyed 16-bit PNG become the background.
    key = np.asarray(Image.open(odd_dir / "i_trns.png")) == 255
    out = np.asarray(load_image(odd_dir / "i_trns.png", background=(0, 0, 255)))
    assert (out[key] == [0, 0, 255]).all() and key.any()


# -- draft, bytes, limits -------------------------------------------------------------------


@pytest.mark.parametrize("bucket", [(512, 320), (256, 256), (96, 160)])
def test_draft_decodes_less_and_gives_the_same_picture(examples_dir, bucket):
    path = examples_dir / "landscape_exif6.jpg"  # 1800x1200 once oriented
    full = load_image(path)
    draft = load_image(path, draft_size=bucket)
    assert draft.width < full.width and draft.width >= bucket[0] and draft.height >= bucket[1]
    assert draft.info["original_size"] == full.info["original_size"] == (1200, 1800)
    a = BucketResizeCrop()(full, bucket, None)
    b = BucketResizeCrop()(draft, bucket, None)
    assert a["original_size"] == b["original_size"] == (1200, 1800)
    assert abs(a["crop_top_left"][0] - b["crop_top_left"][0]) <= 1
    assert abs(a["crop_top_left"][1] - b["crop_top_left"][1]) <= 1
    mse = ((a["pixel_values"].double() - b["pixel_values"].double()) ** 2).mean().item()
    assert 10 * np.log10(255**2 / max(mse, 1e-9)) > 35  # PSNR in dB


def test_draft_is_not_used_when_the_target_is_more_than_half(examples_dir):
    assert load_image(examples_dir / "landscape_exif6.jpg", draft_size=(1024, 1024)).size == (
        1800,
        1200,
    )


def test_bytes_and_path_give_the_same_image(examples_dir):
    path = examples_dir / "portrait_exif8.jpg"
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(load_image(path.read_bytes())))


def test_max_pixels_refuses_before_decoding():
    data = _save(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(ImageDecodeError, match="too_many_pixels"):
        load_image(data, max_pixels=9_999)
    assert load_image(data, max_pixels=10_000).size == (100, 100)


def _png_header(width: int, height: int, mode: str) -> bytes:
    """An 8x8 PNG of ``mode`` whose header is edited to declare width x height: decoding it
    would fail as truncated, so a refusal proves that nothing was decoded."""
    data = bytearray(_save(Image.new(mode, (8, 8)), "PNG"))
    struct.pack_into(">II", data, 16, width, height)  # IHDR data starts at byte 16
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decode_memory_is_bounded_in_bytes_before_decoding():
    # 12000x12000 16-bit in a few hundred bytes: over the default 1 GiB of decode memory
    with pytest.raises(ImageDecodeError, match=r"too_many_bytes: .*12000x12000 I;16.*max_decode"):
        load_image(_png_header(12000, 12000, "I;16"))
    # the same pixel count at 8 bits needs less than half, and the limit counts bytes
    assert decode_bytes("L", (12000, 12000)) < DEFAULT_MAX_DECODE_BYTES
    assert decode_bytes("I;16", (12000, 12000)) > 1.5 * decode_bytes("L", (12000, 12000))
    limit = decode_bytes("L", (4000, 4000))
    with pytest.raises(ImageDecodeError, match="too_many_bytes"):
        load_image(_png_header(4000, 4000, "I;16"), max_decode_bytes=limit)
    with pytest.raises(ImageDecodeError) as decoded:  # within the limit: decoding was tried
        load_image(_png_header(4000, 4000, "L"), max_decode_bytes=limit)
    assert "too_many_bytes" not in str(decoded.value)
    # a float TIFF and an alpha PNG: refused one byte under their need, loaded at it
    for img, fmt in ((Image.new("F", (300, 200), 0.5), "TIFF"), (Image.new("RGBA", (3, 2)), "PNG")):
        data, need = _save(img, fmt), decode_bytes(img.mode, img.size)
        with pytest.raises(ImageDecodeError, match="too_many_bytes"):
            load_image(data, max_decode_bytes=need - 1)
        assert load_image(data, max_decode_bytes=need).size == img.size


_PEAK = """
import os, resource, sys
from PIL import Image
from transforms.image import decode_bytes, load_image
load_image(sys.argv[1])  # imports and first-call allocations, outside the measure
for path in sys.argv[2:]:
    if os.fork() == 0:  # each file measured in a child: its peak starts at the current size
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        load_image(path, max_decode_bytes=None)
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
        with Image.open(path) as img:
            print(path, grown, decode_bytes(img.mode, img.size, "transparency" in img.info))
        sys.stdout.flush()
        os._exit(0)
    os.wait()
"""


def test_decoding_holds_no_more_memory_than_the_limit_counts(tmp_path, repo_root):
    ramp = np.add.outer(np.arange(3000), np.arange(4000))  # 12 MP, compresses fast
    images = {
        "float.tiff": Image.fromarray((ramp / 7000 * 6 - 3).astype(np.float32)),
        "sixteen.png": Image.fromarray((ramp * 9).astype(np.uint16)),
        "alpha.png": Image.fromarray(np.dstack([ramp % 256] * 4).astype(np.uint8)),
    }
    Image.new("RGB", (8, 6)).save(tmp_path / "small.png")
    for name, img in images.items():
        img.save(tmp_path / name)
    out = subprocess.run(
        [sys.executable, "-c", _PEAK, str(tmp_path / "small.png")]
        + [str(tmp_path / name) for name in images],
        capture_output=True, text=True, check=True, cwd=repo_root,
        env={**os.environ, "PYTHONPATH": str(repo_root)},
    )
    lines = [line.split() for line in out.stdout.splitlines()]
    assert len(lines) == len(images), out
    for path, grown, counted in lines:  # no full-size float or int64 copies
        assert int(grown) <= int(counted) * 1.05 + 2**21, (path, grown, counted)


def test_bad_background_is_a_clear_error():
    with pytest.raises(ValueError, match="background"):
        load_image(b"", background=(0, 0))


_JPEG = _save(Image.radial_gradient("L").convert("RGB").resize((64, 48)), "JPEG")
_PNG = _save(Image.linear_gradient("L").resize((48, 64)), "PNG")


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from([_JPEG, _PNG]),
    cut=st.integers(min_value=0, max_value=len(_PNG)),
    noise=st.binary(max_size=64),
)
def test_hostile_bytes_give_rgb_or_a_clean_error(base, cut, noise):
    data = base[: min(cut, len(base))] + noise
    try:
        img = load_image(data)
    except ImageDecodeError as e:
        assert e.reason and str(len(data)) in str(e)
    else:
        assert img.mode == "RGB" and img.width > 0 and img.height > 0
