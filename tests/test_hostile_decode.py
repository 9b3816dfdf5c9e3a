"""``decode_batch`` fits each decoded picture without a full-size float32 copy: the resize
runs on uint8 and only the bucket's crop becomes float (checked on the CPU device by
recording every float tensor torch creates)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from bucketing import BucketLadder, TextToImageDataset, assign, scan
from transforms.gpu_decode import EncodedFit, collate_encoded, decode_batch
from transforms.resize_crop import BucketResizeCrop


class _FloatSizes(TorchDispatchMode):
    """The element counts of every floating-point tensor an operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.sizes.append(t.numel())
        return out


def test_decode_batch_makes_no_full_size_float_copy(tmp_path):
    rng = np.random.default_rng(0)
    w, h = 1024, 768  # four times the bucket's side: resized down before any float
    for k in range(2):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
        (tmp_path / f"{k}.jpg").write_bytes(buf.getvalue())
    index = scan(tmp_path, workers=0)
    assignment = assign(index, BucketLadder.from_buckets([(256, 192)], multiple=16))
    fit = BucketResizeCrop()
    ds = TextToImageDataset(index, assignment, image_transform=EncodedFit(fit), draft=False)
    batch = collate_encoded([ds[0], ds[1]])
    with _FloatSizes() as seen:
        out = decode_batch(batch, "cpu", torch.float32)
    assert out["pixel_values"].shape == (2, 3, 192, 256)
    assert seen.sizes and max(seen.sizes) < 3 * w * h // 4  # the crops, never a whole image
    pixels = TextToImageDataset(index, assignment, image_transform=fit, draft=False)[0]
    expected = pixels["pixel_values"].to(torch.float32) / 127.5 - 1
    assert float((out["pixel_values"][0] - expected).abs().mean()) * 127.5 < 1.0
