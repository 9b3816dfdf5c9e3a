"""bench/sampler.py runs end to end at a tiny size (both sides, restore timings, JSON out)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_sampler_bench_tiny(repo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "sampler.json"
    proc = subprocess.run(
        [sys.executable, str(repo_root / "bench" / "sampler.py"), "--tiny", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "speed-up" in proc.stdout and "elastic" in proc.stdout
    (row,) = json.loads(out.read_text())
    assert row["n"] == 20_000 and row["world_size"] == 8
    ours, peer = row["epoch"]["ours"], row["epoch"]["bucketsampler"]
    # both sides did the same job: rank 0's share of 20k indices at world size 8, give or take
    # less than one batch per bucket (ours pads, bucketsampler trims to a multiple of 8)
    assert 2500 <= ours["indices"] < 2500 + 40 * 4
    assert 2500 - 40 * 4 < peer["indices"] <= 2500
    assert row["restore"]["state_bytes"] < 400
