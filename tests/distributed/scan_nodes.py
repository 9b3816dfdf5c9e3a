"""Run under torchrun (gloo, CPU) as one of several nodes: scan FOLDER with a per-node cache
and write what this rank got to OUT/rank<global rank>.json."""

from __future__ import annotations

import json
import os
import sys

import torch.distributed as dist

from bucketing import scan

folder, out = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
node = int(os.environ["GROUP_RANK"])
index = scan(folder, workers=0, cache=os.path.join(out, f"node{node}", "cache.parquet"))
got = {
    "rank": dist.get_rank(),
    "local_rank": int(os.environ["LOCAL_RANK"]),
    "node": node,
    "paths": list(index.paths),
    "sizes": index.sizes.tolist(),
    "captions": list(index.captions),
    "rejections": [list(r) for r in index.rejections],
    "read_local": index.scan_stats.read_local,
    "read": index.scan_stats.read,
}
with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump(got, f)
dist.barrier()
dist.destroy_process_group()
