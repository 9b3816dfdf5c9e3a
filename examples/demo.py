"""What ``make demo`` runs: the report a user reads first, then one epoch of the whole pipeline.

1. ``bucket-report examples/data --model flux --batch-size 2 --plot OUT/demo_plot.png
   --preview OUT/demo_preview.png`` (in this process, through its ``main``), OUT being
   ``.cache/demo`` (``make docs`` passes ``--out docs`` to refresh the README's pictures);
2. scan -> assign -> TextToImageDataset (BucketResizeCrop, CaptionTransform, FluxTokenizer)
   -> BucketBatchSampler -> DataLoader with 2 workers, printing every batch's shapes.

The FLUX tokenizers are read from ``.cache/flux-tokenizers`` (``make demo`` fetches them);
without that folder the demo runs without tokenization and says so.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from bucketing import BucketLadder, TextToImageDataset, assign, scan
from bucketing.cli.report import main as bucket_report
from samplers import BucketBatchSampler
from transforms import BucketResizeCrop, CaptionTransform, FluxTokenizer, collate

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "examples" / "data"
TOKENIZERS = REPO / ".cache" / "flux-tokenizers"
BATCH_SIZE = 2


def report(out: Path) -> int:
    """Run the real ``bucket-report`` command on the bundled photos, writing its PNGs to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    argv = [str(DATA), "--model", "flux", "--batch-size", str(BATCH_SIZE),
            "--plot", str(out / "demo_plot.png"), "--preview", str(out / "demo_preview.png")]
    if TOKENIZERS.is_dir():
        argv += ["--tokenizers", str(TOKENIZERS)]
    print("$ bucket-report " + " ".join(Path(a).relative_to(REPO).as_posix()
                                       if a.startswith(str(REPO)) else a for a in argv))
    return bucket_report(argv)


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def one_epoch() -> None:
    """Iterate one epoch of the full DataLoader pipeline, printing each batch's shapes."""
    index = scan(DATA)
    assignment = assign(index, BucketLadder.from_data(index, base="flux"))
    tokenizer = FluxTokenizer.from_flux_dir(TOKENIZERS) if TOKENIZERS.is_dir() else None
    if tokenizer is None:
        print(f"(no tokenizers at {TOKENIZERS}: run `make demo` to fetch them; "
              "batches come without token ids)")
    dataset = TextToImageDataset(
        index,
        assignment,
        image_transform=BucketResizeCrop(crop="random", flip_p=0.5),
        caption_transform=CaptionTransform(dropout=0.1),
        model_transform=tokenizer,
        seed=0,
    )
    sampler = BucketBatchSampler(assignment, batch_size=BATCH_SIZE, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=2)
    sampler.set_epoch(0)
    dataset.set_epoch(0)
    print(f"\nOne epoch: {int(assignment.accepted.sum())} images, {len(sampler)} batches, "
          "DataLoader with 2 workers")
    start = time.perf_counter()
    for step, batch in enumerate(loader):
        pixels = batch["pixel_values"]
        line = f"  batch {step:>2}  pixel_values {list(pixels.shape)} {_dtype(pixels)}"
        for key in ("clip_input_ids", "t5_input_ids"):
            if key in batch:
                line += f"  {key} {list(batch[key].shape)}"
        flips = int(batch["flipped"].sum())
        print(f"{line}  flipped {flips}/{len(pixels)}  {batch['captions'][0][:36]!r}")
    print(f"Done in {time.perf_counter() - start:.1f} s.")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / ".cache" / "demo",
                        help="folder for the report's PNGs (default: .cache/demo)")
    parser.add_argument("--report-only", action="store_true", help="skip the epoch")
    args = parser.parse_args()
    code = report(args.out)
    if code != 0:
        sys.exit(code)
    if not args.report_only:
        one_epoch()
