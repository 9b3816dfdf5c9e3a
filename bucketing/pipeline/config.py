"""Dataset config files: several datasets, each with its own source, repeats, captions and
ladder, mixed by one sampler. TOML (``tomllib``; ``tomli`` on Python 3.10), or the same keys
in YAML (``.yaml`` / ``.yml``)::

    model = "flux"             # a MODEL_SPECS preset
    batch_size = 2             # or max_pixels_per_batch (+ max_batch_size)
    seed = 0
    tokenizers = "FLUX.1-dev"  # optional: checkout folder holding tokenizer/, tokenizer_2/, ...

    [[datasets]]
    source = "photos/me"       # anything scan accepts; relative to this file's folder
    repeats = 10               # fractional allowed
    resolution = 768           # or [datasets.ladder] max_area / levels / step / max_aspect
    [datasets.captions]        # CaptionTransform's options
    template = "a photo of sks person, {caption}"
    dropout = 0.1
    tag_dropout = 0.05         # each comma-separated tag dropped with this probability

    [[datasets]]
    source = "regularisation.parquet"

``load_config(path)`` validates the file into a :class:`Config` (an error names the file, the
key and its line); ``from_config(path)`` builds ``(MixedDataset, BucketBatchSampler)``: each
dataset keeps its own buckets and settings, and the sampler plans them together with per-row
repeats. World size and rank come from ``torch.distributed`` (torchrun), as for the sampler.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from bucketing.ladder import MAX_SIDE, MODEL_SPECS
from bucketing.pipeline.builders import (
    CAPTION_EXTENSION,
    LADDER_KEYS,
    MixedDataset,
    make_ladder,
    text_to_image_dataset,
)
from bucketing.pipeline.config_files import ConfigError, line_of, read_config_file
from bucketing.printable import escape
from samplers import BucketBatchSampler
from samplers.batching import MAX_SIZE
from samplers.plan import MAX_REPEATS
from transforms.caption import CaptionTransform
from transforms.tokenize import tokenizer_for_model

CAPTION_KEYS = ("template", "prefix", "suffix", "dropout", "shuffle_parts", "keep_parts",
                "separator", "tag_dropout", "fallback")
# key -> (accepted types, what its value must be)
TOP_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "model": ((str,), f"one of {', '.join(MODEL_SPECS)}"),
    "batch_size": ((int,), "an int >= 1"),
    "max_pixels_per_batch": ((int,), "an int >= 1"),
    "max_batch_size": ((int,), "an int >= 1"),
    "seed": ((int,), "an int >= 0"),
    "shuffle": ((bool,), "true or false"),
    "drop_last": ((bool,), "true or false"),
    "tokenizers": ((str,), "a folder holding the model's tokenizer/ (tokenizer_2/, ...)"),
    "workers": ((int,), "an int >= 0 (scan processes)"),
    "crop": ((str,), '"center" or "random"'),
    "flip_p": ((int, float), "a number in [0, 1]"),
    "allow_upscale": ((bool,), "true or false"),
    "on_error": ((str,), '"substitute" or "raise"'),
    "datasets": ((list,), "an array of [[datasets]] tables"),
}
DATASET_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "source": ((str,), "a folder, manifest or URL list path"),
    "name": ((str,), "a unique name"),
    "repeats": ((int, float), "a number >= 0"),
    "column_map": ((dict,), "a table of column names (image, caption)"),
    "resolution": ((int,), "a side in pixels (max_area = resolution²)"),
    "ladder": ((dict,), f"a table of {', '.join(LADDER_KEYS)}"),
    "captions": ((dict,), f"a table of {', '.join(CAPTION_KEYS)}"),
    "cache": ((str,), "a scan cache path (.parquet)"),
    "caption_extension": ((str,), 'a caption sidecar extension such as ".caption"'),
    "crop": TOP_KEYS["crop"],
    "flip_p": TOP_KEYS["flip_p"],
    "allow_upscale": TOP_KEYS["allow_upscale"],
}
INHERITED = ("crop", "flip_p", "allow_upscale")  # top-level defaults a dataset may override


COLUMN_MAP_KEYS = ("image", "caption", "width", "height")


@dataclass
class DatasetConfig:
    """One ``[[datasets]]`` entry, validated; paths resolved against the file's folder."""

    name: str
    source: str
    repeats: float = 1.0
    column_map: dict[str, str] | None = None
    ladder: dict[str, Any] = field(default_factory=dict)
    captions: dict[str, Any] | None = None
    cache: str | None = None
    caption_extension: str | None = None
    crop: str = "random"
    flip_p: float = 0.0
    allow_upscale: bool = False


@dataclass
class Config:
    """A validated dataset config file."""

    path: str
    model: str = "flux"
    batch_size: int | None = None
    max_pixels_per_batch: int | None = None
    max_batch_size: int | None = None
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = False
    tokenizers: str | None = None
    workers: int | None = None
    on_error: str = "substitute"
    datasets: list[DatasetConfig] = field(default_factory=list)


def load_config(path: str | os.PathLike) -> Config:
    """Read and validate a dataset config: TOML, or YAML for a ``.yaml`` / ``.yml`` file (the
    same keys; see the module docstring)."""
    path = Path(path)
    raw, lines = read_config_file(path)
    return parse_config(raw, path, lines)


def parse_config(
    raw: Mapping[str, Any], path: str | os.PathLike, lines: Mapping[str, int] | None = None
) -> Config:
    """Validate the parsed mapping ``raw`` of the config file ``path``; ``lines`` (key path
    such as ``"datasets[1].captions.dropout"`` -> line) lets errors give the line."""
    path = Path(path)
    lines = lines or {}

    def fail(key: str, message: str) -> ConfigError:
        line = line_of(lines, key)
        where = f"{path}:{line}" if line else str(path)
        return ConfigError(f"{where}: {key}: {message}")

    _check_keys(raw, TOP_KEYS, "", fail)
    model = raw.get("model", "flux")
    if model not in MODEL_SPECS:
        raise fail("model", f"unknown model {model!r}; {TOP_KEYS['model'][1]}")
    sizes = [k for k in ("batch_size", "max_pixels_per_batch") if k in raw]
    if len(sizes) != 1:
        raise fail(sizes[-1] if sizes else "batch_size",
                   "give exactly one of batch_size and max_pixels_per_batch")
    for key in ("batch_size", "max_pixels_per_batch", "max_batch_size"):
        if key in raw and raw[key] < 1:
            raise fail(key, f"must be >= 1, got {raw[key]}")
        if key in raw and raw[key] > MAX_SIZE:
            raise fail(key, f"must be at most 2**62, got {raw[key]}")
    for key in ("seed", "workers"):
        if key in raw and raw[key] < 0:
            raise fail(key, f"must be >= 0, got {raw[key]}")
    if raw.get("on_error", "substitute") not in ("substitute", "raise"):
        raise fail("on_error", f"{TOP_KEYS['on_error'][1]}, got {raw['on_error']!r}")
    defaults = {k: raw[k] for k in INHERITED if k in raw}
    _check_fit(defaults, "", fail)
    entries = raw.get("datasets")
    if not entries:
        raise fail("datasets", "no [[datasets]]: add at least one with a source")
    base = path.parent
    datasets = [_dataset(entry, i, model, defaults, base, fail)
                for i, entry in enumerate(entries)]
    names = [d.name for d in datasets]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise fail(f"datasets[{i}].name" if "name" in entries[i] else f"datasets[{i}].source",
                       f"two datasets are named {name!r}: give each a unique name")
    tokenizers = raw.get("tokenizers")
    return Config(
        path=str(path),
        model=model,
        batch_size=raw.get("batch_size"),
        max_pixels_per_batch=raw.get("max_pixels_per_batch"),
        max_batch_size=raw.get("max_batch_size"),
        seed=raw.get("seed", 0),
        shuffle=raw.get("shuffle", True),
        drop_last=raw.get("drop_last", False),
        tokenizers=None if tokenizers is None else _resolve(tokenizers, base),
        workers=raw.get("workers"),
        on_error=raw.get("on_error", "substitute"),
        datasets=datasets,
    )


def from_config(
    path: str | os.PathLike, model_transform: Callable[[dict], dict] | None = None
) -> tuple[MixedDataset, BucketBatchSampler]:
    """The mixed dataset and its sampler described by the config file at ``path``.

    ``model_transform`` defaults to the model's tokenizer from the file's ``tokenizers``
    folder (none when the file has no such key).
    """
    config = load_config(path)
    if model_transform is None and config.tokenizers is not None:
        model_transform = tokenizer_for_model(config.model, config.tokenizers)
    dataset = build_dataset(config, model_transform)
    return dataset, build_sampler(config, dataset)


def build_dataset(
    config: Config, model_transform: Callable[[dict], dict] | None = None
) -> MixedDataset:
    """One ``text_to_image_dataset`` per ``[[datasets]]`` entry, mixed."""
    parts = {}
    for k, d in enumerate(config.datasets):
        parts[d.name] = text_to_image_dataset(
            model_transform,
            source=d.source,
            column_map=d.column_map,
            model=config.model,
            ladder=d.ladder,
            captions=d.captions,
            crop=d.crop,
            flip_p=d.flip_p,
            allow_upscale=d.allow_upscale,
            seed=part_seed(config.seed, k),
            cache=d.cache,
            workers=config.workers,
            caption_extension=d.caption_extension,
            on_error=config.on_error,
        )
    return MixedDataset(parts)


def build_sampler(
    config: Config, dataset: MixedDataset, world_size: int | None = None, rank: int | None = None
) -> BucketBatchSampler:
    """The sampler over ``dataset`` with the file's batch size, seed and per-row repeats
    (``world_size`` and ``rank`` default to ``torch.distributed``'s)."""
    kwargs: dict[str, Any] = {"world_size": world_size, "rank": rank}
    repeats = [d.repeats for d in config.datasets]
    if any(r != 1 for r in repeats):
        kwargs["repeats"] = dataset.row_repeats(repeats)
    return BucketBatchSampler(
        dataset,
        config.batch_size,
        max_pixels_per_batch=config.max_pixels_per_batch,
        max_batch_size=config.max_batch_size,
        seed=config.seed,
        shuffle=config.shuffle,
        drop_last=config.drop_last,
        **kwargs,
    )


def mix_figures(path: str | os.PathLike, world_size: int = 1) -> dict[str, Any]:
    """What a config file's mix will train on, per dataset: images accepted and rejected (by
    reason), repeats, samples per epoch and their share, buckets; and the plan's steps per
    rank. Nothing is decoded and no tokenizer is loaded."""
    config = load_config(path)
    dataset = build_dataset(config)
    sampler = build_sampler(config, dataset, world_size=world_size, rank=0)
    rows = []
    for k, d in enumerate(config.datasets):
        part, mine = dataset.datasets[k], dataset.dataset_of == k
        ids = dataset.bucket_id[mine]
        reasons, examples = _rejected(part, ids)
        accepted = int((ids >= 0).sum())
        rows.append({
            "name": d.name, "source": d.source, "accepted": accepted,
            "rejected": sum(reasons.values()), "reasons": reasons, "examples": examples,
            "repeats": d.repeats, "samples": accepted * d.repeats,
            "buckets": len(np.unique(ids[ids >= 0])),
        })
    total = sum(r["samples"] for r in rows) or 1.0
    for r in rows:
        r["share"] = r["samples"] / total
    return {"config": str(path), "model": config.model, "batch_size": config.batch_size,
            "max_pixels_per_batch": config.max_pixels_per_batch, "seed": config.seed,
            "world_size": world_size, "steps_per_rank": len(sampler), "datasets": rows}


def _rejected(part: Any, ids: np.ndarray) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Counts of every file the scan or ``assign`` rejected, by reason (``too_small``,
    ``extreme_aspect``, ``too_large``, ...), and up to three files of each."""
    reasons: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    found = [(r.reason, r.path) for r in part.index.rejections]
    found += [(str(part.reasons[i]) if part.reasons is not None and part.reasons[i] else
               "not_assigned", part.index.paths[i]) for i in np.flatnonzero(ids < 0).tolist()]
    for reason, path in found:
        reasons[reason] = reasons.get(reason, 0) + 1
        if len(examples.setdefault(reason, [])) < 3:
            examples[reason].append(path)
    return dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))), examples


def render_mix(figures: Mapping[str, Any]) -> str:
    """The text table of :func:`mix_figures`."""
    size = (f"batch size {figures['batch_size']}" if figures["batch_size"] else
            f"{figures['max_pixels_per_batch']} pixels per batch")
    lines = [f"{figures['config']}: model {figures['model']}, {size}, seed {figures['seed']}, "
             f"world size {figures['world_size']}",
             f"{'dataset':<20} {'images':>7} {'rejected':>8} {'repeats':>7} "
             f"{'per epoch':>9} {'share':>6} {'buckets':>7}"]
    for r in figures["datasets"]:
        lines.append(f"{r['name'][:20]:<20} {r['accepted']:>7} {r['rejected']:>8} "
                     f"{r['repeats']:>7g} {r['samples']:>9g} {r['share']:>6.1%} "
                     f"{r['buckets']:>7}")
        if r["reasons"]:
            lines.append("    rejected: " + ", ".join(f"{k} {v}" for k, v in r["reasons"].items()))
            for reason, paths in r.get("examples", {}).items():
                more = r["reasons"][reason] - len(paths)
                lines.append(f"      {reason}: " + ", ".join(escape(p) for p in paths)
                             + (f" (+{more} more)" if more > 0 else ""))
    lines.append(f"steps per epoch per rank: {figures['steps_per_rank']}")
    return "\n".join(lines) + "\n"


def report_mix(path: str | os.PathLike, world_size: int, out: TextIO) -> int:
    """``bucket-report --config``: write :func:`render_mix` to ``out``; the exit code (2 and
    the error on stderr for a config problem)."""
    try:
        out.write(render_mix(mix_figures(path, world_size)))
    except (ValueError, OSError) as error:
        print(f"bucket-report: error: {error}", file=sys.stderr)
        return 2
    return 0


def part_seed(seed: int, k: int) -> int:
    """Dataset ``k``'s seed: distinct per dataset, so two datasets' row 0 draw differently."""
    return (seed * 1_000_003 + k) % 2**63


# --------------------------------------------------------------------------- validation


def _check_keys(table: Mapping[str, Any], schema: Mapping[str, tuple[tuple[type, ...], str]],
                prefix: str, fail: Callable[[str, str], ConfigError]) -> None:
    for key, value in table.items():
        name = prefix + key
        if key not in schema:
            raise fail(name, f"unknown key; known: {', '.join(schema)}")
        types, what = schema[key]
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            raise fail(name, f"must be {what}, got {value!r}")


def _check_fit(table: Mapping[str, Any], prefix: str,
               fail: Callable[[str, str], ConfigError]) -> None:
    if table.get("crop", "random") not in ("center", "random"):
        raise fail(prefix + "crop", f"{TOP_KEYS['crop'][1]}, got {table['crop']!r}")
    flip = table.get("flip_p", 0.0)
    if not 0.0 <= flip <= 1.0:
        raise fail(prefix + "flip_p", f"{TOP_KEYS['flip_p'][1]}, got {flip}")


def _dataset(entry: Any, i: int, model: str, defaults: Mapping[str, Any], base: Path,
             fail: Callable[[str, str], ConfigError]) -> DatasetConfig:
    prefix = f"datasets[{i}]."
    if not isinstance(entry, dict):
        raise fail(f"datasets[{i}]", "must be a table ([[datasets]])")
    _check_keys(entry, DATASET_KEYS, prefix, fail)
    if "source" not in entry:
        raise fail(f"datasets[{i}]", "has no source (a folder, manifest or URL list)")
    _check_fit(entry, prefix, fail)
    repeats = entry.get("repeats", 1)
    if not (math.isfinite(repeats) and repeats >= 0):
        raise fail(prefix + "repeats", f"must be a number >= 0, got {repeats}")
    if repeats > MAX_REPEATS:
        raise fail(prefix + "repeats", f"must be at most {MAX_REPEATS}, got {repeats}")
    column_map = entry.get("column_map") or {}
    for key, value in column_map.items():
        if key not in COLUMN_MAP_KEYS or not isinstance(value, str):
            raise fail(prefix + "column_map." + str(key),
                       f"keys are {', '.join(COLUMN_MAP_KEYS)}, each naming a column (a "
                       f"string); got {key!r} = {value!r}")
    ladder = dict(entry.get("ladder", {}))
    unknown = sorted(set(ladder) - set(LADDER_KEYS))
    if unknown:
        raise fail(prefix + "ladder." + unknown[0], f"unknown key; known: {', '.join(LADDER_KEYS)}")
    if "resolution" in entry:
        if "max_area" in ladder:
            raise fail(prefix + "resolution", "give resolution or ladder.max_area, not both")
        if entry["resolution"] < 16:
            raise fail(prefix + "resolution", f"must be >= 16, got {entry['resolution']}")
        if entry["resolution"] > MAX_SIDE:
            raise fail(prefix + "resolution",
                       f"must be at most MAX_SIDE = {MAX_SIDE}, got {entry['resolution']}")
        ladder["max_area"] = entry["resolution"] ** 2
    try:
        make_ladder(model, ladder)
    except ValueError as error:
        where = "resolution" if "resolution" in entry and "ladder" not in entry else "ladder"
        raise fail(prefix + where, str(error)) from error
    captions = entry.get("captions")
    if captions is not None:
        unknown = sorted(set(captions) - set(CAPTION_KEYS))
        if unknown:
            raise fail(prefix + "captions." + unknown[0],
                       f"unknown key; known: {', '.join(CAPTION_KEYS)}")
        try:
            CaptionTransform(**captions)
        except (TypeError, ValueError) as error:
            raise fail(prefix + "captions", str(error)) from error
    extension = entry.get("caption_extension")
    if extension is not None and not CAPTION_EXTENSION.match(extension):
        raise fail(prefix + "caption_extension", f"must look like '.txt', got {extension!r}")
    source = _resolve(entry["source"], base)
    cache = entry.get("cache")
    fit = {**defaults, **{k: entry[k] for k in INHERITED if k in entry}}
    return DatasetConfig(
        name=entry.get("name", entry["source"]),
        source=source,
        repeats=float(repeats),
        column_map=entry.get("column_map"),
        ladder=ladder,
        captions=captions,
        cache=None if cache is None else _resolve(cache, base),
        caption_extension=extension,
        **fit,
    )


def _resolve(value: str, base: Path) -> str:
    """A path relative to the config file's folder (URLs and absolute paths as they are)."""
    if re.match(r"^[a-z][a-z0-9+.-]*://", value, flags=re.I) or os.path.isabs(value):
        return value
    return str(base / value)
