"""diffusers_batch / DiffusersCollate: our batches through the code of diffusers' own training
scripts (train_text_to_image_lora_sdxl.py, train_dreambooth_lora_flux.py), copied verbatim
where they touch the batch, with the minimal patch docs/tensors-and-tokens.md shows."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from torch.utils.data import DataLoader

from bucketing import BucketLadder, TextToImageDataset, assign, scan
from samplers import BucketBatchSampler
from transforms import (
    BucketResizeCrop,
    CaptionTransform,
    DiffusersCollate,
    SDXLTokenizer,
    collate,
    diffusers_batch,
    sdxl_add_time_ids,
)


def loader(examples_dir, model: str, model_transform=None, workers: int = 0,
           max_area: int = 192 * 192) -> DataLoader:
    index = scan(examples_dir, workers=0)
    assignment = assign(index, BucketLadder.for_model(model, max_area=max_area))
    dataset = TextToImageDataset(index, assignment, image_transform=BucketResizeCrop(
        crop="random", flip_p=0.5), caption_transform=CaptionTransform(fallback="stem"),
        model_transform=model_transform, seed=0)
    sampler = BucketBatchSampler(assignment, batch_size=3, seed=0, emit="all_ranks")
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=DiffusersCollate(model),
                      num_workers=workers)


@pytest.mark.slow
def test_sdxl_script_batch_through_its_own_compute_time_ids(examples_dir, tiny_encoders_dirs):
    accelerator = Accelerator(cpu=True)
    weight_dtype = torch.float32
    vae = AutoencoderKL.from_pretrained(tiny_encoders_dirs["sdxl"], subfolder="vae")
    tokenizer = SDXLTokenizer.from_pretrained_dir(tiny_encoders_dirs["sdxl"])
    shapes = set()
    # as the script builds it: through accelerate's prepare, with real workers (the collate_fn
    # is pickled)
    sdxl = accelerator.prepare(loader(examples_dir, "sdxl", tokenizer, workers=2,
                                      max_area=256 * 256))
    seen = 0
    for step, batch in enumerate(sdxl):
        pixel_values = batch["pixel_values"]
        assert pixel_values.dtype == torch.float32 and pixel_values.is_contiguous()
        assert pixel_values.min() >= -1.0 and pixel_values.max() <= 1.0
        b, _, h, w = pixel_values.shape
        shapes.add((h, w))
        assert batch["prompts"] == batch["captions"] and all(batch["prompts"])
        assert batch["input_ids_one"].shape == batch["input_ids_two"].shape == (b, 77)

        # --- train_text_to_image_lora_sdxl.py, with target_size taken from the batch ---
        def compute_time_ids(original_size, crops_coords_top_left, target_size):
            # Adapted from pipeline.StableDiffusionXLPipeline._get_add_time_ids
            add_time_ids = list(original_size + crops_coords_top_left + target_size)
            add_time_ids = torch.tensor([add_time_ids])
            add_time_ids = add_time_ids.to(accelerator.device, dtype=weight_dtype)
            return add_time_ids

        add_time_ids = torch.cat(
            [compute_time_ids(s, c, t) for s, c, t in
             zip(batch["original_sizes"], batch["crop_top_lefts"], batch["target_sizes"],
                 strict=True)]
        )
        if step == 0:  # the VAE once: the script's encode of our pixels
            model_input = vae.encode(pixel_values).latent_dist.sample()
            model_input = model_input * vae.config.scaling_factor
            assert model_input.shape == (b, 4, h // 8, w // 8)
        # --- end of the script's code ---

        assert add_time_ids.shape == (b, 6)
        assert torch.equal(add_time_ids, sdxl_add_time_ids(collate_sizes(batch)))
        assert all(t == (h, w) for t in batch["target_sizes"])  # each image's own bucket
        seen += b
    assert seen == int((sdxl.dataset.bucket_id >= 0).sum())  # every image once
    assert any(h != w for h, w in shapes)  # the script's (resolution, resolution) was wrong


def collate_sizes(batch: dict) -> dict:
    """The batch's collate-form sizes ([B, 2] int64), as sdxl_add_time_ids reads them."""
    return {key: batch[key] for key in ("original_size", "crop_top_left", "target_size")}


@pytest.mark.slow
def test_flux_script_batch(examples_dir, tiny_encoders_dirs):
    vae = AutoencoderKL.from_pretrained(tiny_encoders_dirs["flux"], subfolder="vae")
    seen, flux = 0, loader(examples_dir, "flux", max_area=128 * 128)
    for step, batch in enumerate(flux):
        # --- train_dreambooth_lora_flux.py's use of the batch ---
        pixel_values = batch["pixel_values"].to(dtype=vae.dtype)
        prompts = batch["prompts"]
        b, _, h, w = pixel_values.shape
        if step == 0:  # the VAE once
            model_input = vae.encode(pixel_values).latent_dist.sample()
            model_input = (model_input - vae.config.shift_factor) * vae.config.scaling_factor
            assert model_input.shape == (b, 16, h // 8, w // 8)
        # --- end of the script's code ---
        assert isinstance(prompts, list) and all(isinstance(p, str) and p for p in prompts)
        assert pixel_values.min() >= -1.0 and pixel_values.max() <= 1.0
        seen += b
    assert seen == int((flux.dataset.bucket_id >= 0).sum())  # every image once


def test_tuples_not_tensors_and_pixels_exact():
    pixels = torch.tensor([0, 127, 255], dtype=torch.uint8).repeat(2, 3, 2, 1)  # [2, 3, 2, 3]
    batch = {"pixel_values": pixels, "captions": ["a", "b"],
             "original_size": torch.tensor([[300, 200], [640, 480]]),
             "crop_top_left": torch.tensor([[0, 4], [8, 0]]),
             "target_size": torch.tensor([[128, 192], [128, 192]]),
             "input_ids_one": torch.zeros(2, 77, dtype=torch.int64),
             "input_ids_two": torch.zeros(2, 77, dtype=torch.int64)}
    out = diffusers_batch(batch, model="sdxl")
    assert out["original_sizes"] == [(300, 200), (640, 480)]
    assert out["crop_top_lefts"] == [(0, 4), (8, 0)]
    assert out["target_sizes"] == [(128, 192), (128, 192)]
    # tuples concatenate where the script adds them; tensors would add element-wise
    assert out["original_sizes"][0] + out["crop_top_lefts"][0] == (300, 200, 0, 4)
    assert out["pixel_values"][0, 0, 0].tolist() == pytest.approx([-1.0, 127 / 127.5 - 1, 1.0])
    assert out["prompts"] == ["a", "b"] and out["input_ids_one"] is batch["input_ids_one"]
    assert batch["pixel_values"].dtype == torch.uint8  # the input batch is not changed


def test_refusals():
    sample = {"pixel_values": torch.zeros(3, 8, 8, dtype=torch.uint8), "caption": "x"}
    batch = collate([sample, sample])
    with pytest.raises(ValueError, match="SDXLTokenizer"):
        diffusers_batch(batch, model="sdxl")
    with pytest.raises(ValueError, match="model must be one of"):
        diffusers_batch(batch, model="sd15")
    with pytest.raises(ValueError, match="model must be one of"):
        DiffusersCollate("sd3")
    with pytest.raises(TypeError, match="uint8"):
        diffusers_batch({**batch, "pixel_values": batch["pixel_values"].float()}, model="flux")
    with pytest.raises(ValueError, match="latents"):
        diffusers_batch({"latents": torch.zeros(2, 16, 4, 4), "captions": ["a", "b"]},
                        model="flux")
    assert diffusers_batch(batch, model="flux")["prompts"] == ["x", "x"]
