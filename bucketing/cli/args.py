"""What the commands share: argument types, the ladder options and the user-error type.

Light on purpose (argparse and the model registry only): ``bucket-cache --help`` must not
load what ``bucket-report`` plots with.
"""

from __future__ import annotations

import argparse
from typing import Any

from bucketing.models import MODELS

# How a command's ladder meets the data: bucketing.ladder.FIT_MODES (not imported: this module
# stays light; tests/test_ladder.py checks that the two agree).
FIT_MODES = ("data", "preset", "native")


class ConfigError(Exception):
    """A usage or configuration problem the user can fix; reported in one line, exit code 2."""


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def area(text: str) -> int:
    """An argparse type: an area in pixels, ``1048576`` or ``1024x1024``."""
    w, sep, h = text.lower().partition("x")
    try:
        value = int(w) * int(h) if sep else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an area in pixels such as 1048576 or 1024x1024, got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive area, got {text!r}")
    return value


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


def add_ladder_options(p: argparse.ArgumentParser) -> None:
    """``--max-area``, ``--levels``, ``--fit``, ``--max-buckets`` and ``--allow-upscale``: the
    same meaning in every command, so that a cache holds exactly the buckets a report showed."""
    p.add_argument("--max-area", type=area, metavar="N",
                   help="largest bucket area, e.g. 1048576 or 1024x1024 (default: the model's)")
    p.add_argument("--levels", type=positive_int, nargs="+", metavar="SIDE",
                   help="level sides, e.g. --levels 512 768 1024 (areas 512², 768², 1024²)")
    p.add_argument("--fit", choices=FIT_MODES, default="data",
                   help="data (default): buckets fitted to these images from the model's "
                   "whole lattice; preset: the model's preset; native: every image its own "
                   "size (batch size 1)")
    p.add_argument("--max-buckets", type=positive_int, metavar="K",
                   help="with --fit data: at most K buckets (default: as many as the preset "
                   "uses on this data; BucketLadder.from_data)")
    p.add_argument("--allow-upscale", action="store_true",
                   help="give images smaller than every bucket the nearest smallest bucket")


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
