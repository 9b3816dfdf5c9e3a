"""Hostile names and paths through the commands and warnings: what any of them prints from user
data goes through one escaping function, and outputs never replace a file the command read."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import bucketing.cli.report as report
from bucketing import BucketLadder, TextToImageDataset, assign, scan
from bucketing.cli.cache import main as cache_main
from bucketing.pipeline.dataset import SubstitutionWarning
from bucketing.printable import escape
from transforms import BucketResizeCrop

LADDER = BucketLadder.from_buckets([(32, 32), (48, 32), (32, 48)], multiple=16)
HOSTILE = "evil\x1b]0;pwned\x07\x1b[2J\u202e\nname"


def _safe(text: str) -> bool:
    """Nothing that acts on a terminal: no C0/C1 control but newline, no bidi override."""
    bad = {*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, 0x202E, 0x2066} - {0x0A}
    return not any(ord(c) in bad for c in text)


def _photo(path: Path, w: int = 64, h: int = 64, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def test_every_command_uses_the_one_escaping_function():
    assert report.escape is escape
    assert escape(HOSTILE) == "evil\\x1b]0;pwned\\x07\\x1b[2J\\u202e\\nname"


def test_report_never_writes_over_a_sidecar_a_metadata_file_or_its_scan_cache(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    _photo(photos / "a.png")
    (photos / "a.txt").write_text("a caption")
    _photo(photos / "b.png", seed=1)
    (photos / "metadata.jsonl").write_text(json.dumps({"file_name": "b.png", "text": "b"}) + "\n")
    scan_cache = tmp_path / "scan.parquet"
    assert report.main([str(photos), "--cache", str(scan_cache), "--json",
                        str(tmp_path / "r.json")]) == 0
    capsys.readouterr()
    for target in (photos / "a.txt", photos / "metadata.jsonl", scan_cache):
        before = target.read_bytes()
        assert report.main([str(photos), "--cache", str(scan_cache), "--json",
                            str(target)]) == 2
        assert "an input of this report" in capsys.readouterr().err
        assert target.read_bytes() == before


def test_the_substitution_warning_escapes_the_file_name(tmp_path):
    for k in range(2):
        _photo(tmp_path / f"{HOSTILE}{k}.png", seed=k)
    index = scan(tmp_path, workers=0)
    a = assign(index, LADDER)
    Path(index.paths[0]).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    ds = TextToImageDataset(index, a, image_transform=BucketResizeCrop())
    with pytest.warns(SubstitutionWarning) as caught:
        assert ds[0]["substituted"]
    message = str(caught[0].message)
    assert _safe(message) and "\\x1b]0;pwned" in message


def test_bucket_cache_escapes_what_it_prints(tmp_path, tiny_encoders_dirs, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for k in range(3):
        _photo(photos / f"ok{k}.png", seed=k)
    broken = photos / f"{HOSTILE}.png"
    _photo(broken, seed=9)
    broken.write_bytes(broken.read_bytes()[:120])  # header fine, pixels cut: fails to decode
    argv = [str(photos), "--model", "flux", "--weights", str(tiny_encoders_dirs["flux"]),
            "--out", str(tmp_path / f"out{HOSTILE}"), "--dtype", "float32", "--t5-length", "16",
            "--max-area", "48x32", "--levels", "32", "--loader-workers", "0"]
    assert cache_main(argv) == 0
    out = capsys.readouterr().out
    assert "1 images failed to decode" in out and "\\x1b]0;pwned" in out
    assert _safe(out)


@settings(max_examples=8, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(st.text(st.characters(blacklist_characters="/\x00",
                                            blacklist_categories=("Cs",)),
                              min_size=1, max_size=20),
                      min_size=1, max_size=3, unique=True))
def test_sweep_random_file_names_through_bucket_report(tmp_path_factory, capsys, names):
    """Any file name: the report's text output is safe to print and its JSON names the file
    exactly."""
    root = tmp_path_factory.mktemp("names")
    made = []
    for k, name in enumerate(names):
        path = root / f"{name}.png"
        if name in (".", "..") or len(os.fsencode(path.name)) > 255:
            continue
        _photo(path, w=16 + k, h=16, seed=k)  # too small for every bucket: rejected, named
        made.append(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = report.main([str(root), "--json", "-", "--workers", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert _safe(err)
    figures = json.loads(out)
    assert sorted(i["path"] for i in figures["images"]) == sorted(made)
