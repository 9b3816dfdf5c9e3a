"""Batches in the form diffusers' own training scripts consume.

``train_dreambooth_lora_flux.py`` reads ``batch["pixel_values"]`` (float, [-1, 1]) and
``batch["prompts"]`` (a list of str it encodes itself); ``train_text_to_image_lora_sdxl.py``
reads float ``pixel_values``, ``input_ids_one`` / ``input_ids_two`` (``SDXLTokenizer`` sets
them) and ``original_sizes`` / ``crop_top_lefts`` as a list of tuples per batch: its
``compute_time_ids`` concatenates them with ``+``, which joins tuples but adds tensors element
by element. ``target_sizes`` (each image's bucket, (h, w)) is the one key the scripts lack:
their ``compute_time_ids`` hard-codes ``(resolution, resolution)``, wrong for every
non-square bucket; docs/tensors-and-tokens.md shows the patch that reads it from the batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from transforms.collate import collate

SCRIPT_MODELS = ("flux", "sdxl")
# collate's (B, 2) int64 keys -> the scripts' per-sample tuple lists
_SIZES = (("original_size", "original_sizes"), ("crop_top_left", "crop_top_lefts"),
          ("target_size", "target_sizes"))
_REQUIRED = {"flux": (), "sdxl": ("input_ids_one", "input_ids_two")}


def diffusers_batch(batch: Mapping[str, Any], model: str = "sdxl") -> dict[str, Any]:
    """``batch`` (from ``collate``) with what diffusers' ``model`` training script reads.

    ``pixel_values`` float32 in [-1, 1], contiguous (from collate's uint8); ``prompts`` the
    captions; ``original_sizes``, ``crop_top_lefts``, ``target_sizes`` lists of int tuples
    ((h, w), (y, x), (h, w) per image, SDXL's order) when the batch has sizes. Every other key
    is kept. Raises ValueError for a batch without pixels (an encoder cache's latents: the
    scripts encode pixels themselves) or, for ``"sdxl"``, without ``SDXLTokenizer``'s ids.
    """
    if model not in SCRIPT_MODELS:
        raise ValueError(f"model must be one of {', '.join(SCRIPT_MODELS)}, got {model!r}")
    pixels = batch.get("pixel_values")
    if not isinstance(pixels, torch.Tensor):
        raise ValueError("diffusers_batch needs pixel_values (diffusers' scripts run the VAE "
                         "themselves; a batch from an encoder cache carries latents)")
    if pixels.dtype != torch.uint8:
        raise TypeError(f"pixel_values must be collate's uint8, got {pixels.dtype} (already "
                        "normalised pixels would be normalised twice)")
    missing = [key for key in _REQUIRED[model] if key not in batch]
    if missing:
        raise ValueError(f"the {model} script reads {', '.join(missing)}: give the dataset "
                         f"model_transform=SDXLTokenizer.from_pretrained_dir(...)")
    out = dict(batch)
    out["pixel_values"] = pixels.to(torch.float32).div(127.5).sub(1.0).contiguous()
    out["prompts"] = list(batch.get("captions", [""] * len(pixels)))
    for key, name in _SIZES:
        if key in batch:
            out[name] = [tuple(int(v) for v in row) for row in torch.as_tensor(batch[key])]
    return out


class DiffusersCollate:
    """``collate_fn`` for a diffusers training script's DataLoader: ``collate`` then
    ``diffusers_batch(model=...)``; picklable, so it works in DataLoader workers under spawn."""

    def __init__(self, model: str = "sdxl") -> None:
        if model not in SCRIPT_MODELS:
            raise ValueError(f"model must be one of {', '.join(SCRIPT_MODELS)}, got {model!r}")
        self.model = model

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """One bucket's samples as the script's batch."""
        return diffusers_batch(collate(samples), model=self.model)

    def __repr__(self) -> str:
        return f"DiffusersCollate(model={self.model!r})"
