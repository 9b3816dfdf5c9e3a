"""Folder sources: every image file below a folder, captions from sidecar files
(``<stem>.txt`` / ``<stem>.caption``) or HF-imagefolder ``metadata.jsonl`` files.

Pairing is opt-in: ``column_map={"conditioning_image": "{stem}_control.png", "loss_mask":
"../masks/{stem}.png"}`` names each image's paired files by a template relative to the
image's folder (``{stem}``: the image's name without extension), so a suffix rule and a
parallel-folder rule are both one template; ``"loss_mask": "alpha"`` takes the image's
alpha. Files that are some image's pair are not images of their own. Without such a
template a file named ``x_mask.png`` is an ordinary image.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

from bucketing.index import Rejection
from bucketing.sources.entries import (
    CAPTION_SUFFIXES,
    Entry,
    ResolvedSource,
    captions_of,
    image_extensions,
    local_problem,
    read_sidecar,
    real_base,
    sidecar_path,
)
from bucketing.sources.json_rows import read_jsonl
from bucketing.sources.rows import ALPHA, ALPHA_MASK, Pairs, paired_paths

_TEMPLATE_KEY = re.compile(r"^(conditioning_image(_\d+)?|loss_mask)$")


def _walk_folder(
    root: str, extensions: tuple[str, ...], base: str | None
) -> tuple[list[str], list[str], list[Rejection]]:
    """Recursively list image files and other files under ``root`` (sorted, deterministic).

    Symlinked folders are followed once; a link back to a folder already being walked
    is a ``symlink_loop`` rejection and a second link to the same folder a ``duplicate``.
    A folder that cannot be listed is an ``unreadable`` rejection; an image file that
    cannot be scanned is rejected by :func:`~bucketing.sources.entries.local_problem`.
    """
    images: list[str] = []
    others: list[str] = []
    rejections: list[Rejection] = []
    seen: set[tuple[int, int]] = set()
    # depth-first with an explicit stack (no recursion, however deep the folders nest):
    # each level holds the children still to visit and the folders above them
    stack: list[tuple[Iterator[os.DirEntry], frozenset[tuple[int, int]]]] = []

    def enter(folder: str, ancestors: frozenset[tuple[int, int]]) -> None:
        try:
            st = os.stat(folder)
        except OSError as e:
            rejections.append(Rejection(folder, "unreadable", f"cannot stat folder: {e}"))
            return
        key = (st.st_dev, st.st_ino)
        if key in ancestors:
            rejections.append(
                Rejection(folder, "symlink_loop", "links back to a folder above it; not followed")
            )
            return
        if key in seen:
            rejections.append(
                Rejection(folder, "duplicate", "a second link to a folder already listed")
            )
            return
        seen.add(key)
        try:
            with os.scandir(folder) as it:
                children = sorted(it, key=lambda d: d.name)
        except OSError as e:
            rejections.append(Rejection(folder, "unreadable", f"cannot list folder: {e}"))
            return
        stack.append((iter(children), ancestors | {key}))

    enter(root, frozenset())
    while stack:
        children, ancestors = stack[-1]
        child = next(children, None)
        if child is None:
            stack.pop()
            continue
        path = child.path
        try:
            is_dir = child.is_dir()  # follows symlinks
        except OSError as e:  # e.g. ELOOP on a self-referencing link
            rejections.append(Rejection(path, "symlink_loop", str(e)))
            continue
        if is_dir:
            enter(path, ancestors)
        elif not child.name.lower().endswith(extensions):
            others.append(path)
        elif (problem := local_problem(path, base)) is None:
            images.append(path)
        else:
            rejections.append(Rejection(path, *problem))
    return images, others, rejections


def pairing_templates(column_map: dict[str, str]) -> tuple[list[str], str | None]:
    """(conditioning templates in order, mask template or ``"alpha"`` or None) of a folder's
    ``column_map`` (other keys are for manifests); each template must hold ``{stem}`` (else
    every image would share one file)."""
    column_map = {k: v for k, v in column_map.items() if _TEMPLATE_KEY.match(k)}
    numbered = sorted((int(k.rsplit("_", 1)[1]), v) for k, v in column_map.items()
                      if k.startswith("conditioning_image_"))  # fmt: skip
    if numbered and [k for k, _ in numbered] != list(range(len(numbered))):
        raise ValueError("column_map's conditioning_image_<k> keys must be numbered 0..K-1")
    if numbered and "conditioning_image" in column_map:
        raise ValueError("use 'conditioning_image' or numbered 'conditioning_image_<k>' keys")
    conditioning = [v for _, v in numbered] or (
        [column_map["conditioning_image"]] if "conditioning_image" in column_map else []
    )
    mask = column_map.get("loss_mask")
    for template in [*conditioning, *([mask] if mask and mask != ALPHA else [])]:
        if "{stem}" not in template:
            raise ValueError(
                f"folder pairing template {template!r} must contain '{{stem}}' (the image's "
                "name without extension), e.g. '{stem}_mask.png' or '../control/{stem}.png'"
            )
    return conditioning, mask


def _pairs_of(path: str, conditioning: list[str], mask: str | None) -> Pairs:
    """The paired values of the image at ``path`` (relative to its folder)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    folder = os.path.dirname(path)
    values = tuple(os.path.join(folder, t.replace("{stem}", stem)) for t in conditioning)
    if mask == ALPHA:
        return values, ALPHA_MASK
    return values, (os.path.join(folder, mask.replace("{stem}", stem)) if mask else None)


def resolve_folder(
    folder: str, base_dir: str | None, column_map: dict[str, str] | None = None
) -> ResolvedSource:
    """Entries for every image below ``folder`` (see :func:`_walk_folder`), with captions
    and, when ``column_map`` holds pairing templates, paired files (module docstring)."""
    root = os.path.abspath(folder)
    base = real_base(base_dir)
    images, others, rejections = _walk_folder(root, image_extensions(), base)
    sidecars = {p for p in others if p.lower().endswith(CAPTION_SUFFIXES)}
    metadata = _folder_metadata(others, rejections)
    conditioning, mask = pairing_templates(dict(column_map or {}))
    pairs = {p: _pairs_of(p, conditioning, mask) for p in images}
    if conditioning or mask:
        paired = {os.path.normpath(v) for c, m in pairs.values() for v in (*c, m or "")}
        images = [p for p in images if os.path.normpath(p) not in paired]
    entries = []
    for path in images:
        captions = _sidecar_captions(path, sidecars, rejections)
        if captions is None:
            captions = metadata.get(os.path.normpath(path), [])
        got = paired_paths(pairs[path], os.path.dirname(path), base, {})
        if isinstance(got[0], str):
            rejections.append(Rejection(path, got[0], str(got[1])))
            continue
        entries.append(Entry(path, captions, conditioning=got[0], mask=got[1]))
    if not entries and not rejections:
        raise ValueError(
            f"no images found in {folder!r} (looked recursively for "
            f"{', '.join(image_extensions())}); point scan at the folder holding the images "
            "or pass a manifest file"
        )
    return ResolvedSource(entries, rejections)


def _sidecar_captions(
    image: str, sidecars: set[str], rejections: list[Rejection]
) -> list[str] | None:
    """Captions from ``<stem>.txt`` (first choice) or ``<stem>.caption``; None if neither."""
    for suffix in CAPTION_SUFFIXES:
        for candidate in (sidecar_path(image, suffix), sidecar_path(image, suffix.upper())):
            if candidate in sidecars:
                try:
                    return read_sidecar(candidate)
                except OSError as e:
                    rejections.append(Rejection(candidate, "unreadable_caption", str(e)))
                    return []
    return None


def _folder_metadata(others: list[str], rejections: list[Rejection]) -> dict[str, list[str]]:
    """Captions from HF-imagefolder ``metadata.jsonl`` files, keyed by normalised image path
    (``file_name`` is relative to the metadata file's folder)."""
    out: dict[str, list[str]] = {}
    for path in others:
        if os.path.basename(path) != "metadata.jsonl":
            continue
        folder = os.path.dirname(path)
        try:
            rows = read_jsonl(path, rejections)
        except OSError as e:
            rejections.append(Rejection(path, "unreadable", str(e)))
            continue
        for _, row in rows:
            name = row.get("file_name")
            if isinstance(name, str) and name:
                key = os.path.normpath(os.path.join(folder, name))
                out[key] = captions_of(row.get("text", row.get("caption")))
    return out
