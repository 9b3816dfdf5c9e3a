"""``bucket-cache``: scan a source, assign buckets and encode everything once into a cache.

    bucket-cache photos/ --model flux --weights /models/FLUX.1-dev --out cache/
    torchrun --nproc_per_node 8 -m bucketing.cli.cache photos/ --weights ... --out cache/

Options shared with ``bucket-report`` (source, ``--model``, ``--max-area``, ``--levels``,
``--fit``, ``--max-buckets``, ``--allow-upscale``, ``--cache``, ``--workers``, ``--seed``) mean
the same there and here, so the cache holds exactly the buckets the report showed. Under
``torchrun`` every rank encodes its share on its own GPU (``cuda:LOCAL_RANK``) and rank 0
merges the shards.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from bucketing.assign import assign
from bucketing.cli.args import (
    ConfigError,
    add_column_option,
    add_ladder_options,
    ladder_overrides,
    positive_int,
)
from bucketing.ladder import BucketLadder, fitted_ladder
from bucketing.models import MODELS, encoder_models, named_class
from bucketing.pipeline.encoder_cache import CROPS, T5_PADDINGS, build_cache
from bucketing.printable import escape
from bucketing.scan import scan
from transforms.resize_crop import DEFAULT_RESAMPLE, RESAMPLE_MODES

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MODEL_NAMES = encoder_models()


def build_parser() -> argparse.ArgumentParser:
    """The ``bucket-cache`` command line."""
    p = argparse.ArgumentParser(
        prog="bucket-cache",
        description="Encode a data set's images (VAE latents, per bucket) and captions (text "
        "embeddings) once, into a cache that TextToImageDataset(encoder_cache=...) reads. Reruns "
        "encode only what changed; a killed run resumes.",
        epilog="Exit codes: 0 ok, 2 usage or configuration error, 1 unexpected failure.",
    )
    p.add_argument("source", help="a folder, a manifest, or anything bucketing.scan accepts")
    p.add_argument("--model", default="flux", choices=MODEL_NAMES, help="model (default: flux)")
    p.add_argument("--weights", required=True, metavar="DIR",
                   help="local diffusers-layout model folder (vae/, text_encoder/, "
                   "text_encoder_2/, tokenizer/, tokenizer_2/)")
    p.add_argument("--out", required=True, metavar="DIR", help="cache folder (created)")
    add_ladder_options(p)
    add_column_option(p)
    p.add_argument("--cache", metavar="PATH", help="scan cache (parquet)")
    p.add_argument("--workers", type=positive_int, metavar="N", help="scan worker processes")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed of the random crop variants (default: 0)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES),
                   help="encoder dtype (default: bfloat16; the SDXL VAE needs float32)")
    p.add_argument("--device", help="default: cuda (cuda:LOCAL_RANK under torchrun) or cpu")
    p.add_argument("--crop", default="center", choices=CROPS, help="crop (default: center)")
    p.add_argument("--variants", type=positive_int, default=1, metavar="K",
                   help="random crops cached per image (with --crop random)")
    p.add_argument("--flip-p", type=float, default=0.0, metavar="P",
                   help="flip probability the dataset will use; > 0 caches flipped latents")
    p.add_argument("--resample", default=DEFAULT_RESAMPLE, choices=RESAMPLE_MODES)
    p.add_argument("--t5-padding", default="trimmed", choices=T5_PADDINGS,
                   help="store T5 rows up to each caption's tokens, or the full padded length")
    p.add_argument("--t5-length", type=positive_int, metavar="L",
                   help="T5 padding length (default: the model's, 512 dev / 256 schnell / 77 sd3)")
    p.add_argument("--vae-batch-size", type=positive_int, default=8, metavar="B")
    p.add_argument("--text-batch-size", type=positive_int, default=64, metavar="B")
    p.add_argument("--loader-workers", type=int, default=min(4, os.cpu_count() or 1),
                   metavar="N", help="processes decoding images (default: min(4, cores))")
    p.add_argument("--text-only", action="store_true",
                   help="cache the caption embeddings only (no latents): the dataset fits "
                   "pixels per occurrence, with fresh crops and flips every epoch, and the "
                   "trainer loads no text encoder")
    p.add_argument("--prune", action="store_true",
                   help="then remove entries no current image, caption or setting refers to")
    return p


def load_encoders(args: argparse.Namespace, device: str) -> Any:
    """The model's encoders (the model registry's class) from ``--weights`` on ``device`` in
    ``--dtype``, with the T5 length of ``--t5-length`` or the model's."""
    spec = MODELS[args.model]
    settings = {}
    if spec.t5_max_length is not None:
        settings["max_sequence_length"] = args.t5_length or spec.t5_max_length
    return named_class(spec.encoders).from_pretrained(
        args.weights, device=device, dtype=DTYPES[args.dtype], **settings)


def run(args: argparse.Namespace) -> list[str]:
    """Scan, assign and build as the arguments say; returns the summary lines."""
    started = time.perf_counter()
    try:
        ladder = fitted_ladder(BucketLadder.for_model(args.model, **ladder_overrides(args)),
                               None, fit=args.fit, max_buckets=args.max_buckets)
        index = scan(args.source, workers=args.workers, cache=args.cache,
                     column_map=dict(args.column) or None)
        ladder = fitted_ladder(ladder, index, fit=args.fit, max_buckets=args.max_buckets)
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        encoders = load_encoders(args, device)
    except (ValueError, OSError) as error:
        raise ConfigError(str(error)) from error
    assignment = assign(index, ladder, allow_upscale=args.allow_upscale)
    cache = build_cache(
        index, assignment, encoders, args.out, crop=args.crop, variants=args.variants,
        flip_p=args.flip_p, resample=args.resample, seed=args.seed, t5_padding=args.t5_padding,
        batch_size=args.vae_batch_size, text_batch_size=args.text_batch_size,
        workers=args.loader_workers, images=not args.text_only,
    )
    s = cache.build_stats
    lines = [
        f"{s['latents_encoded']} latents encoded ({s['latents_total']} in the view), "
        f"{s['texts_encoded']} captions encoded ({s['texts_total']} in the view)",
    ]
    if s["failed"] or s["missing_files"]:
        lines.append(f"{len(s['failed'])} images failed to decode, {s['missing_files']} files "
                     "missing (the dataset substitutes them):")
        lines += [f"  {escape(f)}" for f in s["failed"][:20]]
    if args.prune:
        pruned = cache.prune()
        lines.append(f"pruned {pruned['removed']} entries ({pruned['rewritten']} shards rewritten)")
    lines.append(f"{cache.nbytes() / 2**20:.1f} MiB in {escape(args.out)}, "
                 f"{time.perf_counter() - started:.1f} s")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bucket-cache``; returns the exit code (0 ok, 2 config error)."""
    args = build_parser().parse_args(argv)
    dist = torch.distributed
    started_dist = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if started_dist:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        lines = run(args)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print("\n".join(lines))
    except ConfigError as error:
        print(f"bucket-cache: error: {escape(str(error))}", file=sys.stderr)
        return 2
    finally:
        if started_dist:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
