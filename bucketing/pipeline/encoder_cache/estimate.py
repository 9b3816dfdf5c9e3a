"""Disk size of a cache before it is built, from the real models' output sizes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from bucketing.pipeline.encoder_cache.keys import MODEL_SIZES, TRIMMED_MODELS
from transforms.tokenize import FluxTokenizer

if TYPE_CHECKING:
    from bucketing.assign import Assignment
    from bucketing.index import ImageIndex



# --------------------------------------------------------------------------- estimates


def estimate_bytes(
    bucket_wh: np.ndarray, captions: Sequence[str], model: str, *, dtype_bytes: int = 2,
    variants: int = 1, flip: bool = False, t5_padding: str = "trimmed",
    text_lengths: np.ndarray | None = None,
) -> dict[str, int]:
    """Disk size of a cache before it is built, from the real models' output sizes.

    ``bucket_wh``: (N, 2) buckets of the accepted images; ``captions``: the distinct
    captions (plus "" for dropout); ``text_lengths``: their T5 token counts (special
    tokens included) when measured, else trimmed sizes are not estimated (full are used).
    """
    if model not in MODEL_SIZES:
        raise ValueError(f"no cache sizes for model {model!r}; known: {sorted(MODEL_SIZES)}")
    s = MODEL_SIZES[model]
    wh = np.asarray(bucket_wh, dtype=np.int64).reshape(-1, 2)
    latent = int(((wh[:, 0] // 8) * (wh[:, 1] // 8)).sum()) * s["latent_channels"] * dtype_bytes
    latent *= variants * (2 if flip else 1)
    n = len(captions)
    if model in TRIMMED_MODELS and t5_padding == "trimmed" and text_lengths is not None:
        rows = int(np.minimum(np.asarray(text_lengths), s["text_length"]).sum())
    else:
        rows = n * s["text_length"]
    text = (rows * s["text_width"] + n * s["pooled"]) * dtype_bytes + n * 8
    return {"latents": latent, "texts": text, "total": latent + text}



def estimate_lines(
    index: ImageIndex, assignment: Assignment, model: str, tokenizers: str | None = None
) -> str:
    """``bucket-report --estimate-cache``: the disk size ``bucket-cache`` would write (bf16,
    one centre crop per image), full and trimmed T5; trimmed needs ``tokenizers`` (a folder
    with tokenizer/ and tokenizer_2/) to count each caption's tokens."""
    if model not in MODEL_SIZES:
        return f"\nEncoder cache: no size table for {model!r} (known: {sorted(MODEL_SIZES)})\n"
    ok = np.asarray(assignment.bucket_id) >= 0
    wh = np.asarray(assignment.bucket_wh).reshape(-1, 2)[ok]
    captions = sorted({c for i in np.flatnonzero(ok) for c in index.captions[i]} | {""})
    full = estimate_bytes(wh, captions, model, t5_padding="full")
    lines = ["", f"Encoder cache estimate (bucket-cache --model {model}, bf16, one crop per "
             f"image; x2 latents with --flip-p > 0, xK with --variants K):",
             f"  latents  {full['latents'] / 2**20:10.1f} MiB  ({len(wh)} images)"]
    if model in TRIMMED_MODELS:
        lines.append(f"  text     {full['texts'] / 2**20:10.1f} MiB  ({len(captions)} captions, "
                     "T5 at full length: --t5-padding full)")
        if tokenizers:
            lengths = FluxTokenizer.from_flux_dir(tokenizers, model=model).token_lengths(
                captions)["t5"]
            trimmed = estimate_bytes(wh, captions, model, text_lengths=lengths)
            lines.append(f"  text     {trimmed['texts'] / 2**20:10.1f} MiB  (T5 trimmed to each "
                         "caption's tokens: the default)")
            lines.append(f"  total    {trimmed['total'] / 2**20:10.1f} MiB  (trimmed), "
                         f"{full['total'] / 2**20:.1f} MiB (full)")
        else:
            lines.append(f"  total    {full['total'] / 2**20:10.1f} MiB  (full; pass --tokenizers "
                         "for the trimmed default, usually 5-20x less text)")
    else:
        lines.append(f"  text     {full['texts'] / 2**20:10.1f} MiB  ({len(captions)} captions)")
        lines.append(f"  total    {full['total'] / 2**20:10.1f} MiB")
    return "\n".join(lines) + "\n"

