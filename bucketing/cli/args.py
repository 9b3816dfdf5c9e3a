"""What the commands share beyond the spec's generated options: the ladder overrides of a
SOURCE's flags, checked.

Light on purpose (argparse, the spec and the model registry only): ``bucket-cache --help``
must not load what ``bucket-report`` plots with.
"""

from __future__ import annotations

import argparse
from typing import Any

from bucketing.ladder import FIT_MODES  # noqa: F401 - the commands' --fit choices
from bucketing.models import MODELS
from bucketing.pipeline.spec import ConfigError


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
