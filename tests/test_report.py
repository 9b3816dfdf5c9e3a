"""bucket-report, run as users run it: the real command in subprocesses, on a folder written
here with known sizes, bad files and captions. All the command runs start at once and the tests
read their results: the full run is the installed command itself; the others are processes
forked from one interpreter that imported bucketing.cli.report once (each its own process, argv,
stdout, stderr and exit code), so that eight runs do not import torch eight times."""

from __future__ import annotations

import json
import math
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from bucketing.assign import assign
from bucketing.cli.report import SCHEMA_VERSION, main, render_text
from bucketing.ladder import BucketLadder, fitted_ladder
from bucketing.scan import scan

REPO = Path(__file__).resolve().parent.parent
LONG_CAPTION = " ".join(["a very detailed description of a square test picture"] * 12)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_folder(root: Path) -> Path:
    """3 images 1024², 2 images 512², one 6:1 panorama, one too small, two broken files, and a
    caption sidecar that cannot be read (a notice: its image is kept)."""
    root.mkdir()
    for i in range(3):
        Image.new("RGB", (1024, 1024), (40 * i, 90, 160)).save(root / f"big_{i}.jpg")
    for i in range(2):
        Image.new("RGB", (512, 512), (200, 40 * i, 60)).save(root / f"small_{i}.png")
    (root / "pano").mkdir()
    Image.new("RGB", (3000, 500), (10, 200, 30)).save(root / "pano" / "wide.jpg")
    Image.new("RGB", (64, 64)).save(root / "tiny.png")
    (root / "empty.jpg").write_bytes(b"")
    (root / "garbage.png").write_bytes(np.random.default_rng(0).bytes(300))
    (root / "big_0.txt").write_text("a blue square\nanother caption of the same picture\n")
    (root / "big_1.txt").write_text(LONG_CAPTION + "\n")
    (root / "big_2.txt").symlink_to(root / "no_such_caption.txt")
    return root


def _write_manifest(folder: Path) -> Path:
    """A CSV listing every file of the folder, one of them twice (a notice: captions merged)."""
    names = sorted(p.relative_to(folder.parent).as_posix() for p in folder.rglob("*.*")
                   if p.suffix in (".jpg", ".png"))
    rows = [f"{name},caption of {name}" for name in names + ["photos/big_0.jpg"]]
    path = folder.parent / "photos.csv"
    path.write_text("image,caption\n" + "\n".join(rows) + "\n")
    return path


def _write_one_image_buckets(root: Path) -> Path:
    """Six photos of six different shapes (one bucket each) and a tiny one whose name tries
    to reach the terminal: an OSC title sequence, a colour, and a newline forging a line."""
    root.mkdir()
    for i, (w, h) in enumerate([(1024, 1024), (1200, 800), (800, 1200), (1500, 600),
                                (600, 1500), (700, 700)]):
        Image.new("RGB", (w, h), (30 * i, 90, 160)).save(root / f"shape_{i}.jpg")
    Image.new("RGB", (8, 8)).save(root / EVIL_NAME)
    return root


EVIL_NAME = "evil\x1b]0;owned\x07\x1b[31mred\nFiles      99 seen · 99 accepted\u202e.png"


def _command() -> list[str]:
    script = REPO / ".venv" / "bin" / "bucket-report"
    return [str(script)] if script.exists() else [sys.executable, "-m", "bucketing.cli.report"]


# Forks one child per run, after importing the command once: a child points fds 1 and 2 at its
# own files, runs main(argv) as the console script does and exits with its code. The parent
# prints {name: exit code} as JSON.
_FORK_RUNS = """
import json, os, sys
from bucketing.cli.report import main
jobs, pids = json.loads(sys.argv[1]), {}
sys.stdout.flush(); sys.stderr.flush()
for name, (argv, out, err) in jobs.items():
    pid = os.fork()
    if pid == 0:
        for fd, path in ((1, out), (2, err)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except BaseException:
            import traceback; traceback.print_exc(); code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    pids[pid] = name
codes = {}
while pids:
    pid, status = os.wait()
    codes[pids.pop(pid)] = os.waitstatus_to_exitcode(status)
print(json.dumps(codes))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, flux_tokenizer_dir: Path) -> dict[str, Any]:
    """Start every command run at once, then wait for all of them."""
    tmp = tmp_path_factory.mktemp("report")
    folder = _write_folder(tmp / "photos")
    manifest = _write_manifest(folder)
    (tmp / "empty").mkdir()
    out = {
        "json": tmp / "report.json",
        "plot": tmp / "plot.png",
        "preview": tmp / "preview.png",
    }
    argv = {
        "full": [str(folder), "--batch-size", "2", "--world-size", "2", "--tokenizers",
                 str(flux_tokenizer_dir), "--cache", str(tmp / "scan.parquet"), "--workers", "1",
                 "--json", str(out["json"]), "--plot", str(out["plot"]),
                 "--preview", str(out["preview"])],
        "stdout_json": [str(manifest), "--max-pixels-per-batch", "1024x1024", "--drop-last",
                        "--workers", "1", "--json", "-"],
        "missing": [str(tmp / "no_such_folder")],
        "empty": [str(tmp / "empty")],
        "advice": [str(_write_one_image_buckets(tmp / "shapes")), "--batch-size", "4",
                   "--world-size", "4", "--workers", "1", "--json", str(tmp / "advice.json")],
        "advice_fixed": [str(tmp / "shapes"), "--batch-size", "4", "--world-size", "4",
                         "--workers", "1", "--max-buckets", "1", "--json", "-"],
        "repeats": [str(tmp / "shapes"), "--batch-size", "4", "--repeats", "3",
                    "--last-batch", "pad", "--workers", "1", "--json", "-"],
        "pad_one_gpu": [str(folder), "--batch-size", "8", "--last-batch", "pad", "--workers",
                        "1", "--json", "-"],
    }
    env = {**os.environ, "COLUMNS": "100"}
    full = subprocess.Popen(_command() + argv.pop("full"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp)
    jobs = {name: [args, str(tmp / f"{name}.stdout"), str(tmp / f"{name}.stderr")]
            for name, args in argv.items()}
    forked = subprocess.run([sys.executable, "-c", _FORK_RUNS, json.dumps(jobs)], cwd=tmp,
                            env=env, capture_output=True, text=True, timeout=300)
    assert forked.returncode == 0, forked.stderr
    codes = json.loads(forked.stdout)
    results = {name: subprocess.CompletedProcess(args, codes[name], Path(o).read_text(),
                                                 Path(e).read_text())
               for name, (args, o, e) in jobs.items()}
    stdout, stderr = full.communicate(timeout=300)
    results["full"] = subprocess.CompletedProcess(full.args, full.returncode, stdout, stderr)
    return {"folder": folder, "out": out, **results}


# --------------------------------------------------------------------------- text


def test_text_report_has_the_expected_figures(runs: dict[str, Any]) -> None:
    r = runs["full"]
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert "9 seen · 6 accepted · 3 rejected" in text
    assert "Notices    unreadable_caption 1 (the images are kept" in text
    for reason, path in (("empty_file", "empty.jpg"), ("not_an_image", "garbage.png"),
                         ("too_small", "tiny.png")):
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(reason))
        assert line.split()[-1] == "1"
        assert path in text
    # The default ladder is fitted to the data: its levels are the fitted buckets' areas.
    fitted = fitted_ladder("flux", scan(runs["folder"], workers=1))
    levels = " ".join(f"{math.isqrt(a)}²" if math.isqrt(a) ** 2 == a else str(a)
                      for a in fitted.levels.tolist())
    assert f"levels {levels} · multiple 16" in text
    assert "world size 2 · batch size 2 per rank" in text
    rows = {}  # W x H -> aspect, images, share, bs/rank, steps, padded
    for ln in text.splitlines():
        words = ln.replace("!", " ").split()
        if words and re.fullmatch(r"\d+x\d+", words[0]) and len(words) >= 7:
            rows.setdefault(words[0], words[1:7])
    assert rows["1024x1024"] == ["1.00", "3", "50.0%", "2", "1", "0"]  # short last batches
    assert rows["512x512"] == ["1.00", "2", "33.3%", "2", "1", "0"]
    assert len(rows) == 3
    assert "3 buckets hold fewer images than one global step" in text
    plan = " ".join(text.split("Plan", 1)[1].split("\n\n", 1)[0].split())
    assert plan == ("3 steps per rank per epoch · 7 samples per epoch (6 images + 1 padded "
                    "duplicate) · 0 dropped · last batch short: 3 short")
    assert "Advice" not in text
    assert "extreme aspect (beyond 4:1) 1" in text and "upscaled 0" in text
    assert "4 images without a caption · 1 with several" in text
    clip = next(ln for ln in text.splitlines() if "CLIP (77)" in ln)
    t5 = next(ln for ln in text.splitlines() if "T5 (512)" in ln)
    assert clip.endswith("1 of 3") and t5.endswith("0 of 3")
    assert "Traceback" not in r.stderr


def test_json_to_stdout_keeps_text_on_stderr(runs: dict[str, Any]) -> None:
    r = runs["stdout_json"]
    assert r.returncode == 0, r.stderr
    figures = json.loads(r.stdout)
    _validate(figures)
    assert "6 accepted" in r.stderr
    # the repeated row is a notice, not a second file: counted once, listed once
    files = figures["files"]
    assert (files["seen"], files["accepted"], files["rejected"]) == (9, 6, 3)
    assert figures["notices"] == {"duplicate": 1} and "Notices    duplicate 1" in r.stderr
    paths = [row["path"] for row in figures["images"]]
    assert len(paths) == len(set(paths)) == 9
    plan = figures["plan"]
    assert plan["max_pixels_per_batch"] == 1024 * 1024 and plan["batch_size"] is None
    for b in figures["buckets"]:  # each bucket's batch size follows the pixel budget
        assert b["batch_size"] == max(1, 1024 * 1024 // (b["width"] * b["height"]))
    small = next(b for b in figures["buckets"] if b["width"] == b["height"] == 512)
    assert small["batch_size"] == 4 and small["steps"] == 0 and small["dropped"] == 2
    assert plan["dropped"] == 2 and plan["padded"] == 0 and plan["last_batch"] == "drop"
    assert plan["steps"] == sum(b["steps"] for b in figures["buckets"]) == 4


@pytest.mark.parametrize("name", ["missing", "empty"])
def test_unusable_source_exits_2_with_one_line(runs: dict[str, Any], name: str) -> None:
    r = runs[name]
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bucket-report: error: ")
    assert ("does not exist" if name == "missing" else "no images found") in lines[0]
    assert r.stdout == ""


def test_bad_usage_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    # argparse's own exit path, in-process: the subprocess runs above cover the real command.
    with pytest.raises(SystemExit) as exit_info:
        main(["somewhere", "--batch-size", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--batch-size" in err and "positive integer" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["somewhere", "--batch-size", "2", "--max-pixels-per-batch", "1024x1024"])
    assert exit_info.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


# --------------------------------------------------------------------------- JSON

_STATS = {"mean": (float, None), "p50": (float, None), "p95": (float, None), "max": (float, None)}
_TOKENS = {"max_length": int, "captions": int, "p50": (float, None), "p95": (float, None),
           "max": (int, None), "truncated": int}
SCHEMA: dict[str, Any] = {
    "schema": int,
    "source": str,
    "files": {
        "seen": int, "accepted": int, "rejected": int,
        "rejections": ("map", {"count": int, "examples": [{"path": str, "detail": str}]}),
    },
    "ladder": {"model": (str, None), "levels": [int], "max_area": int, "multiple": int,
               "max_aspect": float, "buckets": [[int]]},
    "timings": ("map", float),
    # The report's batch settings, then the sampler's stats() keys as they are.
    "plan": ({"batch_size": (int, None), "max_pixels_per_batch": (int, None), "seed": int,
              "epoch": int, "world_size": int, "last_batch": str, "batching": ("map", object),
              "repeats": bool, "num_indices": int, "accepted": int, "excluded": int,
              "samples": int, "steps": int, "padded": int, "dropped": int, "short_steps": int},
             None),
    "buckets": [{"id": int, "width": int, "height": int, "aspect": float, "images": int,
                 "share": float, "global_step": int, "underfilled": bool, "samples": int,
                 "batch_size": int, "steps": int, "padded": int, "dropped": int, "short": bool}],
    "advice": ({"problems": [str], "fix": str}, None),
    "quality": {"crop_loss": _STATS, "resolution_loss": _STATS, "upscaled": int,
                "extreme_aspect": int},
    "captions": {"missing": int, "several": int,
                 "tokens": (("map", _TOKENS), None)},
    "notices": ("map", int),
    "pairs": {"conditioning_images": int, "rows_with_conditioning": int, "rows_with_mask": int,
              "alpha_masks": int, "rejected": ("map", int)},
    "trade": ({"global_batch": int,
               "rows": [{"ladder": str, "buckets": int, "resolution_loss": {
                   "mean": float, "p95": float, "max": float},
                   "crop_loss": {"mean": float, "p95": float}, "rejected": int,
                   "steps": int, "short_steps": int, "chosen": bool}],
               "worst": [{"path": str, "width": int, "height": int, "bucket": [int],
                          "resolution_loss": float, "why": str}]}, None),
    "images": [{"path": str, "width": (int, None), "height": (int, None),
                "bucket": ([int], None), "scale": (float, None), "crop_loss": (float, None),
                "resolution_loss": (float, None), "reason": (str, None)}],
}


def _check(value: Any, spec: Any, where: str) -> None:
    """A small structural validator: types, exact key sets, lists, maps and nullable specs."""
    if isinstance(spec, tuple) and spec and spec[0] == "map":
        assert isinstance(value, dict), where
        for k, v in value.items():
            assert isinstance(k, str), where
            _check(v, spec[1], f"{where}.{k}")
    elif isinstance(spec, tuple):
        if value is None and None in spec:
            return
        _check(value, next(s for s in spec if s is not None), where)
    elif isinstance(spec, dict):
        assert isinstance(value, dict) and set(value) == set(spec), (where, value)
        for k, s in spec.items():
            _check(value[k], s, f"{where}.{k}")
    elif isinstance(spec, list):
        assert isinstance(value, list), where
        for i, v in enumerate(value):
            _check(v, spec[0], f"{where}[{i}]")
    elif spec is float:
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (where, value)
        assert math.isfinite(value), where
    else:
        assert isinstance(value, spec) and not (spec is int and isinstance(value, bool)), (
            where, value)


def _validate(figures: dict[str, Any]) -> None:
    _check(figures, SCHEMA, "$")
    assert figures["schema"] == SCHEMA_VERSION == 2


def test_json_matches_schema_and_assign_row_by_row(runs: dict[str, Any]) -> None:
    assert runs["full"].returncode == 0, runs["full"].stderr
    raw = runs["out"]["json"].read_text()
    figures = json.loads(raw)
    _validate(figures)
    assert "NaN" not in raw

    index = scan(runs["folder"], workers=1)
    a = assign(index, fitted_ladder("flux", index))
    assert figures["ladder"]["buckets"] == a.ladder.buckets.tolist()
    rows = figures["images"]
    rejected = [r for r in index.rejections if r.reason != "unreadable_caption"]
    assert figures["notices"] == {"unreadable_caption": 1}
    assert len(rows) == len(index) + len(rejected) == figures["files"]["seen"] == 9
    for i, row in enumerate(rows[: len(index)]):
        assert row["path"] == index.paths[i]
        assert (row["width"], row["height"]) == (index.width[i], index.height[i])
        if a.bucket_id[i] < 0:
            assert row["bucket"] is None and row["reason"] == a.reasons[i]
            continue
        assert row["bucket"] == a.bucket_wh[i].tolist() and row["reason"] is None
        for key in ("scale", "crop_loss", "resolution_loss"):
            assert row[key] == pytest.approx(float(getattr(a, key)[i]), abs=1e-12)
    for row, rej in zip(rows[len(index):], rejected, strict=True):
        assert (row["path"], row["reason"], row["bucket"]) == (rej.path, rej.reason, None)

    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["big_0.jpg"]["bucket"] == [1024, 1024]
    assert by_name["big_0.jpg"]["crop_loss"] == 0 and by_name["big_0.jpg"]["resolution_loss"] == 0
    assert by_name["small_1.png"]["bucket"] == [512, 512]
    assert by_name["tiny.png"]["reason"] == "too_small"

    counts = {(b["width"], b["height"]): b["images"] for b in figures["buckets"]}
    assert counts == {tuple(a.ladder.buckets[b].tolist()): int(a.counts[b])
                      for b in np.flatnonzero(a.counts)}
    assert figures["quality"]["extreme_aspect"] == int(a.extreme.sum()) == 1
    assert figures["ladder"]["model"] == "flux"
    aspects = [b["aspect"] for b in figures["buckets"]]
    assert aspects == sorted(aspects)
    assert figures["quality"]["crop_loss"]["max"] == pytest.approx(np.nanmax(a.crop_loss))
    assert figures["captions"]["tokens"]["clip"]["truncated"] == 1


# --------------------------------------------------------------------------- pictures


@pytest.mark.parametrize("name", ["plot", "preview"])
def test_pngs_are_real_pictures(runs: dict[str, Any], name: str) -> None:
    assert runs["full"].returncode == 0, runs["full"].stderr
    path = runs["out"][name]
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG"
        assert 600 <= img.width <= 4000 and 300 <= img.height <= 4000
        lo, hi = img.convert("L").getextrema()
        assert hi - lo > 100  # drawn content, not a blank canvas
    assert not list(path.parent.glob(f".{path.name}.*"))  # no temp file left behind


# --------------------------------------------------------------------------- pure parts


def test_preview_of_upscaled_buckets(tmp_path: Path) -> None:
    """--allow-upscale: the preview draws upscaled images instead of failing on them."""
    from bucketing.cli.report import preview_tiles

    for i in range(2):
        Image.new("RGB", (96, 64), (50 * i, 90, 160)).save(tmp_path / f"{i}.png")
    index = scan(tmp_path, workers=0)
    a = assign(index, BucketLadder.from_buckets([(192, 128)]), allow_upscale=True)
    assert a.upscaled.all()
    tiles = preview_tiles(index, a, [{"id": 0, "width": 192, "height": 128}], seed=0)
    assert len(tiles) == 1 and tiles[0].model_input.shape == (128, 192, 3)


@settings(deadline=None, max_examples=25)
@given(width=st.integers(60, 220))
def test_text_fits_the_terminal_width(runs: dict[str, Any], width: int) -> None:
    figures = json.loads(runs["out"]["json"].read_text())
    figures["source"] = "/a/very/long/path/" * 20
    for line in render_text(figures, width).splitlines():
        assert len(line) <= width, line


# --------------------------------------------------------------------------- advice


def test_advice_when_most_of_the_epoch_is_padding(runs: dict[str, Any]) -> None:
    r = runs["advice"]
    assert r.returncode == 0, r.stderr
    figures = json.loads((runs["folder"].parent / "advice.json").read_text())
    _validate(figures)
    plan = figures["plan"]
    # Six buckets of one image on 4 ranks: each last step gives 3 ranks a duplicate.
    assert (plan["accepted"], plan["padded"]) == (6, 18)
    problems = figures["advice"]["problems"]
    assert problems[0].startswith("most of the epoch is padding: 18 of 24 samples")
    assert problems[1].startswith("6 of 6 buckets hold a single sample")
    fix = figures["advice"]["fix"]
    assert fix.startswith("--max-buckets 1 ") and "BucketLadder.from_data(index, max_buckets=1)" \
        in fix
    # The trade table prints the budget the fix suggests, with the losses the fix quotes.
    trade = figures["trade"]
    assert trade["global_batch"] == 16
    by_name = {row["ladder"]: row for row in trade["rows"]}
    assert {"preset", "fitted, 6", "fitted, 1", "own sizes"} <= set(by_name)
    assert [row["ladder"] for row in trade["rows"] if row["chosen"]] == ["fitted, 6"]
    one = by_name["fitted, 1"]
    assert one["buckets"] == 1 and one["short_steps"] == 1 and one["steps"] == 1
    assert by_name["fitted, 6"]["short_steps"] == 6
    assert (f"resolution loss p95 {one['resolution_loss']['p95']:.1%}, crop loss p95 "
            f"{one['crop_loss']['p95']:.1%}, 1 short steps") in fix
    assert len(trade["worst"]) == 5 and all(w["why"] for w in trade["worst"])
    losses = [w["resolution_loss"] for w in trade["worst"]]
    assert losses == sorted(losses, reverse=True)
    assert any(ln.startswith("         * fitted, 6") for ln in r.stdout.splitlines())
    lines = r.stdout.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("Advice   ! most of the epoch"))
    assert lines[at + 1].startswith("         ! 6 of 6 buckets")
    assert lines[at + 2].startswith("           fix: --max-buckets 1 ")
    assert " ".join(" ".join(lines[at + 2:at + 4]).split()) == " ".join(f"fix: {fix}".split())
    # The printed setting fixes it: one bucket of 6 images on 4 ranks, no duplicate.
    fixed = runs["advice_fixed"]
    assert fixed.returncode == 0, fixed.stderr
    after = json.loads(fixed.stdout)
    _validate(after)
    assert after["advice"] is None and "Advice" not in fixed.stderr
    assert len(after["buckets"]) == 1 and after["plan"]["padded"] == 0
    assert after["ladder"]["model"] == "flux" and len(after["ladder"]["buckets"]) == 1


# --------------------------------------------------------------------------- hygiene


def test_file_names_cannot_reach_the_terminal(runs: dict[str, Any]) -> None:
    r = runs["advice"]
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout and "\u202e" not in r.stdout
    assert not any(ln.startswith("Files      99") for ln in r.stdout.splitlines())
    shown = next(ln for ln in r.stdout.splitlines() if "evil" in ln)
    assert "evil\\x1b]0;owned\\x07\\x1b[31mred\\nFiles      99 seen" in shown
    assert "\\u202e.png" in shown
    # The JSON keeps the name exactly.
    figures = json.loads((runs["folder"].parent / "advice.json").read_text())
    assert any(Path(row["path"]).name == EVIL_NAME for row in figures["images"])


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1, (out, err)
    assert lines[0].startswith("bucket-report: error: ") and message in lines[0], lines[0]


def test_outputs_are_checked_before_the_report_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (512, 512)).save(folder / "a.png")
    manifest = tmp_path / "list.csv"
    manifest.write_text("image,caption\nphotos/a.png,a black square\n")
    src = str(folder)
    _refused(capsys, [src, "--json", str(tmp_path / "no" / "r.json")], "does not exist")
    assert not (tmp_path / "no").exists()  # never created
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    _refused(capsys, [src, "--plot", str(fifo)], "not a regular file")
    _refused(capsys, [src, "--json", os.devnull], "not a regular file")
    _refused(capsys, [src, "--preview", str(tmp_path)], "not a regular file")
    link = tmp_path / "link.png"
    link.symlink_to(os.devnull)
    _refused(capsys, [src, "--plot", str(link)], "not a regular file")
    _refused(capsys, [str(manifest), "--json", str(manifest)], "an input of this report")
    before = (folder / "a.png").read_bytes()
    _refused(capsys, [src, "--workers", "1", "--json", str(folder / "a.png")],
             "an input of this report")
    assert (folder / "a.png").read_bytes() == before
    out = str(tmp_path / "same.png")
    _refused(capsys, [src, "--plot", out, "--preview", out], "the same file as --plot")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and os.path.exists(os.devnull)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        _refused(capsys, [src, "--json", str(locked / "r.json")], "not writable")


def test_repeats_and_padding_with_the_fix_for_one_gpu(runs: dict[str, Any]) -> None:
    r = runs["repeats"]
    assert r.returncode == 0, r.stderr
    figures = json.loads(r.stdout)
    _validate(figures)
    plan = figures["plan"]
    assert plan["repeats"] is True and plan["samples"] == 18 and plan["last_batch"] == "pad"
    assert plan["padded"] == 6  # 3 occurrences per bucket of 4: one duplicate each
    assert "18 occurrences of 6 images + 6 padded duplicates" in " ".join(r.stderr.split())
    # Each single image is seen 3 times: it fills its batch with its repeats (no advice).
    assert figures["advice"] is None
    assert all(b["samples"] == 3 for b in figures["buckets"])
    pad = runs["pad_one_gpu"]
    assert pad.returncode == 0, pad.stderr
    advice = json.loads(pad.stdout)["advice"]
    assert advice["problems"] == ["most of the epoch is padding: 18 of 24 samples are "
                                  "duplicates (3 buckets for 6 images)"]
    assert advice["fix"].startswith("--last-batch short ")


def test_a_tiny_ladder_whose_lattice_holds_no_own_size_still_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """sdxl at --max-area 4096: the preset fits every photo in 64x64 while no photo's own size
    is on the lattice; the trade table keeps the rows it can and the report exits 0."""
    for i in range(3):
        Image.new("RGB", (160, 120), (50 * i, 0, 0)).save(tmp_path / f"{i}.jpg")
    assert main([str(tmp_path), "--model", "sdxl", "--max-area", "4096"]) == 0
    out = capsys.readouterr().out
    assert "preset" in out and "own sizes" not in out
    assert "accepted" in out.lower()
