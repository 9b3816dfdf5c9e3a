"""Encode once: VAE latents and text embeddings computed before training, read by bucket.

``build_cache(index, assignment, encoders, path)`` runs the frozen encoders over every
accepted image (one bucket per VAE batch, decoded and fitted exactly as the dataset fits
pixels) and every distinct caption (each once, plus the empty caption for dropout), and
stores the results under ``path``; ``EncoderCache.open(path)`` reads them back, and
``TextToImageDataset(index, assignment, cache=cache)`` serves them instead of pixels.

Layout of a cache folder (no pickle anywhere; every file written atomically)::

    cache.json        format, version, model, encoder fingerprints, dtype, settings
    rows.parquet      the last build's view: per image, its identity, bucket, crop boxes
                      and entry keys; per caption, its entry key
    entries.parquet   table of contents: entry key -> shard file
    shards/*.safetensors   the tensors, memory-mapped when read

Entries are content-keyed (SHA-256) by everything that determines them: an image entry by
the file's identity (path, size, mtime_ns), its bucket, resized size, crop box and flip,
every fit setting (resample filter, background, JPEG draft decoding, upscaling), the VAE's
fingerprint (class, config, weights) and the dtype; a text entry by the caption, the text
encoders' fingerprint, the T5 length and the padding mode. A build encodes only the keys the
store lacks, so adding images, changing the ladder or a caption re-encodes exactly what
changed, and a cache built by other weights is never used for these (its keys differ).

Shards are written every ``shard_size`` entries, each atomically: a build killed at any
moment keeps every finished shard and loses at most the one in progress; rerunning resumes.
Under ``torchrun`` (``torch.distributed`` initialised) each rank encodes every
``world_size``-th batch into its own shards and rank 0 writes the merged view.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from bucketing.atomic import atomic_path, atomic_write_bytes
from transforms.image import ORIGINAL_SIZE_KEY, load_image
from transforms.resize_crop import (
    DEFAULT_RESAMPLE,
    RESAMPLE_MODES,
    BucketResizeCrop,
    FitParams,
    fit,
)
from transforms.tokenize import FluxTokenizer

if TYPE_CHECKING:
    from bucketing.assign import Assignment
    from bucketing.index import ImageIndex

CACHE_FORMAT = "aspect-bucketing/encoder-cache"
CACHE_VERSION = 1
CROPS = ("center", "random")
T5_PADDINGS = ("trimmed", "full")

# Output sizes of the real models, for estimates before anything is built: latent channels,
# the text sequence's width and padded length, and the pooled embedding's width.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "flux": {"latent_channels": 16, "text_width": 4096, "text_length": 512, "pooled": 768},
    "flux-schnell": {"latent_channels": 16, "text_width": 4096, "text_length": 256,
                     "pooled": 768},
    "sdxl": {"latent_channels": 4, "text_width": 2048, "text_length": 77, "pooled": 1280},
    # SD3: both CLIPs' 77 rows (zero-padded to T5's width) then T5's 77 (its training default)
    "sd3": {"latent_channels": 16, "text_width": 4096, "text_length": 77 + 77, "pooled": 2048},
}
_TRIMMED_MODELS = ("flux", "flux-schnell")  # T5 sequences: worth storing trimmed
_SHARD_BYTES = 256 << 20  # a shard is written once its entries reach this size
_OWN_FILES = ("shards", "entries.parquet", "rows.parquet", "texts.parquet", "cache.json")


def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


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


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class FitSettings:
    """How pixels are produced before the VAE: what every image entry's key includes."""

    crop: str = "center"
    variants: int = 1
    flip: bool = False
    resample: str = DEFAULT_RESAMPLE
    background: tuple[int, int, int] = (255, 255, 255)
    draft: bool = True
    allow_upscale: bool = False
    seed: int = 0

    def key(self) -> dict[str, Any]:
        """The settings that change an entry's pixels (not how many variants exist)."""
        return {"resample": self.resample, "background": list(self.background),
                "draft": self.draft, "allow_upscale": self.allow_upscale, "decode": "pil"}


def file_identity(index: ImageIndex, row: int) -> list[Any] | None:
    """(path, size, mtime_ns) of a file row; (label, size, sha256) for embedded bytes; None
    when the file is gone."""
    if index.blob is not None:
        data = index.blob(row)
        return [index.paths[row], len(data), hashlib.sha256(data).hexdigest()]
    try:
        st = os.stat(index.paths[row])
    except OSError:
        return None
    return [index.paths[row], int(st.st_size), int(st.st_mtime_ns)]


def variant_params(
    size_wh: Sequence[int], bucket_wh: Sequence[int], settings: FitSettings, path: str
) -> list[FitParams]:
    """The unflipped :class:`FitParams` of an image's cached variants, from
    ``BucketResizeCrop.make_params`` as the pixel path draws them: the centre crop, or
    ``variants`` random crops from a generator keyed by (seed, path), so a rebuild draws the
    same crops for an unchanged image whatever its row number."""
    transform = BucketResizeCrop(crop=settings.crop, allow_upscale=settings.allow_upscale)
    if settings.crop == "center":
        return [transform.make_params(size_wh, bucket_wh, None)]
    words = np.frombuffer(hashlib.sha256(path.encode("utf-8", "surrogatepass")).digest()[:8],
                          dtype=np.uint32)
    rng = np.random.default_rng([settings.seed, *words.tolist()])
    return [transform.make_params(size_wh, bucket_wh, rng) for _ in range(settings.variants)]


@dataclass
class _Job:
    """One (image, crop) to decode and encode: its flips' keys (None: already stored)."""

    row: int
    params: FitParams
    keys: tuple[str | None, ...]

    @property
    def bucket(self) -> tuple[int, int]:
        """The (w, h) bucket."""
        return self.params.bucket


def plan_rows(
    index: ImageIndex,
    assignment: Assignment,
    settings: FitSettings,
    image_fingerprint: str,
    dtype: str,
) -> tuple[dict[str, list], list[_Job]]:
    """The view's image columns for every accepted row, and one job per (row, crop)."""
    flips = (False, True) if settings.flip else (False,)
    cols: dict[str, list] = {k: [] for k in (
        "row", "path", "identity", "width", "height", "bucket_w", "bucket_h", "resized_w",
        "resized_h", "crop_y", "crop_x", "latent_keys")}
    jobs: list[_Job] = []
    fit_key = settings.key()
    bucket_wh = np.asarray(assignment.bucket_wh).reshape(-1, 2)
    for row in np.flatnonzero(np.asarray(assignment.bucket_id) >= 0).tolist():
        identity = file_identity(index, row)
        if identity is None:
            continue  # the file is gone: the dataset substitutes it like a failed decode
        bucket = (int(bucket_wh[row, 0]), int(bucket_wh[row, 1]))
        size = (int(index.width[row]), int(index.height[row]))
        variants = variant_params(size, bucket, settings, index.paths[row])
        keys = []
        for params in variants:
            ks = tuple(_digest({"file": identity, "size": size, "bucket": bucket,
                                "resized": params.resized, "crop": params.crop, "flip": flip,
                                "fit": fit_key, "vae": image_fingerprint, "dtype": dtype})
                       for flip in flips)
            keys.extend(ks)
            jobs.append(_Job(row, params, ks))
        resized = variants[0].resized
        boxes = [p.crop[:2] for p in variants]
        for name, value in (("row", row), ("path", index.paths[row]),
                            ("identity", json.dumps(identity)), ("width", size[0]),
                            ("height", size[1]), ("bucket_w", bucket[0]), ("bucket_h", bucket[1]),
                            ("resized_w", resized[0]), ("resized_h", resized[1]),
                            ("crop_y", [b[0] for b in boxes]), ("crop_x", [b[1] for b in boxes]),
                            ("latent_keys", keys)):
            cols[name].append(value)
    return cols, jobs


def text_key(caption: str, text_fingerprint: str, dtype: str, padding: str) -> str:
    """The entry key of a caption's embeddings."""
    return _digest({"caption": caption, "text": text_fingerprint, "dtype": dtype,
                    "padding": padding})


# --------------------------------------------------------------------------- the store


def _read_meta(path: Path) -> dict[str, Any]:
    """cache.json of a cache folder, validated; a clear error for anything else."""
    meta_file = path / "cache.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not an encoder cache (no cache.json); build one with "
                                "bucketing.build_cache or bucket-cache")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{meta_file} is unreadable: {error}") from error
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path} is not an aspect-bucketing encoder cache "
                         f"(format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") != CACHE_VERSION:
        raise ValueError(f"{path} is an encoder cache of version {meta.get('version')}, this "
                         f"library reads version {CACHE_VERSION}: rebuild it (bucket-cache)")
    return meta


def _shard_keys(shard: Path) -> list[str]:
    with safe_open(str(shard), "pt") as f:
        names = f.keys()
    return sorted({n.rsplit(".", 1)[0] for n in names})


def _load_entries(path: Path) -> dict[str, str]:
    """key -> shard name for every entry of every complete shard (the table of contents,
    plus shards a killed build wrote after it)."""
    shards_dir = path / "shards"
    present = {p.name for p in shards_dir.glob("*.safetensors")} if shards_dir.is_dir() else set()
    entries: dict[str, str] = {}
    listed: set[str] = set()
    toc = path / "entries.parquet"
    if toc.is_file():
        table = pq.read_table(toc).to_pydict()
        for key, shard in zip(table["key"], table["shard"], strict=True):
            listed.add(shard)
            if shard in present:
                entries[key] = shard
    for shard in sorted(present - listed):
        try:
            keys = _shard_keys(shards_dir / shard)
        except Exception:  # noqa: BLE001 - a shard that cannot be read is not an entry
            continue
        for key in keys:
            entries.setdefault(key, shard)
    return entries


def _write_entries(path: Path, entries: dict[str, str]) -> None:
    keys = sorted(entries)
    table = pa.table({"key": pa.array(keys, pa.string()),
                      "shard": pa.array([entries[k] for k in keys], pa.string())})
    with atomic_path(path / "entries.parquet") as tmp:
        pq.write_table(table, tmp)


class _ShardWriter:
    """Collects encoded tensors (already on the host) and writes them as shards of
    ``shard_size`` entries, or sooner when they reach ``_SHARD_BYTES``."""

    def __init__(self, shards_dir: Path, shard_size: int, rank: int) -> None:
        self.dir, self.size, self.rank = shards_dir, shard_size, rank
        self.tensors: dict[str, torch.Tensor] = {}
        self.keys: set[str] = set()
        self.written: dict[str, str] = {}
        self.nbytes = 0

    def add(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            # a packed copy, not a view that would keep its whole batch alive
            self.tensors[f"{key}.{name}"] = t.clone(memory_format=torch.contiguous_format)
            self.nbytes += t.nbytes
        self.keys.add(key)
        if len(self.keys) >= self.size or self.nbytes >= _SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.keys:
            return
        name = f"r{self.rank}-{uuid.uuid4().hex}.safetensors"
        with atomic_path(self.dir / name) as tmp:
            save_file(self.tensors, tmp, metadata={"format": CACHE_FORMAT,
                                                   "version": str(CACHE_VERSION)})
        self.written.update(dict.fromkeys(self.keys, name))
        self.tensors, self.keys, self.nbytes = {}, set(), 0


# --------------------------------------------------------------------------- decoding jobs


class _FitJobs(Dataset):
    """Decode and fit each job's image as ``TextToImageDataset`` does; errors are returned."""

    def __init__(self, index: ImageIndex, jobs: list[_Job], settings: FitSettings) -> None:
        self.index, self.jobs, self.settings = index, jobs, settings

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        job, s = self.jobs[i], self.settings
        try:
            img = load_image(self.index.image_source(job.row), background=s.background,
                             draft_size=job.bucket if s.draft else None)
            h, w = img.info[ORIGINAL_SIZE_KEY]
            scanned = (int(self.index.width[job.row]), int(self.index.height[job.row]))
            if (w, h) != scanned:
                raise ValueError(f"the file is {w}x{h} but was {scanned[0]}x{scanned[1]} when "
                                 "scanned (rescan it)")
            pixels = fit(img, job.params, resample=s.resample)
        except Exception as error:  # noqa: BLE001 - recorded; the dataset substitutes it
            return i, None, f"{type(error).__name__}: {error}"
        return i, pixels, ""


def _batches(jobs: list[_Job], batch_size: int) -> list[list[int]]:
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
    background: Sequence[int] = (255, 255, 255),
    draft: bool = True,
    seed: int = 0,
    t5_padding: str = "trimmed",
    batch_size: int = 8,
    text_batch_size: int = 64,
    workers: int = 0,
    shard_size: int = 256,
    progress: bool = True,
) -> EncoderCache:
    """Encode what ``path`` lacks for ``index`` x ``assignment`` and return the cache.

    ``encoders``: a ``transforms.FluxEncoders`` / ``SDXLEncoders`` (anything with
    ``encode_images``, ``encode_text``, ``fingerprint``, ``model`` and ``dtype``).
    ``crop="center"`` caches one crop per image; ``"random"`` caches ``variants`` random
    crops (the dataset picks one per epoch). ``flip_p > 0`` also caches each crop flipped
    (the dataset flips with that probability). ``resample``, ``background``, ``draft``: the
    fit settings of the pixel path. ``t5_padding``: ``"trimmed"`` stores each caption's T5
    rows up to its real token count, ``"full"`` the whole padded sequence. ``workers``:
    DataLoader processes decoding images. Under ``torch.distributed`` call it on every rank.
    """
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
        background=tuple(int(v) for v in background), draft=bool(draft),
        allow_upscale=bool(np.any(getattr(assignment, "upscaled", False))), seed=int(seed),
    )
    root = Path(path)
    rank, world = _rank_world()
    _prepare_folder(root, rank)
    dtype = str(encoders.dtype).removeprefix("torch.")
    text_dtype = str(encoders.text_dtype()).removeprefix("torch.")
    padding = t5_padding if encoders.model in _TRIMMED_MODELS else "full"
    image_fp, text_fp = encoders.fingerprint("image"), encoders.fingerprint("text")

    cols, jobs = plan_rows(index, assignment, settings, image_fp, dtype)
    captions = sorted({c for r in cols["row"] for c in index.captions[r]} | {""})
    tkeys = {c: text_key(c, text_fp, text_dtype, padding) for c in captions}
    stored = _load_entries(root)
    _barrier()

    writer = _ShardWriter(root / "shards", int(shard_size), rank)
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

    todo = [_Job(j.row, j.params, tuple(k if k not in stored else None for k in j.keys))
            for j in jobs]
    todo = [j for j in todo if any(j.keys)]
    mine = _batches(todo, int(batch_size))[rank::world]
    failed = _encode_images(index, todo, mine, settings, encoders, writer, workers,
                            progress and rank == 0)
    writer.flush()

    stats = {"latents_encoded": sum(1 for b in mine for i in b for k in todo[i].keys if k)
             - failed["latents"],
             "texts_encoded": sum(len(c) for c in chunks), "failed": failed["rows"]}
    everyone = _gather((stats, writer.written))
    if rank == 0:
        entries = _load_entries(root)
        for _, written in everyone:
            entries.update(written)
        _write_entries(root, entries)
        _write_view(root, cols, tkeys, {
            "format": CACHE_FORMAT, "version": CACHE_VERSION, "model": encoders.model,
            "fingerprints": {"image": image_fp, "text": text_fp}, "dtype": dtype,
            "text_dtype": text_dtype, "t5_padding": padding, "flip_p": float(flip_p),
            "crop": crop, "variants": int(variants), "fit": settings.key(), "seed": int(seed),
            "empty_caption_key": tkeys[""],
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
        - len(cols["row"]),
    }
    return cache


def _prepare_folder(root: Path, rank: int) -> None:
    """Check the folder is new, empty or a cache of this format (every rank, so that all
    raise together); rank 0 creates it and clears temporary files a killed build left."""
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a folder")
    if (root / "cache.json").exists():
        _read_meta(root)
    elif root.is_dir() and any(p.name not in _OWN_FILES for p in root.iterdir()):
        raise FileExistsError(f"{root} is a folder with other files and no cache.json: "
                              "give an empty or new folder (nothing there is overwritten)")
    if rank == 0:
        (root / "shards").mkdir(parents=True, exist_ok=True)
        for tmp in (root / "shards").glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
    _barrier()


def _encode_images(
    index: ImageIndex,
    jobs: list[_Job],
    batches: list[list[int]],
    settings: FitSettings,
    encoders: Any,
    writer: _ShardWriter,
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
    ok: list[tuple[int, torch.Tensor]], jobs: list[_Job], encoders: Any, writer: _ShardWriter
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
    atomically: cache.json last, so a folder with one is a finished cache."""
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
    with atomic_path(root / "rows.parquet") as tmp:
        pq.write_table(table, tmp)
    with atomic_path(root / "texts.parquet") as tmp:
        pq.write_table(texts, tmp)
    atomic_write_bytes(root / "cache.json", json.dumps(meta, indent=1).encode())


# --------------------------------------------------------------------------- reading


class EncoderCache:
    """A built cache: per image its latents (per crop variant and flip), per caption its
    embeddings. Read with :meth:`latent_sample` / :meth:`text_sample` (what
    ``TextToImageDataset(..., cache=cache)`` calls) or :meth:`latents` / :meth:`text`.
    Picklable: DataLoader workers reopen the shards, memory-mapped, on first use."""

    def __init__(self, root: Path, meta: dict[str, Any], rows: dict[str, list],
                 texts: dict[str, str], entries: dict[str, str]) -> None:
        self.root, self.meta = root, meta
        self.model: str = meta["model"]
        self.flip_p = float(meta["flip_p"])
        self.variants = int(meta["variants"])
        self.t5_padding: str = meta["t5_padding"]
        self.rows = rows
        self._by_path = {p: i for i, p in enumerate(rows["path"])}
        self._texts = texts
        self._entries = entries
        self._handles: dict[str, Any] = {}
        self._resident: dict[str, torch.Tensor] | None = None
        self.build_stats: dict[str, Any] = {}

    @classmethod
    def open(cls, path: str | os.PathLike) -> EncoderCache:
        """Open a cache folder; raises a clear error for a missing, foreign or old one."""
        root = Path(path)
        meta = _read_meta(root)
        try:
            rows = pq.read_table(root / "rows.parquet").to_pydict()
            texts = pq.read_table(root / "texts.parquet").to_pydict()
        except (OSError, pa.ArrowException) as error:
            raise ValueError(f"{root} is a damaged encoder cache ({error}); rebuild it") from error
        rows["path"] = [os.fsdecode(p) for p in rows["path"]]
        captions = {c.decode("utf-8", "surrogatepass"): k
                    for c, k in zip(texts["caption"], texts["key"], strict=True)}
        return cls(root, meta, rows, captions, _load_entries(root))

    def __len__(self) -> int:
        return len(self.rows["path"])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def check(self, encoders: Any) -> None:
        """Raise ValueError unless this cache was built by these encoders' weights and dtype."""
        want = {"image": encoders.fingerprint("image"), "text": encoders.fingerprint("text")}
        dtype = str(encoders.dtype).removeprefix("torch.")
        if want != self.meta["fingerprints"] or dtype != self.meta["dtype"]:
            raise ValueError(f"{self.root} was built by other encoder weights or dtype "
                             f"({self.meta['model']}, {self.meta['dtype']}): rebuild it")

    def _tensor(self, key: str, name: str) -> torch.Tensor:
        full = f"{key}.{name}"
        if self._resident is not None and full in self._resident:
            return self._resident[full]
        shard = self._entries.get(key)
        if shard is None:
            raise KeyError(f"entry {key[:12]} is not in the cache {self.root} (rebuild it)")
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(str(self.root / "shards" / shard), "pt")
        return handle.get_tensor(full)

    def latents(self, path: str) -> list[torch.Tensor]:
        """Every cached latent of an image (variant-major, unflipped then flipped)."""
        r = self._by_path[path]
        return [self._tensor(k, "latents") for k in self.rows["latent_keys"][r]]

    def latent_sample(
        self, path: str, size_wh: Sequence[int], bucket_wh: Sequence[int],
        rng: np.random.Generator,
    ) -> dict[str, Any]:
        """The cached sample of an image for one epoch: a flip drawn first with the build's
        ``flip_p`` (as ``BucketResizeCrop`` draws it), then one of the crop variants.
        Raises KeyError when the image (at this size and bucket) is not in the cache."""
        r = self._by_path.get(path)
        rows = self.rows
        if r is None:
            raise KeyError(f"{path} is not in the cache {self.root}")
        bw, bh = (int(v) for v in bucket_wh)
        if (rows["bucket_w"][r], rows["bucket_h"][r]) != (bw, bh) or \
                (rows["width"][r], rows["height"][r]) != tuple(int(v) for v in size_wh):
            raise KeyError(f"{path} is cached for bucket {rows['bucket_w'][r]}x"
                           f"{rows['bucket_h'][r]}, not {bw}x{bh} (rebuild the cache)")
        flip = bool(rng.random() < self.flip_p)
        k = int(rng.integers(self.variants)) if self.variants > 1 else 0
        keys = rows["latent_keys"][r]
        per = len(keys) // len(rows["crop_y"][r])
        key = keys[k * per + (1 if flip and per > 1 else 0)]
        params = FitParams(
            bucket=(bw, bh), scale=max(bw / size_wh[0], bh / size_wh[1]),
            resized=(rows["resized_w"][r], rows["resized_h"][r]),
            crop=(rows["crop_y"][r][k], rows["crop_x"][r][k], bh, bw), flip=flip,
        )
        return {
            "latents": self._tensor(key, "latents"),
            "fit": params,
            "original_size": (rows["height"][r], rows["width"][r]),
            "crop_top_left": params.crop_top_left,
            "target_size": (bh, bw),
            "flipped": flip,
        }

    def text(self, caption: str) -> dict[str, torch.Tensor]:
        """The stored embeddings of a caption: ``prompt_embeds`` [L, D] (L the real token
        count when stored trimmed), ``pooled_prompt_embeds`` and ``text_length``."""
        key = self._texts.get(caption)
        if key is None:
            raise ValueError(
                f"caption {caption[:60]!r} is not in the cache {self.root}: only the captions "
                "of the index (and '') are cached; shuffled or templated captions cannot be "
                "(apply templates to index.captions before building)"
            )
        return {name: self._tensor(key, name)
                for name in ("prompt_embeds", "pooled_prompt_embeds", "text_length")}

    def text_sample(self, caption: str) -> dict[str, Any]:
        """What a sample carries for a caption: the embeddings, and for FLUX the T5
        ``text_length`` and ``t5_attention_mask`` (ones on the real tokens)."""
        out = self.text(caption)
        sample: dict[str, Any] = {"prompt_embeds": out["prompt_embeds"],
                                  "pooled_prompt_embeds": out["pooled_prompt_embeds"]}
        if self.model in _TRIMMED_MODELS:
            n = int(out["text_length"][0])
            mask = torch.zeros(out["prompt_embeds"].shape[0], dtype=torch.int64)
            mask[:n] = 1
            sample.update(text_length=n, t5_attention_mask=mask)
        return sample

    def referenced(self) -> set[str]:
        """The entry keys the current view refers to."""
        return {k for keys in self.rows["latent_keys"] for k in keys} | set(self._texts.values())

    def to(self, device: torch.device | str) -> EncoderCache:
        """Keep every entry of the view on ``device`` (a tiny data set on the GPU: batches
        come out there, without a DataLoader worker or a host copy; use ``num_workers=0``)."""
        resident = {}
        for shard, names in self._names_by_shard(self.referenced()).items():
            with safe_open(str(self.root / "shards" / shard), "pt", device=str(device)) as f:
                for name in names:
                    resident[name] = f.get_tensor(name)
        self._resident = resident
        return self

    def _names_by_shard(self, keys: set[str]) -> dict[str, list[str]]:
        """Tensor names of ``keys``, grouped by the shard holding them."""
        wanted: dict[str, set[str]] = {}
        for key in keys:
            if key in self._entries:
                wanted.setdefault(self._entries[key], set()).add(key)
        out: dict[str, list[str]] = {}
        for shard, shard_keys in wanted.items():
            with safe_open(str(self.root / "shards" / shard), "pt") as f:
                names = f.keys()
            out[shard] = [n for n in names if n.rsplit(".", 1)[0] in shard_keys]
        return out

    def nbytes(self) -> int:
        """Bytes of the shard files on disk."""
        return sum(p.stat().st_size for p in (self.root / "shards").glob("*.safetensors"))

    def prune(self) -> dict[str, int]:
        """Remove entries the current view does not refer to (rewriting mixed shards);
        returns the counts of entries removed and shards rewritten."""
        keep = self.referenced()
        by_shard: dict[str, list[str]] = {}
        for key, shard in self._entries.items():
            by_shard.setdefault(shard, []).append(key)
        writer = _ShardWriter(self.root / "shards", 1 << 30, 0)
        removed, rewritten, dropped = 0, 0, []
        for shard, keys in sorted(by_shard.items()):
            kept = [k for k in keys if k in keep]
            if len(kept) == len(keys):
                continue
            removed += len(keys) - len(kept)
            if kept:
                rewritten += 1
                survivors = self._names_by_shard(set(kept))[shard]
                with safe_open(str(self.root / "shards" / shard), "pt") as f:
                    for name in survivors:
                        writer.tensors[name] = f.get_tensor(name)
                writer.keys.update(kept)
            dropped.append(shard)
        writer.flush()  # the survivors are safe in a new shard before any old one goes
        entries = {k: s for k, s in self._entries.items() if k in keep}
        entries.update(writer.written)
        _write_entries(self.root, entries)
        for shard in dropped:
            (self.root / "shards" / shard).unlink(missing_ok=True)
        self._entries, self._handles = entries, {}
        return {"removed": removed, "rewritten": rewritten}


# --------------------------------------------------------------------------- estimates


def estimate_bytes(
    bucket_wh: np.ndarray, captions: Sequence[str], model: str, *, dtype_bytes: int = 2,
    variants: int = 1, flip: bool = False, t5_padding: str = "trimmed",
    text_lengths: np.ndarray | None = None,
) -> dict[str, int]:
    """Disk size of a cache before it is built, from the real models' output sizes.

    ``bucket_wh``: (N, 2) buckets of the accepted images; ``captions``: the distinct
    captions (plus "" for dropout); ``text_lengths``: their T5 token counts (special
    tokens included) when measured, else trimmed sizes are not estimated (full are used).
    """
    if model not in MODEL_SIZES:
        raise ValueError(f"no cache sizes for model {model!r}; known: {sorted(MODEL_SIZES)}")
    s = MODEL_SIZES[model]
    wh = np.asarray(bucket_wh, dtype=np.int64).reshape(-1, 2)
    latent = int(((wh[:, 0] // 8) * (wh[:, 1] // 8)).sum()) * s["latent_channels"] * dtype_bytes
    latent *= variants * (2 if flip else 1)
    n = len(captions)
    if model in _TRIMMED_MODELS and t5_padding == "trimmed" and text_lengths is not None:
        rows = int(np.minimum(np.asarray(text_lengths), s["text_length"]).sum())
    else:
        rows = n * s["text_length"]
    text = (rows * s["text_width"] + n * s["pooled"]) * dtype_bytes + n * 8
    return {"latents": latent, "texts": text, "total": latent + text}



def estimate_lines(
    index: ImageIndex, assignment: Assignment, model: str, tokenizers: str | None = None
) -> str:
    """``bucket-report --estimate-cache``: the disk size ``bucket-cache`` would write (bf16,
    one centre crop per image), full and trimmed T5; trimmed needs ``tokenizers`` (a folder
    with tokenizer/ and tokenizer_2/) to count each caption's tokens."""
    if model not in MODEL_SIZES:
        return f"\nEncoder cache: no size table for {model!r} (known: {sorted(MODEL_SIZES)})\n"
    ok = np.asarray(assignment.bucket_id) >= 0
    wh = np.asarray(assignment.bucket_wh).reshape(-1, 2)[ok]
    captions = sorted({c for i in np.flatnonzero(ok) for c in index.captions[i]} | {""})
    full = estimate_bytes(wh, captions, model, t5_padding="full")
    lines = ["", f"Encoder cache estimate (bucket-cache --model {model}, bf16, one crop per "
             f"image; x2 latents with --flip-p > 0, xK with --variants K):",
             f"  latents  {full['latents'] / 2**20:10.1f} MiB  ({len(wh)} images)"]
    if model in _TRIMMED_MODELS:
        lines.append(f"  text     {full['texts'] / 2**20:10.1f} MiB  ({len(captions)} captions, "
                     "T5 at full length: --t5-padding full)")
        if tokenizers:
            lengths = FluxTokenizer.from_flux_dir(tokenizers, model=model).token_lengths(
                captions)["t5"]
            trimmed = estimate_bytes(wh, captions, model, text_lengths=lengths)
            lines.append(f"  text     {trimmed['texts'] / 2**20:10.1f} MiB  (T5 trimmed to each "
                         "caption's tokens: the default)")
            lines.append(f"  total    {trimmed['total'] / 2**20:10.1f} MiB  (trimmed), "
                         f"{full['total'] / 2**20:.1f} MiB (full)")
        else:
            lines.append(f"  total    {full['total'] / 2**20:10.1f} MiB  (full; pass --tokenizers "
                         "for the trimmed default, usually 5-20x less text)")
    else:
        lines.append(f"  text     {full['texts'] / 2**20:10.1f} MiB  ({len(captions)} captions)")
        lines.append(f"  total    {full['total'] / 2**20:10.1f} MiB")
    return "\n".join(lines) + "\n"
