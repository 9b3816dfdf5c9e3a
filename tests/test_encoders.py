"""FluxEncoders / SDXLEncoders on tiny random real diffusers + transformers modules: the same
numbers as the diffusers pipelines' encode_prompt and the training scripts' VAE path."""

from __future__ import annotations

import pytest
import torch

from transforms.encoders import FluxEncoders, SD3Encoders, SDXLEncoders, module_fingerprint

CAPTIONS = ["a photo of a cat", "", "a very long caption " * 40, "a photo of a cat"]


@pytest.fixture(scope="module")
def flux(tiny_encoders_dirs) -> FluxEncoders:
    return FluxEncoders.from_pretrained(
        tiny_encoders_dirs["flux"], dtype=torch.float32, max_sequence_length=64
    )


@pytest.fixture(scope="module")
def sdxl(tiny_encoders_dirs) -> SDXLEncoders:
    return SDXLEncoders.from_pretrained(tiny_encoders_dirs["sdxl"])


def _pixels(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=g)


def test_flux_text_equals_the_pipeline(flux: FluxEncoders):
    from diffusers import FluxPipeline

    pipe = FluxPipeline(
        scheduler=None, vae=flux.vae, text_encoder=flux.text_encoder,
        text_encoder_2=flux.text_encoder_2, tokenizer=flux.tokenizer,
        tokenizer_2=flux.tokenizer_2, transformer=None,
    )
    ours = flux.encode_text(CAPTIONS)
    embeds, pooled, _ = pipe.encode_prompt(CAPTIONS, device="cpu", max_sequence_length=64)
    assert ours["prompt_embeds"].shape == (4, 64, 8)
    assert ours["pooled_prompt_embeds"].shape == (4, 8)
    assert torch.equal(ours["prompt_embeds"], embeds)
    assert torch.equal(ours["pooled_prompt_embeds"], pooled)
    lengths = ours["text_lengths"].tolist()
    assert lengths[1] == 1 and lengths[2] == 64 and lengths[0] == lengths[3] > 1
    assert torch.equal(ours["prompt_embeds"][0], ours["prompt_embeds"][3])


def test_sdxl_text_equals_the_pipeline(sdxl: SDXLEncoders):
    from diffusers import StableDiffusionXLPipeline

    assert sdxl.tokenizer_2.pad_token == "!"
    pipe = StableDiffusionXLPipeline(
        vae=sdxl.vae, text_encoder=sdxl.text_encoder, text_encoder_2=sdxl.text_encoder_2,
        tokenizer=sdxl.tokenizer, tokenizer_2=sdxl.tokenizer_2, unet=None, scheduler=None,
    )
    ours = sdxl.encode_text(CAPTIONS)
    embeds, _, pooled, _ = pipe.encode_prompt(
        CAPTIONS, device="cpu", do_classifier_free_guidance=False
    )
    assert ours["prompt_embeds"].shape == (4, 77, 16)  # 8 + 8: both CLIPs' widths
    assert ours["pooled_prompt_embeds"].shape == (4, 12)  # the projection's width
    assert torch.equal(ours["prompt_embeds"], embeds)
    assert torch.equal(ours["pooled_prompt_embeds"], pooled)


@pytest.fixture(scope="module")
def sd3(tiny_encoders_dirs) -> SD3Encoders:
    return SD3Encoders.from_pretrained(
        tiny_encoders_dirs["sd3"], dtype=torch.float32, max_sequence_length=40
    )


def test_sd3_text_equals_the_pipeline(sd3: SD3Encoders):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=None, scheduler=None, vae=sd3.vae, text_encoder=sd3.text_encoder,
        tokenizer=sd3.tokenizer, text_encoder_2=sd3.text_encoder_2, tokenizer_2=sd3.tokenizer_2,
        text_encoder_3=sd3.text_encoder_3, tokenizer_3=sd3.tokenizer_3,
    )
    ours = sd3.encode_text(CAPTIONS)
    embeds, _, pooled, _ = pipe.encode_prompt(
        CAPTIONS, None, None, device="cpu", do_classifier_free_guidance=False,
        max_sequence_length=40,
    )
    assert ours["prompt_embeds"].shape == (4, 77 + 40, 32)
    assert ours["pooled_prompt_embeds"].shape == (4, 24)
    assert torch.equal(ours["prompt_embeds"], embeds)
    assert torch.equal(ours["pooled_prompt_embeds"], pooled)


@pytest.mark.parametrize("which", ["flux", "sdxl", "sd3"])
def test_latents_follow_the_training_scripts(which, request):
    enc = request.getfixturevalue(which)
    pixels = _pixels(2, 32, 48)
    latents = enc.encode_images(pixels)
    assert latents.shape == (2, enc.latent_channels, 4, 6)
    # diffusers' training scripts: Normalize([0.5], [0.5]) after ToTensor, then the VAE
    x = (pixels.float() / 255.0 - 0.5) / 0.5
    z = enc.vae.encode(x).latent_dist.mode()
    cfg = enc.vae.config
    expected = (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)
    # one image alone gives the same latent as in a batch
    torch.testing.assert_close(enc.encode_images(pixels[1:]), latents[1:], rtol=1e-4, atol=1e-5)


def test_bad_inputs_are_refused(flux: FluxEncoders, sdxl: SDXLEncoders, tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        flux.encode_images(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        flux.encode_images(torch.zeros(1, 3, 20, 16, dtype=torch.uint8))
    with pytest.raises(TypeError, match="strings"):
        flux.encode_text(["ok", None])
    with pytest.raises(ValueError, match="latent channels"):
        FluxEncoders(sdxl.vae, flux.text_encoder, flux.text_encoder_2, flux.tokenizer,
                     flux.tokenizer_2)
    with pytest.raises(FileNotFoundError, match="text_encoder_2/"):
        FluxEncoders.from_pretrained(tmp_path)


def test_fingerprints_follow_the_weights(flux: FluxEncoders, tiny_encoders_dirs):
    again = FluxEncoders.from_pretrained(
        tiny_encoders_dirs["flux"], dtype=torch.float32, max_sequence_length=64
    )
    assert again.fingerprint("image") == flux.fingerprint("image")
    assert again.fingerprint("text") == flux.fingerprint("text")
    assert flux.fingerprint("image") != flux.fingerprint("text")
    longer = FluxEncoders(flux.vae, flux.text_encoder, flux.text_encoder_2, flux.tokenizer,
                          flux.tokenizer_2, max_sequence_length=128)
    assert longer.fingerprint("text") != flux.fingerprint("text")
    before = module_fingerprint(again.vae)
    with torch.no_grad():
        again.vae.encoder.conv_in.weight[0, 0, 0, 0] += 1e-3  # one weight of thousands
    assert module_fingerprint(again.vae) != before
    assert module_fingerprint(again.vae.to(torch.bfloat16)) != module_fingerprint(flux.vae)
