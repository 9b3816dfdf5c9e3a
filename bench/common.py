"""Shared timing helpers for the bench/ scripts.

Every comparison follows the same rules: warm-up runs first, ``time.perf_counter``
around each repetition, the median reported with the min/max spread, and a ratio
printed against the reference side. Peak memory is the process's peak RSS
(``resource``) or, for one call, the Python-heap peak from ``tracemalloc``.
"""

from __future__ import annotations

import gc
import os
import platform
import resource
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Timing:
    """Seconds per repetition: ``median`` with the ``min``/``max`` spread and all ``values``."""

    median: float
    min: float
    max: float
    values: tuple[float, ...]

    def __str__(self) -> str:
        return f"{fmt_seconds(self.median)} [{fmt_seconds(self.min)}-{fmt_seconds(self.max)}]"


def collect_garbage() -> None:
    """A full garbage collection, then the survivors frozen (``gc.freeze``): later collections
    walk only what was allocated since, not the million objects of torch's imports, so that
    collecting before each timed repetition costs milliseconds instead of half a second."""
    gc.collect()
    gc.freeze()


def timeit(fn: Callable[[], Any], reps: int = 5, warmup: int = 1) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``reps`` times timed; garbage collected between."""
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    for _ in range(warmup):
        fn()
    values = []
    for _ in range(reps):
        collect_garbage()
        t0 = time.perf_counter()
        fn()
        values.append(time.perf_counter() - t0)
    return Timing(statistics.median(values), min(values), max(values), tuple(values))


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (monotone: measure in a fresh
    process, or compare with :func:`traced_peak_mb` for one call)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def traced_peak_mb(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Call ``fn`` once under ``tracemalloc``; return its result and the peak traced MiB.

    numpy registers its buffers with tracemalloc, so array-heavy code is counted too.
    Tracing slows Python code down: never time and trace the same call.
    """
    gc.collect()
    tracemalloc.start()
    try:
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak / 2**20


def fmt_seconds(s: float) -> str:
    """Human units: 1.23 s, 45.6 ms, 789 us."""
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} us"


def ratio(reference: float, ours: float) -> str:
    """``reference / ours`` as 'N.NNx' (above 1 means ours is faster or smaller)."""
    if ours <= 0:
        return "inf"
    return f"{reference / ours:.2f}x"


def print_table(rows: Sequence[dict[str, Any]], title: str | None = None) -> None:
    """Print dict rows as an aligned plain-text table (columns from the first row's keys)."""
    if title:
        print(f"\n## {title}")
    if not rows:
        print("(no rows)")
        return
    cols = list(rows[0])
    cells = [[_cell(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def machine_line() -> str:
    """One line naming the machine, for the top of each benchmark's output."""
    return (
        f"{platform.platform()} | {platform.processor() or platform.machine()} | "
        f"{os.cpu_count()} cores | Python {platform.python_version()}"
    )


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
