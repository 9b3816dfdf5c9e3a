"""Caption augmentation: pick one of several captions, dropout, part shuffle, tag dropout,
trigger phrases, a fallback for images without a caption.

A functional core (`pick_caption`, `shuffle_parts`, `drop_parts`, `format_caption`,
`transform_caption`) and a
thin, picklable `CaptionTransform` that validates its settings once. All randomness comes from
the generator passed in (the dataset builds it with `transforms.rng.sample_rng(seed, epoch,
index, "caption")`), so the same sample gets the same caption in any worker and after a resume.

Draw order is fixed — one uniform for dropout, then the caption pick, then the part shuffle,
then (only when tag dropout is on) one uniform per part after the kept ones — so changing the
dropout rate does not change which caption or order the kept samples get, and turning tag
dropout off gives exactly the captions of a transform without it.

An empty caption in a template closes up around the placeholder: "photo of sks dog, {caption}"
gives "photo of sks dog", never "photo of sks dog," (see `format_caption`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, overload

import numpy as np

PLACEHOLDER = "{caption}"
STEM = "stem"  # fallback: the file name without its extension


def pick_caption(captions: Sequence[str] | str, rng: np.random.Generator) -> str:
    """One caption chosen uniformly from ``captions`` ("" when there is none).

    A bare string is taken as a single caption (never as a sequence of characters).
    """
    if isinstance(captions, str):
        return captions
    captions = list(captions)
    for c in captions:
        if not isinstance(c, str):
            raise TypeError(f"captions must be strings, got {type(c).__name__}: {c!r}")
    if not captions:
        return ""
    if len(captions) == 1:
        return captions[0]
    return captions[int(rng.integers(len(captions)))]


def split_parts(caption: str, separator: str = ",") -> list[str]:
    """The caption's ``separator``-separated parts, stripped, empty parts dropped."""
    return [p.strip() for p in caption.split(separator) if p.strip()]


def join_parts(parts: Sequence[str], separator: str = ",") -> str:
    """Join parts with ``separator`` followed by one space ("a, b, c")."""
    joiner = separator if separator.isspace() else separator + " "
    return joiner.join(parts)


def shuffle_parts(
    caption: str, rng: np.random.Generator, *, separator: str = ",", keep_parts: int = 0
) -> str:
    """Shuffle the caption's parts, keeping the first ``keep_parts`` in place.

    Parts are stripped and re-joined with ``separator + " "``; empty parts are dropped.
    """
    parts = split_parts(caption, separator)
    head, tail = parts[:keep_parts], parts[keep_parts:]
    order = rng.permutation(len(tail)) if len(tail) > 1 else range(len(tail))
    return join_parts(head + [tail[i] for i in order], separator)


def drop_parts(
    caption: str, rng: np.random.Generator, p: float, *, separator: str = ",", keep_parts: int = 0
) -> str:
    """Drop each ``separator``-separated part with probability ``p`` (kohya's
    ``caption_tag_dropout_rate``), never the first ``keep_parts``; the rest keep their order.

    Draws one uniform per part after the kept ones (none when ``p`` is 0). Parts are stripped
    and re-joined as :func:`shuffle_parts` does.
    """
    parts = split_parts(caption, separator)
    head, tail = parts[:keep_parts], parts[keep_parts:]
    if p > 0 and tail:
        draws = rng.random(len(tail))
        tail = [part for part, u in zip(tail, draws, strict=True) if u >= p]
    return join_parts(head + tail, separator)


def format_caption(
    caption: str,
    *,
    prefix: str = "",
    suffix: str = "",
    template: str | None = None,
    separator: str = ",",
) -> str:
    """``prefix + template(caption) + suffix``, stripped of outer whitespace.

    ``template`` contains ``{caption}`` (e.g. "a photo of sks person, {caption}"); it is
    substituted literally, so other braces in the template or the caption are harmless.
    Prefix and suffix are concatenated as given: include your own separator ("sks, ").
    An empty ``caption`` leaves no stray ``separator`` behind: the text on each side of the
    gap loses the separator that faced it ("sks dog, {caption}" -> "sks dog"; "a, {caption},
    b" -> "a, b"; prefix "sks, " alone -> "sks").
    """
    caption = caption.strip()
    text = caption if template is None else template.replace(PLACEHOLDER, caption)
    if not caption and template is not None:
        pieces = template.split(PLACEHOLDER)
        text = pieces[0]
        for piece in pieces[1:]:
            text = close_gap(text, piece, separator)
    if text.strip():
        return (prefix + text + suffix).strip()
    return close_gap(prefix, suffix, separator).strip()


def close_gap(left: str, right: str, separator: str = ",") -> str:
    """``left`` and ``right`` joined where an empty caption was: the ``separator`` that ends
    ``left`` or starts ``right`` goes with the caption; two parts that both faced the gap with
    a separator keep one between them ("a," + ", b" -> "a, b")."""
    lhs, rhs = left.rstrip(), right.lstrip()
    left_sep = not separator.isspace() and lhs.endswith(separator)
    right_sep = not separator.isspace() and rhs.startswith(separator)
    if left_sep:
        lhs = lhs[: -len(separator)].rstrip()
    if right_sep:
        rhs = rhs[len(separator):].lstrip()
    if not lhs or not rhs:
        return lhs or rhs
    if left_sep and right_sep:
        return join_parts([lhs, rhs], separator)
    spaced = left_sep or right_sep or lhs != left or rhs != right
    return lhs + (" " if spaced else "") + rhs


def caption_fallback(fallback: str | None, path: str | None) -> str:
    """The caption of an image without one: "" for no ``fallback``, the file name's stem for
    ``"stem"`` (``path`` required), else ``fallback`` itself (a class token such as "dog")."""
    if fallback is None:
        return ""
    if fallback == STEM:
        if not path:
            raise ValueError('fallback="stem" needs the image\'s path (the dataset passes it)')
        return os.path.splitext(os.path.basename(path.rstrip("/")))[0]
    return fallback


def transform_caption(
    captions: Sequence[str] | str,
    rng: np.random.Generator,
    *,
    dropout: float = 0.0,
    shuffle: bool = False,
    keep_parts: int = 0,
    separator: str = ",",
    prefix: str = "",
    suffix: str = "",
    template: str | None = None,
    tag_dropout: float = 0.0,
    fallback: str | None = None,
    path: str | None = None,
) -> str:
    """Pick, drop out, shuffle, drop tags, then format one training caption.

    A dropped-out caption is exactly "" (the unconditional prompt for classifier-free
    guidance): prefix, suffix and template are not applied to it. An image whose picked
    caption is empty gets ``caption_fallback(fallback, path)`` instead.
    """
    dropped = rng.random() < dropout
    caption = pick_caption(captions, rng)
    if dropped:
        return ""
    if not caption.strip():
        caption = caption_fallback(fallback, path)
    if shuffle:
        caption = shuffle_parts(caption, rng, separator=separator, keep_parts=keep_parts)
    if tag_dropout > 0:
        caption = drop_parts(caption, rng, tag_dropout, separator=separator, keep_parts=keep_parts)
    return format_caption(caption, prefix=prefix, suffix=suffix, template=template,
                          separator=separator)


class CaptionTransform:
    """The caption transform of `bucketing.TextToImageDataset`: ``transform(sample) ->
    sample`` sets ``sample["caption"]`` from ``sample["captions"]`` (the image's captions),
    ``sample["rng"]`` and ``sample["path"]`` (for ``fallback="stem"``); ``transform(captions,
    rng) -> str`` works too, for a direct call.

    Args:
        dropout: probability in [0, 1] of returning "" (for classifier-free guidance).
        shuffle_parts: shuffle the ``separator``-separated parts of the caption (tag lists).
        keep_parts: with ``shuffle_parts`` or ``tag_dropout``, the number of leading parts
            kept in place (and never dropped).
        separator: the part separator (default ",").
        prefix, suffix: text concatenated before / after the caption (trigger words).
        template: a string containing ``{caption}``, e.g. "a photo of sks person, {caption}".
        tag_dropout: probability in [0, 1] of dropping each part after the first
            ``keep_parts`` (kohya's ``caption_tag_dropout_rate``), after the shuffle.
        fallback: the caption of an image that has none (or only empty ones): a class token
            such as "dog", or ``"stem"`` for the file name without its extension
            ("golden_retriever_01"). Default: "" (an empty caption; a template closes up
            around it).
    """

    def __init__(
        self,
        dropout: float = 0.0,
        shuffle_parts: bool = False,
        keep_parts: int = 0,
        separator: str = ",",
        prefix: str = "",
        suffix: str = "",
        template: str | None = None,
        tag_dropout: float = 0.0,
        fallback: str | None = None,
    ) -> None:
        for name, rate in (("dropout", dropout), ("tag_dropout", tag_dropout)):
            if isinstance(rate, bool) or not isinstance(rate, (int, float)):
                raise TypeError(f"{name} must be a number in [0, 1], got {rate!r}")
            if not (0.0 <= rate <= 1.0) or math.isnan(rate):
                raise ValueError(f"{name} must be in [0, 1], got {rate}")
        if isinstance(keep_parts, bool) or not isinstance(keep_parts, (int, np.integer)):
            raise TypeError(f"keep_parts must be an int >= 0, got {keep_parts!r}")
        if keep_parts < 0:
            raise ValueError(f"keep_parts must be >= 0, got {keep_parts}")
        if keep_parts and not shuffle_parts and not tag_dropout:
            raise ValueError(
                f"keep_parts={keep_parts} only applies when shuffle_parts=True or tag_dropout "
                "> 0; set one of them or leave keep_parts=0"
            )
        if not isinstance(separator, str) or not separator:
            raise ValueError(f"separator must be a non-empty string, got {separator!r}")
        for name, value in (("prefix", prefix), ("suffix", suffix)):
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a string, got {value!r}")
        if fallback is not None and (not isinstance(fallback, str) or not fallback.strip()):
            raise ValueError(
                f'fallback must be a non-empty string (a class token, or "{STEM}" for the file '
                f"name), got {fallback!r}"
            )
        if template is not None and (not isinstance(template, str) or PLACEHOLDER not in template):
            raise ValueError(
                f"template must be a string containing {PLACEHOLDER!r} "
                f"(e.g. 'a photo of sks person, {PLACEHOLDER}'), got {template!r}"
            )
        self.dropout = float(dropout)
        self.shuffle_parts = bool(shuffle_parts)
        self.keep_parts = int(keep_parts)
        self.separator = separator
        self.prefix = prefix
        self.suffix = suffix
        self.template = template
        self.tag_dropout = float(tag_dropout)
        self.fallback = fallback

    @overload
    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any]: ...
    @overload
    def __call__(self, sample: Sequence[str] | str, rng: np.random.Generator) -> str: ...

    def __call__(self, sample, rng=None, path=None):
        """``sample`` with ``caption`` made from its ``captions``, ``rng`` (and ``path``); or,
        given the captions and a generator (and the image's path), the caption alone."""
        if isinstance(sample, Mapping):
            caption = self.caption(sample["captions"], sample["rng"], sample.get("path"))
            return {**sample, "caption": caption}
        return self.caption(sample, rng, path)

    def caption(
        self, captions: Sequence[str] | str, rng: np.random.Generator, path: str | None = None
    ) -> str:
        """:func:`transform_caption` with this transform's settings (``path`` is the image's,
        for ``fallback="stem"``)."""
        return transform_caption(
            captions,
            rng,
            dropout=self.dropout,
            shuffle=self.shuffle_parts,
            keep_parts=self.keep_parts,
            separator=self.separator,
            prefix=self.prefix,
            suffix=self.suffix,
            template=self.template,
            tag_dropout=self.tag_dropout,
            fallback=self.fallback,
            path=path,
        )

    def __repr__(self) -> str:
        return (
            f"CaptionTransform(dropout={self.dropout}, shuffle_parts={self.shuffle_parts}, "
            f"keep_parts={self.keep_parts}, separator={self.separator!r}, prefix={self.prefix!r}, "
            f"suffix={self.suffix!r}, template={self.template!r}, "
            f"tag_dropout={self.tag_dropout}, fallback={self.fallback!r})"
        )
