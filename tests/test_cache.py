"""The encoder cache on tiny random real FLUX/SDXL encoders: cached samples equal on-the-fly
encoding of the dataset's own crops, incremental and resumable builds encode exactly what is
missing, a SIGKILLed build resumes, a 2-rank torchrun build equals a 1-process build."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from captioned_photos import write_captioned_photos
from safetensors import safe_open

from bucketing import BucketLadder, EncoderCache, TextToImageDataset, assign, build_cache, scan
from bucketing.cli.cache import main as cache_main
from bucketing.pipeline.encoder_cache import estimate_bytes
from samplers import BucketBatchSampler
from transforms import BucketResizeCrop, FluxEncoders, SD3Encoders, SDXLEncoders, collate
from transforms.image import DecodeSettings, ImageDecodeError, load_image
from transforms.resize_crop import fit

REPO = Path(__file__).resolve().parent.parent
SIZES = [(80, 64), (64, 80), (96, 64), (70, 50), (50, 70), (64, 64)]
LADDER = BucketLadder.from_buckets([(32, 32), (48, 32), (32, 48)], multiple=16)
T5_LENGTH = 32


def write_images(folder: Path, sizes=SIZES, seed: int = 0) -> Path:
    return write_captioned_photos(folder, sizes, seed)


@pytest.fixture()
def photos(tmp_path) -> Path:
    return write_images(tmp_path / "photos")


def _index(folder: Path, ladder=LADDER):
    index = scan(str(folder), workers=1)
    return index, assign(index, ladder)


def _build(index, assignment, enc, path, **kw):
    return build_cache(index, assignment, enc, path, progress=False, **kw)


def test_cached_samples_equal_encoding_the_datasets_own_crops(photos, tmp_path, flux):
    index, assignment = _index(photos)
    cache = _build(index, assignment, flux, tmp_path / "c", flip_p=0.5, shard_size=3)
    assert cache.build_stats["latents_encoded"] == 2 * len(SIZES)  # and each flipped
    assert cache.build_stats["texts_encoded"] == 4  # 3 distinct captions + the empty one
    cached = TextToImageDataset(index, assignment, encoder_cache=cache, seed=5)
    pixels = TextToImageDataset(index, assignment, seed=5,
                                image_transform=BucketResizeCrop(flip_p=0.5))
    flips = set()
    for epoch in range(1):
        cached.set_epoch(epoch)
        pixels.set_epoch(epoch)
        for i in range(len(index)):
            a, b = cached[i], pixels[i]
            assert "pixel_values" not in a
            for key in ("fit", "original_size", "crop_top_left", "target_size", "flipped",
                        "caption"):
                assert a[key] == b[key], key
            flips.add(a["flipped"])
            expected = flux.encode_images(b["pixel_values"][None])[0]
            torch.testing.assert_close(a["latents"], expected, rtol=1e-5, atol=1e-5)
            text = flux.encode_text([b["caption"]])
            n = int(text["text_lengths"][0])
            assert a["text_length"] == n and a["prompt_embeds"].shape == (n, 8)
            assert a["t5_attention_mask"].tolist() == [1] * n
            torch.testing.assert_close(a["prompt_embeds"], text["prompt_embeds"][0, :n])
            torch.testing.assert_close(a["pooled_prompt_embeds"], text["pooled_prompt_embeds"][0])
    assert flips == {False, True}


def test_full_t5_padding_is_bit_identical_to_the_pipeline(photos, tmp_path, flux):
    from diffusers import FluxPipeline

    index, assignment = _index(photos)
    cache = _build(index, assignment, flux, tmp_path / "c", t5_padding="full", text_batch_size=1)
    pipe = FluxPipeline(scheduler=None, vae=flux.vae, text_encoder=flux.text_encoder,
                        text_encoder_2=flux.text_encoder_2, tokenizer=flux.tokenizer,
                        tokenizer_2=flux.tokenizer_2, transformer=None)
    for caption in ("a photo number 1", ""):
        embeds, pooled, _ = pipe.encode_prompt([caption], device="cpu",
                                               max_sequence_length=T5_LENGTH)
        stored = cache.text_sample(caption)
        assert torch.equal(stored["prompt_embeds"], embeds[0])
        assert torch.equal(stored["pooled_prompt_embeds"], pooled[0])
        assert stored["t5_attention_mask"].shape == (T5_LENGTH,)
        assert stored["t5_attention_mask"].sum() == stored["text_length"]
    trimmed = _build(index, assignment, flux, tmp_path / "t").text_sample("a photo number 1")
    n = trimmed["text_length"]
    assert torch.equal(trimmed["prompt_embeds"],
                       cache.text_sample("a photo number 1")["prompt_embeds"][:n])


def test_random_crops_cache_k_variants_the_dataset_picks_from(photos, tmp_path, flux):
    index, assignment = _index(photos)
    cache = _build(index, assignment, flux, tmp_path / "c", crop="random", variants=3, seed=1)
    ds = TextToImageDataset(index, assignment, encoder_cache=cache)
    r = cache.rows  # images that fill their bucket exactly once resized have one crop
    fixed = [r["row"][k] for k in range(len(cache)) if (r["resized_w"][k], r["resized_h"][k])
             == (r["bucket_w"][k], r["bucket_h"][k])]
    seen: dict[int, set] = {}
    for epoch in range(12):
        ds.set_epoch(epoch)
        for i in range(len(index)):
            s = ds[i]
            seen.setdefault(i, set()).add(s["crop_top_left"])
            if epoch == 0:  # the stored latent is the encoding of that crop of the file
                px = fit(load_image(index.paths[i]), s["fit"])
                torch.testing.assert_close(s["latents"], flux.encode_images(px[None])[0],
                                           rtol=1e-5, atol=1e-5)
    assert fixed and all(len(seen[row]) == 1 for row in fixed)
    assert all(len(cache.latents(p)) == 3 for p in index.paths)  # K variants, no flips
    assert max(len(v) for v in seen.values()) > 1  # images with room to move get variants
    assert all(len(v) <= 3 for v in seen.values())
    with pytest.raises(ValueError, match="crop='random'"):
        _build(index, assignment, flux, tmp_path / "x", variants=2)


def test_rebuilds_encode_exactly_what_changed(photos, tmp_path, flux):
    index, assignment = _index(photos)
    out = tmp_path / "c"
    first = _build(index, assignment, flux, out, flip_p=0.5)
    assert first.build_stats["latents_encoded"] == 12
    assert _build(index, assignment, flux, out, flip_p=0.5).build_stats == {
        **first.build_stats, "latents_encoded": 0, "texts_encoded": 0}

    write_images(photos, [(90, 60)], seed=7)  # overwrites im0 (new size + mtime)
    (photos / "extra.png").write_bytes((photos / "im1.png").read_bytes())
    (photos / "extra.txt").write_text("a brand new caption")
    index, assignment = _index(photos)
    stats = _build(index, assignment, flux, out, flip_p=0.5).build_stats
    assert (stats["latents_encoded"], stats["texts_encoded"]) == (4, 1)  # 2 images x 2 flips

    (photos / "im3.txt").write_text("a changed caption")
    index, assignment = _index(photos)
    stats = _build(index, assignment, flux, out, flip_p=0.5).build_stats
    assert (stats["latents_encoded"], stats["texts_encoded"]) == (0, 1)

    ladder = BucketLadder.from_buckets([(32, 32), (48, 32), (32, 48), (64, 64)], multiple=16)
    moved_index, moved = _index(photos, ladder)
    changed = int(np.count_nonzero(np.any(moved.bucket_wh != assignment.bucket_wh, axis=1)))
    assert 0 < changed < len(index)
    stats = _build(moved_index, moved, flux, out, flip_p=0.5).build_stats
    assert (stats["latents_encoded"], stats["texts_encoded"]) == (2 * changed, 0)


def test_other_weights_are_never_used(photos, tmp_path, flux, tiny_encoders_dirs):
    index, assignment = _index(photos)
    out = tmp_path / "c"
    cache = _build(index, assignment, flux, out)
    other = FluxEncoders.from_pretrained(tiny_encoders_dirs["flux"], dtype=torch.float32,
                                         max_sequence_length=T5_LENGTH)
    with torch.no_grad():
        other.vae.encoder.conv_in.bias += 0.5
    with pytest.raises(ValueError, match="other encoder weights"):
        cache.check(other)
    cache.check(flux)
    stats = _build(index, assignment, other, out).build_stats
    assert (stats["latents_encoded"], stats["texts_encoded"]) == (len(SIZES), 0)
    again = EncoderCache.open(out)
    again.check(other)
    sample = TextToImageDataset(index, assignment, encoder_cache=again)[0]
    pixels = TextToImageDataset(index, assignment, image_transform=BucketResizeCrop())[0]
    torch.testing.assert_close(sample["latents"],
                               other.encode_images(pixels["pixel_values"][None])[0])


def test_open_refuses_what_is_not_a_cache(photos, tmp_path, flux):
    with pytest.raises(FileNotFoundError, match="not an encoder cache"):
        EncoderCache.open(tmp_path)
    index, assignment = _index(photos)
    out = tmp_path / "c"
    _build(index, assignment, flux, out)
    meta = json.loads((out / "cache.json").read_text())
    (out / "cache.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        EncoderCache.open(out)
    (out / "cache.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        EncoderCache.open(out)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="nothing there is overwritten"):
        _build(index, assignment, flux, user)
    assert (user / "notes.txt").read_text() == "keep me" and sorted(os.listdir(user)) == [
        "notes.txt"]


def test_missing_entries_are_substituted_like_failed_decodes(photos, tmp_path, flux):
    index, assignment = _index(photos)
    cache = _build(index, assignment, flux, tmp_path / "c", shard_size=1)
    victim = cache.rows["latent_keys"][0][0]
    shard = cache._entries[victim]
    (tmp_path / "c" / "shards" / shard).unlink()
    ds = TextToImageDataset(index, assignment, encoder_cache=EncoderCache.open(tmp_path / "c"))
    with pytest.warns(UserWarning, match="replaced by row"):
        sample = ds[0]
    assert sample["substituted"] and sample["index"] != 0
    assert tuple(assignment.bucket_wh[sample["index"]]) == tuple(assignment.bucket_wh[0])
    bw, bh = assignment.bucket_wh[0]
    assert sample["latents"].shape == (16, bh // 8, bw // 8)
    strict = TextToImageDataset(index, assignment, encoder_cache=ds.encoder_cache,
                                on_error="raise")
    with pytest.raises(Exception, match="not in the cache"):
        strict[0]


def test_a_dataloader_batches_cached_samples(photos, tmp_path, flux):
    index, assignment = _index(photos)
    cache = _build(index, assignment, flux, tmp_path / "c")
    ds = TextToImageDataset(index, assignment, encoder_cache=cache)
    sampler = BucketBatchSampler(assignment, batch_size=2, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=2,
                                         collate_fn=collate)
    seen = []
    for batch in loader:
        b = batch["latents"].shape[0]
        assert batch["latents"].shape[1] == 16
        assert batch["prompt_embeds"].shape[:2] == batch["t5_attention_mask"].shape
        assert batch["t5_attention_mask"].sum(1).tolist() == batch["text_length"].tolist()
        assert batch["pooled_prompt_embeds"].shape == (b, 8)
        seen += batch["index"].tolist()
    assert set(seen) == set(range(len(index)))
    resident = EncoderCache.open(tmp_path / "c").to("cpu")
    on_device = TextToImageDataset(index, assignment, encoder_cache=resident)
    assert torch.equal(on_device[3]["latents"], ds[3]["latents"])
    assert resident._resident and all(t.device.type == "cpu" for t in resident._resident.values())


def test_prune_removes_only_what_the_view_does_not_use(photos, tmp_path, flux):
    index, assignment = _index(photos)
    out = tmp_path / "c"
    _build(index, assignment, flux, out, shard_size=4)
    for name in ("im0.txt", "im3.txt"):  # the only two with "a photo number 0"
        (photos / name).write_text("a new caption")
    index, assignment = _index(photos)
    cache = _build(index, assignment, flux, out, shard_size=4)
    before = len(cache._entries)
    result = cache.prune()
    assert result == {"removed": 1, "rewritten": 1}  # the 4 texts shared one shard
    assert before - len(cache._entries) == 1
    reopened = EncoderCache.open(out)
    assert set(reopened._entries) == reopened.referenced()
    ds = TextToImageDataset(index, assignment, encoder_cache=reopened, on_error="raise")
    assert all(not ds[i]["substituted"] for i in range(len(index)))


@pytest.mark.parametrize(("model", "channels", "rows"), [("sdxl", 4, 77), ("sd3", 16, 77 + 20)])
def test_sdxl_and_sd3_caches_keep_every_text_row(photos, tmp_path, tiny_encoders_dirs, model,
                                                 channels, rows):
    enc = (SDXLEncoders.from_pretrained(tiny_encoders_dirs["sdxl"]) if model == "sdxl" else
           SD3Encoders.from_pretrained(tiny_encoders_dirs["sd3"], dtype=torch.float32,
                                       max_sequence_length=20))
    index, assignment = _index(photos)
    cache = _build(index, assignment, enc, tmp_path / "c")
    sample = TextToImageDataset(index, assignment, encoder_cache=cache)[1]
    expected = enc.encode_text([sample["caption"]])
    assert sample["latents"].shape[0] == channels
    assert sample["prompt_embeds"].shape == expected["prompt_embeds"].shape[1:]
    assert sample["prompt_embeds"].shape[0] == rows
    assert "t5_attention_mask" not in sample
    torch.testing.assert_close(sample["prompt_embeds"], expected["prompt_embeds"][0])
    torch.testing.assert_close(sample["pooled_prompt_embeds"],
                               expected["pooled_prompt_embeds"][0])
    batch = collate([sample, sample])
    assert batch["prompt_embeds"].shape[:2] == (2, rows) and "t5_attention_mask" not in batch


def test_estimate_matches_a_built_cache(photos, tmp_path, flux):
    index, assignment = _index(photos)
    cache = _build(index, assignment, flux, tmp_path / "c", flip_p=0.5)
    built = sum(cache._tensor(k, "latents").nbytes for keys in cache.rows["latent_keys"]
                for k in keys)
    est = estimate_bytes(assignment.bucket_wh, [], "flux", dtype_bytes=4, flip=True)
    assert est["latents"] == built
    # the real FLUX at 1024²: a 512 KiB bf16 latent; a full T5 sequence 4 MiB
    big = estimate_bytes(np.array([[1024, 1024]]), ["x"], "flux", t5_padding="full")
    assert big["latents"] == 512 * 1024 and big["texts"] == (512 * 4096 + 768) * 2 + 8
    trimmed = estimate_bytes(np.array([[1024, 1024]]), ["x"], "flux", text_lengths=np.array([40]))
    assert trimmed["texts"] == (40 * 4096 + 768) * 2 + 8


def _shards(out: Path) -> list[Path]:
    return sorted((out / "shards").glob("*.safetensors")) if (out / "shards").is_dir() else []


SLOW_BUILD = """
import sys, time, torch
from bucketing import assign, build_cache, scan, BucketLadder
from transforms import FluxEncoders

class Slow(FluxEncoders):
    def encode_images(self, pixels):
        time.sleep(0.3)
        return super().encode_images(pixels)

photos, weights, out = sys.argv[1:4]
index = scan(photos, workers=1)
ladder = BucketLadder.from_buckets([(32, 32), (48, 32), (32, 48)], multiple=16)
flux = FluxEncoders.from_pretrained(weights, dtype=torch.float32, max_sequence_length=32)
enc = Slow(flux.vae, flux.text_encoder, flux.text_encoder_2, flux.tokenizer, flux.tokenizer_2,
           max_sequence_length=32)
build_cache(index, assign(index, ladder), enc, out, batch_size=1, shard_size=1, progress=False)
print("done")
"""


def test_sigkill_during_a_build_then_rebuild(photos, tmp_path, flux, tiny_encoders_dirs):
    out = tmp_path / "c"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_BUILD, str(photos),
                             str(tiny_encoders_dirs["flux"]), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while len(_shards(out)) < 6 and time.monotonic() < deadline:  # 4 texts + 2 images
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    kept = _shards(out)
    assert 6 <= len(kept) < 4 + len(SIZES)  # killed mid-build, after some images
    for shard in kept:  # every shard on disk is whole
        with safe_open(str(shard), "pt") as f:
            assert len(f.keys()) >= 1
    with pytest.raises(FileNotFoundError, match="not an encoder cache"):
        EncoderCache.open(out)  # a build that never finished is not a cache yet
    index, assignment = _index(photos)
    done_latents = len(kept) - 4
    cache = _build(index, assignment, flux, out, batch_size=1)
    assert cache.build_stats["texts_encoded"] == 0
    assert cache.build_stats["latents_encoded"] == len(SIZES) - done_latents
    clean = _build(index, assignment, flux, tmp_path / "clean", batch_size=1)
    _assert_same_cache(cache, clean, index, assignment)


def _assert_same_cache(a: EncoderCache, b: EncoderCache, index, assignment) -> None:
    assert a.rows["latent_keys"] == b.rows["latent_keys"] and a._texts == b._texts
    da = TextToImageDataset(index, assignment, encoder_cache=a, on_error="raise")
    db = TextToImageDataset(index, assignment, encoder_cache=b, on_error="raise")
    for i in range(len(index)):
        sa, sb = da[i], db[i]
        for key in ("latents", "prompt_embeds", "pooled_prompt_embeds"):
            assert torch.equal(sa[key], sb[key]), (i, key)


@pytest.mark.slow
def test_two_rank_torchrun_build_equals_one_process(photos, tmp_path, flux, tiny_encoders_dirs):
    out = tmp_path / "ddp"
    script = REPO / "tests" / "distributed" / "cache_build.py"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         "--nproc_per_node=2", str(script), str(photos), str(tiny_encoders_dirs["flux"]), str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = _shards(out)
    assert {s.name.split("-")[0] for s in shards} == {"r0", "r1"}  # both ranks encoded
    stats = json.loads((out / "stats.json").read_text())
    assert stats["latents_encoded"] == len(SIZES) and stats["texts_encoded"] == 4
    index, assignment = _index(photos)
    one = _build(index, assignment, flux, tmp_path / "one", batch_size=1, text_batch_size=1)
    _assert_same_cache(EncoderCache.open(out), one, index, assignment)


def test_bucket_cache_command(photos, tmp_path, tiny_encoders_dirs, capsys):
    out = tmp_path / "c"
    argv = [str(photos), "--model", "flux", "--weights", str(tiny_encoders_dirs["flux"]),
            "--out", str(out), "--dtype", "float32", "--t5-length", str(T5_LENGTH),
            "--max-area", "48x32", "--levels", "32", "--flip-p", "0.5", "--loader-workers", "0"]
    assert cache_main(argv) == 0
    text = capsys.readouterr().out
    assert "12 latents encoded" in text and "4 captions encoded" in text
    assert cache_main([*argv, "--prune"]) == 0
    assert "0 latents encoded" in capsys.readouterr().out
    assert cache_main([str(photos), "--weights", str(tmp_path / "nowhere"), "--out",
                       str(out)]) == 2
    assert "nowhere" in capsys.readouterr().err
    shutil.rmtree(out)


def test_report_estimates_the_cache_before_it_is_built(photos, capsys, flux_tokenizer_dir):
    from bucketing.cli.report import main as report_main

    args = [str(photos), "--max-area", "48x32", "--levels", "32", "--estimate-cache"]
    assert report_main([*args, "--tokenizers", str(flux_tokenizer_dir)]) == 0
    out = capsys.readouterr().out
    index, assignment = _index(photos)
    full = estimate_bytes(assignment.bucket_wh, sorted({c[0] for c in index.captions} | {""}),
                          "flux", t5_padding="full")
    assert "Encoder cache estimate" in out and "(trimmed)" in out
    assert f"{full['total'] / 2**20:.1f} MiB (full)" in out
    assert report_main([str(photos), "--model", "sd15", "--estimate-cache"]) == 0
    assert "no size table for 'sd15'" in capsys.readouterr().out


def test_caption_dropout_works_and_uncacheable_captions_are_refused(photos, tmp_path, flux):
    from transforms import CaptionTransform

    index, assignment = _index(photos)
    cache = _build(index, assignment, flux, tmp_path / "c")
    dropped = TextToImageDataset(index, assignment, encoder_cache=cache,
                                 caption_transform=CaptionTransform(dropout=1.0))[0]
    assert dropped["caption"] == "" and dropped["text_length"] == 1  # only </s>
    empty = flux.encode_text([""])["prompt_embeds"][0, :1]
    torch.testing.assert_close(dropped["prompt_embeds"], empty)
    with pytest.raises(ValueError, match="formats them with .*'sks, '.*rebuild it"):
        TextToImageDataset(index, assignment, encoder_cache=cache,  # refused before any worker
                           caption_transform=CaptionTransform(prefix="sks, "))
    with pytest.raises(ValueError, match="'sks, a photo number 0' is not in the cache"):
        cache.text_sample("sks, a photo number 0")
    with pytest.raises(ValueError, match="shuffles parts or drops tags"):
        TextToImageDataset(index, assignment, encoder_cache=cache,
                           caption_transform=CaptionTransform(shuffle_parts=True))


def test_images_embedded_in_a_hf_dataset_are_keyed_by_their_bytes(photos, tmp_path, flux):
    datasets = pytest.importorskip("datasets")
    files = sorted(photos.glob("*.png"))[:3]
    ds = datasets.Dataset.from_dict({
        "image": [{"bytes": f.read_bytes(), "path": None} for f in files],
        "text": ["one", "two", "three"],
    }).cast_column("image", datasets.Image())
    index = scan(ds, workers=1)
    assert index.blob is not None and len(index) == 3
    assignment = assign(index, LADDER)
    cache = _build(index, assignment, flux, tmp_path / "c")
    assert cache.build_stats["latents_encoded"] == 3
    sample = TextToImageDataset(index, assignment, encoder_cache=cache, on_error="raise")[1]
    pixels = TextToImageDataset(index, assignment, image_transform=BucketResizeCrop())[1]
    torch.testing.assert_close(sample["latents"],
                               flux.encode_images(pixels["pixel_values"][None])[0])
    assert _build(index, assignment, flux, tmp_path / "c").build_stats["latents_encoded"] == 0


def test_the_build_refuses_what_the_dataset_refuses(photos, tmp_path, flux):
    """The build decodes with the dataset's DecodeSettings: the same limits refuse the same
    files (recorded as failed, not encoded), the others are encoded."""
    index, assignment = _index(photos)
    limits = DecodeSettings(max_pixels=5000)  # the 80x64, 64x80 and 96x64 images are over
    cache = _build(index, assignment, flux, tmp_path / "c", decode=limits)
    failed = cache.build_stats["failed"]
    assert len(failed) == 3 and all("too_many_pixels" in f for f in failed), failed
    assert cache.build_stats["latents_encoded"] == len(SIZES) - 3
    pixels = TextToImageDataset(index, assignment, image_transform=BucketResizeCrop(),
                                max_pixels=5000, on_error="raise")
    assert pixels.decode == limits
    refused = set()
    for i in range(len(index)):
        try:
            pixels[i]
        except ImageDecodeError:
            refused.add(index.paths[i])
    assert refused == {f.split(": ")[0] for f in failed}
