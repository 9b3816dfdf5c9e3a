"""``bucket-report``: what bucketing will do to a data set, before any GPU time is spent.

Runs the real pipeline front half — scan, assign, plan one sampler epoch — and reports
files accepted and rejected (by reason), the ladder, per-bucket occupancy and padding,
crop / resolution loss, the sampler's plan for a world size, caption statistics, and
advice (with the setting that fixes it) when most of an epoch would be padding or many
buckets hold one image. Readable by people (a terminal-width text report, file names with
control characters escaped) and by scripts (``--json``, exact, a versioned schema, see
:data:`SCHEMA_VERSION`); ``--plot`` and ``--preview`` draw PNGs. Every output path is
checked before the scan: its folder must exist and be writable, and only a regular file
that is not the source is ever replaced.

The report reads what the other layers know: bucket counts from ``Assignment.counts``,
extreme aspects from ``Assignment.extreme``, the sampler's ``stats()`` keys as they are.

The work is split into small pure steps: :func:`gather` turns the pipeline's results
into one plain dict (exactly the JSON object), :func:`render_text` formats that dict,
:func:`write_json` writes it. Exit codes: 0 ok, 2 usage or configuration error (one
line saying what to fix), 1 unexpected failure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import stat
import sys
import textwrap
import time
import traceback
from collections.abc import Sequence
from typing import Any, TextIO

import numpy as np
from PIL import Image

from bucketing.assign import assign
from bucketing.atomic import atomic_write_bytes
from bucketing.cli import plots as report_plots
from bucketing.cli.args import (
    ConfigError,
    add_column_option,
    add_ladder_options,
    area,
    ladder_overrides,
    positive_int,
)
from bucketing.cli.plots import PreviewTile
from bucketing.ladder import MODEL_SPECS, BucketLadder, fitted_ladder
from bucketing.ladder_trade import ladder_trade, worst_images
from bucketing.pipeline.config import report_mix
from bucketing.pipeline.dataset import TextToImageDataset
from bucketing.pipeline.encoder_cache import estimate_lines
from bucketing.printable import escape
from bucketing.scan import scan
from bucketing.sources.rows import ALPHA_MASK
from samplers import BucketBatchSampler
from transforms.caption import CaptionTransform
from transforms.image import decode_image
from transforms.resize_crop import BucketResizeCrop
from transforms.tokenize import CLIP_MAX_LENGTH, FluxTokenizer, load_clip_tokenizer

SCHEMA_VERSION = 2
EXAMPLES_PER_REASON = 3
NOTICE_REASONS = frozenset({"duplicate", "unreadable_caption"})
"""Scan rejections that drop no image: a repeated manifest row or folder link (its captions
merged into the first) and a caption sidecar that cannot be read (the image is kept,
uncaptioned). The report counts them as ``notices``, not as files seen or rejected."""
PAIR_REASONS = ("missing_pair", "unreadable_pair", "pair_aspect", "no_alpha")
"""Rejections of a row for its paired files (conditioning images, loss mask)."""


# --------------------------------------------------------------------------- figures


def _num(x: Any) -> float | None:
    """A JSON-safe float: ``None`` for nan/inf (JSON has no NaN)."""
    x = float(x)
    return x if math.isfinite(x) else None


def summarize(values: np.ndarray) -> dict[str, float | None]:
    """mean / p50 / p95 / max of the finite values (all ``None`` when there are none)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": None, "p50": None, "p95": None, "max": None}
    return {
        "mean": float(v.mean()),
        "p50": float(np.percentile(v, 50)),
        "p95": float(np.percentile(v, 95)),
        "max": float(v.max()),
    }


def file_rejections(index: Any) -> list[Any]:
    """The scan's rejections that are files not trained on (``NOTICE_REASONS`` left out)."""
    return [r for r in index.rejections if r.reason not in NOTICE_REASONS]


def notice_counts(index: Any) -> dict[str, int]:
    """Per notice reason (``NOTICE_REASONS``), how many the scan recorded; most common first."""
    counts: dict[str, int] = {}
    for r in index.rejections:
        if r.reason in NOTICE_REASONS:
            counts[r.reason] = counts.get(r.reason, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def image_rows(index: Any, assignment: Any) -> list[dict[str, Any]]:
    """One JSON row per file seen: index rows first (row i is assignment row i), then the
    scan's rejected files (size unknown; notices are not files, see ``NOTICE_REASONS``)."""
    rows = []
    for i, path in enumerate(index.paths):
        accepted = bool(assignment.bucket_id[i] >= 0)
        reason = assignment.reasons[i]
        rows.append(
            {
                "path": path,
                "width": int(index.width[i]),
                "height": int(index.height[i]),
                "bucket": [int(v) for v in assignment.bucket_wh[i]] if accepted else None,
                "scale": _num(assignment.scale[i]) if accepted else None,
                "crop_loss": _num(assignment.crop_loss[i]) if accepted else None,
                "resolution_loss": _num(assignment.resolution_loss[i]) if accepted else None,
                "reason": None if accepted else str(reason or "rejected"),
            }
        )
    for r in file_rejections(index):
        rows.append(
            {
                "path": r.path,
                "width": None,
                "height": None,
                "bucket": None,
                "scale": None,
                "crop_loss": None,
                "resolution_loss": None,
                "reason": r.reason,
            }
        )
    return rows


def file_figures(rows: list[dict[str, Any]], details: list[str]) -> dict[str, Any]:
    """Files seen / accepted / rejected, and per reason a count with a few example paths
    (``details[i]`` says more about row i: its size, or the scan's detail)."""
    by_reason: dict[str, dict[str, Any]] = {}
    for row, detail in zip(rows, details, strict=True):
        if row["reason"] is None:
            continue
        entry = by_reason.setdefault(row["reason"], {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < EXAMPLES_PER_REASON:
            entry["examples"].append({"path": row["path"], "detail": detail})
    ordered = dict(sorted(by_reason.items(), key=lambda kv: (-kv[1]["count"], kv[0])))
    rejected = sum(e["count"] for e in ordered.values())
    return {
        "seen": len(rows),
        "accepted": len(rows) - rejected,
        "rejected": rejected,
        "rejections": ordered,
    }


def pair_figures(index: Any, assignment: Any) -> dict[str, Any]:
    """Paired files of the accepted rows: ``conditioning_images`` per row (K), rows with a
    loss mask (``alpha_masks`` of them from the image's alpha), and the rows rejected for
    their pairs by reason."""
    ok = np.asarray(assignment.bucket_id) >= 0
    masks = [index.loss_mask[i] for i in np.flatnonzero(ok)] if index.loss_mask is not None \
        else []
    rejected: dict[str, int] = {}
    for r in index.rejections:
        if r.reason in PAIR_REASONS:
            rejected[r.reason] = rejected.get(r.reason, 0) + 1
    return {
        "conditioning_images": len(index.conditioning),
        "rows_with_conditioning": int(ok.sum()) if index.conditioning else 0,
        "rows_with_mask": sum(1 for m in masks if m),
        "alpha_masks": sum(1 for m in masks if m == ALPHA_MASK),
        "rejected": rejected,
    }


def _pair_lines(p: dict[str, Any]) -> list[str]:
    k = p["conditioning_images"]
    rejected = " · ".join(f"{n} {reason}" for reason, n in p["rejected"].items()) or "none"
    return [
        f"Pairs      {_plural(p['rows_with_conditioning'], 'row')} with "
        f"{_plural(k, 'conditioning image')} each · {p['rows_with_mask']} with a loss mask "
        f"({p['alpha_masks']} from alpha)",
        f"           rows rejected for their pairs: {rejected}",
    ]


def ladder_figures(ladder: Any) -> dict[str, Any]:
    """The ladder's configuration (``model``: its preset, None for a custom ladder) and its
    full bucket list (w, h)."""
    return {
        "model": ladder.model,
        "levels": [int(v) for v in ladder.levels],
        "max_area": int(ladder.max_area),
        "multiple": int(ladder.multiple),
        "max_aspect": float(ladder.max_aspect),
        "buckets": [[int(w), int(h)] for w, h in ladder.buckets],
    }


def quality_figures(assignment: Any) -> dict[str, Any]:
    """Crop and resolution loss over accepted images; upscaled and extreme-aspect counts."""
    ok = assignment.accepted
    return {
        "crop_loss": summarize(assignment.crop_loss[ok]),
        "resolution_loss": summarize(assignment.resolution_loss[ok]),
        "upscaled": int(np.count_nonzero(assignment.upscaled[ok])),
        "extreme_aspect": int(np.count_nonzero(assignment.extreme)),
    }


def caption_figures(index: Any, assignment: Any, tokens: dict | None) -> dict[str, Any]:
    """Accepted images without a caption, with several, and token statistics when measured."""
    ok = np.asarray(assignment.bucket_id) >= 0
    counts = np.asarray([len(c) for c in index.captions], dtype=np.int64)[ok]
    return {
        "missing": int(np.count_nonzero(counts == 0)),
        "several": int(np.count_nonzero(counts > 1)),
        "tokens": tokens,
    }


def token_figures(lengths: np.ndarray, max_length: int) -> dict[str, Any]:
    """p50 / p95 / max token length (special tokens included); how many exceed ``max_length``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    stats = summarize(lengths)
    return {
        "max_length": int(max_length),
        "captions": int(lengths.size),
        "p50": stats["p50"],
        "p95": stats["p95"],
        "max": None if stats["max"] is None else int(stats["max"]),
        "truncated": int(np.count_nonzero(lengths > max_length)),
    }


# --------------------------------------------------------------------------- text


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _fit(text: str, width: int) -> str:
    """Shorten ``text`` to ``width`` characters, keeping its end (the file name)."""
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def _shown(path: str) -> str:
    """A path for people: relative to the working folder when inside it, escaped (the JSON
    keeps it exactly)."""
    if os.path.isabs(path):
        try:
            rel = os.path.relpath(path)
            path = rel if not rel.startswith(os.pardir) else path
        except ValueError:  # another drive on Windows
            pass
    return escape(path)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _files_lines(files: dict[str, Any], width: int) -> list[str]:
    lines = [
        f"Files      {files['seen']} seen · {files['accepted']} accepted · "
        f"{files['rejected']} rejected"
    ]
    for reason, entry in files["rejections"].items():
        lines.append(f"  {escape(reason):<18} {entry['count']:>6}")
        for ex in entry["examples"]:
            detail = f"  ({escape(ex['detail'])})" if ex["detail"] else ""
            lines.append("      " + _fit(_shown(ex["path"]) + detail, width - 6))
    return lines


def _notice_lines(notices: dict[str, int]) -> list[str]:
    counts = " · ".join(f"{reason} {n}" for reason, n in notices.items())
    return [f"Notices    {counts} (the images are kept; not counted as files above)"]


def _ladder_lines(figures: dict[str, Any]) -> list[str]:
    lad, t = figures["ladder"], figures["timings"]
    levels = " ".join(
        f"{math.isqrt(a)}²" if math.isqrt(a) ** 2 == a else str(a) for a in lad["levels"]
    )
    used = len(figures["buckets"])
    model = lad["model"] or "custom"
    timing = " · ".join(f"{k} {v:.2f} s" for k, v in t.items())
    return [
        f"Ladder     {model}: {len(lad['buckets'])} buckets, {used} used · levels {levels} · "
        f"multiple {lad['multiple']} · aspect ≤ {lad['max_aspect']:g}:1",
        f"Time       {timing}",
    ]


def _bucket_lines(figures: dict[str, Any], width: int) -> list[str]:
    buckets, plan = figures["buckets"], figures["plan"]
    if not buckets:
        return ["Buckets    none: no image was accepted"]
    head = f"  {'W x H':^11} {'aspect':>6} {'images':>7} {'share':>6} "
    head += f"{'bs/rank':>7} {'steps':>6} {'padded':>6} "
    bar_width = max(0, min(30, width - len(head) - 1))
    lines = [
        f"Buckets    world size {plan['world_size']} · "
        + (
            f"batch size {plan['batch_size']} per rank"
            if plan["batch_size"] is not None
            else f"at most {plan['max_pixels_per_batch']} pixels per batch"
        ),
        head.rstrip(),
    ]
    top = max(b["share"] for b in buckets)
    for b in buckets:
        bar = "█" * max(1, round(bar_width * b["share"] / top)) if bar_width else ""
        flag = " !" if b["underfilled"] else "  "
        lines.append(
            f"{flag}{b['width']:>5}x{b['height']:<5} {b['aspect']:>6.2f} {b['images']:>7} "
            f"{_pct(b['share']):>6} {b['batch_size']:>7} {b['steps']:>6} "
            f"{b['padded']:>6} {bar}"
        )
    thin = [b for b in buckets if b["underfilled"]]
    if thin:
        lines.append(
            f"  ! {_plural(len(thin), 'bucket')} hold fewer images than one global step "
            "(a short batch, or duplicates where fewer images than ranks):"
        )
        names = ", ".join(
            f"{b['width']}x{b['height']} ({b['images']} of {b['global_step']})" for b in thin
        )
        lines += textwrap.wrap(
            names, width - 4, initial_indent="    ", subsequent_indent="    ", max_lines=4,
            placeholder=" …",
        )
    return lines


def _quality_lines(q: dict[str, Any], max_aspect: float) -> list[str]:
    lines = [f"Quality    {'':<16}{'mean':>7}{'p50':>7}{'p95':>7}{'max':>7}"]
    for key, label in (("crop_loss", "crop loss"), ("resolution_loss", "resolution loss")):
        s = q[key]
        lines.append(
            f"           {label:<16}" + "".join(f"{_pct(s[k]):>7}" for k in s)
        )
    lines.append(
        f"           upscaled {q['upscaled']} · extreme aspect (beyond {max_aspect:g}:1) "
        f"{q['extreme_aspect']}"
    )
    return lines


def _plan_lines(plan: dict[str, Any]) -> list[str]:
    kept = plan["samples"] - plan["dropped"]
    what = (f"{kept} occurrences of {plan['accepted']} images" if plan["repeats"]
            else _plural(kept, "image"))
    return [
        f"Plan       {plan['steps']} steps per rank per epoch · {kept + plan['padded']} samples "
        f"per epoch ({what} + {_plural(plan['padded'], 'padded duplicate')}) · "
        f"{plan['dropped']} dropped · last batch {plan['last_batch']}: "
        f"{plan['short_steps']} short"
    ]


def _trade_lines(trade: dict[str, Any], width: int) -> list[str]:
    lines = [f"Trade      {'':<18}{'buckets':>8}{'res mean':>9}{'p95':>7}{'max':>7}"
             f"{'crop':>7}{'p95':>7}  short steps (global batch {trade['global_batch']})"]
    for r in trade["rows"]:
        res, crop = r["resolution_loss"], r["crop_loss"]
        mark = "*" if r["chosen"] else " "
        lines.append(f"         {mark} {r['ladder']:<18}{r['buckets']:>8}{_pct(res['mean']):>9}"
                     f"{_pct(res['p95']):>7}{_pct(res['max']):>7}{_pct(crop['mean']):>7}"
                     f"{_pct(crop['p95']):>7}  {r['short_steps']} of {r['steps']}")
    lines.append("           (* the ladder this report uses; losses over accepted images)")
    if trade["worst"]:
        lines.append("           most pixels lost:")
    for w in trade["worst"]:
        head = (f"{_fit(_shown(w['path']), max(20, width - 70))} {w['width']}x{w['height']} -> "
                f"{w['bucket'][0]}x{w['bucket'][1]} {_pct(w['resolution_loss'])}")
        lines.append(f"             {head}: {w['why']}")
    return lines


def _advice_lines(advice: dict[str, Any]) -> list[str]:
    lines = [f"Advice   ! {p}" if not i else f"         ! {p}"
             for i, p in enumerate(advice["problems"])]
    return [*lines, f"           fix: {advice['fix']}"]


def _caption_lines(c: dict[str, Any]) -> list[str]:
    lines = [
        f"Captions   {c['missing']} images without a caption · {c['several']} with several"
    ]
    tokens = c["tokens"]
    if tokens is None:
        lines.append("           token lengths: pass --tokenizers DIR to measure them")
        return lines
    lines.append(f"           {'tokens':<12}{'p50':>7}{'p95':>7}{'max':>7}  truncated")
    for name, t in tokens.items():
        label = f"{name.upper()} ({t['max_length']})"
        lines.append(
            f"           {label:<12}{t['p50']:>7.0f}{t['p95']:>7.0f}{t['max']:>7}"
            f"  {t['truncated']} of {t['captions']}"
            if t["captions"]
            else f"           {label:<12}{'-':>7}{'-':>7}{'-':>7}  0 of 0"
        )
    return lines


def render_text(figures: dict[str, Any], width: int = 100) -> str:
    """The human report for a figures dict (see :func:`gather`), fitted to ``width`` columns."""
    width = max(60, width)
    parts = [
        [f"bucket-report  {_fit(_shown(figures['source']), width - 15)}"],
        _files_lines(figures["files"], width)
        + (_notice_lines(figures["notices"]) if figures["notices"] else []),
        _ladder_lines(figures),
        _bucket_lines(figures, width),
        _quality_lines(figures["quality"], figures["ladder"]["max_aspect"]),
    ]
    if figures["plan"] is not None and figures["buckets"]:
        parts.append(_plan_lines(figures["plan"]))
    if figures.get("trade"):
        parts.append(_trade_lines(figures["trade"], width))
    if figures["advice"]:
        parts.append(_advice_lines(figures["advice"]))
    parts.append(_caption_lines(figures["captions"]))
    pairs = figures["pairs"]
    if pairs["conditioning_images"] or pairs["rows_with_mask"] or pairs["rejected"]:
        parts.append(_pair_lines(pairs))
    text = "\n\n".join("\n".join(p) for p in parts)
    return "\n".join(_wrap(line, width) for line in text.split("\n")) + "\n"


def _wrap(line: str, width: int) -> str:
    """Fold a line longer than ``width``: between its `` · `` items where possible, else at
    spaces; continuation lines keep the line's indent (11 columns for a labelled line)."""
    if len(line) <= width:
        return line
    indent = " " * (len(line) - len(line.lstrip()) or 11)
    out: list[str] = []
    current = ""
    for item in line.split(" · "):
        candidate = f"{current} · {item}" if current else item
        if len(candidate) <= width or not current:
            current = candidate
        else:
            out.append(current + " ·")
            current = indent + item
    out.append(current)
    fold = textwrap.TextWrapper(width, subsequent_indent=indent)
    return "\n".join(piece for part in out for piece in fold.wrap(part))


def write_json(figures: dict[str, Any], dest: str, stdout: TextIO) -> None:
    """Write the figures as one JSON object to ``dest`` (atomically), or to ``stdout`` for ``-``."""
    text = json.dumps(figures, indent=1, allow_nan=False) + "\n"
    if dest == "-":
        stdout.write(text)
        return
    atomic_write_bytes(dest, text.encode("utf-8"))


# --------------------------------------------------------------------------- command


def _repeats(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of repeats, got {text!r}") from None
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"expected repeats above 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``bucket-report`` command line."""
    p = argparse.ArgumentParser(
        prog="bucket-report",
        description="Report what aspect-ratio bucketing will do to a data set: files accepted "
        "and rejected, buckets, padding, crop and resolution loss, the sampler's plan, captions.",
        epilog="Exit codes: 0 ok, 2 usage or configuration error, 1 unexpected failure.",
    )
    p.add_argument("source", nargs="?", help="a folder, a manifest (.jsonl .json .csv .tsv "
                   ".parquet), or anything else bucketing.scan accepts")
    p.add_argument("--config", metavar="FILE.toml", help="instead of SOURCE: the mix of a "
                   "dataset config file (bucketing.from_config), per dataset")
    p.add_argument("--model", default="flux", choices=sorted(MODEL_SPECS),
                   help="model preset for the ladder and T5 length (default: flux)")
    add_ladder_options(p)
    p.add_argument("--min-bucket-size", type=positive_int, metavar="N",
                   help="merge buckets of fewer than N images into their neighbours")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--batch-size", type=positive_int, metavar="B",
                      help="per-rank batch size (default: 1)")
    size.add_argument("--max-pixels-per-batch", type=area, metavar="P",
                      help="per-rank pixel budget: each bucket gets floor(P / (w*h)) images")
    p.add_argument("--world-size", type=positive_int, default=1, metavar="W",
                   help="number of ranks (GPUs) to plan for (default: 1)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampler seed (default: 0)")
    last = p.add_mutually_exclusive_group()
    last.add_argument("--last-batch", choices=("short", "pad", "drop"), default="short",
                      help="each bucket's last partial global step: split short across ranks "
                      "(default), padded with duplicates, or dropped")
    last.add_argument("--drop-last", dest="last_batch", action="store_const", const="drop",
                      help="the same as --last-batch drop")
    p.add_argument("--repeats", type=_repeats, default=1.0, metavar="R",
                   help="times each image appears per epoch (a fraction is drawn per epoch)")
    p.add_argument("--tokenizers", metavar="DIR",
                   help="a FLUX checkout (or folder) with tokenizer/ (CLIP) and tokenizer_2/ "
                   "(T5): measure caption token lengths and truncation")
    p.add_argument("--cache", metavar="PATH", help="scan cache (parquet); rescans are incremental")
    add_column_option(p)
    p.add_argument("--workers", type=positive_int, metavar="N",
                   help="scan worker processes (default: all cores)")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON to FILE ('-': stdout, "
                   "and the text report goes to stderr)")
    p.add_argument("--plot", metavar="FILE.png", help="write occupancy and loss plots")
    p.add_argument("--preview", metavar="FILE.png",
                   help="write a grid of originals with crop boxes beside the model's input")
    p.add_argument("--estimate-cache", action="store_true",
                   help="print the disk size bucket-cache would write for this data set")
    return p


def plan_figures(
    assignment: Any, args: argparse.Namespace
) -> tuple[dict[str, Any] | None, dict[int, dict[str, Any]]]:
    """Build the real sampler (``samplers.BucketBatchSampler``, rank 0) and read its
    ``stats()``: the epoch figures (its keys as they are, with the report's batch settings
    and seed) and, per bucket id, its per-bucket figures (``batch_size``, ``steps``,
    ``padded``, ``dropped``, ...); ``(None, {})`` when nothing was accepted."""
    if not assignment.accepted.any():
        return None, {}
    size = (
        {"batch_size": args.batch_size or 1}
        if args.max_pixels_per_batch is None
        else {"max_pixels_per_batch": args.max_pixels_per_batch}
    )
    sampler = _config(
        BucketBatchSampler, assignment, **size, world_size=args.world_size, rank=0,
        seed=args.seed, last_batch=args.last_batch,
        repeats=None if args.repeats == 1 else args.repeats,
    )
    stats = sampler.stats()
    # "bucket", "wh" and "count" repeat the report's id, width x height and images.
    per_bucket = {
        b["bucket"]: {k: v for k, v in b.items() if k not in ("bucket", "wh", "count")}
        for b in stats["buckets"]
    }
    plan = {
        "batch_size": size.get("batch_size"),
        "max_pixels_per_batch": size.get("max_pixels_per_batch"),
        "seed": args.seed,
        **{k: v for k, v in stats.items() if k != "buckets"},
    }
    return plan, per_bucket


def _target_buckets(plan: dict[str, Any], buckets: list[dict[str, Any]]) -> int:
    """About one global step of samples per bucket: the budget the advice aims at."""
    step = int(np.median([b["global_step"] for b in buckets]))
    return max(1, round((plan["samples"] - plan["dropped"]) / step))


def advice(
    plan: dict[str, Any] | None, buckets: list[dict[str, Any]],
    trade: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """``{"problems": [...], "fix": ...}`` when padding duplicates outnumber the images of an
    epoch, or when many buckets (at least 3, a quarter of those used) hold a single sample (an
    image seen once: a repeated one fills its batch with its repeats); None otherwise. The fix
    is a ladder fitted with fewer buckets (``--max-buckets K``, i.e.
    ``BucketLadder.from_data(index, max_buckets=K)``), K one of the budgets of ``trade`` (the
    largest at or below about one global step of samples per bucket), quoted with the p95
    resolution and crop loss the trade table prints for it; or for padding alone on one GPU,
    short last batches (``--last-batch short``)."""
    if plan is None or not buckets:
        return None
    images = plan["samples"] - plan["dropped"]
    k = _target_buckets(plan, buckets)
    problems = []
    padding = plan["padded"] > images
    if padding:
        problems.append(f"most of the epoch is padding: {plan['padded']} of "
                        f"{images + plan['padded']} samples are duplicates "
                        f"({_plural(len(buckets), 'bucket')} for {plan['accepted']} images)")
    ones = sum(b["samples"] <= 1 for b in buckets)
    if ones >= 3 and 4 * ones >= len(buckets) and len(buckets) > k:
        problems.append(f"{ones} of {len(buckets)} buckets hold a single sample (each trains "
                        "in a batch of its own)")
    if not problems:
        return None
    if padding and len(problems) == 1 and plan["last_batch"] == "pad" and plan["world_size"] == 1:
        # On one GPU short last batches need no duplicate at all.
        fix = '--last-batch short  (in code: BucketBatchSampler(..., last_batch="short"))'
        return {"problems": problems, "fix": fix}
    rows = [r for r in (trade or {}).get("rows", []) if r["ladder"].startswith("fitted")]
    if rows:
        below = [r for r in rows if r["buckets"] <= k]
        row = max(below, key=lambda r: r["buckets"]) if below else min(
            rows, key=lambda r: r["buckets"])
        k = int(row["ladder"].split(", ")[1])
        cost = (f"resolution loss p95 {_pct(row['resolution_loss']['p95'])}, crop loss p95 "
                f"{_pct(row['crop_loss']['p95'])}, {row['short_steps']} short steps; ")
    else:
        cost = ""
    fix = f"--max-buckets {k}  ({cost}in code: BucketLadder.from_data(index, max_buckets={k}))"
    return {"problems": problems, "fix": fix}


def trade_figures(
    index: Any, base: BucketLadder, assignment: Any, plan: dict[str, Any] | None,
    buckets: list[dict[str, Any]], repeats: float,
) -> dict[str, Any] | None:
    """What the budget trades, measured on this data (:func:`bucketing.ladder_trade
    .ladder_trade`): rows for the preset, fitted budgets (with the advice's target among
    them), own sizes and the chosen ladder, at the plan's median global batch; and the images
    that lose the most pixels, with why. None when no image was accepted."""
    if plan is None or not buckets:
        return None
    step = int(np.median([b["global_step"] for b in buckets]))
    rows = ladder_trade(index, base, assignment.ladder, global_batch=step,
                        repeats=float(np.mean(repeats)),
                        budgets=[_target_buckets(plan, buckets)])
    worst = worst_images(index, assignment)
    for w in worst:
        w["path"] = index.paths[w.pop("row")]
    return {"global_batch": step, "rows": rows, "worst": worst}


def measure_tokens(folder: str, model: str, captions: list[str]) -> dict[str, Any]:
    """Token-length figures for every caption, with the real tokenizers in ``folder``.

    FLUX and SD3 presets: CLIP (77) and T5 (the preset's length) through
    ``FluxTokenizer.token_lengths``; CLIP-only presets (SDXL, SD1.5): CLIP from ``tokenizer/``
    alone (their ``tokenizer_2/``, if any, is a second CLIP, not T5).
    """
    t5_length = MODEL_SPECS[model].t5_max_length
    if t5_length is None:
        clip = load_clip_tokenizer(os.path.join(folder, "tokenizer"))
        ids = clip(captions, verbose=False)["input_ids"] if captions else []
        return {"clip": token_figures(np.asarray([len(s) for s in ids]), CLIP_MAX_LENGTH)}
    tok = FluxTokenizer.from_flux_dir(folder, t5_max_length=t5_length)
    lengths = tok.token_lengths(captions)
    return {
        "clip": token_figures(lengths["clip"], CLIP_MAX_LENGTH),
        "t5": token_figures(lengths["t5"], tok.t5_max_length),
    }


def gather(
    *,
    source: str,
    index: Any,
    assignment: Any,
    plan: dict[str, Any] | None,
    per_bucket: dict[int, dict[str, Any]],
    timings: dict[str, float],
    tokens: dict[str, Any] | None,
) -> dict[str, Any]:
    """Everything the report says, as one plain JSON-ready dict (schema :data:`SCHEMA_VERSION`).

    ``plan`` holds the sampler's epoch-level figures (None when no image was accepted) and
    ``per_bucket`` its figures per bucket id, both as :func:`plan_figures` returns them.
    """
    ladder = assignment.ladder
    rows = image_rows(index, assignment)
    details = [f"{w}x{h}" for w, h in zip(index.width, index.height, strict=True)]
    details += [r.detail for r in file_rejections(index)]
    counts = assignment.counts
    n_ok = int(counts.sum())
    world = plan["world_size"] if plan else 1
    buckets = []
    for b in np.flatnonzero(counts):
        w, h = (int(v) for v in ladder.buckets[b])
        fig = per_bucket[int(b)]
        step = world * fig["batch_size"]
        buckets.append(
            {
                "id": int(b),
                "width": w,
                "height": h,
                "aspect": w / h,
                "images": int(counts[b]),
                "share": int(counts[b]) / n_ok,
                "global_step": step,
                "underfilled": bool(counts[b] < step),
                **fig,
            }
        )
    buckets.sort(key=lambda r: (r["aspect"], r["width"] * r["height"]))
    return {
        "schema": SCHEMA_VERSION,
        "source": source,
        "files": file_figures(rows, details),
        "notices": notice_counts(index),
        "ladder": ladder_figures(ladder),
        "timings": timings,
        "plan": plan,
        "buckets": buckets,
        "advice": advice(plan, buckets),
        "trade": None,
        "quality": quality_figures(assignment),
        "captions": caption_figures(index, assignment, tokens),
        "pairs": pair_figures(index, assignment),
        "images": rows,
    }


def _first_loadable(dataset: Any, rows: np.ndarray) -> tuple[dict, Any] | None:
    """The first of ``rows`` whose sample and original (decoded in full, within the
    dataset's decode limits) both decode, or None."""
    for row in rows.tolist():
        try:
            sample = dataset[row]
            return sample, decode_image(dataset.index.image_source(sample["index"]),
                                        dataset.decode)
        except Exception:  # noqa: BLE001 - a broken file must not stop the preview
            continue
    return None


def preview_tiles(
    index: Any, assignment: Any, buckets: list[dict[str, Any]], *, seed: int, count: int = 6
) -> list[Any]:
    """Preview tiles for up to ``count`` buckets spread over the aspect range (one image each):
    the sample exactly as ``TextToImageDataset`` makes it with a random crop and a 50% flip,
    with its conditioning images and loss mask when the index has them (cut by the same
    crop box and flip)."""
    if not buckets:
        return []
    picks = np.unique(np.linspace(0, len(buckets) - 1, min(count, len(buckets))).round())
    dataset = TextToImageDataset(
        index,
        assignment,
        image_transform=BucketResizeCrop(
            crop="random", flip_p=0.5, allow_upscale=bool(np.any(assignment.upscaled))
        ),
        caption_transform=CaptionTransform(),
        seed=seed,
        on_error="substitute",
    )
    ids = np.asarray(assignment.bucket_id)
    tiles = []
    for k in picks.astype(int):
        bucket = buckets[k]
        loaded = _first_loadable(dataset, np.flatnonzero(ids == bucket["id"])[:3])
        if loaded is None:  # no member decodes: the report already says the rest
            continue
        sample, original = loaded
        used = sample["index"]
        height, width = sample["original_size"]
        fit = sample["fit"]  # the params the dataset drew: the box is the one it cut
        y, x, bh, bw = fit.crop
        new_w, new_h = fit.resized
        original.thumbnail((640, 640), Image.Resampling.LANCZOS)
        kx, ky = original.width / new_w, original.height / new_h
        conditioning = sample.get("conditioning_pixel_values")
        mask = sample.get("loss_mask")
        tiles.append(
            PreviewTile(
                original=np.asarray(original),
                box=(x * kx, y * ky, (x + bw) * kx, (y + bh) * ky),
                model_input=sample["pixel_values"].permute(1, 2, 0).numpy(),
                title=f"{_fit(escape(os.path.basename(index.paths[used])) or f'row {used}', 30)}\n"
                f"{width}x{height}",
                caption=sample["caption"],
                flipped=fit.flip,
                conditioning=[] if conditioning is None
                else [c.permute(1, 2, 0).numpy() for c in conditioning],
                mask=None if mask is None else mask[0].numpy(),
            )
        )
    return tiles


def _config(call: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a configuration step; the errors a user can fix become :class:`ConfigError`."""
    try:
        return call(*args, **kwargs)
    except (ValueError, OSError) as error:
        raise ConfigError(str(error) or type(error).__name__) from error


_OUTPUTS = ("json", "plot", "preview")


def check_outputs(args: argparse.Namespace, listed: Sequence[str] = ()) -> None:
    """Refuse (:class:`ConfigError`) an output path that could not be written or must not be:
    its folder missing (never created) or not writable, two outputs on one path, or a path
    that exists and is not a regular file (a device, FIFO, folder, or a link to one), is the
    source, or is one of the ``listed`` (scanned) files."""
    seen: dict[str, str] = {}
    for opt in _OUTPUTS:
        path = getattr(args, opt)
        if not path or (opt == "json" and path == "-"):
            continue
        flag = f"--{opt} {escape(path)}"
        real = os.path.realpath(path)
        folder = os.path.dirname(real)
        if real in seen:
            raise ConfigError(f"{flag}: the same file as {seen[real]}")
        seen[real] = flag
        if not os.path.isdir(folder):
            raise ConfigError(f"{flag}: folder {escape(folder)} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"{flag}: folder {escape(folder)} is not writable")
        try:
            mode = os.stat(real).st_mode
        except FileNotFoundError:
            continue  # a new file
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{flag}: exists and is not a regular file; refusing to "
                              "write over it")
        if any(_same_file(real, p) for p in _inputs_named(os.path.basename(real), args, listed)):
            raise ConfigError(f"{flag}: is an input of this report; refusing to write over it")


SIDECARS = (".txt", ".caption")  # caption files a folder scan reads beside each image
FOLDER_MANIFESTS = ("metadata.jsonl",)  # read in every folder of a folder scan


def _inputs_named(name: str, args: argparse.Namespace, listed: Sequence[str]) -> list[str]:
    """Every file this report read that could be called ``name``: the source, the scan
    cache, the scanned files, their caption sidecars and their folders' metadata files."""
    inputs = [p for p in (args.source, args.cache) if p]
    stem, ext = os.path.splitext(name)
    for path in listed:
        if os.path.basename(path) == name:
            inputs.append(path)
        if ext in SIDECARS and os.path.basename(os.path.splitext(path)[0]) == stem:
            inputs.append(os.path.splitext(path)[0] + ext)
    if name in FOLDER_MANIFESTS:
        inputs += sorted({os.path.join(os.path.dirname(p), name) for p in listed})
    return inputs


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # b is not a local file (a URL, a missing path)
        return False


def run(args: argparse.Namespace) -> tuple[dict[str, Any], Any, Any]:
    """Scan, assign and plan as the arguments say; returns (figures, index, assignment)."""
    ladder = _config(BucketLadder.for_model, args.model, **ladder_overrides(args))

    t0 = time.perf_counter()
    index = _config(scan, args.source, workers=args.workers, cache=args.cache,
                    column_map=dict(args.column) or None)
    check_outputs(args, [*index.paths, *(r.path for r in index.rejections)])
    t1 = time.perf_counter()
    base = ladder
    ladder = _config(fitted_ladder, ladder, index, fit=args.fit, max_buckets=args.max_buckets)
    assignment = assign(index, ladder, allow_upscale=args.allow_upscale,
                        min_bucket_size=args.min_bucket_size)
    t2 = time.perf_counter()
    plan, per_bucket = plan_figures(assignment, args)
    t3 = time.perf_counter()
    tokens = None
    if args.tokenizers:
        ok = np.asarray(assignment.bucket_id) >= 0
        captions = [c for i in np.flatnonzero(ok) for c in index.captions[i]]
        tokens = _config(measure_tokens, args.tokenizers, args.model, captions)
    timings = {"scan": t1 - t0, "assign": t2 - t1, "plan": t3 - t2}
    if tokens is not None:
        timings["tokenize"] = time.perf_counter() - t3
    figures = gather(
        source=str(args.source),
        index=index,
        assignment=assignment,
        plan=plan,
        per_bucket=per_bucket,
        timings=timings,
        tokens=tokens,
    )
    figures["trade"] = trade_figures(index, base, assignment, plan, figures["buckets"],
                                     args.repeats)
    figures["advice"] = advice(plan, figures["buckets"], figures["trade"])
    return figures, index, assignment


def _write_outputs(args: argparse.Namespace, figures: dict, index: Any, assignment: Any) -> None:
    try:
        if args.json:
            write_json(figures, args.json, sys.stdout)
        if args.plot:
            report_plots.plot_report(figures, args.plot)
        if args.preview:
            tiles = preview_tiles(index, assignment, figures["buckets"], seed=args.seed)
            if not tiles:
                raise ConfigError("--preview: no accepted image could be loaded to preview")
            report_plots.plot_preview(tiles, args.preview)
    except OSError as error:
        raise ConfigError(f"cannot write output: {error}") from error


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bucket-report``; returns the exit code (0 ok, 2 config error, 1 bug)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.source is None) == (args.config is None):
        parser.error("give a SOURCE or --config FILE.toml (one of them)")
    text_out = sys.stderr if args.json == "-" else sys.stdout
    if args.config:
        return report_mix(args.config, args.world_size, text_out)
    try:
        check_outputs(args)
        figures, index, assignment = run(args)
        width = shutil.get_terminal_size((100, 24)).columns
        text_out.write(render_text(figures, width))
        if args.estimate_cache:
            text_out.write(estimate_lines(index, assignment, args.model, args.tokenizers))
        text_out.flush()
        _write_outputs(args, figures, index, assignment)
    except ConfigError as error:
        print(f"bucket-report: error: {escape(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bucket-report: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the last resort: a short, honest message
        where = "".join(traceback.format_list(traceback.extract_tb(error.__traceback__)[-3:]))
        print(
            f"bucket-report: unexpected error: {type(error).__name__}: {error}\n{where}"
            "This is a bug in aspect-bucketing, not in your data: please report it with the "
            "command line you ran.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
