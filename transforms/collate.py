"""Stack one bucket's samples into a batch, and move a batch to the model's device.

Pixels stay uint8 until they are on the device: a quarter of the bytes of float32 to pin
and copy. ``to_model_input`` then normalises them to [-1, 1] in the model's dtype there.
Samples read from an encoder cache carry latents and text embeddings instead; trimmed T5
embeddings are padded to the batch's longest with a mask. Keys collate does not know (a
model transform's own ids, torchtune's ``tokens``) are kept, never dropped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

_PAIRS = ("original_size", "crop_top_left", "target_size")
_TOKENS = ("clip_input_ids", "t5_input_ids", "t5_attention_mask")
_INTS = ("index", "original_index", "text_length")
_FLAGS = ("substituted", "flipped", "clip_truncated", "t5_truncated")
# Per-sample lengths differ (T5 embeddings stored trimmed to their tokens): padded with zeros
# to the batch's longest along the first axis; the mask says which rows are real.
_VARIABLE = ("prompt_embeds", "t5_attention_mask")
_FIXED = ("pixel_values", "latents", "pooled_prompt_embeds")
# A row's paired files: uint8 conditioning pixels [K, 3, H, W] and mask [1, H, W] (or, from
# an encoder cache, conditioning latents [K, C, h, w] and the latent-grid mask [1, h, w]).
_PAIRED = ("conditioning_pixel_values", "loss_mask", "conditioning_latents")
_KNOWN = {*_PAIRS, *_TOKENS, *_INTS, *_FLAGS, *_VARIABLE, *_FIXED, *_PAIRED, "caption"}


def collate(
    samples: Sequence[Mapping[str, Any]],
    padding_idx: int | None = None,
    ignore_idx: int | None = None,
) -> dict[str, Any]:
    """Batch samples of one bucket.

    ``padding_idx`` and ``ignore_idx`` are accepted and ignored: torchtune's recipes call
    ``collate_fn(batch, padding_idx=..., ignore_idx=...)``, and our token ids come padded to
    their fixed length by the tokenizer, with no labels to mask.

    ``pixel_values`` uint8 [B, 3, H, W] contiguous, or (from an encoder cache) ``latents``
    [B, C, h, w] and ``pooled_prompt_embeds`` [B, P]; ``original_size``, ``crop_top_left``,
    ``target_size`` int64 [B, 2]; a row's paired files: ``conditioning_pixel_values`` uint8
    [B, K, 3, H, W] and ``loss_mask`` uint8 [B, 1, H, W] (or cached
    ``conditioning_latents`` [B, K, C, h, w] and a latent-grid ``loss_mask`` [B, 1, h, w]);
    token ids and masks [B, L] when present; ``index``,
    ``original_index`` (and ``text_length``) int64 [B]; ``substituted`` (and other flags)
    bool [B]; ``captions`` a list of str. ``prompt_embeds`` of different lengths (trimmed T5)
    are zero-padded to the longest with ``t5_attention_mask`` [B, L] marking the real rows
    (built from ``text_length`` when the samples carry no mask). Any other key is kept:
    tensors of one shape stacked, anything else as a list. Samples marked ``dropped`` (a
    failed file nothing could stand in for) are left out: the batch is short and
    ``dropped`` [D] names them. Raises ValueError naming the samples whose shapes differ
    where one shape is required.
    """
    if len(samples) == 0:
        raise ValueError("collate got an empty batch")
    dropped = [int(s["index"]) for s in samples if s.get("dropped")]
    if dropped:
        return _short(samples, dropped)
    first = samples[0]
    batch: dict[str, Any] = {}
    if "pixel_values" in first or "latents" not in first:
        batch["pixel_values"] = _stack("pixel_values", samples, torch.uint8)
    for key in ("latents", "pooled_prompt_embeds", "conditioning_latents"):
        if key in first:
            batch[key] = _stack(key, samples, None)
    for key in ("conditioning_pixel_values", "loss_mask"):
        if key in first:
            batch[key] = _stack(key, samples, torch.uint8)
    if "prompt_embeds" in first:
        batch.update(_pad_embeds(samples))
    for key in _PAIRS:
        if key in first:
            batch[key] = torch.tensor([tuple(s[key]) for s in samples], dtype=torch.int64)
    for key in _TOKENS:
        if key in first and key not in batch:
            batch[key] = _stack(key, samples, None)
    for key in _INTS:
        if key in first:
            batch[key] = torch.tensor([int(s[key]) for s in samples], dtype=torch.int64)
    for key in _FLAGS:
        if key in first:
            batch[key] = torch.tensor([bool(s[key]) for s in samples], dtype=torch.bool)
    if "caption" in first:
        batch["captions"] = [s["caption"] for s in samples]
    for key in first:
        if key not in _KNOWN:
            batch[key] = _keep(key, samples)
    return batch


def _short(samples: Sequence[Mapping[str, Any]], dropped: list[int]) -> dict[str, Any]:
    """The batch of the samples that did not leave it (``dropped``: a file that failed and
    that no image could stand in for), with ``dropped`` [D] naming the rows that left. When
    none is left: an empty batch (B = 0) of the bucket's shape; skip that step."""
    kept = [s for s in samples if not s.get("dropped")]
    if kept:
        batch = collate(kept)
    else:
        h, w = samples[0]["target_size"]
        empty = torch.zeros(0, dtype=torch.int64)
        batch = {"pixel_values": torch.zeros((0, 3, h, w), dtype=torch.uint8),
                 "index": empty, "original_index": empty.clone(), "captions": []}
    batch["dropped"] = torch.tensor(dropped, dtype=torch.int64)
    return batch


def to_model_input(
    batch: Mapping[str, Any], device: torch.device | str, dtype: torch.dtype = torch.bfloat16
) -> dict[str, Any]:
    """Copy tensors to ``device`` (``non_blocking``: overlap with compute when the batch is
    pinned) and turn uint8 ``pixel_values`` and ``conditioning_pixel_values`` into ``dtype``
    in [-1, 1] there, and a uint8 ``loss_mask`` into ``dtype`` in [0, 1]. Non-tensor values
    (captions) are passed through."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor):
            out[key] = value
            continue
        moved = value.to(device, non_blocking=True)
        if key in ("pixel_values", "conditioning_pixel_values"):
            if moved.dtype != torch.uint8:
                raise TypeError(f"{key} must be uint8 (from collate), got {moved.dtype}")
            moved = moved.to(torch.float32).div_(127.5).sub_(1.0).to(dtype)
        elif key == "loss_mask" and moved.dtype == torch.uint8:
            moved = moved.to(torch.float32).div_(255.0).to(dtype)
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


def _pad_embeds(samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """``prompt_embeds`` [B, L, D] zero-padded to the longest sample, and its mask [B, L]."""
    embeds = [torch.as_tensor(s["prompt_embeds"]) for s in samples]
    tails = {tuple(e.shape[1:]) for e in embeds}
    if len(tails) > 1 or any(e.ndim != 2 for e in embeds):
        shapes = ", ".join(f"{list(e.shape)} at {_label(s, i)}"
                           for i, (e, s) in enumerate(zip(embeds, samples, strict=True)))
        raise ValueError(f"collate: prompt_embeds must be [L, D] with one D per batch ({shapes})")
    longest = max(e.shape[0] for e in embeds)
    out = embeds[0].new_zeros((len(embeds), longest, embeds[0].shape[1]))
    mask = torch.zeros((len(embeds), longest), dtype=torch.int64)
    for i, (e, s) in enumerate(zip(embeds, samples, strict=True)):
        out[i, : e.shape[0]] = e
        if "t5_attention_mask" in s:
            m = torch.as_tensor(s["t5_attention_mask"])
            mask[i, : m.shape[0]] = m
        else:
            mask[i, : int(s.get("text_length", e.shape[0]))] = 1
    if not any("t5_attention_mask" in s or "text_length" in s for s in samples):
        return {"prompt_embeds": out}  # fixed-length embeddings (SDXL's 77 CLIP tokens)
    return {"prompt_embeds": out, "t5_attention_mask": mask}


def _keep(key: str, samples: Sequence[Mapping[str, Any]]) -> Any:
    """An unknown key: stacked when every sample has a tensor of one shape, else a list."""
    values = [s.get(key) for s in samples]
    if all(isinstance(v, torch.Tensor) for v in values) and len({v.shape for v in values}) == 1:
        return torch.stack(values)
    return values
