"""Text tokenization for FLUX.1, SD3, SDXL and SD1.5, and the model-side helpers they need.

The tokenizers load transformers' fast CLIP and T5 tokenizers from *local* folders only (a
model checkout's ``tokenizer/``, ``tokenizer_2/``, ``tokenizer_3/``) and produce exactly the
ids diffusers' pipelines and training scripts produce, i.e. for every tokenizer of the model

    tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True,
              return_overflowing_tokens=False, return_length=False)

with max_length 77 for CLIP and the model's T5 length (FLUX 512 dev / 256 schnell, SD3 77),
but tokenize each caption once, untruncated, so that the true token length (for
`bucket-report`) and a per-sample ``truncated`` flag come for free: truncation keeps the
leading special tokens and the content, and re-appends the closing special token, which is
what the tokenizers' own truncation does (tests/test_tokenize.py checks it on the real files).
Padding uses each tokenizer's own pad token: SDXL's and SD3's OpenCLIP ``tokenizer_2`` pads
with "!" (id 0), OpenAI CLIP with its end token.

The model's constraints (divisibility, VAE scale, patch size, T5 length, timestep shift) and
which tokenizer class serves it come from the model registry `bucketing.models.MODELS`, the
same table `BucketLadder.for_model` reads, so the ladder and the tokenizer cannot disagree.

Model-side helpers, matching diffusers:
- `flux_image_ids(height, width)`: takes the **pixel** size; equals
  `FluxPipeline._prepare_latent_image_ids(B, height // 16, width // 16, ...)`, whose arguments
  are the packed-grid size (latent size // 2) in current diffusers.
- `pack_latents` / `unpack_latents`: `_pack_latents` / `_unpack_latents` on latent tensors;
  `unpack_latents` takes the **latent** height and width (diffusers' takes pixels + VAE scale).
- `flux_time_shift_mu(height, width)`: diffusers' `calculate_shift` of the image token count,
  and `shift_timesteps(t, mu)`: the scheduler's exponential time shift, for training.
- `sdxl_add_time_ids(batch)`: SDXL's micro-conditioning, as diffusers' SDXL training scripts
  compute it (original size + crop top-left + target size).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bucketing.models import MODELS as MODEL_SPECS
from bucketing.models import ModelSpec, named_class

if TYPE_CHECKING:
    from transformers import CLIPTokenizerFast, T5TokenizerFast

CLIP_MAX_LENGTH = 77  # CLIP text encoders' position limit
T5_LIMIT = 512  # T5 length diffusers accepts (FluxPipeline.check_inputs rejects more)
FLUX_MODELS = tuple(n for n, s in MODEL_SPECS.items() if s.tokenizer.endswith(".FluxTokenizer"))

_CLIP_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
_T5_FILES = (("tokenizer.json",), ("spiece.model",))


# --------------------------------------------------------------------------- model constraints


def model_spec(model: str = "flux") -> ModelSpec:
    """The model registry's entry for a FLUX model ("flux" or "flux-schnell")."""
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
    gh, gw = _token_grid(height, width, model_spec("flux"))
    ids = torch.zeros(gh, gw, 3, dtype=dtype, device=device)
    ids[..., 1] = torch.arange(gh, dtype=dtype, device=device)[:, None]
    ids[..., 2] = torch.arange(gw, dtype=dtype, device=device)[None, :]
    return ids.reshape(gh * gw, 3)


def _token_grid(height: int, width: int, spec: ModelSpec) -> tuple[int, int]:
    """Transformer tokens per column and row for a pixel size (VAE scale x patch size each)."""
    multiple = spec.vae_scale_factor * spec.patch_size
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(
            f"{spec.name} pixel height and width must be positive multiples of {multiple} "
            f"(VAE {spec.vae_scale_factor} x patch {spec.patch_size}), got {height}x{width}"
        )
    return height // multiple, width // multiple


def flux_time_shift_mu(height: int, width: int, model: str = "flux") -> float:
    """The resolution-dependent timestep shift ``mu`` for one bucket of ``model``.

    Equal to diffusers' ``calculate_shift(image_seq_len, base_seq_len, max_seq_len,
    base_shift, max_shift)`` with the model's scheduler configuration and ``image_seq_len =
    (height / 16) * (width / 16)``, the packed token count of a ``height`` x ``width`` image.
    """
    spec = MODEL_SPECS.get(model)
    if spec is None or spec.time_shift is None:
        raise ValueError(f"{model!r} has no resolution-dependent timestep shift in MODEL_SPECS")
    base_len, max_len, base_shift, max_shift = spec.time_shift
    gh, gw = _token_grid(height, width, spec)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return (gh * gw) * slope + (base_shift - slope * base_len)


def shift_timesteps(t: torch.Tensor, mu: float, sigma: float = 1.0) -> torch.Tensor:
    """``exp(mu) / (exp(mu) + (1 / t - 1) ** sigma)``: the flow-matching scheduler's exponential
    time shift (diffusers' ``FlowMatchEulerDiscreteScheduler.time_shift``), for t in (0, 1]."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def sdxl_add_time_ids(
    batch: Mapping[str, Any], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """SDXL's ``add_time_ids`` [B, 6]: ``original_size + crop_top_left + target_size`` per row,
    each (h, w) / (y, x), the ``compute_time_ids`` of diffusers' SDXL training scripts, from a
    collated batch's sizes (or one sample's)."""
    parts = []
    for key in ("original_size", "crop_top_left", "target_size"):
        if key not in batch:
            raise KeyError(f"sdxl_add_time_ids needs batch[{key!r}] (BucketResizeCrop sets it)")
        value = torch.as_tensor(batch[key])
        parts.append(value.reshape(-1, 2) if value.ndim <= 2 else value)
    if len({p.shape for p in parts}) != 1 or parts[0].ndim != 2:
        raise ValueError("original_size, crop_top_left and target_size must be [B, 2] each, got "
                         + ", ".join(str(tuple(p.shape)) for p in parts))
    return torch.cat(parts, dim=1).to(dtype)


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
        raise FileNotFoundError(f"{what} folder not found: {path} (tokenizers are read "
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
    """transformers' fast CLIP tokenizer from a local folder (``tokenizer/`` of a checkout)."""
    from transformers import CLIPTokenizerFast

    return _load(CLIPTokenizerFast, _require_folder(folder, "CLIP tokenizer", _CLIP_FILES), "CLIP")


def load_t5_tokenizer(folder: str | os.PathLike) -> T5TokenizerFast:
    """transformers' fast T5 tokenizer from a local folder (FLUX's ``tokenizer_2/``)."""
    from transformers import T5TokenizerFast

    return _load(T5TokenizerFast, _require_folder(folder, "T5 tokenizer", _T5_FILES), "T5")


def _n_suffix(tok) -> int:
    """How many special tokens the tokenizer appends after the text (1 for CLIP and T5)."""
    plain = tok("a", add_special_tokens=False, verbose=False)["input_ids"]
    full = tok("a", add_special_tokens=True, verbose=False)["input_ids"]
    start = next(i for i in range(len(full)) if full[i : i + len(plain)] == plain)
    return len(full) - start - len(plain)


def _checkout(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {path}")
    return path


def _t5_length(t5_max_length: Any, spec: ModelSpec) -> int:
    if t5_max_length is None:
        t5_max_length = spec.t5_max_length
    if isinstance(t5_max_length, bool) or not isinstance(t5_max_length, (int, np.integer)):
        raise TypeError(f"t5_max_length must be an int, got {t5_max_length!r}")
    if not 2 <= t5_max_length <= T5_LIMIT:
        raise ValueError(f"t5_max_length must be in [2, {T5_LIMIT}], got {t5_max_length}")
    return int(t5_max_length)


# --------------------------------------------------------------------------- the transforms


@dataclass(frozen=True)
class TokenSlot:
    """One tokenizer's output in a sample: ids under ``ids_key`` (int64, ``max_length``), the
    attention mask under ``mask_key`` (None: not emitted), and ``{name}_truncated`` (bool)."""

    name: str
    ids_key: str
    mask_key: str | None
    max_length: int


class PromptTokenizer:
    """``model_transform(sample) -> sample`` adding the token ids of ``sample["caption"]`` for
    each ``(TokenSlot, tokenizer)`` pair: the base of the model tokenizers below.

    Each slot adds its ids (and mask) and a ``{name}_truncated`` flag to the sample; the flags
    travel with the batch (collate stacks them), so a trainer can count truncations.
    """

    model = ""

    def __init__(self, slots: Sequence[tuple[TokenSlot, Any]]) -> None:
        self.slots = [(slot, tok, _n_suffix(tok)) for slot, tok in slots]

    @classmethod
    def for_model(cls, name: str, path: str | os.PathLike) -> PromptTokenizer:
        """The tokenizer for model ``name`` from its checkout folder ``path``."""
        return cls.from_pretrained_dir(path)

    @property
    def multiple(self) -> int:
        """Pixel divisibility of every bucket side of this tokenizer's model."""
        return int(MODEL_SPECS[self.model].multiple)

    def _captions(self, captions: Sequence[str]) -> list[str]:
        captions = list(captions)
        for c in captions:
            if not isinstance(c, str):
                raise TypeError(f"captions must be strings, got {type(c).__name__}: {c!r}")
        return captions

    def tokenize(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Batched tokenization of ``captions``: per slot the ids (N, max_length) (and mask),
        ``{name}_truncated`` (N,) bool and ``{name}_lengths`` (N,), the token counts before
        truncation, special tokens included."""
        captions = self._captions(captions)
        if not captions:
            raise ValueError("tokenize() needs at least one caption")
        kw = {"add_special_tokens": True, "verbose": False, "return_attention_mask": False}
        out: dict[str, torch.Tensor] = {}
        for slot, tok, n_suffix in self.slots:
            ids = pad_truncate(tok(captions, **kw)["input_ids"], slot.max_length,
                               tok.pad_token_id, n_suffix)
            out[slot.ids_key] = torch.from_numpy(ids["input_ids"])
            if slot.mask_key is not None:
                out[slot.mask_key] = torch.from_numpy(ids["attention_mask"])
            out[f"{slot.name}_truncated"] = torch.from_numpy(ids["truncated"])
            out[f"{slot.name}_lengths"] = torch.from_numpy(ids["lengths"])
        return out

    def token_lengths(
        self, captions: Sequence[str], chunk_size: int = 4096
    ) -> dict[str, np.ndarray]:
        """Token counts before truncation (special tokens included), an int64 array per slot
        name, without building padded id arrays: the lean path for caption statistics over a
        whole dataset. Truncated means a count above the slot's ``max_length``."""
        captions = self._captions(captions)
        kw = {"add_special_tokens": True, "verbose": False, "return_attention_mask": False}
        out: dict[str, list[int]] = {slot.name: [] for slot, _, _ in self.slots}
        for start in range(0, len(captions), chunk_size):
            chunk = captions[start : start + chunk_size]
            for slot, tok, _ in self.slots:
                out[slot.name].extend(len(ids) for ids in tok(chunk, **kw)["input_ids"])
        return {name: np.asarray(v, dtype=np.int64) for name, v in out.items()}

    def __call__(self, sample: dict) -> dict:
        """``sample`` plus the token ids and truncation flags of ``sample["caption"]``."""
        if "caption" not in sample:
            raise KeyError(f"{type(self).__name__} needs sample['caption'] (the dataset sets it "
                           "from the caption_transform, or the first caption)")
        out = self.tokenize([sample["caption"]])
        added = {key: value[0] for key, value in out.items() if not key.endswith("_lengths")}
        for slot, _, _ in self.slots:
            added[f"{slot.name}_truncated"] = bool(added[f"{slot.name}_truncated"])
        return {**sample, **added}


class FluxTokenizer(PromptTokenizer):
    """FLUX.1's CLIP-L and T5 token ids: ``clip_input_ids`` int64 (77,), ``t5_input_ids`` and
    ``t5_attention_mask`` int64 (t5_max_length,), ``clip_truncated`` and ``t5_truncated``.

    Args:
        clip_dir: folder with the CLIP-L tokenizer (a FLUX checkout's ``tokenizer/``).
        t5_dir: folder with the T5 tokenizer (``tokenizer_2/``).
        t5_max_length: T5 padding/truncation length; default the model's (512 dev, 256 schnell).
        model: "flux" (dev) or "flux-schnell", whose constraints this tokenizer exposes.
    """

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
        self.t5_max_length = _t5_length(t5_max_length, self.spec)
        self.clip_dir, self.t5_dir = Path(clip_dir), Path(t5_dir)
        self.clip = load_clip_tokenizer(clip_dir)
        self.t5 = load_t5_tokenizer(t5_dir)
        super().__init__([
            (TokenSlot("clip", "clip_input_ids", None, CLIP_MAX_LENGTH), self.clip),
            (TokenSlot("t5", "t5_input_ids", "t5_attention_mask", self.t5_max_length), self.t5),
        ])

    @classmethod
    def from_flux_dir(
        cls, path: str | os.PathLike, t5_max_length: int | None = None, *, model: str = "flux"
    ) -> FluxTokenizer:
        """From a FLUX.1 checkout (or any folder) holding ``tokenizer/`` and ``tokenizer_2/``."""
        path = _checkout(path, "FLUX")
        return cls(path / "tokenizer", path / "tokenizer_2", t5_max_length, model=model)

    @classmethod
    def for_model(cls, name: str, path: str | os.PathLike) -> FluxTokenizer:
        """The tokenizer for ``name`` ("flux" or "flux-schnell") from a FLUX checkout folder."""
        return cls.from_flux_dir(path, model=name)

    def __repr__(self) -> str:
        return (f"FluxTokenizer(clip_dir={str(self.clip_dir)!r}, t5_dir={str(self.t5_dir)!r}, "
                f"t5_max_length={self.t5_max_length}, model={self.model!r})")


class SD15Tokenizer(PromptTokenizer):
    """Stable Diffusion 1.x's CLIP-L token ids: ``input_ids`` int64 (77,) (the key diffusers'
    ``train_text_to_image.py`` uses) and ``clip_truncated``.

    Args:
        clip_dir: folder with the CLIP-L tokenizer (an SD1.5 checkout's ``tokenizer/``).
    """

    model = "sd15"

    def __init__(self, clip_dir: str | os.PathLike) -> None:
        self.clip_dir = Path(clip_dir)
        self.clip = load_clip_tokenizer(clip_dir)
        super().__init__([(TokenSlot("clip", "input_ids", None, CLIP_MAX_LENGTH), self.clip)])

    @classmethod
    def from_pretrained_dir(cls, path: str | os.PathLike) -> SD15Tokenizer:
        """From an SD1.5 checkout (or any folder) holding ``tokenizer/``."""
        return cls(_checkout(path, "SD1.5") / "tokenizer")

    def __repr__(self) -> str:
        return f"SD15Tokenizer(clip_dir={str(self.clip_dir)!r})"


class SDXLTokenizer(PromptTokenizer):
    """SDXL's two CLIP token ids, 77 each: ``input_ids_one`` (CLIP-L, ``tokenizer/``) and
    ``input_ids_two`` (OpenCLIP bigG, ``tokenizer_2/``, padded with "!"), the keys diffusers'
    SDXL training scripts use, and ``clip_truncated`` / ``clip_2_truncated``.

    Args:
        clip_dir: folder with the CLIP-L tokenizer (an SDXL checkout's ``tokenizer/``).
        clip_2_dir: folder with the bigG tokenizer (``tokenizer_2/``).
    """

    model = "sdxl"

    def __init__(self, clip_dir: str | os.PathLike, clip_2_dir: str | os.PathLike) -> None:
        self.clip_dir, self.clip_2_dir = Path(clip_dir), Path(clip_2_dir)
        self.clip = load_clip_tokenizer(clip_dir)
        self.clip_2 = load_clip_tokenizer(clip_2_dir)
        super().__init__([
            (TokenSlot("clip", "input_ids_one", None, CLIP_MAX_LENGTH), self.clip),
            (TokenSlot("clip_2", "input_ids_two", None, CLIP_MAX_LENGTH), self.clip_2),
        ])

    @classmethod
    def from_pretrained_dir(cls, path: str | os.PathLike) -> SDXLTokenizer:
        """From an SDXL checkout (or any folder) holding ``tokenizer/`` and ``tokenizer_2/``."""
        path = _checkout(path, "SDXL")
        return cls(path / "tokenizer", path / "tokenizer_2")

    def __repr__(self) -> str:
        return (f"SDXLTokenizer(clip_dir={str(self.clip_dir)!r}, "
                f"clip_2_dir={str(self.clip_2_dir)!r})")


class SD3Tokenizer(PromptTokenizer):
    """SD3's three token ids: ``input_ids_one`` (CLIP-L), ``input_ids_two`` (bigG, padded with
    "!"), 77 each, ``t5_input_ids`` / ``t5_attention_mask`` (t5_max_length, default 77 as in
    diffusers' SD3 training scripts), and ``clip_truncated`` / ``clip_2_truncated`` /
    ``t5_truncated``.

    Args:
        clip_dir, clip_2_dir, t5_dir: an SD3 checkout's ``tokenizer/``, ``tokenizer_2/`` and
            ``tokenizer_3/``.
        t5_max_length: T5 padding/truncation length (at most 512).
    """

    model = "sd3"

    def __init__(
        self,
        clip_dir: str | os.PathLike,
        clip_2_dir: str | os.PathLike,
        t5_dir: str | os.PathLike,
        t5_max_length: int | None = None,
    ) -> None:
        self.t5_max_length = _t5_length(t5_max_length, MODEL_SPECS["sd3"])
        self.dirs = (Path(clip_dir), Path(clip_2_dir), Path(t5_dir))
        self.clip = load_clip_tokenizer(clip_dir)
        self.clip_2 = load_clip_tokenizer(clip_2_dir)
        self.t5 = load_t5_tokenizer(t5_dir)
        super().__init__([
            (TokenSlot("clip", "input_ids_one", None, CLIP_MAX_LENGTH), self.clip),
            (TokenSlot("clip_2", "input_ids_two", None, CLIP_MAX_LENGTH), self.clip_2),
            (TokenSlot("t5", "t5_input_ids", "t5_attention_mask", self.t5_max_length), self.t5),
        ])

    @classmethod
    def from_pretrained_dir(
        cls, path: str | os.PathLike, t5_max_length: int | None = None
    ) -> SD3Tokenizer:
        """From an SD3 checkout holding ``tokenizer/``, ``tokenizer_2/`` and ``tokenizer_3/``."""
        path = _checkout(path, "SD3")
        return cls(path / "tokenizer", path / "tokenizer_2", path / "tokenizer_3", t5_max_length)

    def __repr__(self) -> str:
        dirs = ", ".join(repr(str(d)) for d in self.dirs)
        return f"SD3Tokenizer({dirs}, t5_max_length={self.t5_max_length})"


def tokenizer_for_model(model: str, path: str | os.PathLike) -> PromptTokenizer:
    """The tokenizer of ``model`` (a model registry name) from its checkout folder ``path``
    (the folder holding ``tokenizer/``, ``tokenizer_2/``, ...): the registry's class."""
    if model not in MODEL_SPECS:
        raise ValueError(f"no tokenizer for model {model!r}; known: {', '.join(MODEL_SPECS)}")
    return named_class(MODEL_SPECS[model].tokenizer).for_model(model, path)
