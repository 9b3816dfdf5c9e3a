"""Run every benchmark back to back in one invocation and check the headline ratios.

Each bench script runs in its own subprocess (so one script's imports, caches and peak memory
never touch another's), its output is echoed as it comes, and its tables are parsed back from
that output (the ``print_table`` format of bench/common.py). The summary at the end gives the
project's speed targets with the measured figure and PASS / MISS; the raw results (command, exit
status, wall time, load average before and after, full output and every parsed table) go to
``bench/out/run_all-<mode>.json``.

    python bench/run_all.py --quick   # make bench: the quick version of every script
    python bench/run_all.py           # the full versions (much longer: 20k files, 10M rows)
    python bench/run_all.py --tiny    # smoke test: every script at a tiny size
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from bench.common import machine_line  # noqa: E402
from bucketing.atomic import atomic_write_bytes  # noqa: E402

# name -> arguments per mode, in the order of docs/benchmarks.md.
SCRIPTS: dict[str, dict[str, list[str]]] = {
    "scan": {"full": [], "quick": ["--quick"], "tiny": ["--files", "50", "--reps", "1"]},
    "assign": {
        "full": [],
        "quick": ["--quick", "--sizes", "1000000", "10000000"],  # the 10M target
        "tiny": ["--tiny"],
    },
    "sampler": {"full": [], "quick": ["--quick"], "tiny": ["--tiny"]},
    # tiny: batch size 1, so the sampler pads no bucket up to 4 copies of one file
    "loader": {"full": [], "quick": ["--quick"], "tiny": ["--tiny", "--batch-size", "1"]},
    # tiny: the build decodes in the main process (starting workers would double its time)
    "cache": {"full": [], "quick": ["--quick"], "tiny": ["--tiny", "--workers", "0"]},
    # quick: the 1M-row size only, one timed scan; tiny: 20k rows, without the lists 'before'
    "scale": {
        "full": [],
        "quick": ["--rows", "1000000", "--reps", "1"],
        "tiny": ["--tiny", "--no-lists"],
    },
}

Table = dict[str, Any]  # {"title": str, "columns": [str], "rows": [{column: cell}]}


# -- running ----------------------------------------------------------------------------------


def loadavg() -> float | None:
    """The 1-minute load average (None where the OS does not say)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def run_script(name: str, args: Sequence[str], echo: bool = True) -> dict[str, Any]:
    """Run bench/<name>.py with ``args`` in a subprocess; its stdout echoed line by line and
    kept, its stderr passed through. Returns command, rc, wall seconds, load and output."""
    cmd = [sys.executable, str(BENCH / f"{name}.py"), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    load_before = loadavg()
    t0 = time.perf_counter()
    lines = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=BENCH.parent) as p:
        assert p.stdout is not None
        for line in p.stdout:
            lines.append(line)
            if echo:
                print(line, end="", flush=True)
    return {
        "script": f"bench/{name}.py",
        "command": " ".join(["python", f"bench/{name}.py", *args]),
        "rc": p.returncode,
        "wall_s": time.perf_counter() - t0,
        "load_before": load_before,
        "load_after": loadavg(),
        "stdout": "".join(lines),
    }


# -- parsing the printed tables ---------------------------------------------------------------


def parse_tables(text: str) -> list[Table]:
    """Every ``print_table`` table in ``text``: a '## title' line, a header line, a line of
    dash runs (one per column, giving the column spans), then rows up to a blank line."""
    lines = text.splitlines()
    tables = []
    for i, line in enumerate(lines[:-2]):
        dashes = lines[i + 2]
        if not line.startswith("## ") or not re.fullmatch(r"-+( +-+)*\s*", dashes):
            continue
        spans = [m.span() for m in re.finditer(r"-+", dashes)]
        spans[-1] = (spans[-1][0], None)  # the last column runs to the end of the line

        def cells(row: str, spans: list = spans) -> list[str]:
            return [row[a:b].strip() for a, b in spans]

        columns = cells(lines[i + 1])
        rows = []
        for row in lines[i + 3 :]:
            if not row.strip():
                break
            rows.append(dict(zip(columns, cells(row), strict=True)))
        tables.append({"title": line[3:].strip(), "columns": columns, "rows": rows})
    return tables


_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


def seconds(cell: str) -> float:
    """The median of a Timing cell ('1.23 s [1.1 s-1.4 s]', '45.6 ms', '789 us') in seconds."""
    m = re.match(r"\s*(?:\d+: )?([\d.]+) (s|ms|us)\b", cell)
    if not m:
        raise ValueError(f"not a time: {cell!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def number(cell: str) -> float:
    """The leading number of a cell: '2268', '1.30x', '54%', '20,000'."""
    m = re.match(r"\s*(-?[\d,]*\.?\d+(?:e[-+]?\d+)?)", cell)
    if not m:
        raise ValueError(f"not a number: {cell!r}")
    return float(m.group(1).replace(",", ""))


def find_table(tables: list[Table], title_start: str) -> Table:
    for t in tables:
        if t["title"].startswith(title_start):
            return t
    raise LookupError(f"no table titled {title_start!r}...")


# -- headline ratios against the project's speed targets --------------------------------------


@dataclass
class Headline:
    bench: str
    target: str
    measured: str
    status: str  # "PASS", "MISS" or "n/a" (not measured in this mode / table missing)


def _check(bench: str, target: str, measured: str, ok: bool) -> Headline:
    return Headline(bench, target, measured, "PASS" if ok else "MISS")


def headlines_scan(tables: list[Table]) -> list[Headline]:
    """Ours at its default (all cores, cold cache file) decides PASS/MISS; ours with one
    worker is quoted beside it. Peers are taken at their fastest setting."""
    rows = {r["side"]: r for r in find_table(tables, "header scan")["rows"]}

    def rate(side: str) -> float:
        return number(rows[side]["files/s"])

    def fastest(prefix: str) -> tuple[str, float]:
        hits = [(side, rate(side)) for side in rows if side.startswith(prefix)]
        if not hits:
            raise LookupError(f"no scan row starting {prefix!r}")
        return max(hits, key=lambda h: h[1])

    ours = [s for s in rows if s.startswith("ours")]
    cold_sides = sorted((s for s in ours if "cold" in s), key=lambda s: number(s.split(", ")[1]))
    one, cold = rate(cold_sides[0]), rate(cold_sides[-1])  # 1 worker, all cores
    warm = rate(next(s for s in ours if "warm" in s))
    peer_side, peer = fastest("bucketsampler")
    _, bare = fastest("bare imagesize")
    wrong = sum(int(number(rows[s]["wrong orientation"])) for s in ours)
    return [
        _check(
            "scan",
            ">= 2x bucketsampler (its fastest setting)",
            f"{cold / peer:.2f}x ({cold:.0f} vs {peer:.0f} files/s, {peer_side}); "
            f"1 worker: {one / peer:.2f}x",
            cold / peer >= 2,
        ),
        _check(
            "scan",
            ">= 0.5x bare imagesize loop, orientation right",
            f"{cold / bare:.2f}x ({cold:.0f} vs {bare:.0f} files/s); 1 worker: "
            f"{one / bare:.2f}x; ours wrongly oriented: {wrong}",
            cold / bare >= 0.5 and wrong == 0,
        ),
        _check(
            "scan",
            "warm rescan >= 20x cold scan",
            f"{warm / cold:.1f}x ({warm:.0f} vs {cold:.0f} files/s); vs 1-worker cold: "
            f"{warm / one:.1f}x",
            warm / cold >= 20,
        ),
    ]


def headlines_assign(tables: list[Table]) -> list[Headline]:
    speed = find_table(tables, "assignment time")["rows"]
    by_n = {int(number(r["N"])): seconds(r["ours"]) for r in speed}
    if 10_000_000 in by_n:
        t = by_n[10_000_000]
        speed_line = _check("assign", "10M sizes in < 2 s", f"{t:.2f} s", t < 2)
    else:
        n = max(by_n)
        speed_line = Headline(
            "assign",
            "10M sizes in < 2 s",
            f"not run in this mode; {n:,} took {by_n[n]:.3f} s",
            "n/a",
        )
    quality = find_table(tables, "quality on")["rows"]
    ours = next(r for r in quality if r["method"].startswith("ours"))
    peers = [r for r in quality if r is not ours]
    col = "crop mean, same images" if "crop mean, same images" in ours else "crop mean"
    ours_crop = number(ours[col])
    best = min(peers, key=lambda r: number(r[col]))
    ok = number(ours["upscaled %"]) == 0 and all(ours_crop < number(r[col]) for r in peers)
    return [
        speed_line,
        _check(
            "assign",
            "crop loss below every peer, zero upscales",
            f"ours {ours_crop:.4f} at {number(ours['upscaled %']):.0f}% upscaled; best peer "
            f"{number(best[col]):.4f} ({best['method']}, {number(best['upscaled %']):.0f}% "
            f"upscaled) [{col}]",
            ok,
        ),
    ]


def headlines_sampler(tables: list[Table]) -> list[Headline]:
    rows = find_table(tables, "plan + iterate")["rows"]
    n_max = max(int(number(r["N"])) for r in rows)
    big = {int(r["world"]): r for r in rows if int(number(r["N"])) == n_max}
    label = f"{n_max / 1e6:g}M" if n_max >= 1_000_000 else f"{n_max:,}"
    out = []
    if 8 in big:
        s = number(big[8]["speed-up"])
        out.append(
            _check("sampler", f">= 3x bucketsampler at {label}, world 8", f"{s:.2f}x", s >= 3)
        )
    others = [r for r in rows if int(r["world"]) != 8]
    if others:
        worst = min(others, key=lambda r: number(r["speed-up"]))
        out.append(
            _check(
                "sampler",
                "faster than bucketsampler at world 1 and 64",
                "slowest: " + f"{number(worst['speed-up']):.2f}x (N {worst['N']}, world "
                f"{worst['world']})",
                all(number(r["speed-up"]) > 1 for r in others),
            )
        )
    mem = min((r for r in big.values()), key=lambda r: number(r["memory"]))
    out.append(
        _check(
            "sampler",
            f"far less memory (>= 2x less peak, {label})",
            f"least: {number(mem['memory']):.2f}x ({mem['ours MB']} vs "
            f"{mem['bucketsampler MB']} MB, world {mem['world']})",
            number(mem["memory"]) >= 2,
        )
    )
    restores = [
        r for r in find_table(tables, "ours: restore")["rows"] if int(number(r["N"])) == n_max
    ]
    if restores:
        worst_same = max(seconds(r["load + 1st batch"]) for r in restores)
        elastic_col = next(c for c in restores[0] if c.startswith("elastic"))
        worst_elastic = max(seconds(r[elastic_col]) for r in restores)
        out.append(
            _check(
                "sampler",
                f"restore at mid-epoch in < 1 s at {label}",
                f"load + 1st batch <= {worst_same:.3f} s; elastic <= {worst_elastic:.3f} s",
                max(worst_same, worst_elastic) < 1,
            )
        )
    return out


def headlines_loader(tables: list[Table]) -> list[Headline]:
    rows = find_table(tables, "images/s through the DataLoader")["rows"]
    out = []
    for corpus in dict.fromkeys(r["corpus"] for r in rows):
        side = {r["side"]: number(r["images/s"]) for r in rows if r["corpus"] == corpus}
        bound = next(v for k, v in side.items() if k.startswith("decode-only"))
        ours = next(v for k, v in side.items() if k.startswith("ours default"))
        for peer_name in ("bucketsampler", "typical trainer"):
            peer = next(v for k, v in side.items() if k.startswith(peer_name))
            out.append(
                _check(
                    "loader",
                    f"{corpus}: default >= 1.5x {peer_name}",
                    f"{ours / peer:.2f}x ({ours:.1f} vs {peer:.1f} images/s)",
                    ours / peer >= 1.5,
                )
            )
        out.append(
            _check(
                "loader",
                f"{corpus}: default >= 60% of decode-only",
                f"{ours / bound:.0%} ({ours:.1f} vs {bound:.1f} images/s)",
                ours / bound >= 0.6,
            )
        )
    return out


def headlines_cache(tables: list[Table]) -> list[Headline]:
    """The cached epoch against decoding and encoding on the fly, and one cached FLUX 1024²
    sample read through the dataset ("well under 1 ms": the script's own bar, 0.5 ms)."""
    epochs = {r["side"]: r for r in find_table(tables, "Cached epoch vs on the fly")["rows"]}
    cached = next(r for side, r in epochs.items() if side.startswith("cached (memory-mapped"))
    speedup = number(cached["vs on the fly"])
    (read,) = find_table(tables, "Reading one cached FLUX")["rows"]
    t = seconds(read["median"])
    return [
        _check(
            "cache",
            "cached epoch >= 10x on the fly",
            f"{speedup:.1f}x ({cached['samples/s']} samples/s)",
            speedup >= 10,
        ),
        _check(
            "cache",
            "one cached FLUX 1024² sample read well under 1 ms (< 0.5 ms)",
            f"{t * 1e3:.3f} ms median (p90 {read['p90']})",
            t < 0.5e-3,
        ),
    ]


def headlines_scale(tables: list[Table]) -> list[Headline]:
    """At the largest size measured: a forked worker's private memory growth after reading
    every row of the index (as scanned, and memory-mapped from a saved file: its dirty pages),
    and the index's bytes per row beyond the text itself."""
    speed = find_table(tables, "manifest with sizes")["rows"]
    memory = find_table(tables, "a forked worker reads every row")["rows"]
    big = max(speed, key=lambda r: number(r["rows"]))
    mem = next(r for r in memory if r["rows"] == big["rows"])
    grown = max(number(mem["columns: worker grows"]), number(mem["mapped .arrow: dirty"]))
    beyond = number(big["beyond text"])
    return [
        _check(
            "scale",
            f"forked worker's private memory grows < 50 MB ({big['rows']} rows)",
            f"columns {mem['columns: worker grows']}, mapped .arrow {mem['mapped .arrow: dirty']}"
            f" (lists before: {mem['lists: worker grows']})",
            grown < 50,
        ),
        _check(
            "scale",
            f"index bytes/row beyond text <= 80 ({big['rows']} rows)",
            f"{beyond:.0f} (all: {big['index bytes/row']}); scan {big['rows/s']} rows/s",
            beyond <= 80,
        ),
    ]


HEADLINES: dict[str, Callable[[list[Table]], list[Headline]]] = {
    "scan": headlines_scan,
    "assign": headlines_assign,
    "sampler": headlines_sampler,
    "loader": headlines_loader,
    "cache": headlines_cache,
    "scale": headlines_scale,
}


def headlines(name: str, result: dict[str, Any]) -> list[Headline]:
    """The headline checks of one script's result; one 'n/a' line if it failed or its tables
    do not hold what the check needs (so a broken script never hides the others)."""
    if result["rc"] != 0:
        return [Headline(name, "script ran", f"exit status {result['rc']}", "MISS")]
    try:
        return HEADLINES[name](result["tables"])
    except (LookupError, ValueError, StopIteration) as e:
        return [Headline(name, "headline figures", f"could not read them: {e}", "n/a")]


def print_summary(lines: list[Headline], results: dict[str, dict[str, Any]], mode: str) -> None:
    print(f"\n# Summary ({mode}) vs the project's speed targets")
    for r in results.values():
        load = f"load {r['load_before']:.2f} -> {r['load_after']:.2f}" if r["load_before"] else ""
        print(f"  {r['command']}: exit {r['rc']}, {r['wall_s']:.0f} s {load}")
    width = max(len(f"{h.bench}: {h.target}") for h in lines)
    for h in lines:
        print(f"{h.status:<4}  {f'{h.bench}: {h.target}':<{width}}  {h.measured}")
    counts = {s: sum(h.status == s for h in lines) for s in ("PASS", "MISS", "n/a")}
    print(", ".join(f"{v} {k}" for k, v in counts.items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="quick versions (make bench)")
    mode.add_argument("--tiny", action="store_true", help="smoke test at tiny sizes")
    ap.add_argument("--only", nargs="+", choices=list(SCRIPTS), help="run only these scripts")
    ap.add_argument("--out", type=Path, default=BENCH / "out", help="folder for the JSON")
    args = ap.parse_args(argv)
    mode_name = "tiny" if args.tiny else "quick" if args.quick else "full"
    print(f"# bench/run_all.py --{mode_name} | {machine_line()}")
    results: dict[str, dict[str, Any]] = {}
    summary: list[Headline] = []
    t0 = time.perf_counter()
    for name, modes in SCRIPTS.items():
        if args.only and name not in args.only:
            continue
        print(f"\n# ===== bench/{name}.py {' '.join(modes[mode_name])}", flush=True)
        result = run_script(name, modes[mode_name])
        result["tables"] = parse_tables(result["stdout"])
        results[name] = result
        summary += headlines(name, result)
    print_summary(summary, results, mode_name)
    print(f"total wall time {time.perf_counter() - t0:.0f} s")
    path = args.out / f"run_all-{mode_name}.json"
    report = {
        "mode": mode_name,
        "machine": machine_line(),
        "wall_s": time.perf_counter() - t0,
        "results": results,
        "headlines": [asdict(h) for h in summary],
    }
    atomic_write_bytes(path, json.dumps(report, indent=1).encode())
    print(f"raw results: {path}")
    return 0 if all(r["rc"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
