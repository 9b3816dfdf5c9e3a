"""Brace ranges in a source string, as WebDataset and shells write them:
``shards/{00000..00099}.tar`` and ``{train,extra}/part.parquet`` name lists of files."""

from __future__ import annotations

import itertools
import os
import re
from typing import Any

__all__ = ["brace_list", "expand_braces"]

_GROUP = re.compile(r"\{(?:(?P<lo>\d+)\.\.(?P<hi>\d+)|(?P<alts>[^{}]*,[^{}]*))\}")
MAX_EXPANSION = 10_000_000


def expand_braces(pattern: str) -> list[str]:
    """Every string ``pattern`` names, in order: ``{a..b}`` a numeric range (zero-padded to
    the longer bound's width when either has a leading zero; ``{9..7}`` counts down),
    ``{x,y}`` alternatives; several groups multiply. Without a group: ``[pattern]``."""
    parts: list[list[str]] = []
    pos = 0
    total = 1
    for found in _GROUP.finditer(pattern):
        parts.append([pattern[pos : found.start()]])
        if found["alts"] is not None:
            choices = found["alts"].split(",")
        else:
            lo, hi = found["lo"], found["hi"]
            padded = (lo.startswith("0") and len(lo) > 1) or (hi.startswith("0") and len(hi) > 1)
            width = max(len(lo), len(hi)) if padded else 0
            step = 1 if int(hi) >= int(lo) else -1
            numbers = range(int(lo), int(hi) + step, step)
            total *= len(numbers)
            if total > MAX_EXPANSION:
                raise ValueError(f"{pattern!r} names more than {MAX_EXPANSION} files")
            choices = [str(n).zfill(width) for n in numbers]
        parts.append(choices)
        pos = found.end()
    parts.append([pattern[pos:]])
    return ["".join(p) for p in itertools.product(*parts)]


def brace_list(source: Any) -> list[str] | None:
    """The paths a string ``source`` with brace groups names, when it is no existing path
    itself; else None. Raises ``FileNotFoundError`` when none of them exists."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = os.fspath(source)
    if isinstance(path, bytes) or not _GROUP.search(path) or os.path.exists(path):
        return None
    names = expand_braces(path)
    if not any(os.path.exists(n) for n in names):
        raise FileNotFoundError(
            f"none of the {len(names)} files {path!r} names exists (first: {names[0]!r})"
        )
    return names
