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

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bucketing.pipeline.builders import (
    CAPTION_EXTENSION,
    MixedDataset,
    dataset_from_plan,
    make_ladder,
    plan_dataset,
)
from bucketing.pipeline.config_files import line_of, read_config_file
from bucketing.pipeline.encoder_cache import EncoderCache
from bucketing.pipeline.plan import Plan
from bucketing.pipeline.spec import (
    INHERITED,
    CaptionSpec,
    ConfigError,
    DatasetSpec,
    LadderSpec,
    Spec,
    check,
    options,
    renamed,
)
from samplers import BucketBatchSampler
from transforms.caption import CaptionTransform
from transforms.tokenize import tokenizer_for_model

Config = Spec
"""The validated contents of a config file: a :class:`~bucketing.pipeline.spec.Spec`."""


def _door(cls: type) -> dict[str, dataclasses.Field]:
    return {k: f for k, f in options(cls).items() if "file" in f.metadata["doors"]}


TOP_FIELDS = {**_door(Spec), **{k: options(DatasetSpec)[k] for k in INHERITED},
              "drop_last": dataclasses.field(metadata={
                  "help": "", "doors": ("file",), "types": (bool,), "kind": "bool",
                  "check": None, "flag": {}})}


def load_config(path: str | os.PathLike) -> Spec:
    """Read and validate a dataset config: TOML, or YAML for a ``.yaml`` / ``.yml`` file (the
    same keys; see the module docstring)."""
    path = Path(path)
    raw, lines = read_config_file(path)
    return parse_config(raw, path, lines)


def parse_config(
    raw: Mapping[str, Any], path: str | os.PathLike, lines: Mapping[str, int] | None = None
) -> Spec:
    """Validate the parsed mapping ``raw`` of the config file ``path`` into a :class:`Spec`;
    ``lines`` (key path such as ``"datasets[1].captions.dropout"`` -> line) lets errors give
    the line."""
    path = Path(path)
    lines = lines or {}

    def fail(key: str, message: str) -> ConfigError:
        return ConfigError(message, file=str(path), key=key, line=line_of(lines, key))

    raw = _renamed(raw, "", path, fail)
    check(Spec, raw, "", fail, known=TOP_FIELDS)
    if "drop_last" in raw:
        if "last_batch" in raw:
            raise fail("drop_last", "give last_batch only (drop_last is its older form)")
        raw["last_batch"] = "drop" if raw.pop("drop_last") else "short"
    model = raw.get("model", "flux")
    sizes = [k for k in ("batch_size", "max_pixels_per_batch") if k in raw]
    if len(sizes) != 1:
        raise fail(sizes[-1] if sizes else "batch_size",
                   "give exactly one of batch_size and max_pixels_per_batch")
    defaults = {k: raw[k] for k in INHERITED if k in raw}
    entries = raw.get("datasets")
    if not entries:
        raise fail("datasets", "no [[datasets]]: add at least one with a source")
    base = path.parent
    datasets = [_dataset(entry, i, model, defaults, path, fail)
                for i, entry in enumerate(entries)]
    names = [d.name for d in datasets]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise fail(f"datasets[{i}].name" if "name" in entries[i] else f"datasets[{i}].source",
                       f"two datasets are named {name!r}: give each a unique name")
    top = {k: v for k, v in raw.items() if k not in (*INHERITED, "datasets")}
    for key in ("tokenizers", "encoder_cache"):
        if key in top:
            top[key] = _resolve(top[key], base)
    return Spec(**top, datasets=datasets, path=str(path))


def from_config(
    path: str | os.PathLike, model_transform: Callable[[dict], dict] | None = None
) -> tuple[MixedDataset, BucketBatchSampler]:
    """The mixed dataset and its sampler described by the config file at ``path``.

    ``model_transform`` defaults to the model's tokenizer from the file's ``tokenizers``
    folder (none when the file has no such key). With ``encoder_cache``, every dataset
    serves that cache's latents and embeddings (checked against its plan when built).
    """
    config = load_config(path)
    if model_transform is None and config.tokenizers is not None:
        model_transform = tokenizer_for_model(config.model, config.tokenizers)
    dataset = build_dataset(config, model_transform)
    return dataset, build_sampler(config, dataset)


def build_plans(config: Spec) -> dict[str, Plan]:
    """Each dataset's plan (scan, ladder, assignment), by name."""
    plans = {}
    for k, d in enumerate(config.datasets):
        try:
            plans[d.name] = plan_dataset(
                source=d.source, model=config.model, ladder=d.ladder, column_map=d.column_map,
                allow_upscale=d.allow_upscale, scan_cache=d.scan_cache,
                scan_workers=config.scan_workers, caption_extension=d.caption_extension)
        except ValueError as error:  # e.g. a ladder the model (given on a command line) refuses
            raise ConfigError(f"{error} (model {config.model})", file=config.path or None,
                              key=f"datasets[{k}]") from error
    return plans


def caption_transforms(config: Spec) -> dict[str, CaptionTransform | None]:
    """Each dataset's caption transform (None: the first caption as it is), by name."""
    return {d.name: None if d.captions is None else CaptionTransform(**d.captions.given())
            for d in config.datasets}


def build_dataset(
    config: Spec, model_transform: Callable[[dict], dict] | None = None,
    plans: Mapping[str, Plan] | None = None,
) -> MixedDataset:
    """One dataset per dataset of ``config`` (from ``plans`` when given), mixed; with the
    file's ``encoder_cache`` when it names one."""
    plans = build_plans(config) if plans is None else plans
    cache = None if config.encoder_cache is None else EncoderCache.open(config.encoder_cache)
    captions = caption_transforms(config)
    parts = {}
    for k, d in enumerate(config.datasets):
        parts[d.name] = dataset_from_plan(
            plans[d.name], model_transform, captions=captions[d.name], crop=d.crop,
            flip_p=d.flip_p, allow_upscale=d.allow_upscale, seed=part_seed(config.seed, k),
            on_error=config.on_error, encoder_cache=cache)
    return MixedDataset(parts)


def build_sampler(
    config: Spec, dataset: MixedDataset, world_size: int | None = None, rank: int | None = None
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
        last_batch=config.last_batch,
        plan_fingerprint=dataset.plan_fingerprint,
        **kwargs,
    )


def part_seed(seed: int, k: int) -> int:
    """Dataset ``k``'s seed: distinct per dataset, so two datasets' row 0 draw differently."""
    return (seed * 1_000_003 + k) % 2**63


# --------------------------------------------------------------------------- validation


def _renamed(table: Mapping[str, Any], prefix: str, path: Path,
             fail: Callable[[str, str], ConfigError]) -> dict[str, Any]:
    try:
        return renamed(dict(table), str(path))
    except ConfigError as error:
        raise fail(prefix + (error.key or ""), error.reason) from None


def _dataset(entry: Any, i: int, model: str, defaults: Mapping[str, Any], path: Path,
             fail: Callable[[str, str], ConfigError]) -> DatasetSpec:
    prefix, base = f"datasets[{i}].", path.parent
    if not isinstance(entry, dict):
        raise fail(f"datasets[{i}]", "must be a table ([[datasets]])")
    entry = _renamed(entry, prefix, path, fail)
    check(DatasetSpec, entry, prefix, fail, known=_door(DatasetSpec))
    if "source" not in entry:
        raise fail(f"datasets[{i}]", "has no source (a folder, manifest or URL list)")
    ladder = dict(entry.get("ladder", {}))
    check(LadderSpec, ladder, prefix + "ladder.", fail, known=_door(LadderSpec))
    if "resolution" in entry:
        if "max_area" in ladder:
            raise fail(prefix + "resolution", "give resolution or ladder.max_area, not both")
        ladder["max_area"] = entry["resolution"] ** 2
    ladder_spec = LadderSpec(**ladder)
    try:
        make_ladder(model, ladder_spec)
    except ConfigError as error:
        raise fail(prefix + (error.key or "ladder"), error.reason) from error
    except ValueError as error:
        where = "resolution" if "resolution" in entry and "ladder" not in entry else "ladder"
        raise fail(prefix + where, str(error)) from error
    captions = entry.get("captions")
    if captions is not None:
        check(CaptionSpec, captions, prefix + "captions.", fail, known=_door(CaptionSpec))
        try:
            CaptionTransform(**captions)
        except (TypeError, ValueError) as error:
            raise fail(prefix + "captions", str(error)) from error
    extension = entry.get("caption_extension")
    if extension is not None and not CAPTION_EXTENSION.match(extension):
        raise fail(prefix + "caption_extension", f"must look like '.txt', got {extension!r}")
    cache = entry.get("scan_cache")
    fit = {**defaults, **{k: entry[k] for k in INHERITED if k in entry}}
    return DatasetSpec(
        name=entry.get("name", entry["source"]),
        source=_resolve(entry["source"], base),
        repeats=float(entry.get("repeats", 1.0)),
        column_map=entry.get("column_map"),
        resolution=entry.get("resolution"),
        ladder=ladder_spec,
        captions=None if captions is None else CaptionSpec(**captions),
        scan_cache=None if cache is None else _resolve(cache, base),
        caption_extension=extension,
        **fit,
    )


def _resolve(value: str, base: Path) -> str:
    """A path relative to the config file's folder (URLs and absolute paths as they are)."""
    if re.match(r"^[a-z][a-z0-9+.-]*://", value, flags=re.I) or os.path.isabs(value):
        return value
    return str(base / value)
