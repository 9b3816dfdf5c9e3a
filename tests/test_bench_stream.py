"""bench/stream.py runs at a tiny size and prints its two tables: every side serves every
image, and a tighter buffer bound holds fewer rows and gives more short batches. Timings are
not checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # bench/ is scripts, not an installed package

from bench.run_all import parse_tables  # noqa: E402


@pytest.mark.slow
def test_stream_bench_runs_tiny() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "stream.py"), "--tiny"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    speed, memory = parse_tables(proc.stdout)
    assert [r["side"] for r in speed["rows"]] == [
        "map-style (folder)", "map-style (tar shards)", "streaming (tar shards)",
        "streaming (file rows)"]
    assert all(float(r["images/s"]) > 0 for r in speed["rows"])
    loose, tight = memory["rows"][0], memory["rows"][-1]
    for row in memory["rows"]:
        assert int(row["peak rows"]) <= int(row["max_buffered_rows"]) + 1
    assert int(tight["peak rows"]) < int(loose["peak rows"])
    assert int(tight["short batches"]) >= int(loose["short batches"])
