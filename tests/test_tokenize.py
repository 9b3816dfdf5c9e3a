"""FluxTokenizer against the real FLUX tokenizer files, called the way diffusers calls them.

Reference calls, from diffusers' FluxPipeline._get_clip_prompt_embeds / _get_t5_prompt_embeds
and examples/dreambooth/train_dreambooth_flux.py (_encode_prompt_with_clip / tokenize_prompt):

    tokenizer(prompt, padding="max_length", max_length=77, truncation=True,
              return_overflowing_tokens=False, return_length=False, return_tensors="pt")
    tokenizer_2(prompt, padding="max_length", max_length=max_sequence_length, truncation=True,
                return_length=False, return_overflowing_tokens=False, return_tensors="pt")

with tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer") and
tokenizer_2 = T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_2"). Their
truncation warning compares against `tokenizer(prompt, padding="longest")` (untruncated).
"""

from __future__ import annotations

import pickle
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset

from transforms import FluxTokenizer, flux_image_ids, pack_latents, unpack_latents

LONG = ", ".join(f"a {c} detail number {i}" for i, c in enumerate(["red", "blue"] * 80))
CAPTIONS = [
    "a photo of a cat",
    "",
    "   ",
    "sks person, wearing a red jacket, standing in the rain at night, cinematic lighting",
    LONG,  # > 77 CLIP tokens and > 512 T5 tokens
    "a " * 75,  # exactly 77 CLIP tokens with BOS/EOS: not truncated
    "a " * 76,  # 78: truncated
    "Ünïcödé café — naïve façade, 日本語の猫 🐱🚀, Привет мир, ½ ≠ ∞",
    "MiXeD CaSe\tand\nnewlines  and   spaces",
    "tags,with,no,spaces,(parens:1.2),[brackets],{braces}",
]


@pytest.fixture(scope="module")
def reference(flux_tokenizer_dir):
    from transformers import CLIPTokenizer, T5TokenizerFast

    clip = CLIPTokenizer.from_pretrained(flux_tokenizer_dir, subfolder="tokenizer")
    t5 = T5TokenizerFast.from_pretrained(flux_tokenizer_dir, subfolder="tokenizer_2")
    return clip, t5


@pytest.fixture(scope="module")
def tok(flux_tokenizer_dir) -> FluxTokenizer:
    return FluxTokenizer.from_flux_dir(flux_tokenizer_dir)


def diffusers_ids(reference, captions, max_sequence_length):
    clip, t5 = reference
    c = clip(captions, padding="max_length", max_length=77, truncation=True,
             return_overflowing_tokens=False, return_length=False, return_tensors="pt")
    t = t5(captions, padding="max_length", max_length=max_sequence_length, truncation=True,
           return_length=False, return_overflowing_tokens=False, return_tensors="pt")
    return c.input_ids, t.input_ids, t.attention_mask


def untruncated_lengths(reference, captions):
    clip, t5 = reference
    return ([len(ids) for ids in clip(captions, verbose=False).input_ids],
            [len(ids) for ids in t5(captions, verbose=False).input_ids])


@pytest.mark.parametrize("t5_len", [512, 256, 77])
def test_same_ids_as_diffusers_on_known_captions(flux_tokenizer_dir, reference, t5_len):
    ours = FluxTokenizer.from_flux_dir(flux_tokenizer_dir, t5_max_length=t5_len).tokenize(CAPTIONS)
    clip_ids, t5_ids, t5_mask = diffusers_ids(reference, CAPTIONS, t5_len)
    assert ours["clip_input_ids"].dtype == torch.int64 and ours["t5_input_ids"].dtype == torch.int64
    assert torch.equal(ours["clip_input_ids"], clip_ids)
    assert torch.equal(ours["t5_input_ids"], t5_ids)
    assert torch.equal(ours["t5_attention_mask"], t5_mask)
    clip_len, t5_lens = untruncated_lengths(reference, CAPTIONS)
    assert ours["clip_lengths"].tolist() == clip_len
    assert ours["t5_lengths"].tolist() == t5_lens
    assert ours["clip_truncated"].tolist() == [n > 77 for n in clip_len]
    assert ours["t5_truncated"].tolist() == [n > t5_len for n in t5_lens]


def test_token_lengths_match_tokenize(tok):
    lengths = tok.token_lengths(CAPTIONS, chunk_size=3)
    out = tok.tokenize(CAPTIONS)
    assert lengths["clip"].tolist() == out["clip_lengths"].tolist()
    assert lengths["t5"].tolist() == out["t5_lengths"].tolist()
    assert tok.token_lengths([])["t5"].shape == (0,)


def test_known_captions_exercise_every_case(tok):
    out = tok.tokenize(CAPTIONS)
    lengths = dict(zip(CAPTIONS, out["clip_lengths"].tolist(), strict=True))
    assert lengths["a " * 75] == 77 and lengths["a " * 76] == 78
    assert out["clip_truncated"][CAPTIONS.index(LONG)] and out["t5_truncated"][CAPTIONS.index(LONG)]
    assert out["t5_lengths"][CAPTIONS.index(LONG)] > 512
    assert not out["clip_truncated"][CAPTIONS.index("a " * 75)]
    assert out["clip_truncated"][CAPTIONS.index("a " * 76)]
    # A truncated CLIP sequence still ends with EOS; T5 with </s>, then no padding.
    assert out["clip_input_ids"][CAPTIONS.index(LONG), -1] == tok.clip.eos_token_id
    assert out["t5_input_ids"][CAPTIONS.index(LONG), -1] == tok.t5.eos_token_id
    assert out["t5_attention_mask"][CAPTIONS.index(LONG)].all()


@settings(deadline=None, max_examples=40)
@given(st.lists(st.text(max_size=400), min_size=1, max_size=4), st.sampled_from([512, 64, 8]))
def test_random_text_matches_diffusers(flux_tokenizer_dir, reference, captions, t5_len):
    tok = _cached(flux_tokenizer_dir, t5_len)
    ours = tok.tokenize(captions)
    clip_ids, t5_ids, t5_mask = diffusers_ids(reference, captions, t5_len)
    assert torch.equal(ours["clip_input_ids"], clip_ids)
    assert torch.equal(ours["t5_input_ids"], t5_ids)
    assert torch.equal(ours["t5_attention_mask"], t5_mask)
    clip_len, t5_lens = untruncated_lengths(reference, captions)
    assert ours["clip_truncated"].tolist() == [n > 77 for n in clip_len]
    assert ours["t5_truncated"].tolist() == [n > t5_len for n in t5_lens]


_TOKENIZERS: dict = {}


def _cached(folder, t5_len) -> FluxTokenizer:
    if t5_len not in _TOKENIZERS:
        _TOKENIZERS[t5_len] = FluxTokenizer.from_flux_dir(folder, t5_max_length=t5_len)
    return _TOKENIZERS[t5_len]


def test_sample_transform_contract(tok):
    pixels = torch.zeros(3, 16, 16, dtype=torch.uint8)
    sample = {"caption": LONG, "index": 5, "pixel_values": pixels}
    out = tok(sample)
    assert out["index"] == 5 and out["pixel_values"] is sample["pixel_values"]
    assert "clip_input_ids" not in sample  # the input dict is not mutated
    assert out["clip_input_ids"].shape == (77,) and out["clip_input_ids"].dtype == torch.int64
    assert out["t5_input_ids"].shape == (512,) and out["t5_input_ids"].dtype == torch.int64
    mask = out["t5_attention_mask"]
    assert mask.shape == (512,) and mask.dtype == torch.int64
    assert out["clip_truncated"] is True and out["t5_truncated"] is True
    batch = tok.tokenize([LONG])
    assert torch.equal(out["clip_input_ids"], batch["clip_input_ids"][0])
    assert torch.equal(out["t5_input_ids"], batch["t5_input_ids"][0])
    short = tok({"caption": "a cat"})
    assert short["clip_truncated"] is False and short["t5_truncated"] is False
    assert not hasattr(tok, "counts")  # per-worker tallies never reached the trainer: flags do


class _Captions(Dataset):
    def __init__(self, tok):
        self.tok = tok

    def __len__(self):
        return len(CAPTIONS)

    def __getitem__(self, i):
        return self.tok({"caption": CAPTIONS[i]})


def test_in_dataloader_workers_and_pickled(tok):
    """Tokenizes the same after pickling (spawned workers) and in forked workers."""
    expected = tok.tokenize(CAPTIONS)
    again = pickle.loads(pickle.dumps(tok)).tokenize(CAPTIONS)
    assert torch.equal(again["t5_input_ids"], expected["t5_input_ids"])
    loader = DataLoader(_Captions(tok), batch_size=len(CAPTIONS), num_workers=2)
    (batch,) = list(loader)
    assert torch.equal(batch["clip_input_ids"], expected["clip_input_ids"])
    assert torch.equal(batch["t5_input_ids"], expected["t5_input_ids"])
    assert batch["clip_truncated"].tolist() == expected["clip_truncated"].tolist()


def test_model_constraints_agree_with_the_ladder(flux_tokenizer_dir, tok):
    from bucketing import BucketLadder
    from bucketing.ladder import MODEL_SPECS

    assert tok.multiple == 16 == BucketLadder.for_model("flux").multiple
    assert tok.t5_max_length == MODEL_SPECS["flux"].t5_max_length == 512
    schnell = FluxTokenizer.for_model("flux-schnell", flux_tokenizer_dir)
    assert schnell.t5_max_length == MODEL_SPECS["flux-schnell"].t5_max_length == 256
    assert schnell.tokenize(["a"])["t5_input_ids"].shape == (1, 256)
    for name in ("flux", "flux-schnell"):
        ladder = BucketLadder.for_model(name)
        assert (ladder.buckets % tok.multiple == 0).all()
        w, h = ladder.buckets[0]
        assert flux_image_ids(int(h), int(w)).shape == (int(h) // 16 * (int(w) // 16), 3)


def test_loads_local_folders_only_with_clear_errors(tmp_path, flux_tokenizer_dir):
    # A hub repo id is just a missing local folder: never a download.
    with pytest.raises(FileNotFoundError, match="local folders only"):
        FluxTokenizer("openai/clip-vit-large-patch14", "google/t5-v1_1-xxl")
    with pytest.raises(FileNotFoundError, match="FLUX folder not found"):
        FluxTokenizer.from_flux_dir(tmp_path / "nope")
    # tokenizer/ exists but is empty; transformers alone would build an empty tokenizer here.
    (tmp_path / "tokenizer").mkdir()
    shutil.copytree(flux_tokenizer_dir / "tokenizer_2", tmp_path / "tokenizer_2")
    with pytest.raises(FileNotFoundError, match=r"no CLIP tokenizer files.*vocab.json \+ merges"):
        FluxTokenizer.from_flux_dir(tmp_path)
    # Only a config, no vocabulary.
    shutil.copy(flux_tokenizer_dir / "tokenizer" / "tokenizer_config.json", tmp_path / "tokenizer")
    with pytest.raises(FileNotFoundError, match="no CLIP tokenizer files"):
        FluxTokenizer.from_flux_dir(tmp_path)
    (tmp_path / "tokenizer_2" / "spiece.model").unlink()
    (tmp_path / "tokenizer_2" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="no T5 tokenizer files"):
        FluxTokenizer(flux_tokenizer_dir / "tokenizer", tmp_path / "tokenizer_2")


def test_bad_arguments(flux_tokenizer_dir, tok):
    clip, t5 = flux_tokenizer_dir / "tokenizer", flux_tokenizer_dir / "tokenizer_2"
    with pytest.raises(ValueError, match="t5_max_length must be in"):
        FluxTokenizer(clip, t5, t5_max_length=513)
    with pytest.raises(ValueError, match="t5_max_length must be in"):
        FluxTokenizer(clip, t5, t5_max_length=0)
    with pytest.raises(ValueError, match="supports models"):
        FluxTokenizer(clip, t5, model="sdxl")
    with pytest.raises(KeyError, match="caption"):
        tok({"index": 0})
    with pytest.raises(TypeError, match="captions must be strings"):
        tok({"caption": None})
    with pytest.raises(ValueError, match="at least one caption"):
        tok.tokenize([])


# --------------------------------------------------------------------------- latent helpers

latent_shapes = st.tuples(*(st.integers(1, n) for n in (3, 5, 6, 6)))


@settings(deadline=None, max_examples=30)
@given(latent_shapes)
def test_pack_layout_and_round_trip(shape):
    b, c, gh, gw = shape
    h, w = 2 * gh, 2 * gw
    latents = torch.randn(b, c, h, w)
    packed = pack_latents(latents)
    assert packed.shape == (b, gh * gw, c * 4)
    # diffusers' layout: token i*(W/2)+j holds rows 2i..2i+1, cols 2j..2j+1; features (c, dy, dx)
    for i in range(gh):
        for j in range(gw):
            patch = latents[:, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].reshape(b, c * 4)
            assert torch.equal(packed[:, i * gw + j], patch)
    assert torch.equal(unpack_latents(packed, h, w), latents)


@pytest.mark.parametrize(("height", "width"), [(16, 16), (512, 768), (1024, 576), (64, 2048)])
def test_image_ids_match_packed_token_positions(height, width):
    ids = flux_image_ids(height, width)
    gh, gw = height // 16, width // 16
    assert ids.shape == (gh * gw, 3) and ids.dtype == torch.float32
    assert (ids[:, 0] == 0).all()
    # Token k of pack_latents(latents of size height/8 x width/8) sits at grid (row, col).
    rows = torch.arange(gh).repeat_interleave(gw)
    cols = torch.arange(gw).repeat(gh)
    assert torch.equal(ids[:, 1], rows.float()) and torch.equal(ids[:, 2], cols.float())
    pos = torch.stack(torch.meshgrid(torch.arange(height // 8), torch.arange(width // 8),
                                     indexing="ij")).float()[None]  # [1, 2, H/8, W/8]
    packed = pack_latents(pos)  # features: (row-channel dy dx, col-channel dy dx)
    assert torch.equal(packed[0, :, 0] / 2, ids[:, 1])  # top-left latent row / 2
    assert torch.equal(packed[0, :, 4] / 2, ids[:, 2])  # top-left latent col / 2
    assert flux_image_ids(height, width, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_latent_helpers_reject_wrong_shapes():
    with pytest.raises(ValueError, match="multiples of 16"):
        flux_image_ids(1000, 1024)
    with pytest.raises(ValueError, match="multiples of 16"):
        flux_image_ids(0, 16)
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.zeros(1, 16, 5, 4))
    with pytest.raises(ValueError, match="B, C, H, W"):
        pack_latents(torch.zeros(16, 4, 4))
    with pytest.raises(ValueError, match="does not fit"):
        unpack_latents(torch.zeros(1, 6, 64), 4, 4)


# --------------------------------------------------------------------------- SD1.5, SDXL, SD3
# diffusers' train_text_to_image.py (SD1.5), train_text_to_image_sdxl.py and
# train_text_to_image_lora_sdxl.py (tokenize_captions), train_dreambooth_sd3.py (tokenize_prompt
# for the CLIPs, _encode_prompt_with_t5 for T5) all call each tokenizer as
#     tokenizer(captions, padding="max_length", max_length=L, truncation=True,
#               return_tensors="pt")
# with L = tokenizer.model_max_length (77) for the CLIPs and max_sequence_length (77) for T5.


def diffusers_call(tokenizer, captions, max_length):
    return tokenizer(captions, padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt")


@pytest.fixture(scope="module")
def sd_tokenizers(tokenizer_dirs):
    from transforms import SD3Tokenizer, SD15Tokenizer, SDXLTokenizer

    return {
        "sd15": SD15Tokenizer.from_pretrained_dir(tokenizer_dirs["sd15"]),
        "sdxl": SDXLTokenizer.from_pretrained_dir(tokenizer_dirs["sdxl"]),
        "sd3": SD3Tokenizer.from_pretrained_dir(tokenizer_dirs["sd3"]),
    }


@pytest.fixture(scope="module")
def sd_references(tokenizer_dirs):
    """model -> [(ids key, mask key or None, reference tokenizer, max_length)], loaded as the
    diffusers scripts load them (subfolder of the checkout)."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    def clip(model, sub):
        return CLIPTokenizer.from_pretrained(tokenizer_dirs[model], subfolder=sub)

    t5 = T5TokenizerFast.from_pretrained(tokenizer_dirs["sd3"], subfolder="tokenizer_3")
    return {
        "sd15": [("input_ids", None, clip("sd15", "tokenizer"), 77)],
        "sdxl": [("input_ids_one", None, clip("sdxl", "tokenizer"), 77),
                 ("input_ids_two", None, clip("sdxl", "tokenizer_2"), 77)],
        "sd3": [("input_ids_one", None, clip("sd3", "tokenizer"), 77),
                ("input_ids_two", None, clip("sd3", "tokenizer_2"), 77),
                ("t5_input_ids", "t5_attention_mask", t5, 77)],
    }


def assert_same_as_diffusers(ours, references, captions):
    for ids_key, mask_key, ref, max_length in references:
        expected = diffusers_call(ref, captions, max_length)
        assert ours[ids_key].dtype == torch.int64
        assert torch.equal(ours[ids_key], expected.input_ids), ids_key
        if mask_key is not None:
            assert torch.equal(ours[mask_key], expected.attention_mask), mask_key


@pytest.mark.parametrize("model", ["sd15", "sdxl", "sd3"])
def test_sd_tokenizers_same_ids_as_diffusers(sd_tokenizers, sd_references, model):
    ours = sd_tokenizers[model].tokenize(CAPTIONS)
    assert_same_as_diffusers(ours, sd_references[model], CAPTIONS)
    assert ours["clip_truncated"].tolist() == [n > 77 for n in ours["clip_lengths"].tolist()]
    assert ours["clip_truncated"][CAPTIONS.index(LONG)]


@settings(deadline=None, max_examples=15)
@given(st.lists(st.text(max_size=300), min_size=1, max_size=3))
def test_sd_tokenizers_random_text_matches_diffusers(sd_tokenizers, sd_references, captions):
    for model in ("sdxl", "sd3"):
        assert_same_as_diffusers(sd_tokenizers[model].tokenize(captions), sd_references[model],
                                 captions)


def test_sdxl_second_tokenizer_pads_with_exclamation_mark(sd_tokenizers):
    """SDXL's (and SD3's) OpenCLIP bigG tokenizer pads with "!" (id 0), CLIP-L with its end
    token; both end the text with <|endoftext|> and keep the same BPE."""
    for model in ("sdxl", "sd3"):
        tok = sd_tokenizers[model]
        out = tok({"caption": "a photo of a cat"})
        one, two = out["input_ids_one"], out["input_ids_two"]
        assert one.shape == two.shape == (77,)
        assert tok.clip_2.convert_ids_to_tokens(int(two[-1])) == "!" and int(two[-1]) == 0
        assert int(one[-1]) == tok.clip.eos_token_id == 49407
        n = int((one != 49407).sum()) + 1  # content + EOS
        assert torch.equal(one[:n], two[:n])
        assert out["clip_truncated"] is False and out["clip_2_truncated"] is False


def test_sd3_t5_length_and_sample_contract(sd_tokenizers, tokenizer_dirs):
    from transforms import SD3Tokenizer

    out = sd_tokenizers["sd3"]({"caption": LONG, "index": 3})
    assert out["index"] == 3 and out["t5_input_ids"].shape == (77,)
    assert out["t5_truncated"] is True and out["t5_attention_mask"].all()
    longer = SD3Tokenizer.from_pretrained_dir(tokenizer_dirs["sd3"], t5_max_length=256)
    assert longer.tokenize(["a"])["t5_input_ids"].shape == (1, 256)
    with pytest.raises(ValueError, match="t5_max_length must be in"):
        SD3Tokenizer.from_pretrained_dir(tokenizer_dirs["sd3"], t5_max_length=1000)


def test_tokenizer_for_model_and_multiples(tokenizer_dirs):
    from bucketing import BucketLadder
    from transforms import SD3Tokenizer, SD15Tokenizer, SDXLTokenizer, tokenizer_for_model

    kinds = {"flux": FluxTokenizer, "flux-schnell": FluxTokenizer, "sd15": SD15Tokenizer,
             "sdxl": SDXLTokenizer, "sd3": SD3Tokenizer}
    for model, cls in kinds.items():
        folder = tokenizer_dirs["flux" if model.startswith("flux") else model]
        tok = tokenizer_for_model(model, folder)
        assert type(tok) is cls and tok.model == model
        assert tok.multiple == BucketLadder.for_model(model).multiple
        assert cls.__name__ in repr(tok)
    with pytest.raises(ValueError, match="no tokenizer for model 'kandinsky'"):
        tokenizer_for_model("kandinsky", tokenizer_dirs["sd15"])
    with pytest.raises(FileNotFoundError, match="SDXL folder not found"):
        tokenizer_for_model("sdxl", tokenizer_dirs["sd15"] / "nope")
    with pytest.raises(FileNotFoundError, match="CLIP tokenizer folder not found"):
        tokenizer_for_model("sdxl", tokenizer_dirs["sd15"])  # no tokenizer_2/


# --------------------------------------------------------------------------- SDXL time ids

pairs = st.tuples(st.integers(0, 8192), st.integers(0, 8192))


def diffusers_compute_time_ids(original_size, crops_coords_top_left, target_size):
    """compute_time_ids of diffusers' SDXL training scripts, with the bucket as target size
    (the scripts use (resolution, resolution): one square bucket)."""
    add_time_ids = list(original_size + crops_coords_top_left + target_size)
    return torch.tensor([add_time_ids])


@settings(deadline=None, max_examples=30)
@given(st.lists(st.tuples(pairs, pairs, pairs), min_size=1, max_size=5))
def test_sdxl_add_time_ids_equals_the_training_scripts(rows):
    from transforms import sdxl_add_time_ids

    batch = {"original_size": torch.tensor([r[0] for r in rows]),
             "crop_top_left": torch.tensor([r[1] for r in rows]),
             "target_size": torch.tensor([r[2] for r in rows])}
    expected = torch.cat([diffusers_compute_time_ids(*r) for r in rows]).float()
    got = sdxl_add_time_ids(batch)
    assert got.shape == (len(rows), 6) and got.dtype == torch.float32
    assert torch.equal(got, expected)
    assert sdxl_add_time_ids(batch, dtype=torch.bfloat16).dtype == torch.bfloat16
    one = {key: tuple(value[0].tolist()) for key, value in batch.items()}  # one sample's tuples
    assert torch.equal(sdxl_add_time_ids(one), expected[:1])


def test_sdxl_add_time_ids_from_the_dataset(examples_dir, tmp_path):
    """Through the real pipeline: sizes of the collated batch, (h, w) / (y, x) order."""
    from PIL import Image, ImageOps

    from bucketing import BucketLadder, TextToImageDataset, assign, scan
    from transforms import BucketResizeCrop, collate, sdxl_add_time_ids

    index = scan(examples_dir, workers=1)
    assignment = assign(index, BucketLadder.for_model("sdxl", max_area=256 * 256))
    rows = [i for i in range(len(index)) if assignment.bucket_id[i] >= 0][:3]
    dataset = TextToImageDataset(index, assignment, image_transform=BucketResizeCrop())
    for i in rows:
        sample = dataset[i]
        ids = sdxl_add_time_ids(collate([sample]))[0].tolist()
        with Image.open(index.paths[i]) as img:
            w, h = ImageOps.exif_transpose(img).size
        bw, bh = (int(v) for v in assignment.bucket_wh[i])
        y, x = sample["crop_top_left"]
        assert ids == [h, w, y, x, bh, bw]
    with pytest.raises(KeyError, match="crop_top_left"):
        sdxl_add_time_ids({"original_size": [(1, 2)], "target_size": [(1, 2)]})
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        sdxl_add_time_ids({"original_size": [(1, 2)], "crop_top_left": [(0, 0), (0, 0)],
                           "target_size": [(1, 2)]})


# --------------------------------------------------------------------------- FLUX time shift


@pytest.mark.parametrize(("height", "width"), [(256, 256), (512, 768), (1024, 1024),
                                               (1024, 576), (2048, 2048), (16, 16)])
def test_time_shift_mu_equals_diffusers(height, width):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from transforms import flux_time_shift_mu, shift_timesteps

    # FLUX.1-dev's scheduler_config.json (the values diffusers' FluxPipeline reads).
    config = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5,
              "max_shift": 1.15, "use_dynamic_shifting": True, "shift": 3.0}
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    image_seq_len = pack_latents(torch.zeros(1, 16, height // 8, width // 8)).shape[1]
    expected = calculate_shift(image_seq_len, scheduler.config.base_image_seq_len,
                               scheduler.config.max_image_seq_len, scheduler.config.base_shift,
                               scheduler.config.max_shift)
    mu = flux_time_shift_mu(height, width)
    assert mu == pytest.approx(expected, rel=1e-12, abs=1e-12)
    t = torch.linspace(0.01, 1.0, 50, dtype=torch.float64)
    assert torch.allclose(shift_timesteps(t, mu), scheduler.time_shift(mu, 1.0, t))
    shifted = shift_timesteps(t, mu)
    assert (shifted[1:] > shifted[:-1]).all() and shifted[-1] == 1.0  # monotone, keeps t=1


def test_time_shift_grows_with_resolution_and_refuses_models_without_it():
    from transforms import flux_time_shift_mu

    mus = [flux_time_shift_mu(s, s) for s in (256, 512, 768, 1024)]
    assert mus == sorted(mus) and mus[0] == pytest.approx(0.5) and mus[3] == pytest.approx(1.15)
    with pytest.raises(ValueError, match="no resolution-dependent timestep shift"):
        flux_time_shift_mu(1024, 1024, model="flux-schnell")
    with pytest.raises(ValueError, match="no resolution-dependent timestep shift"):
        flux_time_shift_mu(1024, 1024, model="sd99")
    with pytest.raises(ValueError, match="multiples of 16"):
        flux_time_shift_mu(1000, 1024)
