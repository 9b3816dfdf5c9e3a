"""The sampler across real processes: torchrun (gloo, CPU) runs tests/distributed/sampler_ddp.py
for an epoch at 2 ranks, then resumes its mid-epoch checkpoint at 3 ranks (elastic)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "distributed" / "sampler_ddp.py"


def torchrun(nproc: int, *args: str) -> None:
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("torchrun is not installed next to this python")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [exe, "--standalone", f"--nproc_per_node={nproc}", str(SCRIPT), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"


def test_two_ranks_epoch_then_elastic_resume_at_three(tmp_path: Path) -> None:
    torchrun(2, "epoch", str(tmp_path))
    assert (tmp_path / "state.json").exists()
    torchrun(3, "resume", str(tmp_path))
    assert (tmp_path / "resumed_3.ok").read_text() == "ok"
