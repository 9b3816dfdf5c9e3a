"""The GPU decode path, run on the CPU (``device="cpu"``: torchvision decodes JPEG batches
there too): the same geometry as the CPU path for every sample, pixels within resampling
differences, the worker fallbacks (PNG, CMYK, progressive, truncated), main-process failures
substituted, through a real 2-worker DataLoader; two torchrun ranks with a resume. The CUDA
comparison skips without a GPU."""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_sampler_distributed import torchrun  # the sampler tests' torchrun runner
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_jpeg

from bucketing import BucketLadder, TextToImageDataset, assign, scan
from samplers import BucketBatchSampler
from transforms.collate import collate, to_model_input
from transforms.gpu_decode import (
    DecodeFallbackWarning,
    EncodedFit,
    JpegSource,
    collate_encoded,
    decode_batch,
    device_decodable,
)
from transforms.image import ORIGINAL_SIZE_KEY, DecodeSettings, ImageDecodeError, load_image
from transforms.resize_crop import BucketResizeCrop

FALLBACKS = ("png", "cmyk", "progressive", "truncated")


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, exif_dir: Path) -> Path:
    """The EXIF orientation set at half its size (every orientation 0..8 kept), plus
    a grayscale JPEG and the files the device path leaves to the CPU, all of one size."""
    folder = tmp_path_factory.mktemp("gpu_corpus")
    for path in sorted(exif_dir.glob("Landscape_*.jpg")):
        with Image.open(path) as img:
            small = img.resize((img.width // 2, img.height // 2), Image.Resampling.BILINEAR)
            exif = img.info.get("exif", b"")
        (folder / path.name).write_bytes(_jpeg(small, exif=exif))
    with Image.open(folder / "Landscape_1.jpg") as img:
        base = img.convert("RGB")
    base.save(folder / "png.png")
    (folder / "gray.jpg").write_bytes(_jpeg(base.convert("L")))
    (folder / "cmyk.jpg").write_bytes(_jpeg(base.convert("CMYK")))
    (folder / "progressive.jpg").write_bytes(_jpeg(base, progressive=True))
    whole = _jpeg(base)
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    return folder


@pytest.fixture(scope="module")
def datasets(corpus: Path) -> tuple[TextToImageDataset, TextToImageDataset, BucketBatchSampler]:
    index = scan(corpus)
    assignment = assign(index, BucketLadder.for_model("flux"))
    assert int(assignment.accepted.sum()) == len(index) == 14
    fit = BucketResizeCrop(crop="random", flip_p=0.5)
    cpu = TextToImageDataset(index, assignment, image_transform=fit, seed=5)
    gpu = TextToImageDataset(index, assignment, image_transform=EncodedFit(fit), seed=5)
    return cpu, gpu, BucketBatchSampler(assignment, batch_size=4, seed=1)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two [-1, 1] tensors, on the 8-bit scale."""
    mse = float(((a - b) * 127.5).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


@pytest.mark.filterwarnings("ignore::UserWarning")  # the truncated file's substitution
def test_same_batches_as_the_cpu_path_through_two_workers(datasets) -> None:
    cpu, gpu, sampler = datasets
    cpu_batches = list(DataLoader(cpu, batch_sampler=sampler, collate_fn=collate))
    loader = DataLoader(gpu, batch_sampler=sampler, collate_fn=collate_encoded, num_workers=2)
    seen = 0
    for ours, theirs in zip(loader, cpu_batches, strict=True):
        for key in ("index", "original_index", "substituted", "flipped"):
            assert torch.equal(ours[key], theirs[key]), key
        for key in ("original_size", "crop_top_left", "target_size"):
            assert torch.equal(ours[key], theirs[key]), key
        for row, encoded in zip(ours["original_index"].tolist(), ours["encoded"], strict=True):
            assert encoded.fit == cpu[row]["fit"]  # the same draws: bucket, crop box, flip
        expected = to_model_input(theirs, "cpu", torch.float32)
        got = decode_batch(ours, "cpu", torch.float32)
        assert got["pixel_values"].dtype == torch.float32
        assert got["pixel_values"].shape == expected["pixel_values"].shape
        assert got["pixel_values"].abs().max() <= 1.0
        for a, b in zip(got["pixel_values"], expected["pixel_values"], strict=True):
            assert _psnr(a, b) > 40
            assert float((a - b).abs().mean()) * 127.5 < 0.5
        assert got["captions"] == theirs["captions"]
        seen += len(ours["encoded"])
    assert seen == sum(len(b) for b in sampler) >= len(gpu)


def test_worker_hands_over_jpegs_and_decodes_the_rest(datasets) -> None:
    _, gpu, _ = datasets
    kinds = {}
    for row, path in enumerate(gpu.index.paths):
        stem = Path(path).stem
        if stem == "truncated":
            continue
        encoded = gpu[row]["encoded"]
        kinds[stem] = "device" if encoded.data is not None else "cpu"
        if encoded.data is not None and stem.startswith("Landscape_"):
            code = int(stem.split("_")[1])
            assert encoded.orientation == (code if code else 1)
    assert {k for k, v in kinds.items() if v == "cpu"} == {"png", "cmyk", "progressive"}
    assert kinds["gray"] == "device"


@pytest.mark.parametrize("kind", ["baseline", "gray", *FALLBACKS, "trailing"])
def test_device_decodable(kind: str) -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))
    data = {
        "baseline": lambda: _jpeg(img),
        "gray": lambda: _jpeg(img.convert("L")),
        "png": lambda: (img.save(buf := io.BytesIO(), "PNG"), buf.getvalue())[1],
        "cmyk": lambda: _jpeg(img.convert("CMYK")),
        "progressive": lambda: _jpeg(img, progressive=True),
        "truncated": lambda: _jpeg(img)[:-40],
        "trailing": lambda: _jpeg(img) + b"\x00" * 8,  # junk after the end marker
    }[kind]()
    assert device_decodable(data) == (kind in ("baseline", "gray"))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_main_process_failure_is_substituted_from_the_batch(datasets) -> None:
    _, gpu, _ = datasets
    rows = [r for r, p in enumerate(gpu.index.paths) if Path(p).stem.startswith("Landscape_")]
    samples = [gpu[r] for r in rows[:3]]
    good = samples[0]["encoded"].data.numpy().tobytes()
    no_scan = good[: good.index(b"\xff\xda")] + b"\xff\xd9"  # a frame but no image data
    assert device_decodable(no_scan)
    broken = torch.frombuffer(bytearray(no_scan), dtype=torch.uint8)
    samples[1]["encoded"] = dataclasses.replace(samples[1]["encoded"], data=broken)
    batch = collate_encoded(samples)
    with pytest.warns(DecodeFallbackWarning, match="replaced by sample 2"):
        out = decode_batch(batch, "cpu", torch.float32)
    assert out["substituted"].tolist() == [False, True, False]
    assert out["original_index"].tolist() == rows[:3]
    assert out["index"].tolist() == [rows[0], rows[2], rows[2]]
    assert torch.equal(out["pixel_values"][1], out["pixel_values"][2])
    assert out["crop_top_left"][1].tolist() == out["crop_top_left"][2].tolist()
    assert batch["index"].tolist() == rows[:3]  # the batch itself is left as it was

    for sample in samples:
        sample["encoded"] = dataclasses.replace(sample["encoded"], data=broken, pixels=None)
    with pytest.raises(ImageDecodeError, match="no image of this batch decoded"):
        decode_batch(collate_encoded(samples), "cpu", torch.float32)


def test_collate_encoded_refuses_pixel_samples(datasets) -> None:
    cpu, _, _ = datasets
    with pytest.raises(ValueError, match="EncodedFit"):
        collate_encoded([cpu[0]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_equal_the_cpu_run_of_the_same_code(datasets) -> None:
    _, gpu, sampler = datasets
    for indices in sampler:
        batch = collate_encoded([gpu[i] for i in indices])
        on_cuda = decode_batch(batch, "cuda", torch.float32)
        on_cpu = decode_batch(batch, "cpu", torch.float32)
        assert on_cuda["pixel_values"].device.type == "cuda"
        for a, b in zip(on_cuda["pixel_values"].cpu(), on_cpu["pixel_values"], strict=True):
            assert _psnr(a, b) > 40


@pytest.mark.slow
def test_two_ddp_ranks_decode_their_own_share_and_resume(corpus: Path, tmp_path: Path) -> None:
    script = Path(__file__).parent / "distributed" / "gpu_decode_ddp.py"
    torchrun(2, str(corpus), str(tmp_path), script=script)
    assert sorted(p.name for p in tmp_path.glob("ok_*")) == ["ok_0", "ok_1"]


@pytest.mark.parametrize(
    ("limit", "reason"),
    [({"max_pixels": 100}, "too_many_pixels"), ({"max_decode_bytes": 1000}, "too_many_bytes")],
)
def test_worker_read_refuses_what_load_image_refuses(limit: dict, reason: str) -> None:
    img = Image.fromarray(np.zeros((32, 48, 3), dtype=np.uint8))
    data = _jpeg(img)
    handed_over = EncodedFit.read(data)  # within the default limits: bytes for the device
    assert isinstance(handed_over, JpegSource) and handed_over.size == (48, 32)
    with pytest.raises(ImageDecodeError, match=reason):
        EncodedFit.read(data, DecodeSettings(**limit))


@pytest.mark.filterwarnings("ignore")  # Pillow's warnings about the odd files themselves
def test_every_odd_file_is_handed_over_or_read_exactly_as_load_image_reads_it(
    odd_dir: Path,
) -> None:
    handed = 0
    for path in sorted(p for p in odd_dir.iterdir() if p.name != "expected.json"):
        try:
            expected = load_image(path).info[ORIGINAL_SIZE_KEY]
        except ImageDecodeError as error:
            expected = error.reason
        try:
            got = EncodedFit.read(path)
        except ImageDecodeError as error:
            assert error.reason == expected, path.name
            continue
        assert got.info[ORIGINAL_SIZE_KEY] == expected, path.name
        if isinstance(got, JpegSource):  # the device must be able to decode what it gets
            handed += 1
            pixels = decode_jpeg(got.data, mode=ImageReadMode.RGB)
            stored = got.size[::-1] if got.orientation in (5, 6, 7, 8) else got.size
            assert tuple(pixels.shape) == (3, stored[1], stored[0]), path.name
    assert handed >= 10  # the plain JPEGs among them


def test_decode_batch_refuses_a_filter_the_device_lacks(datasets) -> None:
    _, gpu, _ = datasets
    batch = collate_encoded([gpu[0]])
    with pytest.raises(ValueError, match="resample"):
        decode_batch(batch, "cpu", resample="lanczos")
    bilinear = decode_batch(batch, "cpu", torch.float32, resample="bilinear")["pixel_values"]
    bicubic = decode_batch(batch, "cpu", torch.float32)["pixel_values"]
    assert bilinear.shape == bicubic.shape and not torch.equal(bilinear, bicubic)
