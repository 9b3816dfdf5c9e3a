"""LoRA fine-tuning of FLUX.1 on aspect-bucketed batches: the real diffusers classes.

A FLUX.1-dev checkout (``--weights``: transformer/, vae/, text_encoder/, text_encoder_2/,
tokenizer/, tokenizer_2/) is loaded with diffusers and transformers; the data side is this
library (scan -> FLUX ladder -> TextToImageDataset with FluxTokenizer -> BucketBatchSampler).
Each step: the frozen VAE encodes the bucket's pixels, the frozen CLIP and T5 encode its
captions, a flow-matching target (noise - latents) is fitted by the transformer with a peft
LoRA, at timesteps drawn logit-normal and shifted for the bucket's resolution (mu from the
image token count, as diffusers' ``calculate_shift``), as diffusers' FLUX training scripts do.
Attention uses PyTorch's default SDPA backend choice (no backend is forced).

With ``--cache DIR`` (an encoder cache that ``bucket-cache`` built from the same ``--data`` and
``--max-area``), the batches carry ``latents``, ``prompt_embeds`` and ``pooled_prompt_embeds``
instead of pixels and token ids: neither the VAE nor the text encoders are loaded. The crops
and flips are the cache's (``bucket-cache --crop random --variants K --flip-p P``), the stored
latent is the VAE posterior's mode, and the captions are the index's as cached (a
``--template`` only with a cache built with the same ``bucket-cache --template``; caption
dropout to "" still works). A cache built for another ladder or template is refused before
the first step, saying which buckets differ. Trimmed T5 rows (the cache's default) are
kept out of attention with the batch's ``t5_attention_mask``; a ``--t5-padding full`` cache
feeds every padded row, as the on-the-fly path does.

A text-only cache (``bucket-cache --text-only``) holds the caption embeddings alone: the
pixels are decoded, randomly cropped and flipped per occurrence as without a cache (fresh
crops every epoch), the VAE encodes them each step, and the text encoders (T5-XXL's 9.5 GB
in bf16) are never loaded.

    python examples/tiny_models.py flux .cache/tiny-flux --tokenizers .cache/flux-tokenizers
    python examples/train_flux_lora.py --weights .cache/tiny-flux --max-steps 3 --max-area 65536 \
        --output runs/tiny
    python examples/train_flux_lora.py --weights FLUX.1-dev --config examples/dataset.toml \
        --epochs 10 --grad-accum 4 --lr-scheduler cosine --checkpoint-every 500 --output runs/me
    python examples/train_flux_lora.py --weights FLUX.1-dev --config examples/dataset.toml \
        --epochs 10 --grad-accum 4 --lr-scheduler cosine --output runs/me --resume latest
    bucket-cache my_photos/ --weights FLUX.1-dev --out cache/ --max-area 1048576
    python examples/train_flux_lora.py --weights FLUX.1-dev --data my_photos/ --cache cache/
    bucket-cache my_photos/ --weights FLUX.1-dev --out text/ --max-area 1048576 --text-only
    python examples/train_flux_lora.py --weights FLUX.1-dev --data my_photos/ --cache text/

With ``--loss-mask`` the data's loss masks weight the loss (a manifest's ``loss_mask`` column;
``--loss-mask alpha`` the images' alpha; ``--loss-mask '{stem}_mask.png'`` a folder's mask
files): each latent token counts by the share of its pixels the mask covers
(``loss_weight_for``), so a masked-out background does not train.

The loop, checkpoints, resume and the saved LoRA files are examples/lora_loop.py's. The kohya
file's keys are ``lora_transformer_*`` (diffusers' ``convert_state_dict_to_kohya`` of the
``transformer.`` keys, the names OneTrainer writes and ComfyUI loads for FLUX).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from lora_loop import KOHYA_FILE, LORA_FILE, add_lora, build_loader, check_args, parser, save_kohya
from lora_loop import train as train_loop
from peft.utils import get_peft_model_state_dict
from torch.utils.data import DataLoader
from transformers import CLIPTextModel, T5EncoderModel

from bucketing import EncoderCache, TextToImageDataset
from transforms import (
    BucketResizeCrop,
    CaptionTransform,
    FluxTokenizer,
    flux_image_ids,
    flux_time_shift_mu,
    loss_weight_for,
    pack_latents,
    shift_timesteps,
    to_model_input,
    unpack_latents,
)

MODELS = ("flux", "flux-schnell")


def data_loader(args: argparse.Namespace, cache: EncoderCache | None = None) -> DataLoader:
    """The data side, as a FLUX user wires it: pixels and token ids (from ``--config`` or
    ``--data``), or ``cache``'s latents and text embeddings."""
    if cache is None:
        tokenizer = FluxTokenizer.from_flux_dir(args.weights, t5_max_length=args.t5_max_length)
        return build_loader(args, MODELS, tokenizer)

    def cached(index, assignment, seed):
        # refused here, before any worker, when the cache was built for another ladder or
        # without this template
        captions = CaptionTransform(dropout=0.1, template=args.template)
        if cache.images:
            return TextToImageDataset(index, assignment, encoder_cache=cache, seed=seed,
                                      caption_transform=captions)
        # text-only: embeddings cached, pixels fitted (and flipped) every occurrence
        return TextToImageDataset(index, assignment, encoder_cache=cache, seed=seed,
                                  image_transform=BucketResizeCrop(crop="random", flip_p=0.5),
                                  caption_transform=captions)

    return build_loader(args, MODELS, None, cached)


def load_models(args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                images: bool = True, text: bool = True):
    """The frozen VAE (None without ``images``) and text encoders (None without ``text``),
    and the transformer."""
    weights = Path(args.weights)
    vae = clip = t5 = None
    if images:
        vae = AutoencoderKL.from_pretrained(weights, subfolder="vae", torch_dtype=dtype)
    if text:
        clip = CLIPTextModel.from_pretrained(weights, subfolder="text_encoder", torch_dtype=dtype)
        t5 = T5EncoderModel.from_pretrained(weights, subfolder="text_encoder_2",
                                            torch_dtype=dtype)
    transformer = FluxTransformer2DModel.from_pretrained(weights, subfolder="transformer",
                                                         torch_dtype=dtype)
    for frozen in (vae, clip, t5, transformer):
        if frozen is not None:
            frozen.requires_grad_(False).to(device)
    return vae, clip, t5, transformer


def open_cache(path: str) -> EncoderCache:
    """The encoder cache at ``path``, refused unless it was built for FLUX."""
    cache = EncoderCache.open(path)
    if cache.model not in ("flux", "flux-schnell"):
        raise SystemExit(f"{path} was built for {cache.model}, not FLUX: bucket-cache --model flux")
    return cache


def train(args: argparse.Namespace) -> list[float]:
    """Train; return the loss of every optimizer step this run took."""
    torch.manual_seed(_seed(args))
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cache = open_cache(args.cache) if args.cache else None
    loader = data_loader(args, cache)
    vae, clip, t5, transformer = load_models(args, device, dtype,
                                             images=cache is None or not cache.images,
                                             text=cache is None)
    params = add_lora(transformer, args.rank)

    def step(batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, str]:
        inputs = to_model_input(batch, device, dtype)  # pixels in [-1, 1] on the device
        attention = None
        if "latents" in inputs:  # encoded once, by bucket-cache
            latents = inputs["latents"].to(dtype)
            b, height, width = latents.shape[0], latents.shape[2] * 8, latents.shape[3] * 8
        else:  # pixels fitted this step (no cache, or a text-only one)
            b, _, height, width = inputs["pixel_values"].shape
            with torch.no_grad():
                dist = vae.encode(inputs["pixel_values"]).latent_dist
                latents = dist.sample(generator=generator)
                latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        if cache is not None:  # caption embeddings encoded once, by bucket-cache
            pooled = inputs["pooled_prompt_embeds"].to(dtype)
            prompt_embeds = inputs["prompt_embeds"].to(dtype)
            if cache.t5_padding == "trimmed":  # T5 rows padded with zeros by collate: masked
                text = inputs["t5_attention_mask"].bool()
                image = text.new_ones(b, (height // 16) * (width // 16))
                attention = {"attention_mask": torch.cat([text, image], 1)[:, None, None, :]}
        else:
            with torch.no_grad():
                pooled = clip(inputs["clip_input_ids"], output_hidden_states=False).pooler_output
                prompt_embeds = t5(inputs["t5_input_ids"])[0]
        lh, lw = latents.shape[-2:]

        # Flow matching: x_t = (1 - t) x_0 + t noise, target noise - x_0; t logit-normal,
        # shifted toward noise for large buckets (mu grows with the image token count).
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=dtype)
        mu = flux_time_shift_mu(height, width)
        u = torch.randn(b, generator=generator, device=device)
        t = shift_timesteps(torch.sigmoid(u), mu).to(dtype)
        noisy = (1 - t[:, None, None, None]) * latents + t[:, None, None, None] * noise
        guidance = (torch.full((b,), args.guidance, device=device, dtype=dtype)
                    if transformer.config.guidance_embeds else None)
        pred = transformer(
            hidden_states=pack_latents(noisy),
            timestep=t,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=prompt_embeds,
            txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype),
            img_ids=flux_image_ids(height, width, dtype=dtype, device=device),
            joint_attention_kwargs=attention,
            return_dict=False,
        )[0]
        if args.loss_mask:  # each 2x2 token weighs the share of its pixels the mask covers
            weight = loss_weight_for(inputs["loss_mask"], "flux", latent_hw=(lh, lw))
            error = (pred.float() - pack_latents(noise - latents).float()).square() * weight
            per_sample = error.sum(dim=(1, 2)) / (weight.sum(dim=(1, 2)) * pred.shape[-1]
                                                  ).clamp_min(1.0)
        else:
            error = unpack_latents(pred, lh, lw).float() - (noise - latents).float()
            per_sample = error.square().mean(dim=(1, 2, 3))  # [B]: each image weighs the same
        return per_sample, (f"bucket {width}x{height}  batch {b}  "
                            f"tokens {(height // 16) * (width // 16)}  mu {mu:.3f}")

    def save_lora(folder: Path) -> None:
        FluxPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(
            transformer))
        save_kohya(folder / LORA_FILE, folder / KOHYA_FILE, prefix="lora_")

    return train_loop(args, loader, transformer, params, step, save_lora)


def _seed(args: argparse.Namespace) -> int:
    return 0 if args.seed is None else args.seed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = parser(__doc__.split("\n\n")[0], "FLUX.1 checkout folder (transformer/, vae/, "
               "text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/)")
    p.add_argument("--t5-max-length", type=int, default=None, help="default 512")
    p.add_argument("--guidance", type=float, default=1.0, help="FLUX.1-dev guidance value")
    p.add_argument("--cache", metavar="DIR", help="encoder cache (bucket-cache) of the same "
                   "--data and --max-area: train from its latents and text embeddings")
    p.add_argument("--loss-mask", nargs="?", const="loss_mask", metavar="RULE",
                   help="weight the loss by the data's masks: a manifest column (default "
                   "loss_mask), 'alpha', or a folder template such as '{stem}_mask.png'")
    args = check_args(p, p.parse_args(argv))
    args.column_map = {"loss_mask": args.loss_mask} if args.loss_mask else None
    if args.cache and args.config:
        p.error("--cache reads one folder's encoder cache: give --data, not --config")
    return args


if __name__ == "__main__":
    train(parse_args())
