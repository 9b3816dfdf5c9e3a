"""Run under torchrun (gloo, CPU): every rank builds the same encoder cache into one folder.

``PHOTOS WEIGHTS OUT``: each rank scans PHOTOS, loads the tiny FLUX encoders from WEIGHTS and
calls ``build_cache``, which gives each rank its share of the batches and merges the shards;
rank 0 writes the build's statistics to OUT/stats.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from bucketing import BucketLadder, assign, build_cache, scan
from transforms import FluxEncoders


def main() -> None:
    photos, weights, out = sys.argv[1:4]
    dist.init_process_group("gloo")
    index = scan(photos, workers=1)
    ladder = BucketLadder.from_buckets([(32, 32), (48, 32), (32, 48)], multiple=16)
    enc = FluxEncoders.from_pretrained(weights, dtype=torch.float32, max_sequence_length=32)
    cache = build_cache(index, assign(index, ladder), enc, out, batch_size=1, text_batch_size=1,
                        progress=False)
    if dist.get_rank() == 0:
        stats = {k: cache.build_stats[k] for k in ("latents_encoded", "texts_encoded")}
        (Path(out) / "stats.json").write_text(json.dumps(stats))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
