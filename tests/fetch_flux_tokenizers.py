"""Fetch real tokenizer files (FLUX.1, SD1.5, SDXL, SD3) for the tests: one download.

They ship inside the PyPI wheel ``diffsynth==1.1.9`` (Apache-2.0) under
``diffsynth/tokenizer_configs/``. We download that wheel once with pip and lay the folders out
the way a model checkout holds them, next to each other:

    DEST                         (.cache/flux-tokenizers)  tokenizer/ (CLIP-L), tokenizer_2/ (T5)
    DEST/../sd15-tokenizers      tokenizer/ (CLIP-L)
    DEST/../sdxl-tokenizers      tokenizer/ (CLIP-L), tokenizer_2/ (OpenCLIP bigG, pads with "!")
    DEST/../sd3-tokenizers       tokenizer/ (CLIP-L), tokenizer_2/ (bigG), tokenizer_3/ (T5)

Each folder is checked against what its model expects before it is written (vocabulary and
merges size, pad token, ``model_max_length``). The wheel's SDXL ``tokenizer_2/merges.txt``
is cut short (it stops in the middle of merge 40212 of CLIP's 48894, so rare words would
tokenize differently from SDXL's real tokenizer): we keep that folder's configuration and
vocabulary (checked equal to the SD3 bigG vocabulary) and take the full merges from SD3's
``tokenizer_2``, which is the same OpenCLIP tokenizer (checked: the wheel's short SDXL file is
a prefix of it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "diffsynth==1.1.9"
PREFIX = "diffsynth/tokenizer_configs/"
CLIP_MERGES = 48894  # 49408 ids = 2 x 256 byte tokens + 48894 merges + 2 special tokens

# (cache folder name or "" for DEST itself, subfolder) -> folder in the wheel
LAYOUT = {
    ("", "tokenizer"): "flux/tokenizer_1",
    ("", "tokenizer_2"): "flux/tokenizer_2",
    ("sd15-tokenizers", "tokenizer"): "stable_diffusion/tokenizer",
    ("sdxl-tokenizers", "tokenizer"): "stable_diffusion/tokenizer",
    ("sdxl-tokenizers", "tokenizer_2"): "stable_diffusion_xl/tokenizer_2",
    ("sd3-tokenizers", "tokenizer"): "stable_diffusion_3/tokenizer_1",
    ("sd3-tokenizers", "tokenizer_2"): "stable_diffusion_3/tokenizer_2",
    ("sd3-tokenizers", "tokenizer_3"): "stable_diffusion_3/tokenizer_3",
}
# What each model expects of the folder: pad token and model_max_length.
EXPECTED = {
    "tokenizer": ("<|endoftext|>", 77),  # CLIP ViT-L/14
    "tokenizer_2": ("!", 77),  # OpenCLIP ViT-bigG/14 (SDXL, SD3); FLUX's tokenizer_2 is T5
    "tokenizer_3": ("<pad>", 512),  # T5-XXL
}
T5 = ("<pad>", 512)
SHORT_MERGES = "stable_diffusion_xl/tokenizer_2/merges.txt"
FULL_MERGES = "stable_diffusion_3/tokenizer_2/merges.txt"
# The file whose presence means a complete fetch (written last): the Makefile's target.
LAST = ("sd3-tokenizers", "tokenizer_3")


def _pad_token(config: dict) -> str:
    pad = config.get("pad_token")
    return pad["content"] if isinstance(pad, dict) else pad


def _merges(text: str) -> list[str]:
    return [line for line in text.splitlines()[1:] if line.strip()]


def check(files: dict[str, bytes], expected: tuple[str, int], where: str) -> None:
    """Refuse a tokenizer folder whose pad token, length or vocabulary is not its model's."""
    config = json.loads(files["tokenizer_config.json"])
    pad, length = _pad_token(config), config.get("model_max_length")
    if (pad, length) != expected:
        raise ValueError(f"{where}: pad token {pad!r} and model_max_length {length}, "
                         f"expected {expected}")
    if "merges.txt" in files:
        vocab = json.loads(files["vocab.json"])
        n = len(_merges(files["merges.txt"].decode()))
        if len(vocab) != 49408 or n != CLIP_MERGES:
            raise ValueError(f"{where}: {len(vocab)} vocabulary entries and {n} merges, expected "
                             f"CLIP's 49408 and {CLIP_MERGES}")
    elif "spiece.model" not in files:
        raise ValueError(f"{where}: neither a CLIP vocabulary nor a T5 spiece.model")


def _folders(zf: zipfile.ZipFile) -> dict[str, dict[str, bytes]]:
    """The wheel's tokenizer folders used by LAYOUT: folder -> file name -> bytes."""
    wanted = set(LAYOUT.values())
    out: dict[str, dict[str, bytes]] = {}
    for name in zf.namelist():
        if not name.startswith(PREFIX) or name.endswith("/"):
            continue
        folder, _, file = name[len(PREFIX):].rpartition("/")
        if folder in wanted:
            out.setdefault(folder, {})[file] = zf.read(name)
    return out


def _repair_sdxl_merges(folders: dict[str, dict[str, bytes]]) -> None:
    """Give the SDXL bigG folder the full merges of SD3's identical bigG tokenizer."""
    sdxl = folders["stable_diffusion_xl/tokenizer_2"]
    sd3 = folders["stable_diffusion_3/tokenizer_2"]
    if json.loads(sdxl["vocab.json"]) != json.loads(sd3["vocab.json"]):
        raise ValueError("the wheel's SDXL and SD3 bigG vocabularies differ: cannot repair")
    short, full = _merges(sdxl["merges.txt"].decode()), _merges(sd3["merges.txt"].decode())
    cut = len(short) - 1  # the file ends mid-line ("n" of "n ye")
    if full[:cut] != short[:cut] or not full[cut].startswith(short[cut]):
        raise ValueError(f"{SHORT_MERGES} is not a prefix of {FULL_MERGES}: cannot repair")
    sdxl["merges.txt"] = sd3["merges.txt"]


def fetch(dest: Path) -> Path:
    """Download the wheel and write every tokenizer folder (FLUX into ``dest``, the others next
    to it); return ``dest``."""
    dest = Path(dest)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", tmp],
            check=True,
        )
        (wheel,) = Path(tmp).glob("diffsynth-*.whl")
        with zipfile.ZipFile(wheel) as zf:
            folders = _folders(zf)
    _repair_sdxl_merges(folders)
    for (cache, sub), source in LAYOUT.items():
        expected = T5 if (cache, sub) == ("", "tokenizer_2") else EXPECTED[sub]
        check(folders[source], expected, f"{WHEEL}:{PREFIX}{source}")
    for key in sorted(LAYOUT, key=lambda k: k == LAST):  # the Makefile's target last
        cache, sub = key
        out = (dest.parent / cache if cache else dest) / sub
        partial = out.with_name(out.name + ".partial")  # a folder appears whole or not at all
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for file, data in folders[LAYOUT[key]].items():
            (partial / file).write_bytes(data)
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)
    return dest


def model_dirs(dest: Path) -> dict[str, Path]:
    """Model name -> the checkout-like folder ``fetch(dest)`` writes for it."""
    dest = Path(dest)
    return {
        "flux": dest,
        "sd15": dest.parent / "sd15-tokenizers",
        "sdxl": dest.parent / "sdxl-tokenizers",
        "sd3": dest.parent / "sd3-tokenizers",
    }


def complete(dest: Path) -> bool:
    """Whether every folder of a fetch into ``dest`` is there (the last file written exists)."""
    return (Path(dest).parent / LAST[0] / LAST[1] / "spiece.model").is_file() and (
        Path(dest) / "tokenizer_2" / "spiece.model"
    ).is_file()


if __name__ == "__main__":
    dest = Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/flux-tokenizers")
    fetch(dest)
    print("tokenizers in " + ", ".join(f"{k}: {v}" for k, v in model_dirs(dest).items()))
