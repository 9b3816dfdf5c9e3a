"""``bucket-cache``: scan a source, assign buckets and encode everything once into a cache.

    bucket-cache photos/ --model flux --weights /models/FLUX.1-dev --out cache/
    bucket-cache --config dataset.toml --weights /models/FLUX.1-dev   # every dataset, one cache
    torchrun --nproc_per_node 8 -m bucketing.cli.cache photos/ --weights ... --out cache/

The spec's options (source, ``--model``, ``--max-area``, ``--levels``, ``--fit``,
``--max-buckets``, ``--allow-upscale``, ``--scan-cache``, ``--scan-workers``, ``--seed``, and
the caption ``--template`` / ``--prefix`` / ``--suffix``) mean the same here as in
``bucket-report``, a config file and the builders, so the cache holds exactly the buckets and
captions the trainer will ask for; the cache records the plan's fingerprint, and a dataset
built on another plan refuses it. With ``--config``, one cache covers every dataset of the
file, each with its own ladder and caption template, written to ``--out`` or the file's
``encoder_cache``. Under ``torchrun`` every rank encodes its share on its own GPU
(``cuda:LOCAL_RANK``) and rank 0 merges the shards.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from bucketing.cli.args import add_column_option, ladder_overrides, refuse_column_with_config
from bucketing.models import MODELS, encoder_models, named_class
from bucketing.pipeline.config import build_dataset, build_plans, caption_transforms, load_config
from bucketing.pipeline.encoder_cache import CROPS, T5_PADDINGS, build_cache
from bucketing.pipeline.plan import mix_rows
from bucketing.pipeline.spec import (
    CaptionSpec,
    ConfigError,
    DatasetSpec,
    LadderSpec,
    Spec,
    add_options,
    fill_defaults,
    given_options,
    positive_int,
    unit_float,
)
from bucketing.printable import escape
from transforms.resize_crop import DEFAULT_RESAMPLE, RESAMPLE_MODES

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MODEL_NAMES = encoder_models()
CONFIG_FLAGS = ("model", "seed", "scan_workers")
"""The spec options ``bucket-cache --config`` takes from the command line over the file's."""


def build_parser() -> argparse.ArgumentParser:
    """The ``bucket-cache`` command line."""
    p = argparse.ArgumentParser(
        prog="bucket-cache",
        description="Encode a data set's images (VAE latents, per bucket) and captions (text "
        "embeddings) once, into a cache that TextToImageDataset(encoder_cache=...) reads. Reruns "
        "encode only what changed; a killed run resumes.",
        epilog="Exit codes: 0 ok, 2 usage or configuration error, 1 unexpected failure.",
    )
    p.add_argument("source", nargs="?",
                   help="a folder, a manifest, or anything bucketing.scan accepts")
    p.add_argument("--config", metavar="FILE.toml",
                   help="instead of SOURCE: one cache covering every dataset of a config file "
                   "(each with its ladder and caption template); --model, --seed and "
                   "--scan-workers override the file's values")
    add_options(p, "cache", choices={"model": MODEL_NAMES})
    p.add_argument("--weights", required=True, metavar="DIR",
                   help="local diffusers-layout model folder (vae/, text_encoder/, "
                   "text_encoder_2/, tokenizer/, tokenizer_2/)")
    p.add_argument("--out", metavar="DIR",
                   help="cache folder (created; default with --config: the file's encoder_cache)")
    add_column_option(p)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES),
                   help="encoder dtype (default: bfloat16; the SDXL VAE needs float32)")
    p.add_argument("--device", help="default: cuda (cuda:LOCAL_RANK under torchrun) or cpu")
    p.add_argument("--crop", default="center", choices=CROPS, help="crop (default: center)")
    p.add_argument("--variants", type=positive_int, default=1, metavar="K",
                   help="random crops cached per image (with --crop random)")
    p.add_argument("--flip-p", type=unit_float, metavar="P",
                   help="flip probability the dataset will use; > 0 caches flipped latents "
                   "(default: 0, or with --config the largest of the file's flip_p)")
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


def cache_spec(args: argparse.Namespace, given: dict[str, Any]) -> Spec:
    """The spec to cache: the config file's with the command line's overrides (a flag that
    cannot apply to a file's datasets is refused by name), or SOURCE with the flags."""
    if args.config is None:
        captions = {k: given[k] for k in ("template", "prefix", "suffix") if k in given}
        ladder = ladder_overrides(args)  # a level above the largest area is named here
        for key in ("fit", "max_buckets"):
            if key in given:
                ladder[key] = given[key]
        return Spec(model=args.model, seed=args.seed, scan_workers=args.scan_workers,
                    datasets=[DatasetSpec(
                        source=args.source, name=args.source, ladder=LadderSpec(**ladder),
                        captions=CaptionSpec(**captions) if captions else None,
                        column_map=dict(args.column) or None, scan_cache=args.scan_cache,
                        allow_upscale=bool(args.allow_upscale))])
    refuse_column_with_config(args)
    refused = [k for k in given if k not in CONFIG_FLAGS]
    if refused:
        raise ConfigError(f"--{refused[0].replace('_', '-')} does not apply with --config (a "
                          "per-dataset option): set it in the file's [[datasets]]")
    spec = load_config(args.config)
    return dataclasses.replace(spec, **given)


def load_encoders(args: argparse.Namespace, model: str, device: str) -> Any:
    """``model``'s encoders (the model registry's class) from ``--weights`` on ``device`` in
    ``--dtype``, with the T5 length of ``--t5-length`` or the model's."""
    spec = MODELS[model]
    settings = {}
    if spec.t5_max_length is not None:
        settings["max_sequence_length"] = args.t5_length or spec.t5_max_length
    return named_class(spec.encoders).from_pretrained(
        args.weights, device=device, dtype=DTYPES[args.dtype], **settings)


def run(args: argparse.Namespace, given: dict[str, Any]) -> list[str]:
    """Plan and build as the arguments say; returns the summary lines."""
    started = time.perf_counter()
    spec = cache_spec(args, given)
    if spec.model not in MODEL_NAMES:
        raise ConfigError(f"no encoders for model {spec.model!r} (bucket-cache encodes "
                          f"{', '.join(MODEL_NAMES)})", key="--model")
    out = args.out or spec.encoder_cache
    if out is None:
        raise ConfigError("--out: give the cache folder (or encoder_cache in the config file)")
    try:
        plans = build_plans(spec)
        captions = caption_transforms(spec)
        index, rows = mix_rows(plans, captions)
        fingerprint = build_dataset(dataclasses.replace(spec, encoder_cache=None), None,
                                    plans).plan_fingerprint
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        encoders = load_encoders(args, spec.model, device)
    except (ValueError, OSError) as error:
        raise ConfigError(str(error)) from error
    flip_p = args.flip_p if args.flip_p is not None else max(d.flip_p for d in spec.datasets)
    cache = build_cache(
        index, rows, encoders, out, crop=args.crop, variants=args.variants,
        flip_p=flip_p, resample=args.resample, seed=spec.seed, t5_padding=args.t5_padding,
        batch_size=args.vae_batch_size, text_batch_size=args.text_batch_size,
        workers=args.loader_workers, plan_fingerprint=fingerprint,
        images=not args.text_only, captions_formatted=True,
    )
    s = cache.build_stats
    lines = [
        f"{s['latents_encoded']} latents encoded ({s['latents_total']} in the view), "
        f"{s['texts_encoded']} captions encoded ({s['texts_total']} in the view)",
        "datasets: " + ", ".join(
            f"{name} ({int((plan.assignment.bucket_id >= 0).sum())} images)"
            for name, plan in plans.items()),
        f"plan fingerprint: {fingerprint}",
    ]
    if s["failed"] or s["missing_files"]:
        lines.append(f"{len(s['failed'])} images failed to decode, {s['missing_files']} files "
                     "missing (the dataset substitutes them):")
        lines += [f"  {escape(f)}" for f in s["failed"][:20]]
    if args.prune:
        pruned = cache.prune()
        lines.append(f"pruned {pruned['removed']} entries ({pruned['rewritten']} shards rewritten)")
    lines.append(f"{cache.nbytes() / 2**20:.1f} MiB in {escape(str(out))}, "
                 f"{time.perf_counter() - started:.1f} s")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bucket-cache``; returns the exit code (0 ok, 2 config error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.source is None) == (args.config is None):
        parser.error("give a SOURCE or --config FILE.toml (one of them)")
    given = given_options(args, "cache")
    fill_defaults(args, "cache")
    dist = torch.distributed
    started_dist = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if started_dist:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        lines = run(args, given)
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
