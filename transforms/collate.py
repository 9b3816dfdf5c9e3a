"""Stack one bucket's samples into a batch, and move a batch to the model's device.

Pixels stay uint8 until they are on the device: a quarter of the bytes of float32 to pin
and copy. ``to_model_input`` then normalises them to [-1, 1] in the model's dtype there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

_PAIRS = ("original_size", "crop_top_left", "target_size")
_TOKENS = ("clip_input_ids", "t5_input_ids", "t5_attention_mask")
_INTS = ("index", "original_index")
_FLAGS = ("substituted", "flipped", "clip_truncated", "t5_truncated")


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch samples of one bucket.

    ``pixel_values`` uint8 [B, 3, H, W] contiguous; ``original_size``, ``crop_top_left``,
    ``target_size`` int64 [B, 2]; token ids and masks [B, L] when present; ``index`` and
    ``original_index`` int64 [B]; ``substituted`` (and other flags) bool [B]; ``captions`` a
    list of str. Raises ValueError naming the samples whose shapes differ.
    """
    if len(samples) == 0:
        raise ValueError("collate got an empty batch")
    first = samples[0]
    batch: dict[str, Any] = {
        "pixel_values": _stack("pixel_values", samples, torch.uint8),
    }
    for key in _PAIRS:
        if key in first:
            batch[key] = torch.tensor([tuple(s[key]) for s in samples], dtype=torch.int64)
    for key in _TOKENS:
        if key in first:
            batch[key] = _stack(key, samples, None)
    for key in _INTS:
        if key in first:
            batch[key] = torch.tensor([int(s[key]) for s in samples], dtype=torch.int64)
    for key in _FLAGS:
        if key in first:
            batch[key] = torch.tensor([bool(s[key]) for s in samples], dtype=torch.bool)
    if "caption" in first:
        batch["captions"] = [s["caption"] for s in samples]
    return batch


def to_model_input(
    batch: Mapping[str, Any], device: torch.device | str, dtype: torch.dtype = torch.bfloat16
) -> dict[str, Any]:
    """Copy tensors to ``device`` (``non_blocking``: overlap with compute when the batch is
    pinned) and turn uint8 ``pixel_values`` into ``dtype`` in [-1, 1] there. Non-tensor
    values (captions) are passed through."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor):
            out[key] = value
            continue
        moved = value.to(device, non_blocking=True)
        if key == "pixel_values":
            if moved.dtype != torch.uint8:
                raise TypeError(f"pixel_values must be uint8 (from collate), got {moved.dtype}")
            moved = moved.to(torch.float32).div_(127.5).sub_(1.0).to(dtype)
        out[key] = moved
    return out


def _stack(
    key: str, samples: Sequence[Mapping[str, Any]], dtype: torch.dtype | None
) -> torch.Tensor:
    tensors = []
    for i, s in enumerate(samples):
        if key not in s:
            raise ValueError(f"collate: sample {i} has no {key!r} (the first sample has one)")
        t = torch.as_tensor(s[key])
        if dtype is not None and t.dtype != dtype:
            raise ValueError(f"collate: {key} of sample {i} is {t.dtype}, expected {dtype}")
        tensors.append(t)
    shapes = [tuple(t.shape) for t in tensors]
    if len(set(shapes)) > 1:
        groups: dict[tuple[int, ...], list[str]] = {}
        for i, shape in enumerate(shapes):
            groups.setdefault(shape, []).append(_label(samples[i], i))
        detail = "; ".join(f"{list(shape)} at {', '.join(at)}" for shape, at in groups.items())
        raise ValueError(
            f"collate: {key} shapes differ within one batch ({detail}). A batch must hold one "
            "bucket: use BucketBatchSampler (batch_sampler=...) with this dataset."
        )
    return torch.stack(tensors).contiguous()


def _label(sample: Mapping[str, Any], position: int) -> str:
    """The dataset index of a sample when it has one, else its position in the batch."""
    return f"index {int(sample['index'])}" if "index" in sample else f"position {position}"
