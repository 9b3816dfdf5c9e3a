"""The scan across nodes: two torchrun agents on 127.0.0.1 (``--nnodes=2``), two processes
each (gloo), scan one folder. Ranks shard by GLOBAL rank (each reads a quarter), gather, and
every rank returns the index a single-process scan gives; each node's local rank 0 writes
that node's cache. The same holds for the images packed in tar shards, read in place."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from bucketing import scan
from bucketing.scan_cache import ScanCache

SCRIPT = Path(__file__).parent / "distributed" / "scan_nodes.py"
NODES, PER_NODE = 2, 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pack(folder: Path, shards: Path) -> None:
    """The files of ``folder`` in two tar shards under ``shards`` (WebDataset layout)."""
    shards.mkdir()
    names = sorted(os.listdir(folder))
    for k in range(2):
        with tarfile.open(shards / f"{k:05d}.tar", "w") as tf:
            for name in names[k::2]:
                tf.add(folder / name, arcname=name)


@pytest.mark.parametrize("kind", ["folder", pytest.param("tar", marks=pytest.mark.slow)])
def test_two_nodes_of_two_ranks_share_one_index(tmp_path: Path, kind: str) -> None:
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("torchrun is not installed next to this python")
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(22):
        Image.new("RGB", (16 + i, 40 - i)).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"caption {i}\n")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    if kind == "tar":  # the same images read in place from tar shards
        pack(folder, tmp_path / "shards")
        folder = tmp_path / "shards"
    out = tmp_path / "out"
    out.mkdir()
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    agents = [
        subprocess.Popen(
            [
                exe,
                f"--nnodes={NODES}",
                f"--nproc-per-node={PER_NODE}",
                f"--node-rank={node}",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                str(SCRIPT),
                str(folder),
                str(out),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for node in range(NODES)
    ]
    for agent in agents:
        log, _ = agent.communicate(timeout=180)
        assert agent.returncode == 0, log[-4000:]

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(NODES * PER_NODE)]
    assert [(g["node"], g["local_rank"]) for g in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    local = scan(folder, workers=0)
    for got in ranks:
        assert got["paths"] == list(local.paths) and got["sizes"] == local.sizes.tolist()
        assert got["captions"] == list(local.captions)
        assert got["rejections"] == [list(r) for r in local.rejections]
        assert got["read"] == local.scan_stats.files == 23
    # sharded by global rank: four disjoint quarters, not two halves read twice
    assert sorted(g["read_local"] for g in ranks) == [5, 6, 6, 6]
    for node in range(NODES):  # each node's local rank 0 wrote its cache
        cache = out / f"node{node}" / "cache.parquet"
        assert len(ScanCache.load(cache)) == 23
        assert scan(folder, workers=0, cache=cache).scan_stats.read == 0
