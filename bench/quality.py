"""Resize quality of the fit kernels against a float64 Lanczos reference.

Every method fits the same decoded picture to the same bucket with the same crop box; the
reference is a separable Lanczos-3 (antialiased: the kernel widened by 1/scale, Pillow's
convention) computed in float64 from the 8-bit pixels and never rounded. Two measures:

- PSNR (dB, 8-bit peak) against the reference, on the bundled photos of ``examples/data``
  (each at its flux bucket, decoded at full size) and on a zone plate;
- aliasing on a zone plate, a chirp ``cos(pi k r^2)`` whose local frequency k r reaches the
  source's Nyquist limit at the edges: where that frequency lies above the output's Nyquist
  limit, an ideal resize outputs flat grey, so any contrast left there is aliasing. Given as
  the energy left, in percent of a full-contrast sinusoid's energy, and in dB (lower is
  better). Rows without antialiasing show what the measure catches.

    python bench/quality.py           # 14 photos, zone plates 1024 px at three scales
    python bench/quality.py --tiny    # smoke test: 3 photos, one small zone plate
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, print_table  # noqa: E402

from bucketing.assign import assign  # noqa: E402
from bucketing.index import ImageIndex  # noqa: E402
from bucketing.ladder import BucketLadder  # noqa: E402
from transforms.image import load_image  # noqa: E402
from transforms.resize_crop import BucketResizeCrop, fit, fit_params, resized_size  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
Box = tuple[int, int, int, int]  # (y, x, h, w) in the resized image
Method = Callable[[Image.Image, tuple[int, int], Box], np.ndarray]


# -- the reference ------------------------------------------------------------------------------


def lanczos_weights(n_in: int, n_out: int, first: int, count: int, lobes: int = 3) -> np.ndarray:
    """(count, n_in) float64 weights of output samples ``first .. first+count`` of a
    Lanczos resize from ``n_in`` to ``n_out`` samples (pixel centres at i + 0.5; support
    widened by n_in / n_out when shrinking; each row normalised, clipped at the borders)."""
    step = n_in / n_out
    widen = max(1.0, step)
    centre = (np.arange(first, first + count) + 0.5) * step
    j = np.arange(n_in) + 0.5
    x = (j[None, :] - centre[:, None]) / widen
    w = np.where(np.abs(x) < lobes, np.sinc(x) * np.sinc(x / lobes), 0.0)
    return w / w.sum(axis=1, keepdims=True)


def reference(img: Image.Image, resized_wh: tuple[int, int], box: Box) -> np.ndarray:
    """The float64 Lanczos-3 resize of ``img`` to ``resized_wh``, cut to ``box``: (h, w, 3)."""
    src = np.asarray(img, dtype=np.float64)
    (rw, rh), (y, x, h, w) = resized_wh, box
    rows = lanczos_weights(src.shape[0], rh, y, h)
    cols = lanczos_weights(src.shape[1], rw, x, w)
    return np.einsum("yi,ijc,xj->yxc", rows, src, cols, optimize=True)


# -- the methods --------------------------------------------------------------------------------


def kernel(resample: str | None) -> Method:
    """Our fit kernel with ``resample`` (None: the default of ``BucketResizeCrop()``)."""
    mode = BucketResizeCrop().resample if resample is None else resample

    def run(img: Image.Image, bucket: tuple[int, int], box: Box) -> np.ndarray:
        params = fit_params(img.size, bucket, crop=(box[0], box[1]))
        out = fit(img, params, resample=mode)
        return out.permute(1, 2, 0).numpy().astype(np.float64)

    return run


def torch_no_antialias(img: Image.Image, bucket: tuple[int, int], box: Box) -> np.ndarray:
    """Bilinear without antialiasing (what ``F.resize(antialias=False)`` gives)."""
    resized = _resized(img, bucket)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        chw = torch.from_numpy(np.asarray(img)).permute(2, 0, 1)
    out = F.resize(chw, [resized[1], resized[0]], antialias=False)
    y, x, h, w = box
    return out[:, y : y + h, x : x + w].permute(1, 2, 0).numpy().astype(np.float64)


def _resized(img: Image.Image, bucket: tuple[int, int]) -> tuple[int, int]:
    return resized_size(img.width, img.height, bucket)


def methods() -> dict[str, Method]:
    """Label -> method, the default first."""
    default = BucketResizeCrop().resample
    out: dict[str, Method] = {f"default ({default})": kernel(None)}
    for mode in ("lanczos", "bicubic", "bilinear"):
        if mode != default:
            out[mode] = kernel(mode)
    out["bilinear, no antialias"] = torch_no_antialias
    return out


# -- measures -----------------------------------------------------------------------------------


def psnr_of(error: np.ndarray) -> float:
    """PSNR in dB with an 8-bit peak of an error array (inf when all zero)."""
    mse = float(np.mean(error**2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def zone_plate(size: int) -> tuple[Image.Image, float]:
    """A grey ``size`` x ``size`` zone plate and its chirp rate k (cycles/px per px of radius):
    local frequency k r reaches 0.5 cycles/px at the middle of each edge."""
    k = 0.5 / (size / 2)
    c = np.arange(size) + 0.5 - size / 2
    r2 = c[None, :] ** 2 + c[:, None] ** 2
    grey = np.rint(127.5 + 127.5 * np.cos(math.pi * k * r2)).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=2)), k


def aliasing_energy(out: np.ndarray, size: int, k: float, resized: int, box: Box) -> float:
    """Energy left (fraction of a full-contrast sinusoid's) where the zone plate's local
    frequency exceeds the output's Nyquist limit, inside the source's own Nyquist disc."""
    scale = resized / size
    y, x, h, w = box
    yy = (np.arange(y, y + h) + 0.5) / scale - size / 2
    xx = (np.arange(x, x + w) + 0.5) / scale - size / 2
    r = np.sqrt(yy[:, None] ** 2 + xx[None, :] ** 2)
    region = (k * r > 0.5 * scale) & (r <= size / 2)
    grey = out.mean(axis=2)[region]
    return float(np.mean((grey - 127.5) ** 2) / (127.5**2 / 2))


# -- running ------------------------------------------------------------------------------------


def photo_rows(count: int, meth: dict[str, Method]) -> list[dict]:
    """PSNR of each method over the bundled photos at their flux buckets: all pixels pooled,
    and the worst photo."""
    folder = REPO / "examples" / "data"
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".png"))[:count]
    images = [load_image(p) for p in paths]
    index = ImageIndex(
        paths=[str(p) for p in paths],
        width=[im.width for im in images],
        height=[im.height for im in images],
        captions=[[] for _ in paths],
    )
    assignment = assign(index, BucketLadder.for_model("flux"))
    errors: dict[str, list[np.ndarray]] = {label: [] for label in meth}
    for img, ok, wh in zip(images, assignment.accepted, assignment.bucket_wh, strict=True):
        if not ok:
            continue
        bucket = (int(wh[0]), int(wh[1]))
        resized = _resized(img, bucket)
        box = ((resized[1] - bucket[1]) // 2, (resized[0] - bucket[0]) // 2, bucket[1], bucket[0])
        ref = reference(img, resized, box)
        for label, method in meth.items():
            errors[label].append(method(img, bucket, box) - ref)
    return [
        {
            "input": f"{len(v)} bundled photos",
            "method": label,
            "PSNR all dB": f"{psnr_of(np.concatenate([e.ravel() for e in v])):.1f}",
            "PSNR worst dB": f"{min(psnr_of(e) for e in v):.1f}",
        }
        for label, v in errors.items()
    ]


def zone_rows(size: int, targets: list[int], meth: dict[str, Method]) -> list[dict]:
    """PSNR and aliasing energy of each method on a zone plate shrunk to each target side."""
    img, k = zone_plate(size)
    rows = []
    for side in targets:
        bucket, box = (side, side), (0, 0, side, side)
        ref = reference(img, bucket, box)
        ref_alias = aliasing_energy(ref, size, k, side, box)
        rows.append(_zone_row(size, side, "float64 Lanczos-3 (reference)", math.inf, ref_alias))
        for label, method in meth.items():
            out = method(img, bucket, box)
            alias = aliasing_energy(out, size, k, side, box)
            rows.append(_zone_row(size, side, label, psnr_of(out - ref), alias))
    return rows


def _zone_row(size: int, side: int, label: str, db: float, alias: float) -> dict:
    return {
        "zone plate": f"{size} -> {side} (x{side / size:.2f})",
        "method": label,
        "PSNR dB": f"{db:.1f}",
        "aliasing %": f"{100 * alias:.3f}",
        "aliasing dB": f"{10 * math.log10(max(alias, 1e-12)):.1f}",
    }


def main(argv: list[str] | None = None) -> None:
    """Print the photo table and the zone-plate table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="smoke test: seconds")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(machine_line())
    meth = methods()
    count, size, targets = (3, 256, [176]) if args.tiny else (99, 1024, [720, 512, 352])
    print_table(photo_rows(count, meth), "PSNR against a float64 Lanczos-3 reference, photos")
    print_table(zone_rows(size, targets, meth), "zone plate: PSNR and aliasing (lower is better)")


if __name__ == "__main__":
    main()
