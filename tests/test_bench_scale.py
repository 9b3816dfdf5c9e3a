"""bench/scale.py runs at a tiny size (20k rows) and prints its two tables; the index's bytes per
row beyond the text stay within budget and a forked reader of the columns copies (almost)
nothing while one of the old lists copies megabytes. Timings are not checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # bench/ is scripts, not an installed package

from bench.run_all import parse_tables  # noqa: E402


@pytest.mark.slow
def test_scale_bench_runs_tiny() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "scale.py"), "--tiny"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    speed, memory = parse_tables(proc.stdout)
    (row,) = speed["rows"]
    assert row["rows"] == "20,000" and int(row["steps/rank"]) > 0
    assert int(row["beyond text"]) <= 80
    (mem,) = memory["rows"]
    assert float(mem["columns: worker grows"].split()[0]) < 2.0
    assert float(mem["lists: worker grows"].split()[0]) > 2.0
