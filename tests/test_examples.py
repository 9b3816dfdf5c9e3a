"""The examples run as users run them: real subprocesses, real diffusers/transformers classes
(tiny random configs written with save_pretrained by examples/tiny_models.py), a few bundled
photos. Each trainer trains, checkpoints, is stopped (--max-steps), resumes to the same losses
and weights as an uninterrupted run, and saves LoRA files that diffusers' pipelines load."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.append(str(EXAMPLES))  # the examples import their shared lora_loop as users run them
import tiny_models  # noqa: E402
import train_flux_lora  # noqa: E402
import train_sdxl_lora  # noqa: E402

pytestmark = pytest.mark.slow
BATCH = re.compile(r"^batch +\d+ +epoch (\d+) +bucket (\d+)x(\d+) +batch (\d+) +(.*?) +"
                   r"loss ([\d.]+)$", re.M)
STEP = re.compile(r"^step +(\d+) +lr (\S+) +loss ([\d.]+)$", re.M)


def run(repo_root: Path, script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    proc = subprocess.run([sys.executable, str(repo_root / "examples" / script), *args],
                          cwd=repo_root, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def run_here(script, capsys, *args: str) -> str:
    """The example's ``train`` in this process (its stdout): the uninterrupted reference run."""
    capsys.readouterr()
    script.train(script.parse_args(list(args)))
    return capsys.readouterr().out


def steps(out: str) -> list[tuple[int, float, float]]:
    """(step, lr, loss) of every optimizer step printed."""
    return [(int(s), float(lr), float(loss)) for s, lr, loss in STEP.findall(out)]


def same_steps(out: str, expected: list[tuple[int, float, float]]) -> bool:
    """``out`` printed the optimizer steps ``expected``: the same numbers and rates, losses
    equal to print precision."""
    got = steps(out)
    return ([s[:2] for s in got] == [s[:2] for s in expected]
            and [s[2] for s in got] == pytest.approx([s[2] for s in expected], rel=1e-6))


def lora_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The diffusers LoRA file; gaussian init starts every lora_B at zero, so a non-zero lora_B
    means the optimizer really updated the LoRA."""
    tensors = load_file(folder / "pytorch_lora_weights.safetensors")
    b = [t for name, t in tensors.items() if "lora_B" in name or "lora.up" in name]
    assert b and any(t.abs().sum() > 0 for t in b)
    return tensors


def loaded_lora(pipe, module: torch.nn.Module, folder: Path) -> list[list[torch.Tensor]]:
    """The LoRA weights ``pipe.load_lora_weights`` puts into ``module`` from the diffusers file
    and from the kohya file of ``folder`` (two adapters), each in name order."""
    files = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors")
    for name, file in zip(("diffusers", "kohya"), files, strict=True):
        with warnings.catch_warnings():  # peft notes the second adapter: that is the point
            warnings.filterwarnings("ignore", "Already found a `peft_config`")
            pipe.load_lora_weights(folder, weight_name=file, adapter_name=name)
    state = module.state_dict()
    return [[state[k] for k in sorted(state) if re.search(rf"\.lora_[AB]\.{name}\.", k)]
            for name in ("diffusers", "kohya")]


@pytest.fixture(scope="module")
def tiny(repo_root, tokenizer_dirs, tmp_path_factory) -> dict[str, Path]:
    """examples/tiny_models.py's FLUX and SDXL checkouts, written once for this module."""
    root = tmp_path_factory.mktemp("tiny")
    for model in ("flux", "sdxl"):
        tiny_models.main([model, str(root / model), "--tokenizers", str(tokenizer_dirs[model])])
    return {"flux": root / "flux", "sdxl": root / "sdxl"}


@pytest.fixture(scope="module")
def photos(examples_dir, tmp_path_factory) -> Path:
    """Three photos of different shapes; two captioned, one not."""
    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut.png", "astronaut.txt", "rocket.jpg", "rocket.txt", "china.jpg"):
        shutil.copy(examples_dir / name, folder / name)
    return folder


def test_tiny_checkouts_are_complete_diffusers_checkouts(tiny):
    flux = FluxPipeline.from_pretrained(tiny["flux"])
    sdxl = StableDiffusionXLPipeline.from_pretrained(tiny["sdxl"])
    assert type(flux.transformer).__name__ == "FluxTransformer2DModel"
    assert type(flux.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert type(sdxl.unet).__name__ == "UNet2DConditionModel"
    assert type(sdxl.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    image = flux("a photo", height=32, width=48, num_inference_steps=1, max_sequence_length=16,
                 output_type="np").images
    assert image.shape == (1, 32, 48, 3)


def test_flux_trains_from_a_config_stops_and_resumes_exactly(repo_root, tiny, photos, tmp_path,
                                                             capsys):
    config = tmp_path / "data.toml"
    config.write_text(f'model = "flux"\nbatch_size = 4\nseed = 1\n[[datasets]]\n'
                      f'source = "{photos}"\n[datasets.captions]\n'
                      f'template = "photo of sks, {{caption}}"\nfallback = "stem"\n')
    args = ["--weights", str(tiny["flux"]), "--config", str(config), "--batch-size", "2",
            "--max-area", str(64 * 64), "--t5-max-length", "16", "--epochs", "2",
            "--lr", "1e-3", "--lr-scheduler", "cosine", "--device", "cpu"]
    full = run_here(train_flux_lora, capsys, *args, "--workers", "0",
                    "--output", str(tmp_path / "full"))
    batches, taken = BATCH.findall(full), steps(full)
    # --batch-size 2 overrides the file's 4: three photos are a batch of 2 and a short one
    assert "4 batches, 4 optimizer steps over 2 epochs" in full and len(batches) == 4
    assert sorted(int(b[3]) for b in batches) == [1, 1, 2, 2]
    for (_, w, h, size, detail, loss), (_, _, step_loss) in zip(batches, taken,
                                                                       strict=True):
        assert int(w) * int(h) <= 64 * 64 and int(w) % 16 == 0 and int(h) % 16 == 0
        tokens, mu = re.match(r"tokens (\d+) +mu ([\d.]+)", detail).groups()
        assert int(tokens) == (int(w) // 16) * (int(h) // 16)
        assert float(mu) == pytest.approx(0.5 + (int(tokens) - 256) * 0.65 / 3840, abs=1e-3)
        # each image weighs the same: a batch of 1 counts half of a full batch of 2
        assert step_loss == pytest.approx(float(loss) * int(size) / 2, rel=1e-4)
    assert [lr for _, lr, _ in taken] == pytest.approx(
        [1e-3 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(1, 5)], rel=1e-3, abs=1e-9)

    # stopped mid-epoch 0 (its workers had prefetched more), then resumed in a new process
    part = ["--output", str(tmp_path / "part"), "--workers", "2"]
    stopped = run(repo_root, "train_flux_lora.py", *args, *part, "--max-steps", "1")
    assert same_steps(stopped, taken[:1])
    assert (tmp_path / "part" / "checkpoint-1" / "training_state.pt").is_file()
    resumed = run(repo_root, "train_flux_lora.py", *args, *part, "--resume", "latest")
    assert same_steps(resumed, taken[1:])
    final = lora_tensors(tmp_path / "full")
    again = lora_tensors(tmp_path / "part")
    assert final.keys() == again.keys()
    assert all(torch.allclose(final[k], again[k], rtol=1e-5, atol=1e-7) for k in final)

    # diffusers' FluxPipeline loads both files to the same weights as the trained ones
    kohya = load_file(tmp_path / "full" / "pytorch_lora_weights_kohya.safetensors")
    assert all(k.startswith("lora_transformer_") for k in kohya)
    assert len(kohya) == 3 * len(final) // 2  # lora_down, lora_up, alpha per module
    pipe = FluxPipeline.from_pretrained(tiny["flux"])
    loaded = loaded_lora(pipe, pipe.transformer, tmp_path / "full")
    trained = [final[k] for k in sorted(final)]
    for weights in loaded:
        assert len(weights) == len(trained)
        assert all(torch.equal(a, b) for a, b in zip(weights, trained, strict=True))


def test_sdxl_trains_accumulates_stops_at_an_epoch_end_and_resumes(repo_root, tiny, photos,
                                                                     tmp_path, capsys):
    args = ["--weights", str(tiny["sdxl"]), "--data", str(photos), "--max-area", str(128 * 128),
            "--batch-size", "2", "--epochs", "2", "--grad-accum", "2", "--seed", "1",
            "--device", "cpu"]
    full = run_here(train_sdxl_lora, capsys, *args, "--workers", "0",
                    "--output", str(tmp_path / "full"))
    batches, taken = BATCH.findall(full), steps(full)
    assert "4 batches, 2 optimizer steps over 2 epochs" in full and len(taken) == 2
    for _, w, h, _, detail, _ in batches:
        oh, ow, y, x, th, tw = map(int, re.match(r"time_ids \[([\d, ]+)\]",
                                                 detail).group(1).split(","))
        assert (th, tw) == (int(h), int(w)) and int(w) % 64 == 0 and int(h) % 64 == 0
        assert oh >= th and ow >= tw  # never upscaled: the original covers the bucket
        assert 0 <= y <= oh - th and 0 <= x <= ow - tw
    # two batches per optimizer step, each image weighing 1 / (2 * 2) of it
    per_image = [float(b[5]) * int(b[3]) / 4 for b in batches]
    assert [s[2] for s in taken] == pytest.approx(
        [per_image[0] + per_image[1], per_image[2] + per_image[3]], rel=1e-4)

    # stopped on epoch 0's last batch, resumed: the rest of the run, nothing more
    part = ["--output", str(tmp_path / "part"), "--workers", "2"]
    stopped = run(repo_root, "train_sdxl_lora.py", *args, *part, "--max-steps", "1")
    assert same_steps(stopped, taken[:1])
    resumed = run(repo_root, "train_sdxl_lora.py", *args, *part, "--resume",
                  str(tmp_path / "part" / "checkpoint-1"))
    assert len(BATCH.findall(resumed)) == 2
    assert same_steps(resumed, taken[1:])
    final, again = lora_tensors(tmp_path / "full"), lora_tensors(tmp_path / "part")
    assert all(torch.allclose(final[k], again[k], rtol=1e-5, atol=1e-7) for k in final)

    kohya = load_file(tmp_path / "full" / "pytorch_lora_weights_kohya.safetensors")
    assert kohya and all(k.startswith("lora_unet_") for k in kohya)
    assert {k.split(".", 1)[1] for k in kohya} == {"lora_down.weight", "lora_up.weight", "alpha"}
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny["sdxl"])
    loaded = loaded_lora(pipe, pipe.unet, tmp_path / "full")
    assert loaded[0] and len(loaded[0]) == len(loaded[1]) == len(final)
    assert all(torch.equal(a, b) for a, b in zip(*loaded, strict=True))
    assert any(t.abs().sum() > 0 for t in loaded[0])


def bucket_cache(repo_root, photos, tiny, out: str, *extra: str) -> str:
    """``bucket-cache`` over ``photos`` with the tiny FLUX encoders at 64x64; its stdout."""
    built = subprocess.run(
        [sys.executable, "-m", "bucketing.cli.cache", str(photos), "--weights",
         str(tiny["flux"]), "--out", out, "--dtype", "float32", "--t5-length", "16",
         "--max-area", str(64 * 64), "--loader-workers", "0", *extra],
        capture_output=True, text=True, timeout=400,
        env={**os.environ, "PYTHONPATH": str(repo_root)})
    assert built.returncode == 0, built.stdout + built.stderr
    return built.stdout


def test_train_flux_lora_from_the_encoder_cache(repo_root, tiny, photos, tmp_path, capsys):
    cache = str(tmp_path / "cache")
    bucket_cache(repo_root, photos, tiny, cache, "--flip-p", "0.5")
    # No VAE or text encoder on the training side: a checkout holding only the transformer.
    (tmp_path / "transformer-only").mkdir()
    (tmp_path / "transformer-only" / "transformer").symlink_to(tiny["flux"] / "transformer")
    out = run_here(train_flux_lora, capsys, "--weights", str(tmp_path / "transformer-only"),
                   "--cache", cache, "--data", str(photos), "--max-area", str(64 * 64),
                   "--batch-size", "2", "--workers", "2", "--device", "cpu",
                   "--output", str(tmp_path / "lora"))
    assert len(BATCH.findall(out)) == 2 and len(steps(out)) == 2
    assert any(k.startswith("transformer.") for k in lora_tensors(tmp_path / "lora"))
    # the trainer on another ladder than the cache's is refused before its first step
    capsys.readouterr()
    with pytest.raises(ValueError, match="built for another plan") as refused:
        run_here(train_flux_lora, capsys, "--weights", str(tmp_path / "transformer-only"),
                 "--cache", cache, "--data", str(photos), "--max-area", str(128 * 128),
                 "--batch-size", "2", "--workers", "2", "--device", "cpu",
                 "--output", str(tmp_path / "other"))
    assert "rows are cached in another bucket" in str(refused.value)
    assert not steps(capsys.readouterr().out)


def test_train_flux_lora_from_a_text_only_cache(repo_root, tiny, photos, tmp_path, capsys):
    cache = str(tmp_path / "text-cache")
    built = bucket_cache(repo_root, photos, tiny, cache, "--text-only")
    assert "0 latents encoded (0 in the view)" in built
    # The VAE and the transformer only: a checkout without text_encoder/ or text_encoder_2/,
    # so CLIP and T5 cannot be constructed; the pixels are fitted (and encoded) every step.
    weights = tmp_path / "vae-and-transformer"
    weights.mkdir()
    for part in ("vae", "transformer"):
        (weights / part).symlink_to(tiny["flux"] / part)
    argv = ["--weights", str(weights), "--cache", cache, "--data", str(photos), "--max-area",
            str(64 * 64), "--batch-size", "2", "--workers", "2", "--device", "cpu",
            "--output", str(tmp_path / "lora")]
    out = run_here(train_flux_lora, capsys, *argv)
    assert len(BATCH.findall(out)) == 2 and len(steps(out)) == 2
    assert any(k.startswith("transformer.") for k in lora_tensors(tmp_path / "lora"))
    # The trainer's own loader: pixels, not latents, fitted afresh every epoch.
    loader = train_flux_lora.data_loader(train_flux_lora.parse_args(argv),
                                         train_flux_lora.open_cache(cache))
    by_epoch = []
    for epoch in range(2):
        loader.batch_sampler.set_epoch(epoch)
        by_epoch.append({int(i): px for batch in loader
                         for i, px in zip(batch["index"], batch["pixel_values"], strict=True)})
        assert all("prompt_embeds" in batch and "latents" not in batch for batch in loader)
    assert any(not torch.equal(px, by_epoch[1][i]) for i, px in by_epoch[0].items())


def test_contradictory_options_are_refused(capsys):
    for extra, message in ((["--data", "x", "--config", "y"], "give one"),
                           (["--max-steps", "2"], "need --output"),
                           (["--epochs", "0"], "--epochs must be >= 1")):
        with pytest.raises(SystemExit) as exit_:
            train_sdxl_lora.parse_args(["--weights", "w", *extra])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    # a template with a cache is the cache's to check (bucket-cache --template)
    args = train_flux_lora.parse_args(["--weights", "w", "--cache", "c", "--template", "{caption}"])
    assert args.template == "{caption}"
    with pytest.raises(SystemExit):
        train_flux_lora.parse_args(["--weights", "w", "--cache", "c", "--config", "x.toml"])
    assert "give --data, not --config" in capsys.readouterr().err


def test_train_flux_lora_with_a_loss_mask(tiny, tmp_path, capsys):
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i, (w, h) in enumerate([(96, 64), (64, 96), (96, 64), (64, 96)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 255  # the subject; the rest not trained
        Image.fromarray(mask).save(tmp_path / f"{i}_mask.png")
        rows.append({"image": f"{i}.png", "loss_mask": f"{i}_mask.png", "caption": f"photo {i}"})
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = run_here(train_flux_lora, capsys, "--weights", str(tiny["flux"]), "--data",
                   str(tmp_path / "rows.jsonl"), "--loss-mask", "--max-area", str(64 * 64),
                   "--batch-size", "2", "--workers", "2", "--device", "cpu",
                   "--output", str(tmp_path / "lora"))
    assert len(BATCH.findall(out)) == 2 and all(loss > 0 for _, _, loss in steps(out))
    assert any(k.startswith("transformer.") for k in lora_tensors(tmp_path / "lora"))
