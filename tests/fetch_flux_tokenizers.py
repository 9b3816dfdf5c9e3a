"""Fetch the real FLUX.1 tokenizer files (CLIP-L and T5-XXL) for the tests.

They ship inside the PyPI wheel ``diffsynth==1.1.9`` (Apache-2.0) under
``diffsynth/tokenizer_configs/flux/``; we download that wheel with pip and unpack
only the two tokenizer folders into DEST/tokenizer and DEST/tokenizer_2.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "diffsynth==1.1.9"
PREFIX = "diffsynth/tokenizer_configs/flux/"
FOLDERS = {"tokenizer_1/": "tokenizer/", "tokenizer_2/": "tokenizer_2/"}


def fetch(dest: Path) -> Path:
    """Download the wheel and extract the tokenizers into ``dest``; return ``dest``."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", tmp],
            check=True,
        )
        (wheel,) = Path(tmp).glob("diffsynth-*.whl")
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if not name.startswith(PREFIX) or name.endswith("/"):
                    continue
                rel = name[len(PREFIX):]
                for src, dst in FOLDERS.items():
                    if rel.startswith(src):
                        out = dest / (dst + rel[len(src):])
                        out.parent.mkdir(parents=True, exist_ok=True)
                        out.write_bytes(zf.read(name))
    return dest


if __name__ == "__main__":
    dest = Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/flux-tokenizers")
    print(f"FLUX tokenizers in {fetch(dest)}")
