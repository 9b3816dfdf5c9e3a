"""LoRA fine-tuning of SDXL on aspect-bucketed batches: the real diffusers classes.

An SDXL checkout (``--weights``: unet/, vae/, text_encoder/, text_encoder_2/, scheduler/,
tokenizer/, tokenizer_2/) is loaded with diffusers and transformers; the data side is this
library (scan -> SDXL ladder -> TextToImageDataset with SDXLTokenizer -> BucketBatchSampler).
Each step follows diffusers' ``train_text_to_image_lora_sdxl.py``: VAE latents times the
scaling factor, DDPM noise at uniform timesteps, prompt embeddings from both text encoders'
penultimate hidden states, the pooled bigG embedding, and ``add_time_ids`` from each image's
own original size, crop and bucket (``sdxl_add_time_ids``: the script's ``compute_time_ids``
with the bucket as target size), an epsilon (or v) target for the LoRA-adapted UNet.

    python examples/tiny_models.py sdxl .cache/tiny-sdxl --tokenizers .cache/sdxl-tokenizers
    python examples/train_sdxl_lora.py --weights .cache/tiny-sdxl --max-steps 3 --max-area 65536 \
        --output runs/tiny
    python examples/train_sdxl_lora.py --weights stable-diffusion-xl-base-1.0 --data my_photos/ \
        --epochs 10 --grad-accum 2 --lr-scheduler cosine --checkpoint-every 500 --output runs/me

The loop, checkpoints, resume (``--resume latest``) and the saved LoRA files are
examples/lora_loop.py's; the kohya file's keys are ``lora_unet_*``, as diffusers' SDXL
DreamBooth script writes them with ``convert_state_dict_to_kohya``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import convert_state_dict_to_diffusers
from lora_loop import KOHYA_FILE, LORA_FILE, add_lora, build_loader, check_args, parser, save_kohya
from lora_loop import train as train_loop
from peft.utils import get_peft_model_state_dict
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from transforms import SDXLTokenizer, sdxl_add_time_ids, to_model_input


def encode_prompt(encoders, ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The script's ``encode_prompt``: both encoders' penultimate hidden states concatenated,
    and the last (bigG) encoder's pooled, projected embedding."""
    embeds, pooled = [], None
    for encoder, input_ids in zip(encoders, ids, strict=True):
        out = encoder(input_ids, output_hidden_states=True, return_dict=False)
        pooled = out[0]
        embeds.append(out[-1][-2])
    return torch.cat(embeds, dim=-1), pooled


def train(args: argparse.Namespace) -> list[float]:
    """Train; return the loss of every optimizer step this run took."""
    torch.manual_seed(0 if args.seed is None else args.seed)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    loader = build_loader(args, ("sdxl",), SDXLTokenizer.from_pretrained_dir(args.weights))
    weights = Path(args.weights)
    scheduler = DDPMScheduler.from_pretrained(weights, subfolder="scheduler")
    vae = AutoencoderKL.from_pretrained(weights, subfolder="vae")  # float32, as the script
    encoders = (
        CLIPTextModel.from_pretrained(weights, subfolder="text_encoder", torch_dtype=dtype),
        CLIPTextModelWithProjection.from_pretrained(weights, subfolder="text_encoder_2",
                                                    torch_dtype=dtype),
    )
    unet = UNet2DConditionModel.from_pretrained(weights, subfolder="unet", torch_dtype=dtype)
    for frozen in (vae, *encoders, unet):
        frozen.requires_grad_(False).to(device)
    params = add_lora(unet, args.rank)

    def step(batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, str]:
        inputs = to_model_input(batch, device, torch.float32)
        b, _, height, width = inputs["pixel_values"].shape
        with torch.no_grad():
            latents = vae.encode(inputs["pixel_values"]).latent_dist.sample(generator=generator)
            latents = (latents * vae.config.scaling_factor).to(dtype)
            prompt_embeds, pooled = encode_prompt(
                encoders, [inputs["input_ids_one"], inputs["input_ids_two"]])
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=dtype)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,),
                                  generator=generator, device=device).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        time_ids = sdxl_add_time_ids(inputs, dtype=dtype)  # [B, 6] from our sizes
        pred = unet(noisy, timesteps, prompt_embeds, return_dict=False,
                    added_cond_kwargs={"time_ids": time_ids, "text_embeds": pooled})[0]
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        per_sample = (pred.float() - target.float()).square().mean(dim=(1, 2, 3))  # [B]
        return per_sample, (f"bucket {width}x{height}  batch {b}  "
                            f"time_ids {time_ids[0].int().tolist()}")

    def save_lora(folder: Path) -> None:
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=layers)
        save_kohya(folder / LORA_FILE, folder / KOHYA_FILE)

    return train_loop(args, loader, unet, params, step, save_lora)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = parser(__doc__.split("\n\n")[0], "SDXL checkout folder (unet/, vae/, "
               "text_encoder/, text_encoder_2/, scheduler/, tokenizer/, tokenizer_2/)")
    return check_args(p, p.parse_args(argv))


if __name__ == "__main__":
    train(parse_args())
