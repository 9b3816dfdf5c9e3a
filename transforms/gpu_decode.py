"""The GPU decode path: workers hand over a JPEG's bytes and its fit parameters; the main
process decodes the whole batch on the device and fits it there.

DataLoader workers do what the CPU path does up to the pixels: read the file, its EXIF
orientation and oriented size from the header, and draw the same :class:`FitParams` from the
same per-sample generator (``BucketResizeCrop.make_params``), so a batch has the same
geometry on either path, with any worker count, after any resume. The main process then
decodes the batch with ``torchvision.io.decode_jpeg(list, device=...)`` (nvJPEG on CUDA),
orients, resizes (antialiased), crops, flips and normalises on the device:
:func:`decode_batch` returns what ``to_model_input`` returns, pixels in [-1, 1] in the
model's dtype on the device.

Files the device decoder does not take — anything but a baseline or extended-sequential
JPEG with 1 or 3 components (PNG, CMYK/YCCK, Adobe-transformed, progressive, lossless or
arithmetic-coded JPEGs) and a JPEG without its end-of-image marker (truncated) — are decoded
and fitted on the CPU in the worker, exactly as the CPU path does (and a file that fails
there is substituted by the dataset like any failed decode). A JPEG that still fails on the
device is decoded on the CPU in the main process; one that fails there too is replaced by
another sample of its batch (``substituted=True``, a :class:`DecodeFallbackWarning`).

    dataset = TextToImageDataset(index, assignment, image_transform=EncodedFit(BucketResizeCrop()))
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_encoded, num_workers=8)
    for batch in loader:
        inputs = decode_batch(batch, "cuda", torch.bfloat16)
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from bucketing.headers import SWAPS_AXES, orientation_code
from transforms.collate import collate, to_model_input
from transforms.image import (
    DEFAULT_DECODE,
    ORIGINAL_SIZE_KEY,
    DecodeSettings,
    ImageDecodeError,
    _exif_orientation,
    check_size,
    decode_bytes,
    decode_image,
    describe_source,
)
from transforms.resize_crop import BucketResizeCrop, FitParams, sample_fields

# Start-of-frame markers nvJPEG decodes: baseline and extended sequential, Huffman-coded.
DEVICE_SOF = frozenset({0xC0, 0xC1})
_OTHER_SOF = frozenset({0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_ADOBE = 0xEE  # APP14 "Adobe": RGB-stored or YCCK/CMYK colour transforms
_FILTERS = {"bicubic": F.InterpolationMode.BICUBIC, "bilinear": F.InterpolationMode.BILINEAR}
_NO_PIXELS = torch.empty(0, dtype=torch.uint8)  # lets collate batch the other keys


class DecodeFallbackWarning(UserWarning):
    """A JPEG failed on the device and on the CPU in the main process: another sample of its
    batch was used instead (``substituted=True``)."""


@dataclass(frozen=True)
class JpegSource:
    """A JPEG read by a worker but not decoded: its bytes (uint8, 1-D), EXIF
    ``orientation`` (1-8) and full oriented ``size`` (w, h)."""

    data: torch.Tensor
    orientation: int
    size: tuple[int, int]
    name: str

    @property
    def info(self) -> dict[str, tuple[int, int]]:
        """The oriented (h, w) under ``original_size``, as ``load_image`` records it."""
        return {ORIGINAL_SIZE_KEY: (self.size[1], self.size[0])}


@dataclass(frozen=True)
class EncodedImage:
    """One sample's pixels as a worker hands them over: ``data`` (the JPEG's bytes) to decode
    on the device with ``orientation`` and ``fit`` applied there, or ``pixels`` (uint8
    (3, h, w)) already fitted on the CPU for a file the device cannot decode."""

    fit: FitParams
    name: str
    orientation: int = 1
    data: torch.Tensor | None = None
    pixels: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """(3, h, w) of the bucket: the shape of the pixels this will become."""
        bw, bh = self.fit.bucket
        return (3, bh, bw)


def device_decodable(data: bytes | bytearray | memoryview) -> bool:
    """Whether nvJPEG can decode ``data``: a complete baseline or extended-sequential JPEG
    (Huffman) with 1 or 3 components and no Adobe colour transform."""
    view = memoryview(data)
    if bytes(view[:3]) != b"\xff\xd8\xff" or bytes(view[-2:]) != b"\xff\xd9":
        return False
    pos = 2
    while pos + 4 <= len(view):
        if view[pos] != 0xFF:
            return False
        marker = view[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(view[pos + 2 : pos + 4], "big")
        if marker == _ADOBE and bytes(view[pos + 4 : pos + 9]) == b"Adobe":
            return False
        if marker in DEVICE_SOF:
            return pos + 9 < len(view) and view[pos + 9] in (1, 3)
        if marker in _OTHER_SOF or marker == 0xDA:  # another frame type, or scan before frame
            return False
        pos += 2 + length
    return False


def read_encoded(
    source: str | os.PathLike | bytes,
    settings: DecodeSettings = DEFAULT_DECODE,
    *,
    bucket_wh: Sequence[int] | None = None,
    expected_size: Sequence[int] | None = None,
) -> JpegSource | Image.Image:
    """A worker's read: the JPEG's bytes, orientation and oriented size when the device can
    decode it within ``settings``' limits, else the CPU path's
    :func:`~transforms.image.decode_image` (same arguments, same errors)."""
    data = _read_regular(source)
    header = None if data is None or not device_decodable(data) else _jpeg_header(data)
    if header is None or _over_limits(header, settings):
        return decode_image(source, settings, bucket_wh=bucket_wh, expected_size=expected_size)
    width, height, orientation, _ = header
    size = (height, width) if orientation in SWAPS_AXES else (width, height)
    check_size(describe_source(source), size[::-1], expected_size)
    tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return JpegSource(tensor, orientation, size, describe_source(source))


def _over_limits(header: tuple[int, int, int, str], settings: DecodeSettings) -> bool:
    """Whether ``load_image`` would refuse this image before decoding (it then says why)."""
    width, height, _, mode = header
    if settings.max_pixels is not None and width * height > settings.max_pixels:
        return True
    limit = settings.max_decode_bytes
    return limit is not None and decode_bytes(mode, (width, height)) > limit


def _read_regular(source: str | os.PathLike | bytes) -> bytes | None:
    """The bytes of ``source``; None for anything odd (``load_image`` then says what)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    try:
        if not stat.S_ISREG(os.stat(source).st_mode):
            return None
        with open(source, "rb") as f:
            return f.read()
    except OSError:
        return None


def _jpeg_header(data: bytes) -> tuple[int, int, int, str] | None:
    """(width, height, EXIF orientation, Pillow mode) as stored, read without decoding."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            orientation = orientation_code(_exif_orientation(img))
            mode = img.mode
    except Exception:  # Pillow refuses the header: the CPU path reports why
        return None
    return (width, height, orientation, mode) if width > 0 and height > 0 else None


class EncodedFit:
    """The image transform of the GPU path: ``transform(sample) -> sample``.

    Draws the same :class:`FitParams` as ``fit`` (a ``BucketResizeCrop``) from the same
    generator and adds ``encoded`` (an :class:`EncodedImage`) instead of ``pixel_values``,
    plus the params' sample fields (``fit``, ``original_size``, ``crop_top_left``,
    ``target_size``, ``flipped``). ``TextToImageDataset`` reads files with the transform's
    :meth:`read` (:func:`read_encoded`) instead of decoding them; a file it could not hand
    over as a JPEG arrives decoded and is fitted here on
    the CPU (``encoded.pixels``) with ``fit``'s filter; on the device the filter is
    :func:`decode_batch`'s ``resample`` (antialiased bicubic by default).
    """

    def __init__(self, fit: BucketResizeCrop | None = None) -> None:
        self.fit = BucketResizeCrop() if fit is None else fit
        self.allow_upscale = self.fit.allow_upscale

    read = staticmethod(read_encoded)

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        """``sample`` (with ``image``, ``bucket``, ``rng``) plus ``encoded`` and the fit fields."""
        image = sample["image"]
        if not isinstance(image, JpegSource):
            out = self.fit(sample)
            pixels = out.pop("pixel_values")
            out["encoded"] = EncodedImage(out["fit"], "(decoded in the worker)", pixels=pixels)
            return out
        params = self.fit.make_params(image.size, sample["bucket"], sample["rng"])
        fields = sample_fields(params, _NO_PIXELS, image.size)
        del fields["pixel_values"]
        encoded = EncodedImage(params, image.name, image.orientation, data=image.data)
        return {**sample, **fields, "encoded": encoded}

    def __repr__(self) -> str:
        return f"EncodedFit({self.fit!r})"


def collate_encoded(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``collate`` for :class:`EncodedFit` samples: ``encoded`` stays a list of
    :class:`EncodedImage` (one per sample), every other key is batched as ``collate`` does.
    Samples marked ``dropped`` leave the batch as in ``collate`` (``dropped`` [D] names them;
    all dropped: an empty batch whose ``pixel_values`` [0, 3, H, W] ``decode_batch`` passes
    through)."""
    dropped = [s for s in samples if s.get("dropped")]
    if dropped:
        kept = [s for s in samples if not s.get("dropped")]
        batch = collate_encoded(kept) if kept else collate(dropped)
        if kept:
            batch["dropped"] = collate(dropped)["dropped"]
        else:
            batch["encoded"] = []
        return batch
    missing = [i for i, s in enumerate(samples) if "encoded" not in s]
    if missing:
        raise ValueError(
            f"collate_encoded: samples at {missing} have no 'encoded' (use "
            "image_transform=EncodedFit(...), or collate for pixel samples)"
        )
    rest = [
        {**{k: v for k, v in s.items() if k != "encoded"}, "pixel_values": _NO_PIXELS}
        for s in samples
    ]
    batch = collate(rest)
    del batch["pixel_values"]
    batch["encoded"] = [s["encoded"] for s in samples]
    return batch


def decode_batch(
    batch: Mapping[str, Any],
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    *,
    resample: str = "bicubic",
) -> dict[str, Any]:
    """The model input of a :func:`collate_encoded` batch, decoded and fitted on ``device``:
    ``pixel_values`` [B, 3, H, W] in [-1, 1] in ``dtype`` (the values the CPU path's uint8
    pixels give, within resampling differences), every other tensor moved as
    ``to_model_input`` does. ``resample``: ``"bicubic"`` or ``"bilinear"`` (antialiased)."""
    if resample not in _FILTERS:
        raise ValueError(
            f"resample must be one of {tuple(_FILTERS)} on the device, got {resample!r}"
        )
    encoded: list[EncodedImage] = list(batch["encoded"])
    if not encoded and "dropped" in batch:  # every sample left it: an empty batch
        return to_model_input({k: v for k, v in batch.items() if k != "encoded"}, device, dtype)
    if not encoded:
        raise ValueError("decode_batch got an empty batch")
    decoded = _decode_all(encoded, torch.device(device))
    pixels: list[torch.Tensor | None] = [
        None if img is None else _fit_on_device(img, enc, _FILTERS[resample])
        for img, enc in zip(decoded, encoded, strict=True)
    ]
    rest = {k: v for k, v in batch.items() if k != "encoded"}
    out = to_model_input(rest, device, dtype)
    _substitute_failed(out, pixels, encoded, device)
    stacked = torch.stack(pixels)  # type: ignore[arg-type]  # None replaced above
    out["pixel_values"] = stacked.div_(127.5).sub_(1.0).to(dtype)
    return out


def _decode_all(encoded: Sequence[EncodedImage], device: torch.device) -> list[torch.Tensor | None]:
    """Each sample's uint8 (3, H, W) picture on ``device`` as stored (not oriented), or its
    CPU-fitted pixels; None where every decoder failed. One batched call first; on its
    failure each file alone on the device, then on the CPU."""
    out: list[torch.Tensor | None] = [
        None if e.pixels is None else e.pixels.to(device, non_blocking=True) for e in encoded
    ]
    todo = [k for k, e in enumerate(encoded) if e.data is not None]
    if not todo:
        return out
    try:
        images = _decode([encoded[k].data for k in todo], device)  # type: ignore[misc]
    except RuntimeError:
        images = [_decode_one(encoded[k], device) for k in todo]
    for k, img in zip(todo, images, strict=True):
        out[k] = img
    return out


def _decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def _decode_one(encoded: EncodedImage, device: torch.device) -> torch.Tensor | None:
    for where in (device, torch.device("cpu")):
        try:
            return _decode([encoded.data], where)[0].to(device)  # type: ignore[list-item]
        except RuntimeError:
            continue
    return None


# Each EXIF orientation as operations on a (C, H, W) tensor, equal to Pillow's transposes.
def _orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    if orientation in (2, 3):
        img = img.flip(-1)
    if orientation in (3, 4):
        img = img.flip(-2)
    if orientation == 5:
        img = img.transpose(-1, -2)
    if orientation == 6:
        img = img.transpose(-1, -2).flip(-1)
    if orientation == 7:
        img = img.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:
        img = img.transpose(-1, -2).flip(-2)
    return img


def _fit_on_device(
    img: torch.Tensor, encoded: EncodedImage, mode: F.InterpolationMode
) -> torch.Tensor:
    """Float32 (3, h, w) in [0, 255], rounded like the CPU path's uint8 pixels. The decoded
    picture is resized as uint8 (rounded and clamped by the resize) and only the bucket's
    crop becomes float32: no full-size float copy of the decoded image."""
    if encoded.data is None:  # fitted on the CPU already
        return img.to(torch.float32)
    params = encoded.fit
    pixels = _orient(img, encoded.orientation)
    (rw, rh), (y, x, h, w) = params.resized, params.crop
    if tuple(pixels.shape[-2:]) != (rh, rw):
        pixels = F.resize(pixels, [rh, rw], interpolation=mode, antialias=True)
    pixels = pixels[:, y : y + h, x : x + w].to(torch.float32)
    return pixels.flip(-1) if params.flip else pixels


def _substitute_failed(
    out: dict[str, Any], pixels: list[torch.Tensor | None], encoded: list[EncodedImage], device: Any
) -> None:
    """Replace each failed sample by the next one of the batch that decoded: its pixels and
    every per-sample field but ``original_index``; ``substituted`` set. Raises
    :class:`ImageDecodeError` when none decoded."""
    failed = [k for k, p in enumerate(pixels) if p is None]
    if not failed:
        return
    size = len(pixels)
    if len(failed) == size:
        names = ", ".join(e.name for e in encoded)
        raise ImageDecodeError(names, f"no image of this batch decoded on {device} or the CPU")
    per_sample = {
        key: value.clone() if isinstance(value, torch.Tensor) else list(value)
        for key, value in out.items()
        if isinstance(value, (torch.Tensor, list)) and len(value) == size
        and key != "original_index"
    }  # fmt: skip
    out.update(per_sample)
    for k in failed:
        j = next(j % size for j in range(k + 1, k + size) if pixels[j % size] is not None)
        pixels[k] = pixels[j]
        for value in per_sample.values():
            value[k] = value[j]
        if "substituted" in per_sample:
            per_sample["substituted"][k] = True
        warnings.warn(
            f"could not decode {encoded[k].name} on {device} or on the CPU; sample {k} of the "
            f"batch is replaced by sample {j} (substituted=True)",
            DecodeFallbackWarning,
            stacklevel=3,
        )
