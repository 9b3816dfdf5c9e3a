"""The loop a FLUX.1 fine-tuning script writes around this library, runnable on CPU in seconds.

Everything up to `to_model_input` is the real pipeline: scan -> FLUX ladder -> assign ->
TextToImageDataset(BucketResizeCrop + CaptionTransform + FluxTokenizer) -> BucketBatchSampler
-> DataLoader(collate). After it, the shapes are the ones `FluxTransformer2DModel` takes in
diffusers' FLUX training scripts, but the models are tiny random stand-ins (no weights are
downloaded): a stride-8 conv for the VAE (16 latent channels), embeddings for the frozen
T5 / CLIP encoders, and two attention blocks for the transformer.

    python examples/flux_finetune_sketch.py --steps 4
    python examples/flux_finetune_sketch.py --data my_photos/ --tokenizers FLUX.1-dev --steps 20

``--tokenizers`` is any folder with ``tokenizer/`` (CLIP-L) and ``tokenizer_2/`` (T5), e.g. a
FLUX.1 checkout; fetch the test copies with ``python tests/fetch_flux_tokenizers.py``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from bucketing import BucketLadder, TextToImageDataset
from bucketing.assign import assign
from bucketing.scan import scan
from samplers import BucketBatchSampler
from transforms import BucketResizeCrop, CaptionTransform, FluxTokenizer
from transforms.collate import collate, to_model_input
from transforms.tokenize import flux_image_ids, pack_latents, unpack_latents

REPO = Path(__file__).resolve().parent.parent
LATENT_CHANNELS = 16  # FLUX VAE latent channels; packed 2x2 -> 64 features per token


class TinyVAE(nn.Module):
    """Stand-in for FLUX's AutoencoderKL encoder: 8x downsampling to 16 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, LATENT_CHANNELS, kernel_size=8, stride=8)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.conv(pixels)


class TinyFluxTransformer(nn.Module):
    """Stand-in for FluxTransformer2DModel with the same inputs (text encoders folded in).

    hidden_states [B, N, 64] packed latents, timestep [B], T5 ids/mask [B, L] (a real loop
    passes the frozen T5 encoder's output), CLIP ids [B, 77] (real: CLIP's pooled output),
    img_ids [N, 3] and txt_ids [L, 3] (real: 3-axis RoPE positions). Returns [B, N, 64].
    """

    def __init__(self, t5_vocab: int, clip_vocab: int, dim: int = 64, depth: int = 2) -> None:
        super().__init__()
        self.x_in = nn.Linear(LATENT_CHANNELS * 4, dim)
        self.t5 = nn.Embedding(t5_vocab, dim)
        self.clip = nn.Embedding(clip_vocab, dim)
        self.pos = nn.Linear(3, dim)
        self.time = nn.Linear(1, dim)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True)
            for _ in range(depth)
        )
        self.out = nn.Linear(dim, LATENT_CHANNELS * 4)

    def forward(self, hidden_states, timestep, t5_ids, t5_mask, clip_ids, img_ids, txt_ids):
        txt = self.t5(t5_ids) + self.pos(txt_ids)
        img = self.x_in(hidden_states) + self.pos(img_ids / 64)
        cond = self.time(timestep[:, None]) + self.clip(clip_ids).mean(1)
        x = torch.cat([txt, img], dim=1) + cond[:, None]
        pad = torch.cat([t5_mask == 0, torch.zeros_like(img[..., 0], dtype=torch.bool)], dim=1)
        for block in self.blocks:
            x = block(x, src_key_padding_mask=pad)
        return self.out(x[:, txt.shape[1] :])


def build_loader(args: argparse.Namespace) -> tuple[DataLoader, BucketBatchSampler, FluxTokenizer]:
    """The data side: everything this library does, as a FLUX user wires it."""
    try:
        tokenizer = FluxTokenizer.for_model(args.model, args.tokenizers)
    except FileNotFoundError as e:
        raise SystemExit(f"{e}\nFetch test copies: python tests/fetch_flux_tokenizers.py "
                         f"{args.tokenizers}") from e
    index = scan(args.data, workers=1)
    overrides = {"max_area": args.max_area} if args.max_area else {}
    ladder = BucketLadder.for_model(args.model, **overrides)
    assert ladder.multiple == tokenizer.multiple  # one source of truth: MODEL_SPECS
    assignment = assign(index, ladder)
    print(f"{len(index)} images, {int(assignment.accepted.sum())} accepted into "
          f"{len(set(assignment.bucket_id[assignment.accepted].tolist()))} buckets "
          f"(scan rejected {index.rejection_counts()}, assign rejected "
          f"{int((~assignment.accepted).sum())})")
    dataset = TextToImageDataset(
        index,
        assignment,
        image_transform=BucketResizeCrop(crop="random", flip_p=0.5),
        caption_transform=CaptionTransform(dropout=0.1, template="a photo, {caption}"),
        model_transform=tokenizer,
        seed=args.seed,
    )
    sampler = BucketBatchSampler(assignment, batch_size=args.batch_size, seed=args.seed)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=args.workers,
        pin_memory=torch.cuda.is_available(),
    )
    return loader, sampler, tokenizer


def train(args: argparse.Namespace) -> float:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    loader, sampler, tokenizer = build_loader(args)
    vae = TinyVAE().to(device, dtype).requires_grad_(False)
    model = TinyFluxTransformer(len(tokenizer.t5), len(tokenizer.clip)).to(device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    step, epoch, loss = 0, 0, torch.tensor(float("nan"))
    start = time.perf_counter()
    while step < args.steps:
        sampler.set_epoch(epoch)
        loader.dataset.set_epoch(epoch)
        for batch in loader:
            inputs = to_model_input(batch, device, dtype)  # pixels in [-1, 1]
            b, _, height, width = inputs["pixel_values"].shape
            with torch.no_grad():
                latents = vae(inputs["pixel_values"])  # [B, 16, H/8, W/8]
            lh, lw = latents.shape[-2:]

            # Rectified flow: x_t = (1 - t) x_0 + t * noise, target velocity = noise - x_0.
            noise = torch.randn_like(latents)
            t = torch.sigmoid(torch.randn(b, device=device)).to(dtype)  # logit-normal
            noisy = (1 - t[:, None, None, None]) * latents + t[:, None, None, None] * noise

            packed = pack_latents(noisy)  # [B, (H/16)(W/16), 64]
            img_ids = flux_image_ids(height, width, dtype=dtype, device=device)
            txt_ids = torch.zeros(tokenizer.t5_max_length, 3, dtype=dtype, device=device)
            assert packed.shape == (b, (height // 16) * (width // 16), 64)
            assert img_ids.shape == (packed.shape[1], 3)
            assert inputs["t5_input_ids"].shape == (b, tokenizer.t5_max_length)
            assert inputs["clip_input_ids"].shape == (b, 77)

            pred = model(packed, t, inputs["t5_input_ids"], inputs["t5_attention_mask"],
                         inputs["clip_input_ids"], img_ids, txt_ids)
            pred = unpack_latents(pred, lh, lw)  # back to [B, 16, H/8, W/8]
            loss = F.mse_loss(pred.float(), (noise - latents).float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

            step += 1
            print(f"step {step:3d}  epoch {epoch}  bucket {width}x{height}  batch {b}  "
                  f"tokens {packed.shape[1]}  t5_truncated {int(batch['t5_truncated'].sum())}  "
                  f"loss {loss.item():.4f}")
            if step >= args.steps:
                break
        epoch += 1
    print(f"{step} steps in {time.perf_counter() - start:.1f} s")
    return loss.item()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(REPO / "examples" / "data"), help="images + captions")
    p.add_argument("--tokenizers", default=str(REPO / ".cache" / "flux-tokenizers"),
                   help="folder with tokenizer/ (CLIP-L) and tokenizer_2/ (T5)")
    p.add_argument("--model", default="flux", choices=["flux", "flux-schnell"])
    p.add_argument("--max-area", type=int, default=None,
                   help="largest bucket area in pixels (default: the model's, 1024*1024)")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps to run")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


if __name__ == "__main__":
    train(parse_args())
