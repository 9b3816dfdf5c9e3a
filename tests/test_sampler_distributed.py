"""The sampler across real processes: torchrun (gloo, CPU) runs tests/distributed/sampler_ddp.py
for an epoch at 2 ranks, then resumes its mid-epoch checkpoint at 3 ranks (elastic); and the
DDP example trains, stops, and resumes on another number of ranks."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "distributed" / "sampler_ddp.py"


def torchrun(nproc: int, *args: str, script: Path = SCRIPT) -> str:
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("torchrun is not installed next to this python")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [exe, "--standalone", f"--nproc_per_node={nproc}", str(script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.mark.slow
def test_two_ranks_epoch_then_elastic_resume_at_three(tmp_path: Path) -> None:
    torchrun(2, "epoch", str(tmp_path))
    assert (tmp_path / "state.json").exists()
    torchrun(3, "resume", str(tmp_path))
    assert (tmp_path / "resumed_3.ok").read_text() == "ok"


@pytest.mark.slow
def test_ddp_example_stops_and_resumes_on_another_world_size(repo_root: Path, tmp_path) -> None:
    example = repo_root / "examples" / "ddp_torchrun.py"
    ckpt = str(tmp_path / "ddp.pt")
    first = torchrun(
        2, "--ckpt", ckpt, "--epochs", "1", "--stop-after", "3", "--workers", "0", script=example
    )
    assert first.count(" loss ") == 3
    second = torchrun(1, "--ckpt", ckpt, "--epochs", "1", "--workers", "2", script=example)
    assert "resumed at step 3: epoch 0" in second
    steps = [int(s) for s in re.findall(r"step +(\d+) bucket", second)]
    assert steps[0] == 4 and steps == list(range(4, steps[-1] + 1))
    assert f"done: {steps[-1]} steps" in second


@pytest.mark.slow
def test_accelerate_prepare_hands_each_process_its_planned_batches() -> None:
    """Real ``Accelerator(cpu=True)`` on 2 gloo ranks: ``emit="all_ranks"`` under ``prepare``
    sees every image once per epoch in lock-step; the default mode raises naming accelerate."""
    pytest.importorskip("accelerate")
    out = torchrun(2, script=SCRIPT.parent / "accelerate_prepare.py")
    assert "every image once per epoch, lock-step: ok" in out
