"""The frozen encoders of a text-to-image model, run the way diffusers runs them.

``FluxEncoders`` (VAE + CLIP-L + T5-XXL), ``SDXLEncoders`` (VAE + CLIP-L + OpenCLIP-bigG)
and ``SD3Encoders`` (VAE + both CLIPs + T5-XXL) wrap the real diffusers / transformers
modules: either modules the caller already holds, or loaded with
``from_pretrained(folder)`` from a local diffusers-layout folder (``vae/``,
``text_encoder/``, ``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``, and SD3's
``text_encoder_3/``, ``tokenizer_3/``; never the hub).

- ``encode_images(uint8 [B, 3, H, W]) -> latents [B, C, H/8, W/8]``: pixels to [-1, 1] in the
  VAE's dtype, the posterior's mode, then normalised as diffusers' training scripts do
  (FLUX ``(z - shift_factor) * scaling_factor``, SDXL ``z * scaling_factor``).
- ``encode_text(captions)`` -> ``prompt_embeds`` and ``pooled_prompt_embeds``, the same ids
  and the same numbers as the pipeline's ``encode_prompt`` on the same modules
  (``FluxPipeline``: T5 last hidden state at the padded length, CLIP's pooled output;
  ``StableDiffusionXLPipeline``: both CLIPs' penultimate states concatenated, the second
  CLIP's projected pooled output; ``StableDiffusion3Pipeline``: both CLIPs' states padded to
  T5's width, then T5's), plus ``text_lengths``: each caption's real T5 token
  count (special tokens included), which a cache uses to store only those rows.
- ``fingerprint(part)``: a digest of the modules behind ``"image"`` (the VAE) or ``"text"``
  (tokenizers + text encoders): class, configuration and weights, so that a cache built by
  other weights is never taken for this one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bucketing.models import MODELS

_SAMPLES_PER_TENSOR = 1024  # values of each weight tensor that enter the fingerprint
_VOLATILE_CONFIG = ("transformers_version", "torch_dtype", "dtype", "architectures")


def module_fingerprint(module: Any) -> str:
    """SHA-256 of a module's class, configuration and weights.

    Weights enter as each tensor's name, shape, dtype, float64 sum and 1024 evenly strided
    values: two checkpoints that differ anywhere a fine-tune reaches differ here, and a
    4.8 B-parameter T5 is fingerprinted in one pass over memory. Paths and library versions
    in the configuration are ignored (the same weights copied elsewhere match).
    """
    h = hashlib.sha256(type(module).__name__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        kept = {
            k: v for k, v in items.items() if not k.startswith("_") and k not in _VOLATILE_CONFIG
        }
        h.update(json.dumps(kept, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in sorted(module.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
            sample = flat[::step][:_SAMPLES_PER_TENSOR].to(torch.float32).cpu().numpy()
            total = float(torch.sum(flat, dtype=torch.float64)) if flat.numel() else 0.0
            h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{total!r}|".encode())
            h.update(sample.tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of a tokenizer's class, vocabulary, special tokens and length limit."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    vocab = tokenizer.get_vocab()
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    special = {k: str(v) for k, v in tokenizer.special_tokens_map.items()}
    h.update(json.dumps([special, tokenizer.model_max_length], sort_keys=True).encode())
    return h.hexdigest()


def _device_of(module: Any) -> torch.device:
    return next(module.parameters()).device


def _dtype_of(module: Any) -> torch.dtype:
    return next(module.parameters()).dtype


def _require_captions(captions: Sequence[str]) -> list[str]:
    captions = list(captions)
    if not captions:
        raise ValueError("encode_text needs at least one caption")
    for c in captions:
        if not isinstance(c, str):
            raise TypeError(f"captions must be strings, got {type(c).__name__}: {c!r}")
    return captions


def _require_folder(folder: str | os.PathLike, parts: Sequence[str]) -> Path:
    path = Path(folder)
    missing = [p for p in parts if not (path / p).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{path} is not a diffusers-layout model folder: missing {', '.join(missing)}/ "
            f"(expected {', '.join(p + '/' for p in parts)}; weights are read from local "
            "folders only, never downloaded)"
        )
    return path


class _Encoders:
    """What FLUX and SDXL share: a VAE, two tokenizers and two text encoders, devices,
    dtypes and fingerprints."""

    model = ""
    text_parts = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")

    @classmethod
    def classes(cls) -> dict[str, str]:
        """Folder -> the diffusers / transformers class (``package.Name``) that loads it, from
        the model registry."""
        return dict(MODELS[cls.model].components)

    @property
    def latent_channels(self) -> int:
        """The VAE's latent channels the model expects (the model registry's)."""
        return MODELS[self.model].latent_channels

    def __init__(
        self,
        vae: Any,
        text_encoder: Any,
        text_encoder_2: Any,
        tokenizer: Any,
        tokenizer_2: Any,
        max_sequence_length: int | None = None,
    ) -> None:
        if max_sequence_length is None:  # the model registry's T5 length (None: no T5)
            max_sequence_length = MODELS[self.model].t5_max_length
        if max_sequence_length is not None and not 1 <= int(max_sequence_length) <= 512:
            raise ValueError(f"max_sequence_length must be in [1, 512], got {max_sequence_length}")
        self.max_sequence_length = None if max_sequence_length is None else int(max_sequence_length)
        channels = int(vae.config.latent_channels)
        if channels != self.latent_channels:
            raise ValueError(
                f"{type(self).__name__} expects a VAE with {self.latent_channels} latent "
                f"channels, got {channels} (is this the right model's vae/?)"
            )
        self.vae = vae.train(False).requires_grad_(False)
        spec = MODELS[self.model]  # the registry's defaults; the checkpoint's config wins
        scaling = getattr(vae.config, "scaling_factor", None)
        self.scaling_factor = float(scaling) if scaling is not None else spec.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else spec.shift_factor
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.text_encoder = text_encoder.train(False).requires_grad_(False)
        self.text_encoder_2 = text_encoder_2.train(False).requires_grad_(False)
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self._fingerprints: dict[str, str] = {}

    @property
    def device(self) -> torch.device:
        """The VAE's device (the text encoders' may differ; inputs go to each one's own)."""
        return _device_of(self.vae)

    @property
    def dtype(self) -> torch.dtype:
        """The VAE's parameter dtype (latents come out in it)."""
        return _dtype_of(self.vae)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> normalised latents [B, C, H/8, W/8] in the VAE's dtype."""
        if pixel_values.dtype != torch.uint8 or pixel_values.ndim != 4:
            raise ValueError(
                "encode_images expects uint8 pixels [B, 3, H, W], got "
                f"{pixel_values.dtype} {tuple(pixel_values.shape)}"
            )
        f = self.vae_scale_factor
        if pixel_values.shape[-2] % f or pixel_values.shape[-1] % f:
            raise ValueError(f"image height and width must be multiples of {f}, got "
                             f"{tuple(pixel_values.shape[-2:])}")
        x = pixel_values.to(self.device, non_blocking=True).to(torch.float32)
        x = (x / 127.5 - 1.0).to(self.dtype)
        with torch.no_grad():
            z = self.vae.encode(x).latent_dist.mode()
        return (z - self.shift_factor) * self.scaling_factor

    @classmethod
    def _load(
        cls, folder: str | os.PathLike, device: torch.device | str, dtype: torch.dtype,
        **settings: Any,
    ) -> Any:
        """Every folder of ``classes`` loaded locally (models in ``dtype`` on ``device``)."""
        import diffusers
        import transformers

        classes = cls.classes()
        path = _require_folder(folder, tuple(classes))
        modules: dict[str, Any] = {}
        for part, dotted in classes.items():
            library, _, name = dotted.partition(".")
            loader = getattr({"diffusers": diffusers, "transformers": transformers}[library], name)
            if part.startswith("tokenizer"):
                loaded = loader.from_pretrained(path / part, local_files_only=True)
            elif part == "vae":
                loaded = loader.from_pretrained(
                    path / part, torch_dtype=dtype, local_files_only=True).to(device)
            else:
                loaded = loader.from_pretrained(
                    path / part, dtype=dtype, local_files_only=True).to(device)
            modules[part] = loaded
        return cls(**modules, **settings)

    def fingerprint(self, part: str) -> str:
        """Digest of the modules behind ``"image"`` (the VAE) or ``"text"`` (tokenizers and
        text encoders, plus the text settings such as the T5 length)."""
        if part not in ("image", "text"):
            raise ValueError(f"part must be 'image' or 'text', got {part!r}")
        if part not in self._fingerprints:
            if part == "image":
                digest = module_fingerprint(self.vae)
            else:
                h = hashlib.sha256(json.dumps(self.text_settings(), sort_keys=True).encode())
                for name in self.text_parts:
                    module = getattr(self, name)
                    fp = (tokenizer_fingerprint(module) if name.startswith("tokenizer")
                          else module_fingerprint(module))
                    h.update(f"{name}:{fp}".encode())
                digest = h.hexdigest()
            self._fingerprints[part] = digest
        return self._fingerprints[part]

    def text_settings(self) -> dict[str, Any]:
        """The settings besides weights that determine ``encode_text``'s output: the model
        and the T5 padding length."""
        return {"model": self.model, "max_sequence_length": self.max_sequence_length}

    def text_dtype(self) -> torch.dtype:
        """The dtype ``encode_text`` returns."""
        return _dtype_of(getattr(self, self.text_parts[-1]))

    def to(self, device: torch.device | str) -> _Encoders:
        """Move every module to ``device``; returns self."""
        for name in ("vae", *self.text_parts):
            module = getattr(self, name)
            if isinstance(module, torch.nn.Module):
                module.to(device)
        return self


class _T5Encoders(_Encoders):
    """Models with a T5 sequence (FLUX, SD3): its padding length is a setting."""

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        max_sequence_length: int | None = None,
    ) -> Any:
        """Load from a local diffusers folder (only its encoders and tokenizers);
        ``max_sequence_length`` defaults to the model registry's T5 length (FLUX 512, SD3
        77)."""
        return cls._load(folder, device, dtype, max_sequence_length=max_sequence_length)


class FluxEncoders(_T5Encoders):
    """FLUX.1's VAE (16 channels), CLIP-L (pooled) and T5-XXL (sequence) encoders.

    ``max_sequence_length``: the T5 padding length (512 for dev, 256 for schnell), as the
    pipeline's argument of that name.
    """

    model = "flux"

    def encode_text(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """``prompt_embeds`` [B, max_sequence_length, D_t5] (T5, padded, unmasked as the
        pipeline runs it), ``pooled_prompt_embeds`` [B, D_clip] and ``text_lengths`` [B]."""
        captions = _require_captions(captions)
        clip_ids = self.tokenizer(
            captions, padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_overflowing_tokens=False, return_length=False,
            return_tensors="pt",
        ).input_ids
        t5 = self.tokenizer_2(
            captions, padding="max_length", max_length=self.max_sequence_length,
            truncation=True, return_length=False, return_overflowing_tokens=False,
            return_tensors="pt",
        )
        with torch.no_grad():
            pooled = self.text_encoder(
                clip_ids.to(_device_of(self.text_encoder)), output_hidden_states=False
            ).pooler_output.to(_dtype_of(self.text_encoder))
            embeds = self.text_encoder_2(
                t5.input_ids.to(_device_of(self.text_encoder_2)), output_hidden_states=False
            )[0].to(_dtype_of(self.text_encoder_2))
        return {
            "prompt_embeds": embeds,
            "pooled_prompt_embeds": pooled,
            "text_lengths": t5.attention_mask.sum(dim=1).to(torch.int64),
        }


class SDXLEncoders(_Encoders):
    """SDXL's VAE (4 channels) and two CLIP text encoders (penultimate states, 77 tokens)."""

    model = "sdxl"

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> SDXLEncoders:
        """Load from a local SDXL diffusers folder (only its encoders and tokenizers). The SDXL
        VAE overflows in float16: keep float32 (or use a fp16-fixed VAE) for it."""
        return cls._load(folder, device, dtype)

    def encode_text(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """``prompt_embeds`` [B, 77, D1 + D2] (both CLIPs' penultimate hidden states),
        ``pooled_prompt_embeds`` [B, D2] (the second CLIP's projection) and ``text_lengths``."""
        captions = _require_captions(captions)
        states, pooled, lengths = [], None, None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder),
                                   (self.tokenizer_2, self.text_encoder_2)):
            tokens = tokenizer(
                captions, padding="max_length", max_length=tokenizer.model_max_length,
                truncation=True, return_tensors="pt",
            )
            with torch.no_grad():
                out = encoder(tokens.input_ids.to(_device_of(encoder)), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]
            states.append(out.hidden_states[-2])
            lengths = tokens.input_ids.shape[1]
        dtype = _dtype_of(self.text_encoder_2)
        return {
            "prompt_embeds": torch.cat(states, dim=-1).to(dtype),
            "pooled_prompt_embeds": pooled.to(dtype),
            "text_lengths": torch.full((len(captions),), lengths, dtype=torch.int64),
        }


class SD3Encoders(_T5Encoders):
    """SD3's VAE (16 channels), two CLIPs (penultimate states, projected pooled outputs) and
    T5: ``prompt_embeds`` [B, 77 + max_sequence_length, D_t5], the CLIP states zero-padded
    to T5's width and followed by T5's; ``pooled_prompt_embeds`` both CLIPs' concatenated."""

    model = "sd3"
    text_parts = (*_Encoders.text_parts, "tokenizer_3", "text_encoder_3")

    def __init__(
        self,
        vae: Any,
        text_encoder: Any,
        text_encoder_2: Any,
        text_encoder_3: Any,
        tokenizer: Any,
        tokenizer_2: Any,
        tokenizer_3: Any,
        *,
        max_sequence_length: int | None = None,
    ) -> None:
        super().__init__(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2,
                         max_sequence_length)
        self.text_encoder_3 = text_encoder_3.train(False).requires_grad_(False)
        self.tokenizer_3 = tokenizer_3

    def encode_text(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """``prompt_embeds`` [B, 77 + L, D_t5], ``pooled_prompt_embeds`` [B, P1 + P2] and
        ``text_lengths`` (77 + L: SD3 attends to every row)."""
        captions = _require_captions(captions)
        states, pooled = [], []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder),
                                   (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenizer(captions, padding="max_length",
                            max_length=self.tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            with torch.no_grad():
                out = encoder(ids.to(_device_of(encoder)), output_hidden_states=True)
            pooled.append(out[0])
            states.append(out.hidden_states[-2].to(_dtype_of(self.text_encoder)))
        ids = self.tokenizer_3(captions, padding="max_length", max_length=self.max_sequence_length,
                               truncation=True, add_special_tokens=True,
                               return_tensors="pt").input_ids
        with torch.no_grad():
            t5 = self.text_encoder_3(ids.to(_device_of(self.text_encoder_3)))[0]
        t5 = t5.to(_dtype_of(self.text_encoder_3))
        clip = torch.cat(states, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        embeds = torch.cat([clip, t5], dim=-2)
        return {
            "prompt_embeds": embeds,
            "pooled_prompt_embeds": torch.cat(pooled, dim=-1),
            "text_lengths": torch.full((len(captions),), embeds.shape[1], dtype=torch.int64),
        }

