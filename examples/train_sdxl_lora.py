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
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
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

REPO = Path(__file__).resolve().parent.parent


def build_loader(args: argparse.Namespace) -> tuple[DataLoader, BucketBatchSampler]:
    """The data side, as an SDXL user wires it."""
    index = scan(args.data, workers=1)
    overrides = {"max_area": args.max_area} if args.max_area else {}
    assignment = assign(index, BucketLadder.for_model("sdxl", **overrides))
    dataset = TextToImageDataset(
        index, assignment,
        image_transform=BucketResizeCrop(crop="random", flip_p=0.5),
        caption_transform=CaptionTransform(dropout=0.1, template=args.template),
        model_transform=SDXLTokenizer.from_pretrained_dir(args.weights),
        seed=args.seed,
    )
    sampler = BucketBatchSampler(assignment, batch_size=args.batch_size, seed=args.seed)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                        num_workers=args.workers, pin_memory=torch.cuda.is_available())
    return loader, sampler


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
    loader, sampler = build_loader(args)
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
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    lora = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora, lr=args.lr)
    print(f"LoRA: {sum(p.numel() for p in lora)} trainable parameters")

    step, epoch, loss = 0, 0, torch.tensor(float("nan"))
    start = time.perf_counter()
    while step < args.steps:
        sampler.set_epoch(epoch)
        loader.dataset.set_epoch(epoch)
        for batch in loader:
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
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

            step += 1
            print(f"step {step:3d}  epoch {epoch}  bucket {width}x{height}  batch {b}  "
                  f"time_ids {time_ids[0].int().tolist()}  loss {loss.item():.4f}")
            if step >= args.steps:
                break
        epoch += 1
    print(f"{step} steps in {time.perf_counter() - start:.1f} s")
    if args.save:
        unet.save_lora_adapter(args.save)
        print(f"LoRA saved in {args.save}")
    return loss.item()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True,
                   help="SDXL checkout folder (unet/, vae/, text_encoder/, text_encoder_2/, "
                   "scheduler/, tokenizer/, tokenizer_2/)")
    p.add_argument("--data", default=str(REPO / "examples" / "data"), help="images + captions")
    p.add_argument("--template", default="a photo, {caption}", help="caption template")
    p.add_argument("--max-area", type=int, default=None,
                   help="largest bucket area in pixels (default: SDXL's 1024*1024)")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps to run")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--rank", type=int, default=4, help="LoRA rank")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", help="folder to save the LoRA adapter into")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


if __name__ == "__main__":
    train(parse_args())
