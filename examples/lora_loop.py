"""What the two LoRA examples share: their command line, the LoRA adapter and the epoch loop
(sampler and dataset epochs set before each epoch's iterator, one optimizer step per batch)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parent.parent


def parser(description: str, weights_help: str) -> argparse.ArgumentParser:
    """The options both examples take."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--weights", required=True, help=weights_help)
    p.add_argument("--data", default=str(REPO / "examples" / "data"), help="images + captions")
    p.add_argument("--template", default="a photo, {caption}", help="caption template")
    p.add_argument("--max-area", type=int, default=None,
                   help="largest bucket area in pixels (default: the model's 1024*1024)")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps to run")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--rank", type=int, default=4, help="LoRA rank")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", help="folder to save the LoRA adapter into")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def add_lora(model: torch.nn.Module, rank: int) -> list[torch.nn.Parameter]:
    """Freeze ``model``, add a peft LoRA on its attention projections; the trainable params."""
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                 target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    lora = [p for p in model.parameters() if p.requires_grad]
    print(f"LoRA: {sum(p.numel() for p in lora)} trainable parameters")
    return lora


def train_steps(
    loader: DataLoader,
    steps: int,
    step: Callable[[dict], tuple[torch.Tensor, str]],
    optimizer: torch.optim.Optimizer,
) -> float:
    """Run ``steps`` optimizer steps over as many epochs as needed; ``step(batch)`` returns the
    loss and a line to print. Returns the last loss."""
    sampler, dataset = loader.batch_sampler, loader.dataset
    done, epoch, loss = 0, 0, torch.tensor(float("nan"))
    start = time.perf_counter()
    while done < steps:
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        for batch in loader:
            loss, line = step(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            print(f"step {done:3d}  epoch {epoch}  {line}  loss {loss.item():.4f}")
            if done >= steps:
                break
        epoch += 1
    print(f"{done} steps in {time.perf_counter() - start:.1f} s")
    return loss.item()
