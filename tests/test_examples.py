"""The examples run as users run them: real subprocesses on the bundled data."""

from __future__ import annotations

import re
import subprocess
import sys


def test_flux_sketch_runs(repo_root, flux_tokenizer_dir):
    """The FLUX fine-tuning sketch trains a few steps end to end, shapes checked inside."""
    steps = 3
    proc = subprocess.run(
        [sys.executable, str(repo_root / "examples" / "flux_finetune_sketch.py"),
         "--tokenizers", str(flux_tokenizer_dir), "--steps", str(steps), "--max-area",
         str(512 * 512), "--batch-size", "2", "--workers", "2", "--device", "cpu"],
        cwd=repo_root, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = re.findall(r"^step +\d+ .*bucket (\d+)x(\d+) .*tokens (\d+) .*loss ([\d.]+)$",
                       proc.stdout, flags=re.M)
    assert len(lines) == steps, proc.stdout
    for w, h, tokens, loss in lines:
        w, h = int(w), int(h)
        assert w % 16 == 0 and h % 16 == 0 and w * h <= 512 * 512
        assert int(tokens) == (w // 16) * (h // 16)
        assert float(loss) > 0
