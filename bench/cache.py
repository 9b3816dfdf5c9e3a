"""Benchmark: what the encoder cache saves, and what one cached sample costs to read.

1. Epoch throughput with the same tiny random FLUX-like encoders (diffusers ``AutoencoderKL``
   with 16 latent channels, transformers CLIP + T5, tests/conftest.py ``write_tiny_encoders``):
   - on the fly: ``TextToImageDataset`` + ``BucketResizeCrop`` + ``collate``, then
     ``encode_images`` and ``encode_text`` on every batch (what a trainer without a cache does);
   - cached: ``TextToImageDataset(encoder_cache=...)`` + ``collate`` (memory-mapped shards);
   - cached, resident: the same after ``cache.to("cpu")`` (the tiny-dataset option).
   All in one process (``num_workers=0``): per-core figures, the same sampler plan.
   - which cache when: for FLUX and SDXL (tiny random models of each layout), an epoch
     with no cache (VAE + text encoders every batch), a text-only cache
     (``build_cache(..., images=False)``: decode + fit + VAE every batch, fresh crops, no
     text encoder loaded) and a full cache; with the parameter bytes of the text encoders
     a text-only cache leaves unloaded (tiny models: the real sizes are not measured here).
2. Bytes per sample for FLUX.1 at 1024² (bf16, the real 4096-wide T5-XXL, 768-wide pooled
   CLIP), full 512-token T5 vs trimmed to a caption's tokens.
3. Reading one cached FLUX 1024² sample through the dataset (latent 16x128x128 bf16 = 512 KiB
   + trimmed T5 + pooled), from a cache of real-sized entries written by ``build_cache`` with
   stand-in encoders that return tensors of the real shapes (no weights needed).
4. The build against its bare encoders: ``build_cache`` into a fresh folder (decoding in
   DataLoader workers, writing shards) vs ``encode_images`` on the same batches already
   fitted in memory plus ``encode_text`` on the same captions. With ``--weights DIR``
   (a local FLUX.1 folder) and ``--device cuda`` this is the real figure on a GPU.

    python bench/cache.py            # 48 images, 5 repetitions
    python bench/cache.py --quick    # fewer images and repetitions
    python bench/cache.py --tiny     # smoke test: 4 images, 1 repetition
    python bench/cache.py --modes --images 8   # the which-cache-when table alone
    python bench/cache.py --weights /models/FLUX.1-dev --device cuda --images 512
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))  # the tiny model folders the tests build
from common import machine_line, print_table, ratio, timeit  # noqa: E402
from conftest import write_tiny_encoders  # noqa: E402

from bucketing import (  # noqa: E402
    BucketLadder,
    TextToImageDataset,
    assign,
    build_cache,
    scan,
)
from bucketing.pipeline.encoder_cache import estimate_bytes  # noqa: E402
from samplers import BucketBatchSampler  # noqa: E402
from transforms import BucketResizeCrop, FluxEncoders, SDXLEncoders, collate  # noqa: E402
from transforms.image import load_image  # noqa: E402
from transforms.resize_crop import fit  # noqa: E402

TOKENIZERS = REPO / ".cache" / "flux-tokenizers"
SIZES = [(320, 256), (256, 320), (288, 288), (400, 256), (256, 400), (300, 300)]
LADDER = BucketLadder.from_buckets([(256, 256), (320, 256), (256, 320), (384, 256), (256, 384)],
                                   multiple=16)
CAPTION = "a photo of a {} on a wooden table next to a window, soft light, 35mm"
WORDS = ["cat", "dog", "teapot", "bicycle", "lamp", "plant", "book", "guitar"]


def write_photos(folder: Path, count: int) -> Path:
    """``count`` smooth photo-like JPEGs with one caption each (eight distinct captions)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        w, h = SIZES[i % len(SIZES)]
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([np.sin(x / (9 + c * 3) + i) * np.cos(y / (7 + c)) for c in range(3)], -1)
        pixels = ((base + 1) * 110 + rng.normal(0, 8, (h, w, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"p{i:03d}.jpg", quality=90)
        (folder / f"p{i:03d}.txt").write_text(CAPTION.format(WORDS[i % len(WORDS)]))
    return folder


def epoch(ds: TextToImageDataset, sampler: BucketBatchSampler, encoders: Any = None) -> int:
    """One epoch in this process; with ``encoders``, each batch is encoded as a trainer would
    (the pixels, and the captions unless a cache supplied their embeddings)."""
    n = 0
    for batch_ids in sampler:
        batch = collate([ds[i] for i in batch_ids])
        if encoders is not None:
            if "pixel_values" in batch:
                batch["latents"] = encoders.encode_images(batch["pixel_values"])
            if "prompt_embeds" not in batch:
                batch.update(encoders.encode_text(batch["captions"]))
        n += len(batch_ids)
    return n


class RealShapes:
    """Stand-in FLUX encoders returning tensors of the real models' shapes (bf16): 16-channel
    latents, T5-XXL [B, 512, 4096] with each caption's true token count, CLIP pooled [B, 768].
    Only for sizing and read timing: the numbers are not a model's."""

    model = "flux"
    dtype = torch.bfloat16

    def __init__(self, lengths: dict[str, int]) -> None:
        self.lengths = lengths

    def text_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def fingerprint(self, part: str) -> str:
        return f"real-shapes-{part}"

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        b, _, h, w = pixels.shape
        return torch.randn(b, 16, h // 8, w // 8).to(torch.bfloat16)

    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        n = len(captions)
        return {"prompt_embeds": torch.randn(n, 512, 4096).to(torch.bfloat16),
                "pooled_prompt_embeds": torch.randn(n, 768).to(torch.bfloat16),
                "text_lengths": torch.tensor([self.lengths.get(c, 1) for c in captions])}


def bench_epochs(root: Path, images: int, reps: int) -> tuple[list[dict], float]:
    """Table 1; returns its rows and the cached/on-the-fly ratio."""
    dirs = write_tiny_encoders(root / "models", TOKENIZERS)
    enc = FluxEncoders.from_pretrained(dirs["flux"], dtype=torch.float32, max_sequence_length=512)
    photos = write_photos(root / "photos", images)
    index = scan(str(photos), workers=1)
    assignment = assign(index, LADDER)
    sampler = BucketBatchSampler(assignment, batch_size=4, seed=0)
    t0 = time.perf_counter()
    cache = build_cache(index, assignment, enc, root / "cache", progress=False)
    build_s = time.perf_counter() - t0
    fly = TextToImageDataset(index, assignment, image_transform=BucketResizeCrop())
    cached = TextToImageDataset(index, assignment, encoder_cache=cache)
    resident = TextToImageDataset(index, assignment,
                                  encoder_cache=type(cache).open(root / "cache").to("cpu"))
    with torch.inference_mode():
        t_fly = timeit(lambda: epoch(fly, sampler, enc), reps=reps)
    t_cached = timeit(lambda: epoch(cached, sampler), reps=reps)
    t_resident = timeit(lambda: epoch(resident, sampler), reps=reps)
    n = len(index)
    rows = [
        {"side": "on the fly: decode + fit + VAE + CLIP + T5", "epoch": str(t_fly),
         "samples/s": f"{n / t_fly.median:.0f}", "vs on the fly": "1.0x"},
        {"side": "cached (memory-mapped shards)", "epoch": str(t_cached),
         "samples/s": f"{n / t_cached.median:.0f}",
         "vs on the fly": ratio(t_fly.median, t_cached.median)},
        {"side": "cached, resident (cache.to('cpu'))", "epoch": str(t_resident),
         "samples/s": f"{n / t_resident.median:.0f}",
         "vs on the fly": ratio(t_fly.median, t_resident.median)},
        {"side": "one-off build_cache (same encoders)", "epoch": f"{build_s:.2f} s",
         "samples/s": f"{n / build_s:.0f}", "vs on the fly": "-"},
    ]
    return rows, t_fly.median / t_cached.median


def bench_modes(root: Path, images: int, reps: int) -> list[dict]:
    """The "which cache when" table: none / text-only / full, for FLUX and SDXL."""
    dirs = write_tiny_encoders(root / "mode-models", TOKENIZERS)
    photos = write_photos(root / "mode-photos", images)
    index = scan(str(photos), workers=1)
    assignment = assign(index, LADDER)
    sampler = BucketBatchSampler(assignment, batch_size=4, seed=0)
    fit = BucketResizeCrop(crop="random", flip_p=0.5)
    rows = []
    for model, cls in (("flux", FluxEncoders), ("sdxl", SDXLEncoders)):
        enc = cls.from_pretrained(dirs[model], dtype=torch.float32)
        text = build_cache(index, assignment, enc, root / f"{model}-text", images=False,
                           progress=False)
        full = build_cache(index, assignment, enc, root / f"{model}-full", progress=False)
        sides = {
            "none": TextToImageDataset(index, assignment, image_transform=fit),
            "text-only": TextToImageDataset(index, assignment, image_transform=fit,
                                            encoder_cache=text),
            "full latents": TextToImageDataset(index, assignment, encoder_cache=full),
        }
        with torch.inference_mode():
            times = {name: timeit(lambda d=d, e=enc: epoch(d, sampler, e), reps=reps)
                     for name, d in sides.items()}
        text_bytes = sum(p.numel() * p.element_size()
                         for m in (enc.text_encoder, enc.text_encoder_2) for p in m.parameters())
        base = times["none"].median
        for name, t in times.items():
            rows.append({
                "model": model, "cache": name, "epoch": str(t),
                "vs none": ratio(base, t.median),
                "text encoders loaded": "yes" if name == "none" else
                f"no ({text_bytes / 2**20:.2f} MiB tiny params saved)",
                "fresh crops": "no (K variants)" if name == "full latents" else "yes",
                "cache on disk": "-" if name == "none" else
                f"{(text if name == 'text-only' else full).nbytes() / 2**10:.0f} KiB",
            })
    return rows


def bench_build(
    root: Path, encoders: FluxEncoders, images: int, reps: int, workers: int
) -> tuple[list[dict], float]:
    """Table 4: build_cache vs the bare encoders on the same work; returns the fraction."""
    photos = write_photos(root / "build-photos", images)
    index = scan(str(photos), workers=1)
    assignment = assign(index, LADDER)
    probe = build_cache(index, assignment, encoders, root / "probe", progress=False,
                        workers=workers)
    rows = probe.rows
    by_bucket: dict[tuple, list] = {}
    for k, row in enumerate(rows["row"]):  # the build's own crops, decoded once, up front
        params = probe.latent_sample(rows["path"][k], (rows["width"][k], rows["height"][k]),
                                     (rows["bucket_w"][k], rows["bucket_h"][k]),
                                     np.random.default_rng(0))["fit"]
        by_bucket.setdefault(params.bucket, []).append(fit(load_image(index.paths[row]), params))
    batches = [torch.stack(v[i : i + 8]) for v in by_bucket.values() for i in range(0, len(v), 8)]
    captions = sorted({c for caps in index.captions for c in caps} | {""})

    def bare() -> None:
        for chunk in range(0, len(captions), 64):
            encoders.encode_text(captions[chunk : chunk + 64])
        for px in batches:
            encoders.encode_images(px)
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def build() -> None:
        shutil.rmtree(root / "timed", ignore_errors=True)
        build_cache(index, assignment, encoders, root / "timed", progress=False, workers=workers)

    t_bare = timeit(bare, reps=reps)
    t_build = timeit(build, reps=reps)
    share = t_bare.median / t_build.median
    n = len(index)
    return [
        {"side": "bare encoders (pixels ready in memory)", "time": str(t_bare),
         "images/s": f"{n / t_bare.median:.1f}", "share of bare": "100%"},
        {"side": f"build_cache (decode in {workers} workers, shards)", "time": str(t_build),
         "images/s": f"{n / t_build.median:.1f}", "share of bare": f"{share:.0%}"},
    ], share


def bench_sizes(lengths: list[int]) -> list[dict]:
    """Table 2: bytes per FLUX 1024² sample (one caption each), full vs trimmed T5."""
    wh = np.array([[1024, 1024]])
    rows = []
    for label, padding, measured in (("full (512 tokens)", "full", None),
                                     *((f"trimmed ({n} tokens)", "trimmed", np.array([n]))
                                       for n in lengths)):
        est = estimate_bytes(wh, ["caption"], "flux", t5_padding=padding, text_lengths=measured)
        rows.append({"T5 storage": label, "latent": f"{est['latents'] / 1024:.0f} KiB",
                     "text": f"{est['texts'] / 1024:.0f} KiB",
                     "per sample": f"{est['total'] / 1024:.0f} KiB"})
    return rows


def bench_read(root: Path, reads: int) -> tuple[list[dict], float]:
    """Table 3: one cached FLUX 1024² sample read through the dataset; returns the median."""
    photos = root / "big"
    photos.mkdir()
    lengths = {}
    for i, n in enumerate((12, 40, 120)):
        Image.new("RGB", (1024, 1024), (i * 40, 90, 160)).save(photos / f"b{i}.png")
        caption = f"caption {i}"
        (photos / f"b{i}.txt").write_text(caption)
        lengths[caption] = n
    index = scan(str(photos), workers=1)
    assignment = assign(index, BucketLadder.from_buckets([(1024, 1024)], multiple=16))
    cache = build_cache(index, assignment, RealShapes(lengths), root / "big-cache",
                        progress=False, batch_size=1)
    ds = TextToImageDataset(index, assignment, encoder_cache=cache)
    torch.set_num_threads(1)
    for i in range(len(index)):
        ds[i]  # open the shards (each worker does this once)
    times = []
    for k in range(reads):
        t0 = time.perf_counter()
        s = ds[k % len(index)]
        times.append(time.perf_counter() - t0)
    latent_kib = s["latents"].numel() * 2 / 1024
    med = float(np.median(times))
    rows = [{"read": "dataset[i] from the cache, FLUX 1024², 1 thread",
             "median": f"{med * 1e6:.0f} us", "p90": f"{np.percentile(times, 90) * 1e6:.0f} us",
             "latent": f"{latent_kib:.0f} KiB", "T5 rows": "12 / 40 / 120 (trimmed)"}]
    return rows, med


def main(argv: list[str] | None = None) -> int:
    """Run the three measurements and print their tables."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer images and repetitions")
    size.add_argument("--tiny", action="store_true", help="smoke test: 4 images, 1 repetition")
    p.add_argument("--weights", help="a local FLUX.1 folder for the build table (default: "
                   "the tiny random encoders)")
    p.add_argument("--device", default="cpu", help="device of the build table's encoders")
    p.add_argument("--images", type=int, help="images in the build table")
    p.add_argument("--workers", type=int, default=2, help="decoding workers of the build")
    p.add_argument("--modes", action="store_true", help="only the which-cache-when table "
                   "(--images of them, 2 repetitions)")
    args = p.parse_args(argv)
    if args.modes:
        print(machine_line())
        with tempfile.TemporaryDirectory() as tmp:
            n = args.images or 8
            print_table(bench_modes(Path(tmp), n, 2), f"Which cache when ({n} images, tiny "
                        "random FLUX / SDXL layouts on CPU, 1 process)")
        return 0
    images, reps, reads = (
        (4, 1, 20) if args.tiny else (16, 2, 200) if args.quick else (48, 5, 1000)
    )
    print(machine_line())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows, speedup = bench_epochs(root, images, reps)
        print_table(rows, f"Cached epoch vs on the fly ({images} images, tiny FLUX-like "
                    "encoders, 1 process)")
        if not args.tiny:  # --modes runs it alone
            print_table(bench_modes(root, images, reps), f"Which cache when ({images} images, "
                        "tiny random FLUX / SDXL layouts on CPU, 1 process)")
        print_table(bench_sizes([16, 40, 77, 128]), "Bytes per FLUX.1 1024² sample (bf16)")
        read_rows, read_s = bench_read(root, reads)
        print_table(read_rows, "Reading one cached FLUX 1024² sample")
        weights = args.weights or root / "models" / "flux"
        dtype = torch.bfloat16 if args.weights else torch.float32
        enc = FluxEncoders.from_pretrained(weights, device=args.device, dtype=dtype)
        build_rows, share = bench_build(root, enc, args.images or images, reps, args.workers)
        print_table(build_rows, f"build_cache vs its bare encoders ({args.device}, "
                    f"{'tiny' if not args.weights else args.weights})")
    print(f"cached epoch {speedup:.1f}x on the fly (target >= 10x): "
          f"{'PASS' if speedup >= 10 else 'MISS'}")
    print(f"the build ran at {share:.0%} of its bare encoders' throughput (target >= 90% "
          "on a GPU with the real encoders)")
    print(f"one cached 1024² sample read in {read_s * 1e3:.3f} ms (target well under 1 ms): "
          f"{'PASS' if read_s < 0.5e-3 else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
