"""Building a cache: decode and fit every accepted image as the dataset does, run the
frozen encoders bucket by bucket, and write the shards and the view (on every rank)."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from bucketing.atomic import atomic_path
from bucketing.pipeline.encoder_cache.captions import (
    caption_format,
    check_cacheable_captions,
    final_caption,
)
from bucketing.pipeline.encoder_cache.keys import (
    CACHE_FORMAT,
    CACHE_VERSION,
    CROPS,
    T5_PADDINGS,
    TRIMMED_MODELS,
    FitSettings,
    Job,
    plan_rows,
    text_key,
)
from bucketing.pipeline.encoder_cache.pairs import encode_pairs
from bucketing.pipeline.encoder_cache.reader import EncoderCache
from bucketing.pipeline.encoder_cache.store import (
    ShardWriter,
    build_lock,
    load_entries,
    read_meta,
    start_mark,
    write_entries,
    write_meta,
)
from transforms.image import DEFAULT_DECODE, DecodeSettings
from transforms.resize_crop import DEFAULT_RESAMPLE, RESAMPLE_MODES, decode_and_fit

if TYPE_CHECKING:
    from bucketing.assign import Assignment
    from bucketing.index import ImageIndex



def _dist() -> Any:
    """``torch.distributed`` when the program initialised it, else None."""
    return torch.distributed if torch.distributed.is_available() and \
        torch.distributed.is_initialized() else None


def _rank_world() -> tuple[int, int]:
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)


def _gather(obj: Any) -> list[Any]:
    dist = _dist()
    if dist is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()



# --------------------------------------------------------------------------- decoding jobs


class _FitJobs(Dataset):
    """Decode and fit each job's image as ``TextToImageDataset`` does; errors are returned."""

    def __init__(self, index: ImageIndex, jobs: list[Job], settings: FitSettings) -> None:
        self.index, self.jobs, self.settings = index, jobs, settings

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        job, s = self.jobs[i], self.settings
        scanned = (int(self.index.width[job.row]), int(self.index.height[job.row]))
        try:
            pixels = decode_and_fit(self.index.image_source(job.row), job.params, s.decode,
                                    resample=s.resample, expected_size=scanned)["pixel_values"]
        except Exception as error:  # noqa: BLE001 - recorded; the dataset substitutes it
            return i, None, f"{type(error).__name__}: {error}"
        return i, pixels, ""


def _batches(jobs: list[Job], batch_size: int) -> list[list[int]]:
    """Job positions cut into batches of one bucket each, in a fixed order."""
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i, job in enumerate(jobs):
        by_bucket.setdefault(job.bucket, []).append(i)
    return [members[k : k + batch_size] for _, members in sorted(by_bucket.items())
            for k in range(0, len(members), batch_size)]



# --------------------------------------------------------------------------- building


def build_cache(
    index: ImageIndex,
    assignment: Assignment,
    encoders: Any,
    path: str | os.PathLike,
    *,
    crop: str = "center",
    variants: int = 1,
    flip_p: float = 0.0,
    resample: str = DEFAULT_RESAMPLE,
    decode: DecodeSettings = DEFAULT_DECODE,
    seed: int = 0,
    t5_padding: str = "trimmed",
    batch_size: int = 8,
    text_batch_size: int = 64,
    workers: int = 0,
    shard_size: int = 256,
    progress: bool = True,
    plan_fingerprint: str | None = None,
    images: bool = True,
    caption_transform: Any = None,
    captions_formatted: bool = False,
) -> EncoderCache:
    """Encode what ``path`` lacks for ``index`` x ``assignment`` and return the cache.

    ``encoders``: a ``transforms.FluxEncoders`` / ``SDXLEncoders`` (anything with
    ``encode_images``, ``encode_text``, ``fingerprint``, ``model`` and ``dtype``).
    ``crop="center"`` caches one crop per image; ``"random"`` caches ``variants`` random
    crops (the dataset picks one per epoch). ``flip_p > 0`` also caches each crop flipped
    (the dataset flips with that probability). ``resample`` and ``decode`` (a
    ``transforms.image.DecodeSettings``: limits, JPEG draft, background): the settings of
    the pixel path, ``TextToImageDataset.decode`` for the dataset that will read the cache.
    ``t5_padding``: ``"trimmed"`` stores each caption's T5 rows up to its real token count,
    ``"full"`` the whole padded sequence. ``workers``: DataLoader processes decoding images. Under
    ``torch.distributed`` call it on every rank.
    ``plan_fingerprint``: the plan's (``bucket-cache`` passes the dataset's), recorded with
    the per-row buckets so that a dataset built on another plan refuses the cache.
    ``images=False``: a text-only cache (no latents, nothing decoded): the dataset then fits
    pixels per occurrence, with fresh crops and flips every epoch, and reads only the
    caption embeddings here. ``caption_transform``: the dataset's ``CaptionTransform``; its
    template, prefix and suffix are applied to every caption before encoding (the cache is
    keyed by the final caption text); one that shuffles parts or drops tags is refused.
    ``captions_formatted``: the index's captions are already formatted, each dataset's its own
    way (``bucket-cache --config``'s mix): no one format is recorded, and a dataset's captions
    are checked one by one against the cache when it is made.
    An index with paired files also caches, beside every image latent (same crop and flip),
    its conditioning latents and its loss mask on the latent grid (see
    :mod:`bucketing.pipeline.encoder_cache.pairs`).
    """
    check_cacheable_captions(caption_transform)
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    if crop == "center" and variants != 1:
        raise ValueError("variants > 1 needs crop='random' (a centre crop has one variant)")
    if int(variants) < 1 or int(batch_size) < 1 or int(text_batch_size) < 1 or int(shard_size) < 1:
        raise ValueError("variants, batch_size, text_batch_size and shard_size must be >= 1")
    if not 0.0 <= flip_p <= 1.0:
        raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")
    if t5_padding not in T5_PADDINGS:
        raise ValueError(f"t5_padding must be one of {T5_PADDINGS}, got {t5_padding!r}")
    if resample not in RESAMPLE_MODES:
        raise ValueError(f"resample must be one of {RESAMPLE_MODES}, got {resample!r}")
    if len(assignment) != len(index):
        raise ValueError(f"assignment has {len(assignment)} rows but the index has {len(index)}")
    settings = FitSettings(
        crop=crop, variants=int(variants), flip=flip_p > 0, resample=resample,
        decode=decode,
        allow_upscale=bool(np.any(getattr(assignment, "upscaled", False))), seed=int(seed),
    )
    root = Path(path)
    rank, world = _rank_world()
    _prepare_folder(root, rank)
    with contextlib.ExitStack() as held:
        _lock(root, rank, held)
        _clear_temporary(root, rank)
        dtype = str(encoders.dtype).removeprefix("torch.")
        text_dtype = str(encoders.text_dtype()).removeprefix("torch.")
        padding = t5_padding if encoders.model in TRIMMED_MODELS else "full"
        image_fp, text_fp = encoders.fingerprint("image"), encoders.fingerprint("text")

        cols, jobs = plan_rows(index, assignment, settings, image_fp, dtype)
        if images:
            rows = cols["row"]
        else:  # text only: no image is read, every accepted row's captions are encoded
            cols, jobs = {k: [] for k in cols}, []
            rows = np.flatnonzero(np.asarray(assignment.bucket_id) >= 0).tolist()
        captions = sorted({final_caption(c, caption_transform)
                           for r in rows for c in index.captions[r]} | {""})
        tkeys = {c: text_key(c, text_fp, text_dtype, padding) for c in captions}
        stored = load_entries(root)
        _barrier()

        writer = ShardWriter(root / "shards", int(shard_size), rank)
        todo_texts = [c for c in captions if tkeys[c] not in stored]
        chunks = [todo_texts[k : k + text_batch_size]
                  for k in range(0, len(todo_texts), text_batch_size)][rank::world]
        for chunk in chunks:
            out = {k: v.cpu() for k, v in encoders.encode_text(chunk).items()}  # one device sync
            for j, caption in enumerate(chunk):
                n = int(out["text_lengths"][j]) if padding == "trimmed" else None
                writer.add(tkeys[caption], {
                    "prompt_embeds": out["prompt_embeds"][j, :n],
                    "pooled_prompt_embeds": out["pooled_prompt_embeds"][j],
                    "text_length": out["text_lengths"][j : j + 1],
                })

        todo = [Job(j.row, j.params, tuple(k if k not in stored else None for k in j.keys))
                for j in jobs]
        todo = [j for j in todo if any(j.keys)]
        mine = _batches(todo, int(batch_size))[rank::world]
        failed = _encode_images(index, todo, mine, settings, encoders, writer, workers,
                                progress and rank == 0)
        if index.has_pairs:  # conditioning latents and latent-grid masks, beside each latent
            failed["rows"] += encode_pairs(index, jobs, settings, encoders, writer, stored, rank,
                                           world)
        writer.flush()

        stats = {"latents_encoded": sum(1 for b in mine for i in b for k in todo[i].keys if k)
                 - failed["latents"],
                 "texts_encoded": sum(len(c) for c in chunks), "failed": failed["rows"]}
        everyone = _gather((stats, writer.written))
        if rank == 0:
            entries = load_entries(root)
            for _, written in everyone:
                entries.update(written)
            write_entries(root, entries)
            _write_view(root, cols, tkeys, {
                "format": CACHE_FORMAT, "version": CACHE_VERSION, "model": encoders.model,
                "fingerprints": {"image": image_fp, "text": text_fp}, "dtype": dtype,
                "text_dtype": text_dtype, "t5_padding": padding, "flip_p": float(flip_p),
                "crop": crop, "variants": int(variants), "fit": settings.key(), "seed": int(seed),
                "empty_caption_key": tkeys[""], "images": bool(images),
                "caption_format": None if captions_formatted else caption_format(
                    caption_transform),
                "vae_scale_factor": getattr(encoders, "vae_scale_factor", None),
                "plan": {"fingerprint": plan_fingerprint,
                         "missing": _missing(index, assignment, cols)},
            })
    _barrier()
    cache = EncoderCache.open(root)
    cache.build_stats = {
        "latents_encoded": sum(s["latents_encoded"] for s, _ in everyone),
        "texts_encoded": sum(s["texts_encoded"] for s, _ in everyone),
        "latents_total": sum(len(k) for k in cols["latent_keys"]),
        "texts_total": len(captions),
        "failed": [f for s, _ in everyone for f in s["failed"]],
        "missing_files": int(np.count_nonzero(np.asarray(assignment.bucket_id) >= 0))
        - len(rows),
    }
    return cache


def _missing(index: ImageIndex, assignment: Assignment, cols: dict[str, list]) -> list[str]:
    """Accepted rows whose file was gone at build time (the view has no row for them)."""
    present = set(cols["row"])
    return [index.paths[r] for r in np.flatnonzero(np.asarray(assignment.bucket_id) >= 0)
            if int(r) not in present]


def _prepare_folder(root: Path, rank: int) -> None:
    """Check the folder is new, empty or a cache of this format (every rank, so that all
    raise together); rank 0 creates it and marks it ours (cache.json without a build) before
    writing anything else. A folder holding files but no mark is never adopted, whatever
    their names."""
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a folder")
    marked = (root / "cache.json").exists()
    if marked:
        read_meta(root)
    elif root.is_dir() and any(root.iterdir()):
        raise FileExistsError(f"{root} is a folder with other files and no cache.json: "
                              "give an empty or new folder (nothing there is overwritten)")
    _barrier()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if not marked:
            write_meta(root, start_mark())
        (root / "shards").mkdir(exist_ok=True)
    _barrier()


def _lock(root: Path, rank: int, held: contextlib.ExitStack) -> None:
    """Rank 0 takes the folder's build lock into ``held``; when another build holds it,
    every rank raises the same error (none is left waiting at a barrier)."""
    refused = None
    if rank == 0:
        try:
            held.enter_context(build_lock(root))
        except RuntimeError as error:
            refused = str(error)
    refused = next((r for r in _gather(refused) if r), None)
    if refused:
        raise RuntimeError(refused)


def _clear_temporary(root: Path, rank: int) -> None:
    """Rank 0, holding the build lock: remove the temporary files a killed build left."""
    if rank == 0:
        for tmp in (root / "shards").glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
    _barrier()


def _encode_images(
    index: ImageIndex,
    jobs: list[Job],
    batches: list[list[int]],
    settings: FitSettings,
    encoders: Any,
    writer: ShardWriter,
    workers: int,
    progress: bool,
) -> dict[str, Any]:
    """Decode, fit and encode ``batches`` of ``jobs`` (one bucket each); returns failures."""
    failed: dict[str, Any] = {"rows": [], "latents": 0}
    if not batches:
        return failed
    loader = DataLoader(_FitJobs(index, jobs, settings), batch_sampler=batches,
                        num_workers=int(workers), collate_fn=list)
    total = sum(len(b) for b in batches)
    with tqdm(total=total, unit="img", desc="encoding images", disable=not progress) as bar:
        for items in loader:
            ok = [(i, px) for i, px, _ in items if px is not None]
            for i, px, error in items:
                if px is None:
                    failed["rows"].append(f"{index.paths[jobs[i].row]}: {error}")
                    failed["latents"] += sum(1 for k in jobs[i].keys if k)
            if ok:
                _encode_batch(ok, jobs, encoders, writer)
            bar.update(len(items))
    return failed


def _encode_batch(
    ok: list[tuple[int, torch.Tensor]], jobs: list[Job], encoders: Any, writer: ShardWriter
) -> None:
    """One VAE call for a bucket's pixels (and their flips, when cached)."""
    pixels, slots = [], []
    for i, px in ok:
        for flip, key in enumerate(jobs[i].keys):
            if key is not None:
                pixels.append(px.flip(-1) if flip else px)
                slots.append(key)
    latents = encoders.encode_images(torch.stack(pixels)).cpu()  # one device sync per batch
    for key, z in zip(slots, latents, strict=True):
        writer.add(key, {"latents": z})


def _write_view(
    root: Path, cols: dict[str, list], tkeys: dict[str, str], meta: dict[str, Any]
) -> None:
    """rows.parquet (images), texts.parquet (captions) of this build, then cache.json, each
    atomically: cache.json last, naming the build the tables carry, so a folder whose
    cache.json names its tables is a finished cache and a killed rebuild is refused."""
    build = uuid.uuid4().hex
    table = pa.table({
        "row": pa.array(cols["row"], pa.int64()),
        "path": pa.array([os.fsencode(p) for p in cols["path"]], pa.binary()),
        "identity": pa.array(cols["identity"], pa.string()),
        **{k: pa.array(cols[k], pa.int64()) for k in (
            "width", "height", "bucket_w", "bucket_h", "resized_w", "resized_h")},
        "crop_y": pa.array(cols["crop_y"], pa.list_(pa.int64())),
        "crop_x": pa.array(cols["crop_x"], pa.list_(pa.int64())),
        "latent_keys": pa.array(cols["latent_keys"], pa.list_(pa.string())),
    })
    captions = sorted(tkeys)
    texts = pa.table({"caption": pa.array([c.encode("utf-8", "surrogatepass") for c in captions],
                                          pa.binary()),
                      "key": pa.array([tkeys[c] for c in captions], pa.string())})
    for name, t in (("rows.parquet", table), ("texts.parquet", texts)):
        with atomic_path(root / name) as tmp:
            pq.write_table(t.replace_schema_metadata({"build": build}), tmp)
    write_meta(root, {**meta, "build": build})


