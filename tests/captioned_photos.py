"""Small random photos with caption sidecars, written for the encoder-cache tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def write_captioned_photos(folder: Path, sizes: Sequence[tuple[int, int]], seed: int = 0) -> Path:
    """``im{i}.png`` of each (w, h) in ``sizes`` with random pixels drawn from ``seed``, and
    ``im{i}.txt`` captions of which three are distinct; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
        (folder / f"im{i}.txt").write_text(f"a photo number {i % 3}")
    return folder
