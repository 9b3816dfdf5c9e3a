"""bench/: every benchmark script runs at a tiny size (through bench/run_all.py, each script in
its own subprocess) and exits 0 with tables the summary can read; the table parser round-trips
``print_table``. No benchmark figures are checked here: timings on a shared machine mean nothing.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # bench/ is scripts, not an installed package

from bench.common import print_table  # noqa: E402
from bench.run_all import (  # noqa: E402
    SCRIPTS,
    headlines_cache,
    headlines_scale,
    headlines_scan,
    parse_tables,
    seconds,
)

TOKENIZERS = REPO / ".cache" / "flux-tokenizers" / "tokenizer_2" / "spiece.model"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not TOKENIZERS.exists():
        pytest.skip("bench/cache.py needs the FLUX tokenizers in .cache/flux-tokenizers: run "
                    "`make test` once (or python tests/fetch_flux_tokenizers.py "
                    ".cache/flux-tokenizers)")
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run_all.py"), "--tiny", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "run_all-tiny.json").read_text())
    report["summary_text"] = proc.stdout.split("# Summary")[-1]
    return report


@pytest.mark.parametrize("script", list(SCRIPTS))
@pytest.mark.slow
def test_script_runs_tiny(tiny_run: dict, script: str) -> None:
    result = tiny_run["results"][script]
    assert result["rc"] == 0, result["stdout"][-3000:]
    assert result["tables"], f"bench/{script}.py printed no table"
    assert all(t["rows"] for t in result["tables"])
    mine = [h for h in tiny_run["headlines"] if h["bench"] == script]
    assert mine, f"no headline figures for {script}"
    unreadable = [h for h in mine if h["target"] == "headline figures"]
    assert not unreadable, unreadable  # the summary found the tables and columns it needs
    assert all(h["status"] in ("PASS", "MISS", "n/a") for h in mine)


@pytest.mark.slow
def test_summary_lists_every_headline(tiny_run: dict) -> None:
    for h in tiny_run["headlines"]:
        assert f"{h['bench']}: {h['target']}" in tiny_run["summary_text"]


_text = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=12)
_cell = st.one_of(st.just(""), _text, st.builds(lambda a, b: f"{a} [{b}]", _text, _text))


@settings(deadline=None, max_examples=50)
@given(
    columns=st.lists(_text, min_size=1, max_size=6, unique=True),
    data=st.data(),
)
def test_parse_tables_round_trips_print_table(columns: list[str], data: st.DataObject) -> None:
    rows = data.draw(
        # a row's first cell is never empty (print_table rows are never all blank)
        st.lists(
            st.fixed_dictionaries({c: _text if c == columns[0] else _cell for c in columns}),
            min_size=1,
            max_size=5,
        )
    )
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print("noise before")
        print_table(rows, "first table")
        print_table(rows[:1], "second table")
        print("\nnoise after")
    first, second = parse_tables(buf.getvalue())
    assert (first["title"], second["title"]) == ("first table", "second table")
    assert first["columns"] == list(rows[0])  # print_table takes the first row's key order
    assert first["rows"] == rows and second["rows"] == rows[:1]


def test_seconds_reads_timing_cells() -> None:
    assert seconds("1.23 s [1.1 s-1.4 s]") == 1.23
    assert seconds("45.6 ms") == pytest.approx(0.0456)
    assert seconds("789 us [700 us-800 us]") == pytest.approx(789e-6)
    assert seconds("16: 5.6 ms [5.6 ms-5.6 ms]") == pytest.approx(0.0056)
    with pytest.raises(ValueError):
        seconds("skipped")


def test_scan_headlines_pass_and_miss() -> None:
    def table(cold: float, warm: float, peer: float, bare: float, wrong: int) -> list:
        rows = [
            ("ours, 1 worker, cold cache", cold / 2, wrong),
            ("ours, 2 workers, cold cache", cold, wrong),
            ("ours, 2 workers, warm rescan", warm, wrong),
            ("bare imagesize.get loop", bare, 7),
            ("bucketsampler build_metadata_cache, 1 thread", peer, 9),
            ("bucketsampler build_metadata_cache, 2 threads", peer / 2, 9),
        ]
        rows = [{"side": s, "files/s": str(v), "wrong orientation": str(w)} for s, v, w in rows]
        return [{"title": "header scan, 6 files", "columns": list(rows[0]), "rows": rows}]

    good = headlines_scan(table(cold=1000, warm=30000, peer=400, bare=1500, wrong=0))
    assert [h.status for h in good] == ["PASS"] * 3
    bad = headlines_scan(table(cold=1000, warm=10000, peer=600, bare=1500, wrong=1))
    assert [h.status for h in bad] == ["MISS"] * 3


def _table(title: str, rows: list[dict]) -> dict:
    return {"title": title, "columns": list(rows[0]), "rows": rows}


@pytest.mark.parametrize(("ratio", "read", "expect"), [
    ("1884.00x", "54 us", ["PASS", "PASS"]),
    ("9.50x", "54 us", ["MISS", "PASS"]),
    ("12.00x", "1.2 ms", ["PASS", "MISS"]),
])  # fmt: skip
def test_cache_headlines(ratio: str, read: str, expect: list[str]) -> None:
    epochs = [
        {"side": "on the fly: decode + fit + VAE + CLIP + T5", "samples/s": "1",
         "vs on the fly": "1.0x"},
        {"side": "cached (memory-mapped shards)", "samples/s": "1994", "vs on the fly": ratio},
    ]  # fmt: skip
    reads = [{"read": "dataset[i]", "median": read, "p90": read}]
    tables = [_table("Cached epoch vs on the fly (16 images)", epochs),
              _table("Reading one cached FLUX 1024² sample", reads)]  # fmt: skip
    assert [h.status for h in headlines_cache(tables)] == expect


@pytest.mark.parametrize(("grown", "dirty", "beyond", "expect"), [
    ("0.2 MB", "0.3 MB", "40", ["PASS", "PASS"]),
    ("0.2 MB", "64.0 MB", "40", ["MISS", "PASS"]),
    ("263.0 MB", "0.3 MB", "81", ["MISS", "MISS"]),
])  # fmt: skip
def test_scale_headlines_read_the_largest_size(
    grown: str, dirty: str, beyond: str, expect: list[str]
) -> None:
    def mem(rows: str, grown: str, dirty: str) -> dict:
        return {"rows": rows, "lists: worker grows": "-", "columns: worker grows": grown,
                "mapped .arrow: dirty": dirty}  # fmt: skip

    speed = [
        {"rows": "20,000", "index bytes/row": "131", "beyond text": "200", "rows/s": "1"},
        {"rows": "1,000,000", "index bytes/row": "135", "beyond text": beyond, "rows/s": "1"},
    ]
    memory = [mem("20,000", "900 MB", "900 MB"), mem("1,000,000", grown, dirty)]
    tables = [_table("manifest with sizes -> index", speed),
              _table("a forked worker reads every row: private memory", memory)]  # fmt: skip
    lines = headlines_scale(tables)
    assert [h.status for h in lines] == expect
    assert all("1,000,000 rows" in h.target for h in lines)


@pytest.mark.parametrize(
    ("script", "args", "expect"),
    [
        ("quality.py", ["--tiny"], "aliasing %"),  # kernels against the float64 reference
        ("gpu_loader.py", ["--device", "cpu", "--tiny"], "GPU path >= 2x CPU path"),
    ],
)
@pytest.mark.slow
def test_standalone_script_runs_tiny(script: str, args: list[str], expect: str) -> None:
    stdout, tables = _run_tiny(script, *args)
    assert tables and all(t["rows"] for t in tables)
    assert expect in stdout


def _run_tiny(script: str, *args: str) -> tuple[str, list[dict]]:
    """Run ``bench/<script>`` as a user would; its stdout and the tables parsed from it."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, parse_tables(proc.stdout)


@pytest.mark.slow
def test_scale_bench_runs_tiny() -> None:
    """bench/scale.py at 20k rows: the index's bytes per row beyond the text stay within
    budget, and a forked reader of the columns copies (almost) nothing while one of the old
    lists copies megabytes."""
    _, (speed, memory) = _run_tiny("scale.py", "--tiny")
    (row,) = speed["rows"]
    assert row["rows"] == "20,000" and int(row["steps/rank"]) > 0
    assert int(row["beyond text"]) <= 80
    (mem,) = memory["rows"]
    assert float(mem["columns: worker grows"].split()[0]) < 2.0
    assert float(mem["lists: worker grows"].split()[0]) > 2.0


@pytest.mark.slow
def test_stream_bench_runs_tiny() -> None:
    """bench/stream.py: every side serves every image, and a tighter buffer bound holds fewer
    rows and gives more short batches."""
    _, (speed, memory) = _run_tiny("stream.py", "--tiny")
    assert [r["side"] for r in speed["rows"]] == [
        "map-style (folder)", "map-style (tar shards)", "streaming (tar shards)",
        "streaming (file rows)"]
    assert all(float(r["images/s"]) > 0 for r in speed["rows"])
    loose, tight = memory["rows"][0], memory["rows"][-1]
    for row in memory["rows"]:
        assert int(row["peak rows"]) <= int(row["max_buffered_rows"]) + 1
    assert int(tight["peak rows"]) < int(loose["peak rows"])
    assert int(tight["short batches"]) >= int(loose["short batches"])
