"""Write a tiny, randomly initialised FLUX.1 or SDXL checkout to try the training examples on CPU.

The folders are complete diffusers checkouts (``save_pretrained`` of the real diffusers and
transformers classes, with tiny configs, the scheduler, the real tokenizers and the pipeline's
``model_index.json``), so the examples, diffusers' training scripts and
``FluxPipeline.from_pretrained`` / ``StableDiffusionXLPipeline.from_pretrained`` load them
exactly as they load FLUX.1-dev or SDXL base: nothing here is a stand-in, only small and
untrained. No weights are downloaded.

    python examples/tiny_models.py flux .cache/tiny-flux --tokenizers .cache/flux-tokenizers
    python examples/tiny_models.py sdxl .cache/tiny-sdxl --tokenizers .cache/sdxl-tokenizers
    python examples/train_flux_lora.py --weights .cache/tiny-flux --max-steps 3 --output runs/tiny

``--tokenizers`` is a folder with the model's ``tokenizer/`` (and ``tokenizer_2/``), e.g. from
``python tests/fetch_flux_tokenizers.py``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

TEXT_DIM = 32  # hidden size of every tiny text encoder


def _vae(latent_channels: int, **config) -> AutoencoderKL:
    """Four blocks, three 2x downsamplings: the real VAEs' factor 8."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=64,
        **config,
    )


def _clip_config(**extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408, hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=1, **extra,
    )


def _copy_tokenizers(tokenizers: Path, dest: Path, names: tuple[str, ...]) -> None:
    for name in names:
        if not (tokenizers / name).is_dir():
            raise SystemExit(f"{tokenizers / name} not found: --tokenizers must hold {names}")
        shutil.copytree(tokenizers / name, dest / name, dirs_exist_ok=True)


def write_tiny_flux(dest: Path, tokenizers: Path) -> Path:
    """transformer/, vae/, text_encoder/ (CLIP-L-like), text_encoder_2/ (T5-like), scheduler/,
    tokenizer/, tokenizer_2/ and model_index.json of a tiny FLUX.1-dev-like model."""
    torch.manual_seed(0)
    parts = {
        "transformer": FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
            pooled_projection_dim=TEXT_DIM, guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
        "vae": _vae(16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                    use_post_quant_conv=False),
        "text_encoder": CLIPTextModel(_clip_config()),
        "text_encoder_2": T5EncoderModel(T5Config(vocab_size=32128, d_model=TEXT_DIM, d_kv=8,
                                                  d_ff=64, num_layers=2, num_heads=2)),
        # FLUX.1-dev's scheduler_config.json.
        "scheduler": FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096),
    }
    _save(FluxPipeline, dest, parts, tokenizers, (CLIPTokenizer, T5TokenizerFast))
    return dest


def write_tiny_sdxl(dest: Path, tokenizers: Path) -> Path:
    """unet/, vae/, text_encoder/, text_encoder_2/ (with projection), scheduler/, tokenizer/,
    tokenizer_2/ and model_index.json of a tiny SDXL-base-like model (the UNet takes SDXL's
    text_time conditioning)."""
    torch.manual_seed(0)
    parts = {
        "unet": UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            cross_attention_dim=2 * TEXT_DIM, norm_num_groups=8, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + TEXT_DIM),
        "vae": _vae(4, scaling_factor=0.13025),
        "text_encoder": CLIPTextModel(_clip_config()),
        "text_encoder_2": CLIPTextModelWithProjection(_clip_config(projection_dim=TEXT_DIM)),
        # SDXL base's scheduler_config.json (the training scripts' DDPMScheduler).
        "scheduler": DDPMScheduler(beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", num_train_timesteps=1000,
                                   steps_offset=1),
    }
    _save(StableDiffusionXLPipeline, dest, parts, tokenizers, (CLIPTokenizer, CLIPTokenizer))
    return dest


def _save(pipeline_cls: type[DiffusionPipeline], dest: Path, parts: dict, tokenizers: Path,
          tokenizer_classes: tuple[type, type]) -> None:
    """Each part in its subfolder, the tokenizers copied, and the pipeline's own
    ``model_index.json`` (the class of every subfolder) written by ``save_config``."""
    for name, part in parts.items():
        part.save_pretrained(dest / name)
    _copy_tokenizers(tokenizers, dest, ("tokenizer", "tokenizer_2"))
    for name, cls in zip(("tokenizer", "tokenizer_2"), tokenizer_classes, strict=True):
        parts[name] = cls.from_pretrained(dest / name)
    pipeline_cls(**parts).save_config(dest)


def main(argv: list[str] | None = None) -> None:
    """Command line: ``tiny_models.py {flux,sdxl} DEST --tokenizers DIR``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", choices=["flux", "sdxl"])
    p.add_argument("dest", type=Path, help="folder to write the checkout into")
    p.add_argument("--tokenizers", type=Path, required=True,
                   help="folder holding the model's tokenizer/ and tokenizer_2/")
    args = p.parse_args(argv)
    write = write_tiny_flux if args.model == "flux" else write_tiny_sdxl
    print(f"tiny {args.model} checkout in {write(args.dest, args.tokenizers)}")


if __name__ == "__main__":
    main()
