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
latent is the VAE posterior's mode, and the captions are the index's as cached (no
``--template``; caption dropout to "" still works). Trimmed T5 rows (the cache's default) are
kept out of attention with the batch's ``t5_attention_mask``; a ``--t5-padding full`` cache
feeds every padded row, as the on-the-fly path does.

A text-only cache (``bucket-cache --text-only``) holds the caption embeddings alone: the
pixels are decoded, randomly cropped and flipped per occurrence as without a cache (fresh
crops every epoch), the VAE encodes them each step, and the text encoders (T5-XXL's 9.5 GB
in bf16) are never loaded.

    python examples/tiny_models.py flux .cache/tiny-flux --tokenizers .cache/flux-tokenizers
    python examples/train_flux_lora.py --weights .cache/tiny-flux --steps 3 --max-area 65536
    python examples/train_flux_lora.py --weights FLUX.1-dev --data my_photos/ --steps 1000
    bucket-cache my_photos/ --weights FLUX.1-dev --out cache/ --max-area 1048576
    python examples/train_flux_lora.py --weights FLUX.1-dev --data my_photos/ --cache cache/
    bucket-cache my_photos/ --weights FLUX.1-dev --out text/ --max-area 1048576 --text-only
    python examples/train_flux_lora.py --weights FLUX.1-dev --data my_photos/ --cache text/
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FluxTransformer2DModel
from lora_loop import add_lora, parser, train_steps
from torch.utils.data import DataLoader
from transformers import CLIPTextModel, T5EncoderModel

from bucketing import BucketLadder, EncoderCache, TextToImageDataset, assign, scan
from samplers import BucketBatchSampler
from transforms import (
    BucketResizeCrop,
    CaptionTransform,
    FluxTokenizer,
    collate,
    flux_image_ids,
    flux_time_shift_mu,
    pack_latents,
    shift_timesteps,
    to_model_input,
    unpack_latents,
)


def build_loader(args: argparse.Namespace, cache: EncoderCache | None = None) -> DataLoader:
    """The data side, as a FLUX user wires it: pixels and token ids, or ``cache``'s
    latents and text embeddings (pixels still fitted per occurrence when it is text-only)."""
    index = scan(args.data, workers=1)
    overrides = {"max_area": args.max_area} if args.max_area else {}
    # Buckets fitted to the data, as bucket-cache and the builders fit them by default.
    assignment = assign(index, BucketLadder.from_data(
        index, base=BucketLadder.for_model("flux", **overrides)))
    if cache is not None and cache.images:
        dataset = TextToImageDataset(index, assignment, encoder_cache=cache, seed=args.seed,
                                     caption_transform=CaptionTransform(dropout=0.1))
    elif cache is not None:  # text embeddings cached, pixels fitted (and flipped) every time
        dataset = TextToImageDataset(index, assignment, encoder_cache=cache, seed=args.seed,
                                     image_transform=BucketResizeCrop(crop="random", flip_p=0.5),
                                     caption_transform=CaptionTransform(dropout=0.1))
    else:
        tokenizer = FluxTokenizer.from_flux_dir(args.weights, t5_max_length=args.t5_max_length)
        dataset = TextToImageDataset(
            index, assignment,
            image_transform=BucketResizeCrop(crop="random", flip_p=0.5),
            caption_transform=CaptionTransform(dropout=0.1, template=args.template),
            model_transform=tokenizer,
            seed=args.seed,
        )
    sampler = BucketBatchSampler(assignment, batch_size=args.batch_size, seed=args.seed)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                      num_workers=args.workers, pin_memory=torch.cuda.is_available())


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


def train(args: argparse.Namespace) -> float:
    """Run ``args.steps`` optimizer steps; return the last loss."""
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cache = open_cache(args.cache) if args.cache else None
    loader = build_loader(args, cache)
    vae, clip, t5, transformer = load_models(args, device, dtype,
                                             images=cache is None or not cache.images,
                                             text=cache is None)
    optimizer = torch.optim.AdamW(add_lora(transformer, args.rank), lr=args.lr)

    def step(batch: dict) -> tuple[torch.Tensor, str]:
        inputs = to_model_input(batch, device, dtype)  # pixels in [-1, 1] on the device
        attention = None
        if "latents" in inputs:  # encoded once, by bucket-cache
            latents = inputs["latents"].to(dtype)
            b, height, width = latents.shape[0], latents.shape[2] * 8, latents.shape[3] * 8
        else:  # pixels fitted this step (no cache, or a text-only one)
            b, _, height, width = inputs["pixel_values"].shape
            with torch.no_grad():
                latents = vae.encode(inputs["pixel_values"]).latent_dist.sample()
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
        noise = torch.randn_like(latents)
        mu = flux_time_shift_mu(height, width)
        t = shift_timesteps(torch.sigmoid(torch.randn(b, device=device)), mu).to(dtype)
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
        loss = F.mse_loss(unpack_latents(pred, lh, lw).float(), (noise - latents).float())
        return loss, (f"bucket {width}x{height}  batch {b}  "
                      f"tokens {(height // 16) * (width // 16)}  mu {mu:.3f}")

    loss = train_steps(loader, args.steps, step, optimizer)
    if args.save:
        transformer.save_lora_adapter(args.save)
        print(f"LoRA saved in {args.save}")
    return loss


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = parser(__doc__.split("\n\n")[0], "FLUX.1 checkout folder (transformer/, vae/, "
               "text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/)")
    p.add_argument("--t5-max-length", type=int, default=None, help="default 512")
    p.add_argument("--guidance", type=float, default=1.0, help="FLUX.1-dev guidance value")
    p.add_argument("--cache", metavar="DIR", help="encoder cache (bucket-cache) of the same "
                   "--data and --max-area: train from its latents and text embeddings")
    args = p.parse_args(argv)
    if args.cache and args.template != p.get_default("template"):
        p.error("--template cannot apply to a cache (its captions are encoded as they are): "
                "template the captions before bucket-cache")
    return args


if __name__ == "__main__":
    train(parse_args())
