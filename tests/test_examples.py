"""The examples run as users run them: real subprocesses, real diffusers/transformers classes
(tiny random configs written with save_pretrained by examples/tiny_models.py), the bundled
photos, 3 optimizer steps each."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from transforms import collate

STEPS = 3


def run(repo_root: Path, script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    proc = subprocess.run([sys.executable, str(repo_root / "examples" / script), *args],
                          cwd=repo_root, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def tiny_checkout(repo_root: Path, model: str, dest: Path, tokenizers: Path) -> Path:
    run(repo_root, "tiny_models.py", model, str(dest), "--tokenizers", str(tokenizers))
    return dest


def trained_lora(folder: Path) -> dict[str, torch.Tensor]:
    """The saved adapter; gaussian init starts every lora_B at zero, so a non-zero lora_B
    means the optimizer really updated the LoRA."""
    (weights,) = folder.glob("*.safetensors")
    tensors = load_file(weights)
    b = [t for name, t in tensors.items() if "lora_B" in name]
    assert b and any(t.abs().sum() > 0 for t in b)
    return tensors


@pytest.fixture(scope="module")
def tiny_flux(repo_root, flux_tokenizer_dir, tmp_path_factory) -> Path:
    """examples/tiny_models.py's FLUX checkout, written once for this module."""
    return tiny_checkout(repo_root, "flux", tmp_path_factory.mktemp("tiny") / "flux",
                         flux_tokenizer_dir)


def check_flux_steps(out: str) -> None:
    """The example printed STEPS steps of buckets within 256², with FLUX.1-dev's mu."""
    lines = re.findall(r"^step +\d+ .*bucket (\d+)x(\d+) .*tokens (\d+) +mu ([\d.]+) +"
                       r"loss ([\d.]+)$", out, flags=re.M)
    assert len(lines) == STEPS, out
    for w, h, tokens, mu, loss in lines:
        w, h = int(w), int(h)
        assert w % 16 == 0 and h % 16 == 0 and w * h <= 256 * 256
        assert int(tokens) == (w // 16) * (h // 16)
        # diffusers' calculate_shift with FLUX.1-dev's scheduler values, for this bucket
        assert float(mu) == pytest.approx(0.5 + (int(tokens) - 256) * 0.65 / 3840, abs=1e-3)
        assert float(loss) > 0


def test_train_flux_lora(repo_root, tiny_flux, tmp_path):
    out = run(repo_root, "train_flux_lora.py", "--weights", str(tiny_flux), "--steps", str(STEPS),
              "--max-area", str(256 * 256), "--t5-max-length", "64", "--batch-size", "2",
              "--workers", "2", "--device", "cpu", "--save", str(tmp_path / "lora"))
    check_flux_steps(out)
    assert any("transformer" in name for name in trained_lora(tmp_path / "lora"))


def test_train_flux_lora_from_the_encoder_cache(repo_root, tiny_flux, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    data, cache = str(repo_root / "examples" / "data"), str(tmp_path / "cache")
    built = subprocess.run(
        [sys.executable, "-m", "bucketing.cli.cache", data, "--weights", str(tiny_flux), "--out",
         cache, "--dtype", "float32", "--t5-length", "64", "--max-area", str(256 * 256),
         "--flip-p", "0.5", "--loader-workers", "0"],
        capture_output=True, text=True, timeout=400, env=env)
    assert built.returncode == 0, built.stdout + built.stderr
    # No VAE or text encoder on the training side: a checkout holding only the transformer.
    (tmp_path / "transformer-only").mkdir()
    (tmp_path / "transformer-only" / "transformer").symlink_to(tiny_flux / "transformer")
    out = run(repo_root, "train_flux_lora.py", "--weights", str(tmp_path / "transformer-only"),
              "--cache", cache, "--data", data, "--steps", str(STEPS), "--max-area",
              str(256 * 256), "--batch-size", "2", "--workers", "2", "--device", "cpu",
              "--save", str(tmp_path / "lora"))
    check_flux_steps(out)
    assert any("transformer" in name for name in trained_lora(tmp_path / "lora"))


@pytest.mark.slow
def test_train_flux_lora_from_a_text_only_cache(repo_root, tiny_flux, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    data, cache = str(repo_root / "examples" / "data"), str(tmp_path / "text-cache")
    built = subprocess.run(
        [sys.executable, "-m", "bucketing.cli.cache", data, "--weights", str(tiny_flux), "--out",
         cache, "--dtype", "float32", "--t5-length", "64", "--max-area", str(256 * 256),
         "--text-only", "--loader-workers", "0"],
        capture_output=True, text=True, timeout=400, env=env)
    assert built.returncode == 0, built.stdout + built.stderr
    assert "0 latents encoded (0 in the view)" in built.stdout
    # The VAE and the transformer only: a checkout without text_encoder/ or text_encoder_2/,
    # so CLIP and T5 cannot be constructed; the pixels are fitted (and encoded) every step.
    weights = tmp_path / "vae-and-transformer"
    weights.mkdir()
    for part in ("vae", "transformer"):
        (weights / part).symlink_to(tiny_flux / part)
    out = run(repo_root, "train_flux_lora.py", "--weights", str(weights), "--cache", cache,
              "--data", data, "--steps", str(STEPS), "--max-area", str(256 * 256),
              "--batch-size", "2", "--workers", "2", "--device", "cpu",
              "--save", str(tmp_path / "lora"))
    check_flux_steps(out)
    assert any("transformer" in name for name in trained_lora(tmp_path / "lora"))


def _collate_keeps_unknown_keys() -> bool:
    sample = {"pixel_values": torch.zeros(3, 2, 2, dtype=torch.uint8),
              "input_ids_one": torch.zeros(77, dtype=torch.int64)}
    return "input_ids_one" in collate([sample, sample])


@pytest.mark.skipif(not _collate_keeps_unknown_keys(),
                    reason="SDXL's input_ids_one/two need a collate that keeps unknown keys")
def test_train_sdxl_lora(repo_root, tokenizer_dirs, tmp_path):
    weights = tiny_checkout(repo_root, "sdxl", tmp_path / "sdxl", tokenizer_dirs["sdxl"])
    out = run(repo_root, "train_sdxl_lora.py", "--weights", str(weights), "--steps", str(STEPS),
              "--max-area", str(256 * 256), "--batch-size", "2", "--workers", "2",
              "--device", "cpu", "--save", str(tmp_path / "lora"))
    lines = re.findall(r"^step +\d+ .*bucket (\d+)x(\d+) .*time_ids \[([\d, ]+)\] +"
                       r"loss ([\d.]+)$", out, flags=re.M)
    assert len(lines) == STEPS, out
    for w, h, time_ids, loss in lines:
        oh, ow, y, x, th, tw = (int(v) for v in time_ids.split(","))
        assert (th, tw) == (int(h), int(w)) and int(w) % 64 == 0 and int(h) % 64 == 0
        assert oh >= th and ow >= tw  # never upscaled: the original covers the bucket
        assert 0 <= y <= oh - th and 0 <= x <= ow - tw and float(loss) > 0
    trained_lora(tmp_path / "lora")
