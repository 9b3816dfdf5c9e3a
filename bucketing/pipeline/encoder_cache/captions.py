"""Which captions an encoder cache holds: the index's, formatted as the dataset's caption
transform formats them (template, prefix, suffix), and "" for dropout. A transform whose
captions no build can list (part shuffle, tag dropout) is refused, and so is one formatting
captions otherwise than the build did: every sample would fail in a worker."""

from __future__ import annotations

from typing import Any

from transforms.caption import format_caption


def final_caption(caption: str, caption_transform: Any) -> str:
    """``caption`` as ``caption_transform`` formats it (template, prefix, suffix)."""
    if caption_transform is None:
        return caption
    return format_caption(caption, prefix=caption_transform.prefix,
                          suffix=caption_transform.suffix, template=caption_transform.template)


def caption_format(caption_transform: Any) -> dict[str, Any]:
    """The caption formatting a cache was built with (recorded in cache.json)."""
    return {name: getattr(caption_transform, name, default)
            for name, default in (("prefix", ""), ("suffix", ""), ("template", None))}


def check_cacheable_captions(caption_transform: Any, encoder_cache: Any = None) -> None:
    """Refuse a caption transform whose captions no encoder cache can hold (part shuffle,
    tag dropout), or, given ``encoder_cache``, one formatting captions (template, prefix,
    suffix) otherwise than its build did: every sample would fail in a worker."""
    shuffles = getattr(caption_transform, "shuffle_parts", False)
    drops = getattr(caption_transform, "tag_dropout", 0.0)
    if shuffles or drops:
        raise ValueError(
            "an encoder cache holds fixed captions (the index's, templated as the build's "
            "caption_transform says, and ''), but this caption_transform shuffles parts or "
            "drops tags, making captions no build can list: drop shuffle_parts/tag_dropout, "
            "or train without an encoder cache (text encoded every step)"
        )
    built = getattr(encoder_cache, "meta", {}).get("caption_format")
    if built is None:  # a cache from before the format was recorded: checked per caption
        return
    wanted = caption_format(caption_transform)
    if wanted != built:
        raise ValueError(
            f"the encoder cache {getattr(encoder_cache, 'root', '')} holds captions formatted "
            f"with {built} but this caption_transform formats them with {wanted}: rebuild it "
            "with build_cache(..., caption_transform=<this transform>)"
        )
