"""What the commands share beyond the spec's generated options: the ladder overrides of a
SOURCE's flags, checked, and ``--column KEY=NAME`` (a SOURCE's ``column_map``).

Light on purpose (argparse, the spec and the model registry only): ``bucket-cache --help``
must not load what ``bucket-report`` plots with.
"""

from __future__ import annotations

import argparse
from typing import Any

from bucketing.ladder import FIT_MODES  # noqa: F401 - the commands' --fit choices
from bucketing.models import MODELS
from bucketing.pipeline.spec import ConfigError


def add_column_option(p: argparse.ArgumentParser) -> None:
    """``--column KEY=NAME`` (repeatable): the scan's ``column_map``, the same in every command,
    so that a cache reads the paired files a report counted."""
    p.add_argument("--column", action="append", default=[], type=column_entry, metavar="KEY=NAME",
                   help="a column_map entry for the scan (repeat it): e.g. caption=text, "
                   "loss_mask=alpha, or for a folder conditioning_image={stem}_control.png")


def column_entry(text: str) -> tuple[str, str]:
    """An argparse type: a ``KEY=NAME`` pair of ``column_map``."""
    key, sep, name = text.partition("=")
    if not sep or not key or not name:
        raise argparse.ArgumentTypeError(f"expected KEY=NAME (e.g. loss_mask=alpha), got {text!r}")
    return key, name


def refuse_column_with_config(args: argparse.Namespace) -> None:
    """``--column`` names one SOURCE's columns: with ``--config`` a :class:`ConfigError`
    (each dataset's ``column_map`` is set in the file)."""
    if args.config is not None and args.column:
        raise ConfigError("--column does not apply with --config (a per-dataset option: set "
                          "column_map in the file's [[datasets]])")


def ladder_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``BucketLadder.for_model(args.model, **overrides)``'s overrides from the ladder options;
    a :class:`ConfigError` for a level above the largest bucket area."""
    overrides: dict[str, Any] = {}
    if args.max_area is not None:
        overrides["max_area"] = args.max_area
    if args.levels:
        max_area = args.max_area or MODELS[args.model].max_area
        too_big = [s for s in args.levels if s * s > max_area]
        if too_big:
            raise ConfigError(
                f"--levels {too_big[0]}: a {too_big[0]}² level is above the largest bucket area "
                f"{max_area} ({args.model}); pass a larger --max-area or smaller level sides"
            )
        overrides["levels"] = [s * s for s in args.levels]
    return overrides
