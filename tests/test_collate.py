"""collate and to_model_input: dtypes, shapes, clear errors on mixed buckets, [-1, 1] pixels."""

from __future__ import annotations

import pytest
import torch

from transforms.collate import collate, to_model_input


def _sample(i: int, h: int = 4, w: int = 6, with_tokens: bool = True) -> dict:
    s = {
        "pixel_values": torch.full((3, h, w), i, dtype=torch.uint8),
        "original_size": (h * 2, w * 2),
        "crop_top_left": (0, i),
        "target_size": (h, w),
        "flipped": bool(i % 2),
        "caption": f"caption {i}",
        "index": 10 + i,
        "original_index": 20 + i,
        "substituted": i == 1,
    }
    if with_tokens:
        s["clip_input_ids"] = torch.arange(77, dtype=torch.int64) + i
        s["t5_input_ids"] = torch.arange(16, dtype=torch.int64)
        s["t5_attention_mask"] = torch.ones(16, dtype=torch.int64)
    return s


def test_collate_stacks_one_bucket():
    batch = collate([_sample(i) for i in range(3)])
    pv = batch["pixel_values"]
    assert pv.shape == (3, 3, 4, 6) and pv.dtype == torch.uint8 and pv.is_contiguous()
    assert pv[2].unique().tolist() == [2]
    for key in ("original_size", "crop_top_left", "target_size"):
        assert batch[key].shape == (3, 2) and batch[key].dtype == torch.int64
    assert batch["crop_top_left"][:, 1].tolist() == [0, 1, 2]
    assert batch["clip_input_ids"].shape == (3, 77) and batch["clip_input_ids"][1, 0] == 1
    assert batch["t5_input_ids"].shape == batch["t5_attention_mask"].shape == (3, 16)
    assert batch["index"].tolist() == [10, 11, 12] and batch["index"].dtype == torch.int64
    assert batch["original_index"].tolist() == [20, 21, 22]
    assert batch["substituted"].tolist() == [False, True, False]
    assert batch["substituted"].dtype == torch.bool
    assert batch["captions"] == ["caption 0", "caption 1", "caption 2"]


def test_collate_without_tokens_has_no_token_keys():
    batch = collate([_sample(i, with_tokens=False) for i in range(2)])
    assert "clip_input_ids" not in batch and "t5_input_ids" not in batch


def test_mixed_shapes_name_the_shapes_and_indices():
    samples = [_sample(0), _sample(1, h=8), _sample(2)]
    with pytest.raises(ValueError) as info:
        collate(samples)
    msg = str(info.value)
    assert "[3, 4, 6] at index 10, index 12" in msg and "[3, 8, 6] at index 11" in msg
    assert "BucketBatchSampler" in msg


def test_mixed_token_lengths_and_empty_batches_are_errors():
    a, b = _sample(0), _sample(1)
    b["t5_input_ids"] = torch.arange(8)
    with pytest.raises(ValueError, match="t5_input_ids"):
        collate([a, b])
    with pytest.raises(ValueError, match="empty"):
        collate([])
    c = _sample(2)
    c["pixel_values"] = c["pixel_values"].float()
    with pytest.raises(ValueError, match="uint8"):
        collate([_sample(0), c])


def test_to_model_input_normalises_on_the_device():
    batch = collate([_sample(0), _sample(1)])
    batch["pixel_values"][0, 0, 0, 0] = 255
    batch["pixel_values"][0, 0, 0, 1] = 128
    out = to_model_input(batch, "cpu", dtype=torch.float32)
    pv = out["pixel_values"]
    assert pv.dtype == torch.float32 and pv.shape == batch["pixel_values"].shape
    assert pv[0, 0, 0, 0] == 1.0 and pv[0, 1, 0, 0] == -1.0
    assert abs(pv[0, 0, 0, 1].item() - (128 / 127.5 - 1)) < 1e-6
    assert out["captions"] == batch["captions"]
    assert torch.equal(out["clip_input_ids"], batch["clip_input_ids"])
    assert batch["pixel_values"].dtype == torch.uint8  # the batch itself is left alone
    bf16 = to_model_input(batch, torch.device("cpu"))["pixel_values"]
    assert bf16.dtype == torch.bfloat16 and bf16.min() >= -1 and bf16.max() <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_model_input_on_cuda_from_pinned_memory():
    batch = collate([_sample(0), _sample(1)])
    batch["pixel_values"] = batch["pixel_values"].pin_memory()
    out = to_model_input(batch, "cuda")
    assert out["pixel_values"].is_cuda and out["pixel_values"].dtype == torch.bfloat16
    assert out["index"].is_cuda
