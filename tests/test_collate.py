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


def test_unknown_keys_are_kept_stacked_or_listed():
    samples = [_sample(i) for i in range(3)]
    for i, s in enumerate(samples):
        s["input_ids_one"] = torch.full((77,), i)  # an SDXL model transform's ids
        s["tokens"] = list(range(i + 1))  # torchtune's ragged token lists
        s["ragged"] = torch.zeros(i + 1)
        s["fit"] = ("params", i)
    batch = collate(samples)
    assert batch["input_ids_one"].shape == (3, 77) and batch["input_ids_one"][2, 0] == 2
    assert batch["tokens"] == [[0], [0, 1], [0, 1, 2]]
    assert [t.shape[0] for t in batch["ragged"]] == [1, 2, 3]
    assert batch["fit"] == [("params", 0), ("params", 1), ("params", 2)]


def test_torchtune_keyword_arguments_are_accepted_and_change_nothing():
    samples = [_sample(i) for i in range(2)]
    plain, tuned = collate(samples), collate(samples, padding_idx=0, ignore_idx=-100)
    assert plain.keys() == tuned.keys()
    assert all(torch.equal(plain[k], tuned[k]) if torch.is_tensor(plain[k]) else
               plain[k] == tuned[k] for k in plain)  # fmt: skip
    with pytest.raises(TypeError):
        collate(samples, pad_to=8)  # other keywords are still typos


def _cached(i: int, length: int) -> dict:
    return {
        "latents": torch.full((16, 2, 3), float(i)),
        "prompt_embeds": torch.full((length, 4), float(i + 1)),
        "pooled_prompt_embeds": torch.full((8,), float(i)),
        "t5_attention_mask": torch.ones(length, dtype=torch.int64),
        "text_length": length,
        "original_size": (8, 12), "crop_top_left": (0, 0), "target_size": (16, 24),
        "caption": f"c{i}", "index": i, "substituted": False,
    }


def test_trimmed_embeddings_are_padded_with_a_mask():
    batch = collate([_cached(0, 3), _cached(1, 5), _cached(2, 1)])
    assert "pixel_values" not in batch
    assert batch["latents"].shape == (3, 16, 2, 3)
    assert batch["pooled_prompt_embeds"].shape == (3, 8)
    pe, mask = batch["prompt_embeds"], batch["t5_attention_mask"]
    assert pe.shape == (3, 5, 4) and mask.shape == (3, 5)
    assert mask.sum(1).tolist() == [3, 5, 1] == batch["text_length"].tolist()
    assert torch.equal(pe[0, :3], torch.ones(3, 4)) and pe[0, 3:].abs().sum() == 0
    assert pe[2, 0, 0] == 3 and pe[2, 1:].abs().sum() == 0
    # full-length embeddings keep their own mask and length
    full = [_cached(0, 5), _cached(1, 5)]
    full[0]["t5_attention_mask"] = torch.tensor([1, 1, 0, 0, 0])
    assert collate(full)["t5_attention_mask"].sum(1).tolist() == [2, 5]
    bad = _cached(1, 4)
    bad["prompt_embeds"] = torch.zeros(4, 6)
    with pytest.raises(ValueError, match="prompt_embeds"):
        collate([_cached(0, 3), bad])
