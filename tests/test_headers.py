"""read_header: oriented sizes equal ``ImageOps.exif_transpose(img).size`` without decoding.

Ground truth is Pillow itself (decoding the files the tests write), the EXIF
orientation set and tests/data/odd/expected.json.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps, PngImagePlugin, TiffImagePlugin, features

from bucketing.headers import Header, default_max_pixels, orientation_code, read_header
from transforms.image import ImageDecodeError, load_image

REASONS = {"missing_file", "empty_file", "not_an_image", "unreadable", "too_many_pixels"}
SIZE = (60, 20)  # non-square so that a missed quarter turn shows


def pillow_size(data: bytes) -> tuple[int, int]:
    """What the user sees: the decoded, EXIF-transposed size."""
    with Image.open(io.BytesIO(data)) as im:
        return ImageOps.exif_transpose(im).size


def both(source: Path | bytes) -> Header:
    """read_header on a path and on its bytes must agree; return the result."""
    data = source if isinstance(source, bytes) else source.read_bytes()
    from_bytes = read_header(data)
    if isinstance(source, Path):
        assert read_header(source)[:4] == from_bytes[:4]
    return from_bytes


def encode(fmt: str, orientation: int | None = None, *, xmp: bytes | None = None) -> bytes:
    im = Image.new("RGB", SIZE, (200, 30, 30))
    im.putpixel((0, 0), (0, 0, 255))
    kwargs = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[274] = orientation
        kwargs["exif"] = exif if fmt == "TIFF" else exif.tobytes()
    if xmp is not None:
        kwargs["xmp"] = xmp
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def xmp_packet(orientation: int, element: bool = False) -> bytes:
    value = (
        f"<tiff:Orientation>{orientation}</tiff:Orientation>"
        if element
        else f'tiff:Orientation="{orientation}"'
    )
    body = (
        f"<rdf:Description xmlns:tiff='http://ns.adobe.com/tiff/1.0/'>{value}</rdf:Description>"
        if element
        else f"<rdf:Description xmlns:tiff='http://ns.adobe.com/tiff/1.0/' {value}/>"
    )
    return (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        f'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">{body}</rdf:RDF></x:xmpmeta>'
    ).encode()


FORMATS = ["JPEG", "PNG", "WEBP", "TIFF"] + (["AVIF"] if features.check("avif") else [])


# --------------------------------------------------------------------------- ground-truth sets


def test_exif_orientation_set(exif_dir):
    files = sorted(exif_dir.glob("*.jpg"))
    assert len(files) == 18
    for path in files:
        want = (1800, 1200) if path.name.startswith("Landscape") else (1200, 1800)
        h = both(path)
        assert h.ok and (h.width, h.height) == want, path.name


def test_odd_files_match_expected(odd_dir, odd_expected):
    for name, spec in odd_expected.items():
        h = both(odd_dir / name)
        assert isinstance(h, Header)
        if spec["expect"] == "ok":
            assert h.ok, (name, h)
            assert [h.width, h.height] == spec["oriented_size"], name
        elif not h.ok:
            assert h.reason in REASONS and h.detail, (name, h)
        else:  # accepted although Pillow cannot decode it: the loader rejects it later
            assert h.width > 0 and h.height > 0, name


def test_odd_rejections_are_specific(odd_dir):
    assert read_header(odd_dir / "zero_bytes.jpg").reason == "empty_file"
    assert read_header(odd_dir / "not_an_image.png").reason == "not_an_image"
    assert read_header(odd_dir / "decompression_bomb.gif").reason == "too_many_pixels"
    assert read_header(odd_dir / "bmp__b__reallybig.bmp").reason == "too_many_pixels"
    assert read_header(odd_dir / "broken.png").reason == "unreadable"


# --------------------------------------------------------------------------- written files


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_orientation_tag(fmt):
    for orientation in [None, *range(0, 10), 65535]:
        data = encode(fmt, orientation)
        h = both(data)
        expected = pillow_size(data)
        assert (h.width, h.height) == expected, (fmt, orientation)
        if orientation in (5, 6, 7, 8):  # Pillow keeps the tag for all these formats
            assert expected == SIZE[::-1]


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "PNG"])
@pytest.mark.parametrize("element", [False, True])
def test_xmp_orientation_where_pillow_honours_it(fmt, element):
    for orientation in (1, 3, 6, 8):
        data = encode(fmt, xmp=xmp_packet(orientation, element))
        assert (both(data).width, both(data).height) == pillow_size(data), (fmt, orientation)
    # EXIF wins over XMP, as in Image.getexif
    data = encode(fmt, 1, xmp=xmp_packet(6, element))
    assert (both(data).width, both(data).height) == pillow_size(data) == SIZE


def png_chunk(cid: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + cid + data + struct.pack(">I", zlib.crc32(cid + data))


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 8
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        out.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]))
        pos += 12 + n
    return out


def build_png(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return PngImagePlugin._MAGIC + b"".join(png_chunk(c, d) for c, d in chunks)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_png_exif_after_image_data(orientation):
    """Pillow reads an eXIf chunk placed after IDAT when it loads: so must we."""
    chunks = png_chunks(encode("PNG", orientation))
    exif = [c for c in chunks if c[0] == b"eXIf"]
    rest = [c for c in chunks if c[0] not in (b"eXIf", b"IEND")]
    data = build_png(rest + exif + [(b"IEND", b"")])
    assert [c[0] for c in png_chunks(data)][-2:] == [b"eXIf", b"IEND"]
    assert (both(data).width, both(data).height) == pillow_size(data)
    # split image data across several IDAT chunks: the walk hops over each
    idat = b"".join(d for c, d in rest if c == b"IDAT")
    head = [c for c in rest if c[0] != b"IDAT"]
    pieces = [(b"IDAT", idat[i : i + 7]) for i in range(0, len(idat), 7)]
    data = build_png(head + pieces + exif + [(b"IEND", b"")])
    assert (both(data).width, both(data).height) == pillow_size(data)


@pytest.mark.parametrize("orientation", [1, 6, 8])
@pytest.mark.parametrize("chunk", ["tEXt", "zTXt", "iTXt"])
def test_png_imagemagick_raw_profile(orientation, chunk):
    """ImageMagick writes EXIF as hex text ('Raw profile type exif'); Pillow reads it."""
    exif = Image.Exif()
    exif[274] = orientation
    raw = exif.tobytes()
    text = f"\nexif\n{len(raw):8}\n{raw.hex()}\n"
    info = PngImagePlugin.PngInfo()
    if chunk == "iTXt":
        info.add_itxt("Raw profile type exif", text, zip=True)
    else:
        info.add_text("Raw profile type exif", text, zip=chunk == "zTXt")
    buf = io.BytesIO()
    Image.new("RGB", SIZE).save(buf, "PNG", pnginfo=info)
    data = buf.getvalue()
    assert (both(data).width, both(data).height) == pillow_size(data)


def jpeg_with_exif_entry(typ: int, count: int, value: bytes, endian: str = "<") -> bytes:
    """A JPEG whose only EXIF entry is tag 274 with the given TIFF type/count/value field."""
    prefix = b"II*\x00" if endian == "<" else b"MM\x00*"
    ifd = struct.pack(endian + "H", 1) + struct.pack(endian + "HHL", 274, typ, count)
    if len(value) > 4:  # stored after the directory; the entry holds its offset
        field, tail = struct.pack(endian + "L", 8 + 2 + 12 + 4), value
    else:
        field, tail = value.ljust(4, b"\x00"), b""
    tiff = prefix + struct.pack(endian + "L", 8) + ifd + field + b"\x00" * 4 + tail
    app1 = b"Exif\x00\x00" + tiff
    plain = encode("JPEG")
    return plain[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + plain[2:]


@pytest.mark.filterwarnings("ignore:Metadata Warning")  # Pillow, decoding the oracle
@pytest.mark.parametrize(
    "typ,count,value,endian",
    [
        (3, 1, struct.pack("<H", 6), "<"),  # SHORT
        (3, 1, struct.pack(">H", 8), ">"),  # big-endian
        (4, 1, struct.pack("<L", 6), "<"),  # LONG
        (3, 2, struct.pack("<HH", 6, 1), "<"),  # two values: Pillow takes the first
        (1, 1, b"\x06", "<"),  # BYTE
        (2, 2, b"6\x00", "<"),  # ASCII "6"
        (9, 1, struct.pack("<l", 6), "<"),  # SLONG
        (99, 1, struct.pack("<H", 6), "<"),  # unknown type: Pillow skips the entry
        (5, 1, struct.pack("<LL", 6, 1), "<"),  # RATIONAL 6/1
        (10, 1, struct.pack(">ll", 16, 2), ">"),  # SRATIONAL 16/2 = 8
        (5, 1, struct.pack("<LL", 13, 2), "<"),  # RATIONAL 6.5: no such orientation
        (5, 1, struct.pack("<LL", 6, 0), "<"),  # RATIONAL 6/0 (nan)
        (11, 1, struct.pack("<f", 6.0), "<"),  # FLOAT
        (12, 1, struct.pack(">d", 5.0), ">"),  # DOUBLE
    ],
)
def test_unusual_exif_encodings_follow_pillow(typ, count, value, endian):
    data = jpeg_with_exif_entry(typ, count, value, endian)
    assert (both(data).width, both(data).height) == pillow_size(data)


def _transposed(value: object) -> Image.Image:
    """``ImageOps.exif_transpose`` of a small marked image whose tag 274 holds ``value``."""
    im = Image.new("RGB", SIZE, (200, 30, 30))
    im.putpixel((0, 0), (0, 0, 255))
    im.getexif()[274] = value
    return ImageOps.exif_transpose(im)


@settings(deadline=None, max_examples=60)
@given(
    value=st.one_of(
        st.integers(-1, 10),
        st.integers(-1, 10).map(float),
        st.floats(allow_nan=True, allow_infinity=True),
        st.builds(TiffImagePlugin.IFDRational, st.integers(-2, 20), st.integers(0, 3)),
        st.sampled_from(["6", b"6", (6,), (6, 1), None, True, False]),
    )
)
def test_orientation_code_reads_a_value_as_exif_transpose_does(value):
    code = orientation_code(value)
    assert type(code) is int and 1 <= code <= 8
    got, want = _transposed(value), _transposed(code)
    assert got.size == want.size and got.tobytes() == want.tobytes()


def test_orientation_code_of_unhashable_junk_is_1():
    assert orientation_code([6]) == orientation_code({6: 6}) == 1


def test_two_exif_segments_and_fill_bytes():
    exif = Image.Exif()
    exif[274] = 6
    plain = encode("JPEG")
    app1 = b"Exif\x00\x00" + exif.tobytes()
    seg = b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1
    extra = b"\xff\xe1" + struct.pack(">H", 8 + 2) + b"Exif\x00\x00" + b"\x00" * 4
    data = plain[:2] + seg + extra + b"\xff\xff\xff" + plain[2:]
    assert (both(data).width, both(data).height) == pillow_size(data) == SIZE[::-1]


def test_header_read_without_decoding_pixels():
    """Garbage after the JPEG scan header or inside PNG image data: the size still reads,
    because pixels are never decoded (Pillow itself fails on these at load time)."""
    jpeg = encode("JPEG", 6)
    sos = jpeg.index(b"\xff\xda")
    garbage = os.urandom(500)
    h = both(jpeg[: sos + 14] + garbage)
    assert (h.width, h.height) == SIZE[::-1]
    chunks = png_chunks(encode("PNG", 8))
    data = build_png([(c, os.urandom(len(d)) if c == b"IDAT" else d) for c, d in chunks])
    assert (both(data).width, both(data).height) == SIZE[::-1]


def test_decompression_bomb_rejected_from_header():
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = build_png([(b"IHDR", ihdr), (b"IDAT", zlib.compress(b"")), (b"IEND", b"")])
    assert read_header(data)[:2] == (100_000, 100_000)  # no limit asked: the header's word
    h = read_header(data, max_pixels=default_max_pixels())
    assert h.reason == "too_many_pixels" and "100000x100000" in h.detail
    assert read_header(encode("PNG"), max_pixels=SIZE[0] * SIZE[1] - 1).reason == "too_many_pixels"
    assert read_header(encode("PNG"), max_pixels=SIZE[0] * SIZE[1]).ok


def test_file_system_failures(tmp_path):
    h = read_header(tmp_path / "nope.jpg")
    assert h.reason == "missing_file" and h.io_error
    assert read_header(tmp_path).reason == "unreadable"  # a folder
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    assert read_header(fifo).reason == "unreadable"  # and it did not hang
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert read_header(empty).reason == "empty_file" and not read_header(empty).io_error
    if os.geteuid() != 0:  # root reads everything
        locked = tmp_path / "locked.jpg"
        locked.write_bytes(encode("JPEG"))
        locked.chmod(0)
        assert read_header(locked).reason == "unreadable" and read_header(locked).io_error


# --------------------------------------------------------------------------- hostile bytes


VALID = [encode(f, o) for f in ("JPEG", "PNG", "WEBP", "TIFF", "GIF", "BMP") for o in (None, 6)]
SIGNATURES = [b"\xff\xd8\xff", PngImagePlugin._MAGIC, b"GIF89a", b"RIFF\0\0\0\0WEBPVP8 ", b"II*\0"]


def check_never_raises(data: bytes) -> Header:
    h = read_header(data, max_pixels=default_max_pixels())
    assert isinstance(h, Header)
    if h.ok:
        assert h.width > 0 and h.height > 0 and h.reason is None
    else:
        assert h.reason in REASONS and h.detail and (h.width, h.height) == (0, 0)
    return h


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=300),
        st.tuples(st.sampled_from(SIGNATURES), st.binary(max_size=300)).map(lambda t: b"".join(t)),
    )
)
def test_random_bytes_never_raise(data):
    check_never_raises(data)


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(range(len(VALID))), st.floats(0, 1), st.binary(max_size=8))
@example(which=8, cut=0.3203125, tail=b"\x00\x00\x01\x00\x00")  # a GIF cut in its header
def test_truncated_and_corrupted_files(which, cut, tail):
    """A valid file cut anywhere (metadata precedes pixel data) either still gives the
    full file's oriented size, or a rejection, never an exception. When the cut lands inside
    the header, the appended bytes make another file (a GIF frame descriptor of another
    size, say): then the size read is Pillow's for that file, or, where Pillow cannot open
    it, loading it fails cleanly at training time (the documented header-only contract)."""
    full = VALID[which]
    data = full[: int(len(full) * cut)] + tail
    h = check_never_raises(data)
    if not h.ok or (h.width, h.height) == pillow_size(full):
        return
    try:
        seen = pillow_size(data)
    except (OSError, ValueError, SyntaxError):
        with pytest.raises(ImageDecodeError):
            load_image(data)
    else:
        assert (h.width, h.height) == seen


def test_random_bytes_in_files(tmp_path):
    rng = __import__("random").Random(0)
    for i in range(30):
        path = tmp_path / f"junk{i}.jpg"
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
        assert read_header(path).reason in {"not_an_image", "unreadable"}
