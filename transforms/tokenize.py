"""FLUX.1 text tokenization (CLIP-L + T5-XXL) and the latent-side helpers a FLUX model needs.

`FluxTokenizer` loads transformers' fast CLIP and T5 tokenizers from *local* folders only and
produces exactly the ids the diffusers FLUX pipeline and training scripts produce, i.e.

    tokenizer(prompt, padding="max_length", max_length=77, truncation=True,
              return_overflowing_tokens=False, return_length=False)            # CLIP
    tokenizer_2(prompt, padding="max_length", max_length=max_sequence_length,
                truncation=True, return_length=False, return_overflowing_tokens=False)  # T5

but tokenizes each caption once, untruncated, so that the true token length (for
`bucket-report`) and a per-sample ``truncated`` flag come for free: truncation keeps the
leading special tokens and the content, and re-appends the closing special token, which is
what the tokenizers' own truncation does (tests/test_tokenize.py checks it on the real files).

The model's constraints (divisibility 16 = VAE 8 x patch 2, T5 length 512 dev / 256 schnell)
come from `bucketing.ladder.MODEL_SPECS`, the same table `BucketLadder.for_model` reads, so the
ladder and the tokenizer cannot disagree.

Latent-side helpers, matching diffusers' `FluxPipeline` static methods:
- `flux_image_ids(height, width)`: takes the **pixel** size; equals
  `FluxPipeline._prepare_latent_image_ids(B, height // 16, width // 16, ...)`, whose arguments
  are the packed-grid size (latent size // 2) in current diffusers.
- `pack_latents` / `unpack_latents`: `_pack_latents` / `_unpack_latents` on latent tensors;
  `unpack_latents` takes the **latent** height and width (diffusers' takes pixels + VAE scale).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from bucketing.ladder import MODEL_SPECS, ModelSpec

if TYPE_CHECKING:
    from transformers import CLIPTokenizerFast, T5TokenizerFast

CLIP_MAX_LENGTH = 77
T5_LIMIT = 512  # diffusers' FluxPipeline.check_inputs rejects max_sequence_length > 512
FLUX_MODELS = ("flux", "flux-schnell")

_CLIP_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
_T5_FILES = (("tokenizer.json",), ("spiece.model",))


# --------------------------------------------------------------------------- model constraints


def model_spec(model: str = "flux") -> ModelSpec:
    """The entry of `bucketing.ladder.MODEL_SPECS` for a FLUX model ("flux" or "flux-schnell")."""
    if model not in FLUX_MODELS:
        raise ValueError(f"FluxTokenizer supports models {FLUX_MODELS}, got {model!r}")
    return MODEL_SPECS[model]


# --------------------------------------------------------------------------- functional core


def pad_truncate(
    sequences: Sequence[Sequence[int]], max_length: int, pad_id: int, n_suffix: int = 1
) -> dict[str, np.ndarray]:
    """Right-pad / truncate tokenized sequences (special tokens included) to ``max_length``.

    A sequence longer than ``max_length`` keeps its first ``max_length - n_suffix`` tokens and
    its last ``n_suffix`` (the closing special tokens), as HF truncation does. Returns int64
    ``input_ids`` and ``attention_mask`` (N, max_length), ``lengths`` (N,) before truncation
    and ``truncated`` (N,) bool.
    """
    if max_length <= n_suffix:
        raise ValueError(f"max_length must exceed {n_suffix}, got {max_length}")
    n = len(sequences)
    ids = np.full((n, max_length), pad_id, dtype=np.int64)
    mask = np.zeros((n, max_length), dtype=np.int64)
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=n)
    for i, seq in enumerate(sequences):
        if len(seq) > max_length:
            seq = list(seq[: max_length - n_suffix]) + list(seq[len(seq) - n_suffix :])
        ids[i, : len(seq)] = seq
        mask[i, : len(seq)] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "lengths": lengths,
        "truncated": lengths > max_length,
    }


def flux_image_ids(
    height: int,
    width: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """FLUX latent image position ids for a **pixel** size: ((h/16) * (w/16), 3), rows [0, y, x].

    Row-major over the packed 2x2-patch grid, the same order as `pack_latents`; identical to
    diffusers' `FluxPipeline._prepare_latent_image_ids(B, height // 16, width // 16, ...)`.
    """
    multiple = model_spec("flux").multiple
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(
            f"FLUX pixel height and width must be positive multiples of {multiple} "
            f"(VAE 8 x patch 2), got {height}x{width}"
        )
    gh, gw = height // multiple, width // multiple
    ids = torch.zeros(gh, gw, 3, dtype=dtype, device=device)
    ids[..., 1] = torch.arange(gh, dtype=dtype, device=device)[:, None]
    ids[..., 2] = torch.arange(gw, dtype=dtype, device=device)[None, :]
    return ids.reshape(gh * gw, 3)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] latents -> [B, (H/2)(W/2), C*4] tokens of 2x2 patches (diffusers' layout).

    Token ``i * (W/2) + j`` holds the patch at rows 2i..2i+1, cols 2j..2j+1; its features are
    ordered (channel, dy, dx).
    """
    if latents.ndim != 4:
        raise ValueError(f"pack_latents expects [B, C, H, W], got shape {tuple(latents.shape)}")
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2, got {h}x{w}")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """Inverse of `pack_latents`: [B, (H/2)(W/2), C*4] -> [B, C, H, W] for the **latent** H, W."""
    if packed.ndim != 3:
        raise ValueError(f"unpack_latents expects [B, N, C*4], got shape {tuple(packed.shape)}")
    b, n, f = packed.shape
    h, w = latent_height, latent_width
    if h % 2 or w % 2 or f % 4 or n != (h // 2) * (w // 2):
        raise ValueError(
            f"packed shape {tuple(packed.shape)} does not fit a {h}x{w} latent "
            f"(need {(h // 2) * (w // 2)} tokens of 4*C features, H and W even)"
        )
    x = packed.reshape(b, h // 2, w // 2, f // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, f // 4, h, w)


# --------------------------------------------------------------------------- loading


def _require_folder(folder: str | os.PathLike, what: str, alternatives) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {path} (FLUX tokenizers are read "
                                "from local folders only, never downloaded)")
    if not any(all((path / f).is_file() for f in files) for files in alternatives):
        wanted = " or ".join(" + ".join(files) for files in alternatives)
        raise FileNotFoundError(f"{path} has no {what} files: expected {wanted}")
    return path


def _load(cls, path: Path, what: str):
    tok = cls.from_pretrained(str(path), local_files_only=True)
    # transformers can build an empty tokenizer from a folder it half understands: refuse it.
    probe = tok("a photo of a cat", add_special_tokens=False, verbose=False)["input_ids"]
    if len(tok) < 1000 or not probe or tok.unk_token_id in probe:
        raise ValueError(f"{path} does not hold a usable {what} tokenizer "
                         f"(vocabulary of {len(tok)}, 'a photo of a cat' -> {probe})")
    return tok


def load_clip_tokenizer(folder: str | os.PathLike) -> CLIPTokenizerFast:
    """transformers' fast CLIP tokenizer from a local folder (tokenizer/ of a FLUX checkout)."""
    from transformers import CLIPTokenizerFast

    return _load(CLIPTokenizerFast, _require_folder(folder, "CLIP tokenizer", _CLIP_FILES), "CLIP")


def load_t5_tokenizer(folder: str | os.PathLike) -> T5TokenizerFast:
    """transformers' fast T5 tokenizer from a local folder (tokenizer_2/ of a FLUX checkout)."""
    from transformers import T5TokenizerFast

    return _load(T5TokenizerFast, _require_folder(folder, "T5 tokenizer", _T5_FILES), "T5")


def _n_suffix(tok) -> int:
    """How many special tokens the tokenizer appends after the text (1 for CLIP and T5)."""
    plain = tok("a", add_special_tokens=False, verbose=False)["input_ids"]
    full = tok("a", add_special_tokens=True, verbose=False)["input_ids"]
    start = next(i for i in range(len(full)) if full[i : i + len(plain)] == plain)
    return len(full) - start - len(plain)


# --------------------------------------------------------------------------- the transform


class FluxTokenizer:
    """``model_transform(sample) -> sample`` adding FLUX's CLIP and T5 token ids.

    Adds ``clip_input_ids`` int64 (77,), ``t5_input_ids`` and ``t5_attention_mask`` int64
    (t5_max_length,), ``clip_truncated`` and ``t5_truncated`` (bool) from ``sample["caption"]``.
    ``counts`` tallies captions and truncations seen by this instance (per process: each
    DataLoader worker holds its own copy).

    Args:
        clip_dir: folder with the CLIP-L tokenizer (a FLUX checkout's ``tokenizer/``).
        t5_dir: folder with the T5 tokenizer (``tokenizer_2/``).
        t5_max_length: T5 padding/truncation length; default the model's (512 dev, 256 schnell).
        model: "flux" (dev) or "flux-schnell", whose constraints this tokenizer exposes.
    """

    clip_max_length = CLIP_MAX_LENGTH
    vae_scale_factor = 8  # FLUX VAE downsampling
    patch_size = 2  # 2x2 latent patches per transformer token

    def __init__(
        self,
        clip_dir: str | os.PathLike,
        t5_dir: str | os.PathLike,
        t5_max_length: int | None = None,
        *,
        model: str = "flux",
    ) -> None:
        self.model = model
        self.spec = model_spec(model)
        if self.spec.multiple != self.vae_scale_factor * self.patch_size:
            raise ValueError(f"MODEL_SPECS[{model!r}].multiple={self.spec.multiple} disagrees "
                             "with FLUX's VAE scale 8 x patch 2")
        if t5_max_length is None:
            t5_max_length = self.spec.t5_max_length
        if isinstance(t5_max_length, bool) or not isinstance(t5_max_length, (int, np.integer)):
            raise TypeError(f"t5_max_length must be an int, got {t5_max_length!r}")
        if not 2 <= t5_max_length <= T5_LIMIT:
            raise ValueError(f"t5_max_length must be in [2, {T5_LIMIT}], got {t5_max_length}")
        self.t5_max_length = int(t5_max_length)
        self.clip_dir, self.t5_dir = Path(clip_dir), Path(t5_dir)
        self.clip = load_clip_tokenizer(clip_dir)
        self.t5 = load_t5_tokenizer(t5_dir)
        self._clip_suffix = _n_suffix(self.clip)
        self._t5_suffix = _n_suffix(self.t5)
        self.counts = {"captions": 0, "clip_truncated": 0, "t5_truncated": 0}

    @classmethod
    def from_flux_dir(
        cls, path: str | os.PathLike, t5_max_length: int | None = None, *, model: str = "flux"
    ) -> FluxTokenizer:
        """From a FLUX.1 checkout (or any folder) holding ``tokenizer/`` and ``tokenizer_2/``."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"FLUX folder not found: {path}")
        return cls(path / "tokenizer", path / "tokenizer_2", t5_max_length, model=model)

    @classmethod
    def for_model(cls, name: str, path: str | os.PathLike) -> FluxTokenizer:
        """The tokenizer for ``name`` ("flux" or "flux-schnell") from a FLUX checkout folder."""
        return cls.from_flux_dir(path, model=name)

    @property
    def multiple(self) -> int:
        """Pixel divisibility of every bucket side (VAE scale 8 x patch 2 = 16)."""
        return int(self.spec.multiple)

    def tokenize(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Batched tokenization of ``captions``.

        Returns ``clip_input_ids`` (N, 77), ``t5_input_ids`` / ``t5_attention_mask``
        (N, t5_max_length), ``clip_truncated`` / ``t5_truncated`` (N,) bool and
        ``clip_lengths`` / ``t5_lengths`` (N,): token counts before truncation, special
        tokens included.
        """
        captions = list(captions)
        for c in captions:
            if not isinstance(c, str):
                raise TypeError(f"captions must be strings, got {type(c).__name__}: {c!r}")
        if not captions:
            raise ValueError("tokenize() needs at least one caption")
        kw = {"add_special_tokens": True, "verbose": False, "return_attention_mask": False}
        clip = pad_truncate(
            self.clip(captions, **kw)["input_ids"],
            CLIP_MAX_LENGTH, self.clip.pad_token_id, self._clip_suffix,
        )
        t5 = pad_truncate(
            self.t5(captions, **kw)["input_ids"],
            self.t5_max_length, self.t5.pad_token_id, self._t5_suffix,
        )
        self.counts["captions"] += len(captions)
        self.counts["clip_truncated"] += int(clip["truncated"].sum())
        self.counts["t5_truncated"] += int(t5["truncated"].sum())
        return {
            "clip_input_ids": torch.from_numpy(clip["input_ids"]),
            "t5_input_ids": torch.from_numpy(t5["input_ids"]),
            "t5_attention_mask": torch.from_numpy(t5["attention_mask"]),
            "clip_truncated": torch.from_numpy(clip["truncated"]),
            "t5_truncated": torch.from_numpy(t5["truncated"]),
            "clip_lengths": torch.from_numpy(clip["lengths"]),
            "t5_lengths": torch.from_numpy(t5["lengths"]),
        }

    def token_lengths(
        self, captions: Sequence[str], chunk_size: int = 4096
    ) -> dict[str, np.ndarray]:
        """Token counts before truncation (special tokens included) as int64 arrays ``clip``
        and ``t5``, without building padded id arrays: the lean path for caption statistics
        over a whole dataset. Truncated means ``clip > 77`` / ``t5 > t5_max_length``."""
        captions = list(captions)
        for c in captions:
            if not isinstance(c, str):
                raise TypeError(f"captions must be strings, got {type(c).__name__}: {c!r}")
        kw = {"add_special_tokens": True, "verbose": False, "return_attention_mask": False}
        out = {"clip": [], "t5": []}
        for start in range(0, len(captions), chunk_size):
            chunk = captions[start : start + chunk_size]
            for name, tok in (("clip", self.clip), ("t5", self.t5)):
                out[name].extend(len(ids) for ids in tok(chunk, **kw)["input_ids"])
        return {name: np.asarray(v, dtype=np.int64) for name, v in out.items()}

    def __call__(self, sample: dict) -> dict:
        """``sample`` plus the token ids and truncation flags of ``sample["caption"]``."""
        if "caption" not in sample:
            raise KeyError("FluxTokenizer needs sample['caption'] (the dataset sets it from the "
                           "caption_transform, or the first caption)")
        out = self.tokenize([sample["caption"]])
        return {
            **sample,
            "clip_input_ids": out["clip_input_ids"][0],
            "t5_input_ids": out["t5_input_ids"][0],
            "t5_attention_mask": out["t5_attention_mask"][0],
            "clip_truncated": bool(out["clip_truncated"][0]),
            "t5_truncated": bool(out["t5_truncated"][0]),
        }

    def __repr__(self) -> str:
        return (f"FluxTokenizer(clip_dir={str(self.clip_dir)!r}, t5_dir={str(self.t5_dir)!r}, "
                f"t5_max_length={self.t5_max_length}, model={self.model!r})")
