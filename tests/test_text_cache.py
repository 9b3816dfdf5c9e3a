"""The text-only encoder cache: pixels fitted per occurrence, embeddings from the cache."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from test_cache import LADDER, T5_LENGTH, write_images
from torch.utils.data import DataLoader

from bucketing import EncoderCache, TextToImageDataset, assign, build_cache, scan
from samplers import BucketBatchSampler
from transforms import BucketResizeCrop, CaptionTransform, FluxEncoders

TEMPLATE = "a picture of sks, {caption}"


@pytest.fixture(scope="module")
def flux(tiny_encoders_dirs) -> FluxEncoders:
    return FluxEncoders.from_pretrained(
        tiny_encoders_dirs["flux"], dtype=torch.float32, max_sequence_length=T5_LENGTH
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory, flux):
    root = tmp_path_factory.mktemp("text-only")
    index = scan(str(write_images(root / "photos")), workers=1)
    assignment = assign(index, LADDER)
    cache = build_cache(index, assignment, flux, root / "cache", images=False, progress=False,
                        caption_transform=CaptionTransform(template=TEMPLATE))
    return index, assignment, cache


def test_a_text_only_cache_holds_the_final_captions_and_no_latents(built):
    index, _, cache = built
    reopened = EncoderCache.open(cache.root)
    assert not reopened.images and len(reopened) == 0
    assert cache.build_stats["latents_total"] == 0 and cache.build_stats["missing_files"] == 0
    expected = {TEMPLATE.replace("{caption}", c) for caps in index.captions for c in caps}
    assert set(reopened._texts) == expected | {""}
    names = [n for shard in (cache.root / "shards").glob("*.safetensors")
             for n in safe_open(str(shard), "pt").keys()]  # noqa: SIM118
    assert names and not [n for n in names if n.endswith(".latents")]


def test_pixels_are_fitted_per_occurrence_and_text_comes_from_the_cache(built, flux):
    index, assignment, cache = built
    dataset = TextToImageDataset(
        index, assignment, encoder_cache=cache, seed=1,
        image_transform=BucketResizeCrop(crop="random", flip_p=0.5),
        caption_transform=CaptionTransform(dropout=0.3, template=TEMPLATE))
    sampler = BucketBatchSampler(assignment, batch_size=2, seed=1)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=list, num_workers=2)
    by_epoch = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        by_epoch.append({s["index"]: s for batch in loader for s in batch})
    assert set(by_epoch[0]) == set(by_epoch[1]) == set(range(len(index)))
    # fresh crops and flips every epoch: the same image is fitted differently
    differ = [i for i in by_epoch[0] if not torch.equal(by_epoch[0][i]["pixel_values"],
                                                        by_epoch[1][i]["pixel_values"])]
    assert differ
    captions = [s["caption"] for e in by_epoch for s in e.values()]
    assert "" in captions and any(c.startswith("a picture of sks") for c in captions)
    encoded = flux.encode_text(captions)
    for j, s in enumerate(s for e in by_epoch for s in e.values()):
        n = int(encoded["text_lengths"][j])
        assert s["pixel_values"].dtype == torch.uint8 and "latents" not in s
        assert s["text_length"] == n
        torch.testing.assert_close(s["prompt_embeds"], encoded["prompt_embeds"][j, :n])
        torch.testing.assert_close(s["pooled_prompt_embeds"],
                                   encoded["pooled_prompt_embeds"][j])


def test_uncached_caption_variants_are_refused_with_a_clear_error(built):
    index, assignment, cache = built
    fit = BucketResizeCrop()
    with pytest.raises(ValueError, match="shuffles parts or drops tags"):
        TextToImageDataset(index, assignment, encoder_cache=cache, image_transform=fit,
                           caption_transform=CaptionTransform(shuffle_parts=True))
    with pytest.raises(ValueError, match="shuffles parts or drops tags"):
        build_cache(index, assignment, None, cache.root,
                    caption_transform=CaptionTransform(tag_dropout=0.2))
    with pytest.raises(ValueError, match="rebuild it with build_cache"):  # another format
        TextToImageDataset(index, assignment, encoder_cache=cache, image_transform=fit)
    with pytest.raises(ValueError, match="is not in the cache"):  # a caption no build listed
        cache.text_sample("a caption the index never had")
    with pytest.raises(TypeError, match="image_transform"):
        TextToImageDataset(index, assignment, encoder_cache=cache)  # pixels need a fit
