"""The model registry is the one source of each model's numbers: every consumer reads it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from bucketing.cli import cache as cache_cli
from bucketing.ladder import MODEL_SPECS, BucketLadder, default_levels
from bucketing.models import MODELS, encoder_models, model_spec, named_class
from bucketing.pipeline.encoder_cache.keys import MODEL_SIZES, TRIMMED_MODELS
from transforms.tokenize import tokenizer_for_model

NAMES = ("flux", "flux-schnell", "sdxl", "sd3", "sd15")


def test_the_registry_holds_the_known_models():
    assert tuple(MODELS) == ("flux", "flux-schnell", "sd3", "sdxl", "sd15")
    assert {n: MODELS[n].t5_max_length for n in NAMES} == {
        "flux": 512, "flux-schnell": 256, "sdxl": None, "sd3": 77, "sd15": None}
    with pytest.raises(ValueError, match="unknown model 'kandinsky'; known: flux"):
        model_spec("kandinsky")


@pytest.mark.parametrize("name", NAMES)
def test_the_ladder_reads_the_registry(name):
    spec = MODELS[name]
    assert MODEL_SPECS[name] is spec
    ladder = BucketLadder.for_model(name)
    assert ladder.multiple == spec.multiple and ladder.max_area == spec.max_area
    # The registry's levels, plus the levels holding the canonical sizes they lack.
    assert set(spec.levels) <= set(ladder.levels.tolist())
    assert list(spec.levels) == default_levels(spec.max_area, spec.multiple)
    assert {tuple(c) for c in spec.canonical} <= {tuple(b) for b in ladder.buckets.tolist()}
    assert (ladder.buckets % spec.multiple == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_the_cache_tables_read_the_registry(name):
    spec = MODELS[name]
    if spec.encoders is None:
        assert name not in MODEL_SIZES and name not in cache_cli.MODEL_NAMES
        return
    assert MODEL_SIZES[name] == {"latent_channels": spec.latent_channels,
                                 "text_width": spec.text_width,
                                 "text_length": spec.clip_rows + (spec.t5_max_length or 0),
                                 "pooled": spec.pooled}
    assert (name in TRIMMED_MODELS) == spec.t5_trimmed
    choices = next(a.choices for a in cache_cli.build_parser()._actions if a.dest == "model")
    assert name in choices and tuple(choices) == encoder_models()


@pytest.mark.parametrize("name", NAMES)
def test_tokenizers_read_the_registry(name, tokenizer_dirs):
    spec = MODELS[name]
    tok = tokenizer_for_model(name, tokenizer_dirs["flux" if name.startswith("flux") else name])
    assert type(tok) is named_class(spec.tokenizer) and tok.model == name
    assert tok.multiple == spec.multiple
    assert getattr(tok, "t5_max_length", None) == spec.t5_max_length


def test_encoders_read_the_registry(tiny_encoders_dirs):
    """Loaded with no T5 length, each wrapper pads T5 to the registry's (SD3: 77), its VAE
    has the registry's channels and its prompt_embeds have the registry's row count."""
    for name in ("flux", "sdxl", "sd3"):
        spec = MODELS[name]
        cls = named_class(spec.encoders)
        enc = cls.from_pretrained(tiny_encoders_dirs[name], dtype=torch.float32)
        assert enc.max_sequence_length == spec.t5_max_length
        assert enc.latent_channels == spec.latent_channels == enc.vae.config.latent_channels
        assert set(cls.classes()) == {part for part, _ in spec.components}
        out = enc.encode_text(["a photo of a cat"])
        assert out["prompt_embeds"].shape[1] == MODEL_SIZES[name]["text_length"]
        assert enc.scaling_factor == pytest.approx(spec.scaling_factor)
        assert enc.shift_factor == pytest.approx(spec.shift_factor)


def test_bucket_cache_help_loads_no_matplotlib():
    code = ("import sys, contextlib, io\n"
            "import bucketing.cli.cache as c\n"
            "assert 'matplotlib' not in sys.modules, 'import'\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "    c.main(['--help'])\n"
            "assert 'matplotlib' not in sys.modules, '--help'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
