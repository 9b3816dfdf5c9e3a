"""CaptionTransform: determinism, part shuffle invariants, dropout rate, tag dropout, templates,
validation."""

from __future__ import annotations

import math
import shutil
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bucketing import BucketLadder, TextToImageDataset, assign, scan
from transforms import BucketResizeCrop, CaptionTransform
from transforms.caption import shuffle_parts, split_parts
from transforms.rng import sample_rng

# Parts without the separator and without outer whitespace, so that split/join is lossless.
part = st.text(
    alphabet=st.characters(
        blacklist_characters=",", blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc")
    ),
    min_size=1,
    max_size=8,
)
parts_list = st.lists(part, min_size=0, max_size=12)
captions_list = st.lists(st.text(max_size=40), min_size=0, max_size=5)
seeds = st.integers(0, 2**32 - 1)


def rng(seed: int, index: int = 0, epoch: int = 0) -> np.random.Generator:
    return sample_rng(seed, epoch, index, "caption")


@settings(deadline=None, max_examples=60)
@given(captions=captions_list, seed=seeds, dropout=st.floats(0, 1), keep=st.integers(0, 3))
def test_same_rng_seed_gives_same_caption(captions, seed, dropout, keep):
    t = CaptionTransform(dropout=dropout, shuffle_parts=True, keep_parts=keep, prefix="sks ")
    assert t(captions, rng(seed)) == t(captions, rng(seed))
    # the dataset's form: the sample in, the sample out with its caption set
    sample = t({"captions": captions, "rng": rng(seed), "index": 3})
    assert sample["caption"] == t(captions, rng(seed)) and sample["index"] == 3


@settings(deadline=None, max_examples=60)
@given(parts=parts_list, keep=st.integers(0, 14), seed=seeds)
def test_shuffle_keeps_first_parts_and_the_multiset(parts, keep, seed):
    caption = ",".join(parts)
    out = CaptionTransform(shuffle_parts=True, keep_parts=keep)([caption], rng(seed))
    got = split_parts(out)
    assert got[:keep] == parts[:keep]
    assert Counter(got) == Counter(parts)
    assert out == ", ".join(got)  # re-joined with "sep " exactly


def test_shuffle_normalises_whitespace_and_drops_empty_parts():
    out = shuffle_parts("  a ,b,, c  ,", np.random.default_rng(0), keep_parts=3)
    assert out == "a, b, c"
    assert shuffle_parts("x | y|z", np.random.default_rng(0), separator="|", keep_parts=3) == (
        "x| y| z"
    )


def test_shuffle_actually_permutes():
    caption = ", ".join(f"tag{i}" for i in range(10))
    t = CaptionTransform(shuffle_parts=True, keep_parts=1)
    outs = {t([caption], rng(0, i)) for i in range(50)}
    assert len(outs) > 40
    assert all(o.startswith("tag0, ") for o in outs)


def test_without_shuffle_caption_is_kept_verbatim():
    caption = "a  red car,parked ,  at night"
    assert CaptionTransform()([caption], rng(1)) == caption


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
def test_dropout_rate_is_near_p_over_indices(p):
    t = CaptionTransform(dropout=p)
    n = 4000
    dropped = sum(t(["a dog"], rng(7, i)) == "" for i in range(n))
    # 5 standard deviations of a binomial; exact at p in {0, 1}
    assert abs(dropped - p * n) <= 5 * math.sqrt(n * p * (1 - p))


def test_dropout_differs_across_epochs_and_depends_only_on_seed_epoch_index():
    t = CaptionTransform(dropout=0.5)
    e0 = [t(["x"], sample_rng(3, 0, i, "caption")) for i in range(200)]
    e1 = [t(["x"], sample_rng(3, 1, i, "caption")) for i in range(200)]
    again = [t(["x"], sample_rng(3, 0, i, "caption")) for i in range(200)]
    assert e0 == again
    assert e0 != e1


def test_caption_pick_is_uniform_and_independent_of_dropout_rate():
    caps = ["one", "two", "three"]
    picks = Counter(CaptionTransform()(caps, rng(5, i)) for i in range(3000))
    assert set(picks) == set(caps)
    assert all(abs(c - 1000) < 5 * math.sqrt(3000 * (1 / 3) * (2 / 3)) for c in picks.values())
    # Kept samples get the same caption whatever the dropout rate (fixed draw order).
    a, b = CaptionTransform(dropout=0.0), CaptionTransform(dropout=0.3)
    for i in range(300):
        out = b(caps, rng(5, i))
        assert out == "" or out == a(caps, rng(5, i))


def is_subsequence(short: list[str], long: list[str]) -> bool:
    rest = iter(long)
    return all(part in rest for part in short)


@settings(deadline=None, max_examples=60)
@given(parts=parts_list, keep=st.integers(0, 14), p=st.floats(1e-6, 1), seed=seeds)
def test_tag_dropout_keeps_an_ordered_subset_and_the_first_parts(parts, keep, p, seed):
    caption = ",".join(parts)
    out = CaptionTransform(tag_dropout=p, keep_parts=keep)([caption], rng(seed))
    got = split_parts(out)
    assert is_subsequence(got, parts)
    assert got[:keep] == parts[:keep]
    assert out == ", ".join(got)
    # p = 1 keeps only the kept-first parts; p = 0 keeps every part
    assert split_parts(CaptionTransform(tag_dropout=1.0, keep_parts=keep)([caption], rng(seed))
                       ) == parts[:keep]
    assert split_parts(CaptionTransform(tag_dropout=0.0)([caption], rng(seed))) == [
        q.strip() for q in parts]


@settings(deadline=None, max_examples=60)
@given(captions=captions_list, seed=seeds, dropout=st.floats(0, 1), keep=st.integers(0, 3),
       shuffle=st.booleans())
def test_tag_dropout_off_changes_nothing(captions, seed, dropout, keep, shuffle):
    # the same draws as a transform without the option, whatever the other settings
    keep = keep if shuffle else 0
    kwargs = {"dropout": dropout, "shuffle_parts": shuffle, "keep_parts": keep,
              "template": "sks, {caption}"}
    assert CaptionTransform(**kwargs, tag_dropout=0.0)(captions, rng(seed)) == CaptionTransform(
        **kwargs)(captions, rng(seed))


def test_tag_dropout_rate_and_draw_order():
    caption = ", ".join(f"tag{i}" for i in range(10))
    t = CaptionTransform(tag_dropout=0.3, keep_parts=2)
    outs = [split_parts(t([caption], rng(0, i))) for i in range(500)]
    dropped = sum(10 - len(o) for o in outs)
    n = 500 * 8  # the two kept parts are never drawn
    assert abs(dropped - 0.3 * n) <= 5 * math.sqrt(n * 0.3 * 0.7)
    assert all(o[:2] == ["tag0", "tag1"] for o in outs)
    # Caption dropout and the pick come first: a kept sample gets the same caption's tags.
    caps = ["a, b, c, d", "e, f, g, h"]
    plain, both = CaptionTransform(), CaptionTransform(dropout=0.2, tag_dropout=0.5)
    for i in range(200):
        out = both(caps, rng(3, i))
        assert out == "" or is_subsequence(split_parts(out), split_parts(plain(caps, rng(3, i))))


@settings(deadline=None, max_examples=40)
@given(caption=st.text(max_size=40).filter(lambda s: s.strip() == s and s), seed=seeds)
def test_template_prefix_suffix_applied(caption, seed):
    t = CaptionTransform(template="a photo of sks person, {caption}")
    assert t([caption], rng(seed)) == f"a photo of sks person, {caption}"
    t = CaptionTransform(prefix="sks, ", suffix=", 4k", template="[{caption}]")
    assert t([caption], rng(seed)) == f"sks, [{caption}], 4k"


def test_trigger_phrase_stays_first_under_shuffle_and_dropout_gives_empty():
    t = CaptionTransform(shuffle_parts=True, template="sks person, {caption}", dropout=0.2)
    outs = [t(["b, c, d, e"], rng(0, i)) for i in range(200)]
    assert all(o == "" or o.startswith("sks person, ") for o in outs)
    assert "" in outs


def test_no_caption_and_braces_in_captions():
    assert CaptionTransform()([], rng(0)) == ""
    assert CaptionTransform(template="{caption} style")([], rng(0)) == "style"
    assert CaptionTransform(template="x {caption}")(["{weird} {}"], rng(0)) == "x {weird} {}"
    assert CaptionTransform()("single string caption", rng(0)) == "single string caption"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dropout": 1.5}, r"dropout must be in \[0, 1\]"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\]"),
        ({"dropout": float("nan")}, r"dropout must be in \[0, 1\]"),
        ({"template": "a photo of sks person"}, r"\{caption\}"),
        ({"keep_parts": -1, "shuffle_parts": True}, "keep_parts must be >= 0"),
        ({"keep_parts": 2}, "only applies when shuffle_parts=True"),
        ({"tag_dropout": 1.5}, r"tag_dropout must be in \[0, 1\]"),
        ({"tag_dropout": float("nan")}, r"tag_dropout must be in \[0, 1\]"),
        ({"separator": ""}, "separator must be a non-empty string"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CaptionTransform(**kwargs)


def test_bad_types_raise():
    with pytest.raises(TypeError):
        CaptionTransform(dropout="0.1")
    with pytest.raises(TypeError, match="tag_dropout must be a number"):
        CaptionTransform(tag_dropout=True)
    with pytest.raises(TypeError):
        CaptionTransform()([b"bytes caption", "x"], rng(0))


sep_part = st.text(alphabet="abc xyz", min_size=1, max_size=6).map(str.strip).filter(bool)


@settings(deadline=None, max_examples=60)
@given(before=st.lists(sep_part, max_size=3), after=st.lists(sep_part, max_size=3),
       caption=st.sampled_from(["", "  ", "red car"]),
       separator=st.sampled_from([",", ";", " |"]))
def test_template_never_leaves_a_stray_separator(before, after, caption, separator):
    """A template of parts around {caption}: an empty caption closes up to the other parts
    joined by the separator; a caption fills the placeholder literally."""
    joiner = separator.strip() + " "
    template = joiner.join([*before, "{caption}", *after])
    t = CaptionTransform(template=template, separator=separator.strip())
    out = t([caption], rng(0))
    if caption.strip():
        assert out == template.replace("{caption}", caption).strip()
    else:
        assert out == joiner.join(before + after)
        sep = separator.strip()
        assert not out.startswith(sep) and not out.endswith(sep)
        assert f"{sep} {sep}" not in out and f"{sep}{sep}" not in out


def test_empty_caption_closes_up_the_template_and_prefix():
    assert CaptionTransform(template="photo of sks dog, {caption}")([""], rng(0)) == \
        "photo of sks dog"
    assert CaptionTransform(template="{caption}, in the style of x")([], rng(0)) == \
        "in the style of x"
    assert CaptionTransform(template="sks, {caption}, 4k")([], rng(0)) == "sks, 4k"
    assert CaptionTransform(prefix="sks dog, ")([], rng(0)) == "sks dog"
    assert CaptionTransform(prefix="sks, ", suffix=", 4k")([], rng(0)) == "sks, 4k"
    assert CaptionTransform(template="a {caption} photo")([], rng(0)) == "a photo"


def test_fallback_class_token_or_file_stem():
    dog = CaptionTransform(fallback="dog", template="photo of sks {caption}")
    assert dog([], rng(0)) == "photo of sks dog"
    assert dog(["", " "], rng(0)) == "photo of sks dog"
    assert dog(["a cat"], rng(0)) == "photo of sks a cat"  # a real caption wins
    stem = CaptionTransform(fallback="stem")
    sample = {"captions": [], "rng": rng(0), "path": "/data/photos/golden_retriever.v2.jpg"}
    assert stem(sample)["caption"] == "golden_retriever.v2"
    assert stem([], rng(0), "shots/IMG_0001.png") == "IMG_0001"
    with pytest.raises(ValueError, match="path"):
        stem([], rng(0))
    with pytest.raises(ValueError, match="fallback"):
        CaptionTransform(fallback="  ")
    # dropout still gives the unconditional "" (the fallback is for missing captions)
    assert CaptionTransform(fallback="dog", dropout=1.0)([], rng(0)) == ""


def test_fallback_stem_through_the_dataset(tmp_path, examples_dir):
    shutil.copy(examples_dir / "rocket.jpg", tmp_path / "red_rocket.jpg")
    (tmp_path / "red_rocket.txt").write_text("")
    index = scan(tmp_path, workers=0)
    dataset = TextToImageDataset(index, assign(index, BucketLadder.for_model("sd15")),
                                 image_transform=BucketResizeCrop(),
                                 caption_transform=CaptionTransform(fallback="stem",
                                                                    template="sks, {caption}"))
    sample = dataset[0]
    assert sample["caption"] == "sks, red_rocket" and "path" not in sample
