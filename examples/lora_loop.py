"""What the two LoRA examples share: the command line, the data (a dataset config file or one
folder), the LoRA adapter, and the training loop of a small real trainer.

The loop: one bucket per batch; each sample's loss weighs the same in short and full batches
(the per-sample losses summed and divided by the bucket's nominal batch size times the
accumulation steps, as docs/sampler.md recommends); ``--grad-accum`` batches per optimizer
step; a diffusers LR schedule over ``sampler.total_steps(epochs)``; a checkpoint every
``--checkpoint-every`` steps (LoRA, optimizer, LR schedule, sampler position and step count,
in ``OUTPUT/checkpoint-N/``) that ``--resume`` continues exactly: every random draw of a batch
(noise, timesteps, the VAE's sample) comes from a generator keyed by (seed, batch number), and
the data's own randomness is keyed by the sampler's position, so a resumed run computes the
same losses as an uninterrupted one. The LoRA is saved as diffusers weights
(``pytorch_lora_weights.safetensors``, for ``load_lora_weights``) and as one kohya-named file
(``pytorch_lora_weights_kohya.safetensors``) for ComfyUI, A1111 / Forge and kohya's tools.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.optimization import get_scheduler
from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from bucketing import BucketLadder, TextToImageDataset, assign, scan
from bucketing.pipeline.config import build_dataset, build_sampler, load_config
from samplers import BucketBatchSampler
from transforms import BucketResizeCrop, CaptionTransform, collate

REPO = Path(__file__).resolve().parent.parent
LORA_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"
STATE_FILE = "training_state.pt"
DEFAULTS = {"batch_size": 2, "seed": 0, "template": "a photo, {caption}"}
# batch -> (per-sample losses [B], a line to print), with the batch's random generator
StepFn = Callable[[dict, torch.Generator], tuple[torch.Tensor, str]]


def parser(description: str, weights_help: str) -> argparse.ArgumentParser:
    """The options both examples take. Data options left out fall back to the ``--config``
    file's values, or to ``DEFAULTS`` without one."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--weights", required=True, help=weights_help)
    data = p.add_argument_group("data")
    data.add_argument("--config", help="dataset config file (TOML/YAML, as bucketing.from_config"
                      " reads); --batch-size, --seed, --max-area and --template override it")
    data.add_argument("--data", help="a folder of images + captions, without --config "
                      "(default: the bundled examples/data)")
    data.add_argument("--template", help=f"caption template (default {DEFAULTS['template']!r})")
    data.add_argument("--max-area", type=int, help="largest bucket area in pixels "
                      "(default: the model's 1024*1024)")
    data.add_argument("--batch-size", type=int, help="images per batch (default 2)")
    data.add_argument("--seed", type=int, help="data order, augmentation and noise (default 0)")
    data.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=1)
    train.add_argument("--max-steps", type=int,
                       help="stop after this many optimizer steps (a checkpoint is saved)")
    train.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step")
    train.add_argument("--lr", type=float, default=1e-4)
    train.add_argument("--lr-scheduler", default="constant",
                       help="diffusers' get_scheduler name: constant, constant_with_warmup, "
                       "linear, cosine, ...")
    train.add_argument("--lr-warmup", type=int, default=0, help="warmup optimizer steps")
    train.add_argument("--max-grad-norm", type=float, default=1.0)
    train.add_argument("--rank", type=int, default=4, help="LoRA rank")
    train.add_argument("--output", help="folder for checkpoints and the final LoRA")
    train.add_argument("--checkpoint-every", type=int, default=0,
                       help="optimizer steps between checkpoints (0: only at --max-steps)")
    train.add_argument("--resume", help="a checkpoint-N folder, or 'latest' in --output")
    train.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Refuse contradictory options (argparse's error: exit 2 with the usage)."""
    if args.config and args.data:
        p.error("--data and --config both name the data: give one")
    for name in ("epochs", "grad_accum", "rank"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if (args.resume or args.checkpoint_every or args.max_steps) and not args.output:
        p.error("--resume, --checkpoint-every and --max-steps need --output")
    return args


def build_loader(
    args: argparse.Namespace,
    models: tuple[str, ...],
    model_transform: Callable[[dict], dict] | None,
    dataset_for: Callable[..., TextToImageDataset] | None = None,
) -> DataLoader:
    """The DataLoader over ``--config`` (its datasets, with the command line's overrides) or
    over one folder. ``dataset_for(index, assignment, seed)`` builds the folder's dataset
    (default: random crop and flip, the caption template, ``model_transform``)."""
    if args.config:
        config = load_config(args.config)
        if config.model not in models:
            raise SystemExit(f"{args.config} is for model {config.model!r}; this script "
                             f"trains {' or '.join(models)}")
        config = _override(config, args)
        dataset = build_dataset(config, model_transform)
        sampler = build_sampler(config, dataset)
    else:
        seed = _arg(args, "seed")
        index = scan(args.data or str(REPO / "examples" / "data"), workers=1,
                     column_map=getattr(args, "column_map", None))
        overrides = {"max_area": args.max_area} if args.max_area else {}
        # Buckets fitted to the data, as bucket-cache and the builders fit them by default.
        assignment = assign(index, BucketLadder.from_data(
            index, base=BucketLadder.for_model(models[0], **overrides)))
        if dataset_for is None:
            dataset = TextToImageDataset(
                index, assignment,
                image_transform=BucketResizeCrop(crop="random", flip_p=0.5),
                caption_transform=CaptionTransform(dropout=0.1, template=_arg(args, "template")),
                model_transform=model_transform, seed=seed)
        else:
            dataset = dataset_for(index, assignment, seed)
        sampler = BucketBatchSampler(assignment, batch_size=_arg(args, "batch_size"), seed=seed)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                      num_workers=args.workers, pin_memory=torch.cuda.is_available())


def _arg(args: argparse.Namespace, name: str) -> Any:
    value = getattr(args, name)
    return DEFAULTS[name] if value is None else value


def _override(config: Any, args: argparse.Namespace) -> Any:
    """``config`` with the data options given on the command line."""
    changes: dict[str, Any] = {}
    if args.batch_size is not None:
        changes.update(batch_size=args.batch_size, max_pixels_per_batch=None)
    if args.seed is not None:
        changes["seed"] = args.seed
    datasets = []
    for d in config.datasets:
        ladder = d.ladder if args.max_area is None else {**d.ladder, "max_area": args.max_area}
        captions = d.captions
        if args.template is not None:
            captions = {**(captions or {}), "template": args.template}
        datasets.append(dataclasses.replace(d, ladder=ladder, captions=captions))
    return dataclasses.replace(config, datasets=datasets, **changes)


def add_lora(model: torch.nn.Module, rank: int) -> list[torch.nn.Parameter]:
    """Freeze ``model``, add a peft LoRA on its attention projections (as diffusers' LoRA
    scripts do); the trainable parameters."""
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                 target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    lora = [p for p in model.parameters() if p.requires_grad]
    print(f"LoRA: {sum(p.numel() for p in lora)} trainable parameters")
    return lora


def batch_generator(seed: int, batch_number: int, device: torch.device) -> torch.Generator:
    """The generator of one batch's draws, keyed by (seed, batch number): a resumed run draws
    what the uninterrupted run drew."""
    key = int(np.random.SeedSequence([seed, batch_number]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(key)


@dataclass
class Progress:
    """Where training is: optimizer steps taken, batches seen."""

    step: int = 0
    batches: int = 0


def train(
    args: argparse.Namespace,
    loader: DataLoader,
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    step_fn: StepFn,
    save_lora: Callable[[Path], None],
) -> list[float]:
    """Train ``params`` of ``model`` for ``args.epochs`` (or ``args.max_steps``); return the
    loss of every optimizer step taken by this run."""
    sampler, dataset = loader.batch_sampler, loader.dataset
    device, seed = torch.device(args.device), _arg(args, "seed")
    total_batches = sampler.total_steps(args.epochs)
    total_steps = math.ceil(total_batches / args.grad_accum)
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    schedule = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup,
                             num_training_steps=total_steps)
    progress = Progress()
    if args.resume:
        progress = load_checkpoint(_checkpoint_dir(args), model, optimizer, schedule, sampler)
    nominal = sampler.batch_sizes
    print(f"{total_batches} batches, {total_steps} optimizer steps over {args.epochs} epochs")
    losses, group_loss, start = [], 0.0, time.perf_counter()
    epoch = sampler.epoch  # after a resume: the sampler's own (a finished epoch moves on)
    while epoch < args.epochs and progress.step < total_steps:
        sampler.set_epoch(epoch)  # a no-op on the resumed epoch: its position survives
        dataset.set_epoch(epoch)
        for received, batch in enumerate(loader, start=1):
            generator = batch_generator(seed, progress.batches, device)
            per_sample, line = step_fn(batch, generator)
            bucket = int(dataset.bucket_id[int(batch["original_index"][0])])
            loss = per_sample.sum() / (int(nominal[bucket]) * args.grad_accum)
            loss.backward()
            group_loss += loss.item()
            progress.batches += 1
            print(f"batch {progress.batches:3d}  epoch {epoch}  {line}  "
                  f"loss {per_sample.mean().item():.6f}")
            if progress.batches % args.grad_accum and progress.batches < total_batches:
                continue
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            losses.append(group_loss)
            print(f"step {progress.step:3d}  lr {schedule.get_last_lr()[0]:.3e}  "
                  f"loss {group_loss:.6f}")
            group_loss = 0.0
            stop = args.max_steps is not None and progress.step >= args.max_steps
            every = args.checkpoint_every and progress.step % args.checkpoint_every == 0
            if stop or every:
                save_checkpoint(Path(args.output) / f"checkpoint-{progress.step}", model,
                                optimizer, schedule, sampler.state_dict(received=received),
                                progress, save_lora)
            if stop:
                print(f"stopped after {progress.step} steps (--max-steps)")
                return losses
        epoch += 1
    print(f"{progress.step} steps in {time.perf_counter() - start:.1f} s")
    if args.output:
        save_lora(Path(args.output))
        print(f"LoRA saved in {args.output}: {LORA_FILE}, {KOHYA_FILE}")
    return losses


def save_checkpoint(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    sampler_state: dict[str, Any],
    progress: Progress,
    save_lora: Callable[[Path], None],
) -> None:
    """The resume state (``training_state.pt``, written to a temporary name and renamed) and
    the LoRA files of this step."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "lora": get_peft_model_state_dict(model),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": schedule.state_dict(),
        "sampler": sampler_state,
        "progress": dataclasses.asdict(progress),
    }
    tmp = folder / f".{STATE_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, folder / STATE_FILE)
    save_lora(folder)
    print(f"checkpoint saved in {folder}")


def load_checkpoint(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    sampler: BucketBatchSampler,
) -> Progress:
    """Restore what ``save_checkpoint`` wrote into the freshly built run; its progress."""
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    result = set_peft_model_state_dict(model, state["lora"])
    if getattr(result, "unexpected_keys", None):
        raise SystemExit(f"{folder}: LoRA keys this model lacks: {result.unexpected_keys[:3]}"
                         " (another model or --rank?)")
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["lr_scheduler"])
    sampler.load_state_dict(state["sampler"])  # refuses another dataset or sampler setting
    progress = Progress(**state["progress"])
    print(f"resumed from {folder} at step {progress.step} (batch {progress.batches})")
    return progress


def _checkpoint_dir(args: argparse.Namespace) -> Path:
    if args.resume != "latest":
        return Path(args.resume)
    found = [p for p in Path(args.output).glob("checkpoint-*")
             if re.fullmatch(r"checkpoint-\d+", p.name) and (p / STATE_FILE).is_file()]
    if not found:
        raise SystemExit(f"--resume latest: no checkpoint-N/{STATE_FILE} in {args.output}")
    return max(found, key=lambda p: int(p.name.split("-")[1]))


def save_kohya(diffusers_file: Path, dest: Path, prefix: str = "") -> None:
    """One safetensors file with kohya's key names (``lora_unet_*`` / ``lora_te1_*``, each
    module's ``lora_down`` / ``lora_up`` / ``alpha``), converted from a diffusers LoRA file by
    diffusers' ``convert_all_state_dict_to_peft`` and ``convert_state_dict_to_kohya``, as its
    SDXL DreamBooth script does; ``prefix`` goes before every key (FLUX's
    ``transformer.`` keys become ComfyUI's ``lora_transformer_*``)."""
    kohya = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(load_file(diffusers_file)))
    save_file({prefix + k: v.contiguous() for k, v in kohya.items()}, dest)
