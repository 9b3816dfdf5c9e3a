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
    python examples/train_sdxl_lora.py --weights .cache/tiny-sdxl --steps 3 --max-area 65536
    python examples/train_sdxl_lora.py --weights stable-diffusion-xl-base-1.0 --data my_photos/
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from lora_loop import add_lora, parser, train_steps
from torch.utils.data import DataLoader
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from bucketing import BucketLadder, TextToImageDataset, assign, scan
from samplers import BucketBatchSampler
from transforms import (
    BucketResizeCrop,
    CaptionTransform,
    SDXLTokenizer,
    collate,
    sdxl_add_time_ids,
    to_model_input,
)


def build_loader(args: argparse.Namespace) -> DataLoader:
    """The data side, as an SDXL user wires it."""
    index = scan(args.data, workers=1)
    overrides = {"max_area": args.max_area} if args.max_area else {}
    # Buckets fitted to the data, as bucket-cache and the builders fit them by default.
    assignment = assign(index, BucketLadder.from_data(
        index, base=BucketLadder.for_model("sdxl", **overrides)))
    dataset = TextToImageDataset(
        index, assignment,
        image_transform=BucketResizeCrop(crop="random", flip_p=0.5),
        caption_transform=CaptionTransform(dropout=0.1, template=args.template),
        model_transform=SDXLTokenizer.from_pretrained_dir(args.weights),
        seed=args.seed,
    )
    sampler = BucketBatchSampler(assignment, batch_size=args.batch_size, seed=args.seed)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                      num_workers=args.workers, pin_memory=torch.cuda.is_available())


def encode_prompt(encoders, ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The script's ``encode_prompt``: both encoders' penultimate hidden states concatenated,
    and the last (bigG) encoder's pooled, projected embedding."""
    embeds, pooled = [], None
    for encoder, input_ids in zip(encoders, ids, strict=True):
        out = encoder(input_ids, output_hidden_states=True, return_dict=False)
        pooled = out[0]
        embeds.append(out[-1][-2])
    return torch.cat(embeds, dim=-1), pooled


def train(args: argparse.Namespace) -> float:
    """Run ``args.steps`` optimizer steps; return the last loss."""
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    loader = build_loader(args)
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
    optimizer = torch.optim.AdamW(add_lora(unet, args.rank), lr=args.lr)

    def step(batch: dict) -> tuple[torch.Tensor, str]:
        inputs = to_model_input(batch, device, torch.float32)
        b, _, height, width = inputs["pixel_values"].shape
        with torch.no_grad():
            latents = vae.encode(inputs["pixel_values"]).latent_dist.sample()
            latents = (latents * vae.config.scaling_factor).to(dtype)
            prompt_embeds, pooled = encode_prompt(
                encoders, [inputs["input_ids_one"], inputs["input_ids_two"]])
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,),
                                  device=device).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        time_ids = sdxl_add_time_ids(inputs, dtype=dtype)  # [B, 6] from our sizes
        pred = unet(noisy, timesteps, prompt_embeds, return_dict=False,
                    added_cond_kwargs={"time_ids": time_ids, "text_embeds": pooled})[0]
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        loss = F.mse_loss(pred.float(), target.float())
        return loss, f"bucket {width}x{height}  batch {b}  time_ids {time_ids[0].int().tolist()}"

    loss = train_steps(loader, args.steps, step, optimizer)
    if args.save:
        unet.save_lora_adapter(args.save)
        print(f"LoRA saved in {args.save}")
    return loss


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    return parser(__doc__.split("\n\n")[0], "SDXL checkout folder (unet/, vae/, "
                  "text_encoder/, text_encoder_2/, scheduler/, tokenizer/, tokenizer_2/)"
                  ).parse_args(argv)


if __name__ == "__main__":
    train(parse_args())
