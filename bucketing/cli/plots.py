"""PNG pictures for ``bucket-report``: the occupancy / loss overview and the batch preview.

Both draw only from plain data — the report's figures dict and small arrays — with
matplotlib's Agg backend (no display needed), and write through ``atomic_path``.
"""

from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass, field
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from bucketing.atomic import atomic_path  # noqa: E402

_ASPECT_TICKS = [(1, 4), (1, 3), (1, 2), (2, 3), (1, 1), (3, 2), (2, 1), (3, 1), (4, 1)]
_ACCENT, _MUTED, _WARN = "#2b6cb0", "#a0aec0", "#dd6b20"


def _save(fig: Any, path: str | os.PathLike, dpi: int) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def _aspect_axis(ax: Any, lo: float, hi: float) -> None:
    """Log-scale x axis with aspect ticks labelled as w:h ratios."""
    ax.set_xscale("log")
    ticks = [(w, h) for w, h in _ASPECT_TICKS if lo <= w / h <= hi]
    ax.set_xticks([w / h for w, h in ticks])
    ax.set_xticklabels([f"{w}:{h}" for w, h in ticks])
    ax.minorticks_off()
    ax.set_xlim(lo, hi)


def plot_report(figures: dict[str, Any], path: str | os.PathLike) -> None:
    """Four panels: bucket occupancy by aspect, the data's aspects against the ladder's,
    and the crop-loss and resolution-loss histograms of accepted images."""
    buckets = figures["buckets"]
    rows = figures["images"]
    sized = [r for r in rows if r["width"] and r["height"]]
    accepted = [r for r in rows if r["bucket"] is not None]
    ladder = np.asarray(figures["ladder"]["buckets"], dtype=np.float64).reshape(-1, 2)

    fig = plt.figure(figsize=(min(24.0, max(12.0, 0.16 * len(buckets))), 8), layout="constrained")
    grid = fig.add_gridspec(2, 3)
    ax_occ = fig.add_subplot(grid[0, :])
    ax_asp, ax_crop, ax_res = (fig.add_subplot(grid[1, i]) for i in range(3))
    n_ok, n_seen = figures["files"]["accepted"], figures["files"]["seen"]
    fig.suptitle(f"bucket-report: {n_ok} of {n_seen} images accepted into {len(buckets)} buckets")

    # occupancy, ordered by aspect (portrait left, landscape right)
    x = np.arange(len(buckets))
    colors = [_WARN if b["underfilled"] else _ACCENT for b in buckets]
    ax_occ.bar(x, [b["images"] for b in buckets], color=colors)
    every = -(-len(buckets) // 150)  # at most 150 labels: they stay legible
    ax_occ.set_xticks(x[::every])
    ax_occ.set_xticklabels(
        [f"{b['width']}x{b['height']}" for b in buckets[::every]],
        rotation=90 if len(buckets) > 8 else 0,
        fontsize=7 if len(buckets) > 24 else 9,
    )
    ax_occ.set_ylabel("images")
    ax_occ.set_title(
        "bucket occupancy (ordered by aspect; orange: fewer images than one global step)"
    )
    ax_occ.margins(x=0.01)

    # the data's aspect ratios against the ladder's
    aspects = np.asarray([r["width"] / r["height"] for r in sized], dtype=np.float64)
    rejected = np.asarray([r["reason"] is not None for r in sized], dtype=bool)
    ladder_aspects = np.unique(np.round(ladder[:, 0] / ladder[:, 1], 4)) if len(ladder) else []
    lo = min([0.25, *aspects, *ladder_aspects]) / 1.1
    hi = max([4.0, *aspects, *ladder_aspects]) * 1.1
    if aspects.size:
        ax_asp.hist(
            [aspects[~rejected], aspects[rejected]], bins=np.geomspace(lo, hi, 40), stacked=True,
            color=[_ACCENT, _MUTED], label=["accepted", "rejected"],
        )
    ax_asp.vlines(
        ladder_aspects, 0.92, 1.0, transform=ax_asp.get_xaxis_transform(), color=_WARN, lw=1,
        label="ladder aspects",
    )
    ax_asp.set_ylim(0, ax_asp.get_ylim()[1] * 1.15)
    _aspect_axis(ax_asp, lo, hi)
    ax_asp.set_title("aspect ratio (w:h)")
    ax_asp.set_ylabel("images")
    ax_asp.legend(loc="upper left", bbox_to_anchor=(0, 0.9), fontsize=8)

    for ax, key, title in (
        (ax_crop, "crop_loss", "crop loss (share of the resized image cut off)"),
        (ax_res, "resolution_loss", "resolution loss (pixels given up)"),
    ):
        values = 100 * np.asarray([r[key] for r in accepted], dtype=np.float64)
        top = min(100.0, max(10.0, 10 * np.ceil(values.max() / 10))) if values.size else 100.0
        if values.size:
            ax.hist(values, bins=np.linspace(0, top, 41), color=_ACCENT)
            ax.axvline(values.mean(), color=_WARN, lw=1.2, label=f"mean {values.mean():.1f}%")
            ax.legend(loc="upper right", fontsize=8)
        ax.set_xlim(0, top)
        ax.set_xlabel("%")
        ax.set_title(title, fontsize=10)
    ax_crop.set_ylabel("images")
    for ax in (ax_occ, ax_asp, ax_crop, ax_res):
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    _save(fig, path, dpi=100)


@dataclass
class PreviewTile:
    """One preview entry: the original (possibly downscaled for display) with the crop box in
    its pixel coordinates ``(x0, y0, x1, y1)``, the model's input (H, W, 3 uint8), and text;
    for a row with paired files its conditioning images as the model gets them (each
    H, W, 3) and its loss mask (H, W uint8 coverage), drawn over the model's input."""

    original: np.ndarray
    box: tuple[float, float, float, float]
    model_input: np.ndarray
    title: str
    caption: str
    flipped: bool
    conditioning: list[np.ndarray] = field(default_factory=list)
    mask: np.ndarray | None = None


def _draw_tile(ax: Any, tile: PreviewTile) -> None:
    """Original (crop box drawn, outside dimmed) and model input side by side, at equal
    display height, in one axes; the file above, the caption below."""
    height = 100.0
    h0, w0 = tile.original.shape[:2]
    h1, w1 = tile.model_input.shape[:2]
    k0, k1 = height / h0, height / h1
    left_w = w0 * k0
    right_x = max(left_w + 8.0, 80.0)  # room for the left title above narrow portraits
    ax.imshow(tile.original, extent=(0, left_w, height, 0))
    ax.imshow(tile.model_input, extent=(right_x, right_x + w1 * k1, height, 0))
    x0, y0, x1, y1 = (v * k0 for v in tile.box)
    shade = {"fc": "black", "alpha": 0.45, "lw": 0}
    for rect in (
        (0, 0, left_w, y0),
        (0, y1, left_w, height - y1),
        (0, y0, x0, y1 - y0),
        (x1, y0, left_w - x1, y1 - y0),
    ):
        ax.add_patch(Rectangle(rect[:2], *rect[2:], **shade))
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="#e53e3e", lw=1.8))
    ax.text(0, -3, tile.title, fontsize=9, va="bottom", ha="left")
    flipped = ", flipped" if tile.flipped else ""
    label = "model input" + (" + mask" if tile.mask is not None else "")
    ax.text(right_x, -3, f"{label}\n{w1}x{h1}{flipped}", fontsize=9, va="bottom", ha="left")
    if tile.mask is not None:  # shade what the loss leaves out (1 - coverage)
        shade_rgba = np.zeros((*tile.mask.shape, 4), dtype=np.float32)
        shade_rgba[..., 0] = 0.85
        shade_rgba[..., 3] = 0.6 * (1.0 - tile.mask.astype(np.float32) / 255.0)
        ax.imshow(shade_rgba, extent=(right_x, right_x + w1 * k1, height, 0))
    end = right_x + w1 * k1
    for k, image in enumerate(tile.conditioning):
        x = end + 8.0
        ax.imshow(image, extent=(x, x + w1 * k1, height, 0))
        ax.text(x, -3, f"conditioning {k}\nsame crop", fontsize=9, va="bottom", ha="left")
        end = x + w1 * k1
    caption = textwrap.fill(tile.caption or "(no caption)", width=64, max_lines=2)
    ax.text(0, height + 4, caption, fontsize=9, va="top", ha="left", style="italic")
    ax.set_xlim(-1, max(end, 210) + 1)
    ax.set_ylim(height + 20, -22)
    ax.set_aspect("equal")
    ax.axis("off")


def plot_preview(tiles: list[PreviewTile], path: str | os.PathLike, columns: int = 2) -> None:
    """A grid of tiles: each the original with its crop box beside what the model receives."""
    if not tiles:
        raise ValueError("plot_preview: no tiles to draw")
    columns = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // columns)
    extra = max(len(t.conditioning) for t in tiles)  # room for conditioning images
    fig, axes = plt.subplots(rows, columns, figsize=((6.4 + 2.4 * extra) * columns, 3.4 * rows),
                             squeeze=False)  # fmt: skip
    fig.subplots_adjust(left=0.01, right=0.99, top=0.99, bottom=0.01, wspace=0.04, hspace=0.04)
    for ax, tile in zip(axes.flat[: len(tiles)], tiles, strict=True):
        _draw_tile(ax, tile)
    for ax in axes.flat[len(tiles) :]:
        ax.axis("off")
    _save(fig, path, dpi=85)
