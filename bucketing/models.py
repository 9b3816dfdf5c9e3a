"""The model registry: every number the library knows about each model, in one table.

``MODELS`` maps a model name ("flux", "flux-schnell", "sdxl", "sd3", "sd15") to its
:class:`ModelSpec`: the bucket geometry (side ``multiple``, default ``max_area``, levels,
width ``step``), the T5 length, the VAE's latent channels and default normalisation, the
transformer's patch size and timestep shift, the sizes of the text embeddings, and the classes
that tokenize and encode for it (dotted names, so this module needs no torch). Every other
table derives from it: ``bucketing.ladder.MODEL_SPECS`` (the ladder presets), the encoder
cache's size estimates, ``bucket-cache --model``, ``tokenizer_for_model`` and the encoders'
default T5 length. To change a number (say SD3's T5 length), change it here.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any

CLIP_ROWS = 77  # a CLIP text encoder's sequence length


@dataclass(frozen=True)
class ModelSpec:
    """One model's numbers and classes.

    Geometry: bucket sides are multiples of ``multiple``; ``max_area`` is the default top
    level, ``levels`` the default level areas, ``step`` the width grid, ``max_aspect`` the
    widest aspect. ``canonical``: the sizes people train the model at (and curate their data
    to); its ladder preset holds each of them exactly.

    Model side, as in diffusers' configs: ``vae_scale_factor``, the transformer's
    ``patch_size`` (1 for UNets), ``time_shift`` (``(base_seq_len, max_seq_len, base_shift,
    max_shift)`` of the scheduler's resolution-dependent shift; None: no shift),
    ``latent_channels``, and the VAE's ``scaling_factor`` / ``shift_factor`` (defaults: a
    loaded checkpoint's config wins).

    Text: ``t5_max_length`` (None: no T5), ``clip_rows`` (CLIP rows in ``prompt_embeds``
    before T5's), ``text_width`` (its last dimension), ``pooled`` (width of the pooled
    embedding; 0: none), ``t5_trimmed`` (the encoder cache stores each caption's T5 rows up to
    its tokens). ``tokenizer`` and ``encoders`` name the classes (``module.Class``; encoders
    None: no encoder wrapper) and ``components`` the diffusers-layout folders with the class
    that loads each.
    """

    name: str
    multiple: int
    max_area: int
    levels: tuple[int, ...]
    step: int = 64
    max_aspect: float = 4.0
    t5_max_length: int | None = None
    vae_scale_factor: int = 8
    patch_size: int = 1
    time_shift: tuple[int, int, float, float] | None = None
    latent_channels: int = 4
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    clip_rows: int = CLIP_ROWS
    text_width: int = 768
    pooled: int = 0
    t5_trimmed: bool = False
    tokenizer: str = ""
    encoders: str | None = None
    components: tuple[tuple[str, str], ...] = ()
    canonical: tuple[tuple[int, int], ...] = ()

    @property
    def text_length(self) -> int:
        """Rows of ``prompt_embeds`` at the padded length: CLIP's, then T5's."""
        return self.clip_rows + (self.t5_max_length or 0)


_VAE = ("vae", "diffusers.AutoencoderKL")
_CLIP = "transformers.CLIPTextModel"
_CLIP_PROJ = "transformers.CLIPTextModelWithProjection"
_CLIP_TOK = "transformers.CLIPTokenizer"
_T5 = "transformers.T5EncoderModel"
_T5_TOK = "transformers.T5TokenizerFast"

# Levels from 256² to 1024² (128² to 512² for SD1.5) so that small photos train at their size
# instead of being rejected, and a 16 px width step where the model allows it: see
# docs/ladders.md "Levels are a quality choice". They equal ladder.default_levels(max_area,
# multiple) (tests/test_models.py checks it).
def _areas(*sides: int) -> tuple[int, ...]:
    return tuple(s * s for s in sides)


_LEVELS_16 = _areas(256, 288, 336, 384, 448, 512, 592, 672, 784, 896, 1024)


def _mirrored(*sizes: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """``sizes`` and their mirrors, sorted, without duplicates."""
    return tuple(sorted({s for w, h in sizes for s in ((w, h), (h, w))}))


# The canonical training sizes: each preset holds them exactly, so an image of one of them is
# neither resized nor cropped.
_FLUX_CANONICAL = _mirrored((1024, 1024), (1216, 832), (1344, 768), (1152, 896), (1536, 640),
                            (1248, 832), (1360, 768), (1024, 768), (768, 768), (512, 512))
_SDXL_CANONICAL = _mirrored((1024, 1024), (1152, 896), (1216, 832), (1344, 768), (1536, 640),
                            (1024, 768), (768, 768), (512, 512))
_SD15_CANONICAL = _mirrored((512, 512), (512, 384), (576, 448), (640, 384))

# FLUX.1: 8x VAE then 2x2 patches -> sides multiple of 16; T5 512 (dev) / 256 (schnell);
# prompt_embeds are T5's alone. The dev scheduler's shift: base_image_seq_len 256 ->
# base_shift 0.5, max_image_seq_len 4096 -> max_shift 1.15 (schnell's does not shift).
_FLUX = ModelSpec(
    "flux", 16, 1024 * 1024, _LEVELS_16, step=16, t5_max_length=512, patch_size=2,
    time_shift=(256, 4096, 0.5, 1.15), latent_channels=16, scaling_factor=0.3611,
    shift_factor=0.1159, clip_rows=0, text_width=4096, pooled=768, t5_trimmed=True,
    tokenizer="transforms.tokenize.FluxTokenizer", encoders="transforms.encoders.FluxEncoders",
    components=(_VAE, ("text_encoder", _CLIP), ("text_encoder_2", _T5),
                ("tokenizer", _CLIP_TOK), ("tokenizer_2", _T5_TOK)),
    canonical=_FLUX_CANONICAL,
)

MODELS: dict[str, ModelSpec] = {
    "flux": _FLUX,
    "flux-schnell": dataclasses.replace(
        _FLUX, name="flux-schnell", t5_max_length=256, time_shift=None),
    # SD3: 8x VAE then 2x2 patches -> 16; both CLIPs' 77 rows (zero-padded to T5's width)
    # then T5's, 77 long as in diffusers' SD3 training scripts.
    "sd3": ModelSpec(
        "sd3", 16, 1024 * 1024, _LEVELS_16, step=16, t5_max_length=77, patch_size=2,
        latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, text_width=4096,
        pooled=2048, tokenizer="transforms.tokenize.SD3Tokenizer",
        encoders="transforms.encoders.SD3Encoders",
        components=(_VAE, ("text_encoder", _CLIP_PROJ), ("text_encoder_2", _CLIP_PROJ),
                    ("text_encoder_3", _T5), ("tokenizer", _CLIP_TOK),
                    ("tokenizer_2", _CLIP_TOK), ("tokenizer_3", _T5_TOK)),
        canonical=_FLUX_CANONICAL,
    ),
    # SDXL: the UNet needs latent sides divisible by 4 (pixels by 32), but SDXL was trained on
    # 64-multiple buckets (1152x896, 1216x832, ...) and kohya uses 64: we use 64.
    "sdxl": ModelSpec(
        "sdxl", 64, 1024 * 1024, _areas(256, 320, 384, 448, 512, 576, 704, 768, 896, 1024),
        scaling_factor=0.13025, text_width=768 + 1280, pooled=1280,
        tokenizer="transforms.tokenize.SDXLTokenizer",
        encoders="transforms.encoders.SDXLEncoders",
        components=(_VAE, ("text_encoder", _CLIP), ("text_encoder_2", _CLIP_PROJ),
                    ("tokenizer", _CLIP_TOK), ("tokenizer_2", _CLIP_TOK)),
        canonical=_SDXL_CANONICAL,
    ),
    # SD1.5: 8x VAE and three 2x downsamplings in the UNet -> 64-multiples; 512x512 native.
    "sd15": ModelSpec(
        "sd15", 64, 512 * 512, _areas(128, 192, 256, 320, 384, 448, 512),
        tokenizer="transforms.tokenize.SD15Tokenizer",
        components=(_VAE, ("text_encoder", _CLIP), ("tokenizer", _CLIP_TOK)),
        canonical=_SD15_CANONICAL,
    ),
}


def model_spec(name: str) -> ModelSpec:
    """The registry entry of ``name``; a ValueError listing the known names otherwise."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


def encoder_models() -> tuple[str, ...]:
    """The models with an encoder wrapper (what ``bucket-cache`` can build a cache for)."""
    return tuple(name for name, spec in MODELS.items() if spec.encoders)


def named_class(dotted: str) -> Any:
    """The object a registry's dotted name (``package.module.Name``) refers to."""
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)
