"""``bucket-caption FOLDER --captioner DIR``: caption the images of a folder that have none.

A local transformers image-to-text model (any folder ``AutoProcessor`` and
``AutoModelForImageTextToText`` load: BLIP, GIT, a vision-encoder-decoder, ...) writes a
``<stem>.txt`` sidecar next to every image without a caption (no ``.txt`` / ``.caption``
sidecar, no ``metadata.jsonl`` row), in batches, on the GPU when there is one. An existing
caption is never overwritten unless ``--overwrite`` is given; sidecars are written atomically.
An image that cannot be read is reported and skipped, never the end of the run.
``--prefix`` / ``--template`` write a trigger word into every caption created ("sks dog, " +
the generated text, or "photo of sks dog, {caption}"); captions already there are untouched.

    bucket-caption my_photos/ --captioner blip-image-captioning-base --batch-size 16
    bucket-caption my_photos/ --captioner blip-base --template "photo of sks dog, {caption}"
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from bucketing.atomic import atomic_write_bytes
from bucketing.members import parse_member
from bucketing.printable import escape
from bucketing.sources import resolve_source, sidecar_path
from transforms.caption import PLACEHOLDER, format_caption
from transforms.image import ImageDecodeError, load_image


@dataclass
class CaptionRun:
    """What a run did: sidecars ``written``, images ``kept`` (they had a caption), images
    that ``failed`` (path, reason), generated captions that came out ``empty`` and sidecars
    ``refused`` (path, reason: a symlink, or outside the folder; never written through)."""

    written: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)


def sidecar_problem(folder_real: str, image: str) -> str | None:
    """Why the sidecar of ``image`` must not be written, or None: it is a symlink (dangling
    or not: never followed, never written through), not a regular file, or it lies outside
    ``folder_real`` (the folder's real path) once symlinked folders are resolved."""
    side = sidecar_path(image)
    if os.path.islink(side):
        return f"{os.path.basename(side)} is a symlink (not followed)"
    if os.path.lexists(side) and not os.path.isfile(side):
        return f"{os.path.basename(side)} is not a regular file"
    real = os.path.realpath(side)
    if os.path.commonpath([real, folder_real]) != folder_real:
        return f"its caption file would be written outside {folder_real} ({real})"
    return None


def caption_folder(
    folder: str | os.PathLike,
    model_dir: str | os.PathLike,
    *,
    batch_size: int = 8,
    overwrite: bool = False,
    max_new_tokens: int = 40,
    prompt: str | None = None,
    device: str | None = None,
    prefix: str = "",
    template: str | None = None,
) -> CaptionRun:
    """Write a generated ``<stem>.txt`` for every image of ``folder`` without a caption (every
    image with ``overwrite``), with the image-to-text model in the local folder ``model_dir``.
    Each written caption is ``prefix + template(generated text)`` (``format_caption``: a
    trigger word such as "sks dog, ", or a template "photo of sks dog, {caption}")."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if template is not None and PLACEHOLDER not in template:
        raise ValueError(f"template must contain {PLACEHOLDER} (e.g. 'photo of sks dog, "
                         f"{PLACEHOLDER}'), got {template!r}")
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model folder not found: {model_dir} (a local "
                                "transformers image-to-text model; nothing is downloaded)")
    resolved = resolve_source(os.fspath(folder))
    inside = next((e.path for e in resolved.entries if parse_member(e.path)), None)
    if inside is not None:
        raise ValueError(f"{folder} is tar shards ({inside}): a caption file cannot be written "
                         "beside a member; caption the extracted images, or add {key}.txt "
                         "members to the shards")  # fmt: skip
    folder_real = os.path.realpath(folder)
    run = CaptionRun()
    todo = []
    for entry in resolved.entries:
        (todo if overwrite or not entry.captions else run.kept).append(entry.path)
    if not todo:
        return run
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(  # loaded in inference mode
        model_dir, local_files_only=True, dtype=dtype).to(device)
    for start in range(0, len(todo), batch_size):
        paths, images = [], []
        for path in todo[start : start + batch_size]:
            try:
                images.append(load_image(path))
                paths.append(path)
            except ImageDecodeError as error:
                run.failed.append((path, error.reason))
        if not images:
            continue
        kwargs = {"text": [prompt] * len(images)} if prompt else {}
        inputs = processor(images=images, return_tensors="pt", **kwargs).to(device)
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens)
        for path, text in zip(paths, processor.batch_decode(out, skip_special_tokens=True),
                              strict=True):
            text = " ".join(text.split())
            if prompt and text.startswith(prompt):
                text = text[len(prompt):].strip()
            if not text:
                run.empty.append(path)
                continue
            problem = sidecar_problem(folder_real, path)
            if problem:
                run.refused.append((path, problem))
                continue
            text = format_caption(text, prefix=prefix, template=template)
            atomic_write_bytes(sidecar_path(path), (text + "\n").encode("utf-8"))
            run.written.append(path)
    return run


def build_parser() -> argparse.ArgumentParser:
    """The ``bucket-caption`` command line."""
    p = argparse.ArgumentParser(prog="bucket-caption", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="folder of images (recursive)")
    p.add_argument("--captioner", metavar="DIR",
                   help="local transformers image-to-text model folder (required)")
    p.add_argument("--model", dest="old_captioner", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=8, metavar="B")
    p.add_argument("--max-new-tokens", type=int, default=40, metavar="N")
    p.add_argument("--prompt", help="text prompt for conditional captioning models")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--prefix", default="", help='text written before each created caption, '
                   'e.g. "sks dog, " (include your own separator)')
    p.add_argument("--template", help='each created caption as this template, e.g. "photo of '
                   'sks dog, {caption}"')
    p.add_argument("--overwrite", action="store_true",
                   help="also caption images that have a caption (their .txt is replaced)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bucket-caption``; 0 ok, 2 usage or configuration error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.old_captioner is not None:
        message = "--model is now --captioner; the old name goes in the next release"
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        print(f"bucket-caption: warning: {message}", file=sys.stderr)
        if args.captioner is not None:
            parser.error("give --captioner only (--model is its old name)")
        args.captioner = args.old_captioner
    if args.captioner is None:
        parser.error("the following arguments are required: --captioner")
    try:
        run = caption_folder(args.folder, args.captioner, batch_size=args.batch_size,
                             overwrite=args.overwrite, max_new_tokens=args.max_new_tokens,
                             prompt=args.prompt, device=args.device, prefix=args.prefix,
                             template=args.template)
    except (ValueError, OSError) as error:
        print(f"bucket-caption: error: {escape(str(error))}", file=sys.stderr)
        return 2
    print(f"{len(run.written)} captions written, {len(run.kept)} images kept their caption, "
          f"{len(run.failed)} unreadable, {len(run.empty)} empty captions not written")
    for path, reason in run.failed:
        print(f"  unreadable: {escape(path)}: {escape(reason)}")
    for path, reason in run.refused:
        print(f"  not written: {escape(path)}: {escape(reason)}")
    for path in run.empty:
        print(f"  empty caption: {escape(path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
