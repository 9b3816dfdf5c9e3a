"""``bucket-report --config``'s figures and text: a config file's mix, per dataset."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from bucketing.printable import escape


def mix_figures(spec: Any, plans: Mapping[str, Any], dataset: Any, sampler: Any,
                notes: list[str], schema: int) -> dict[str, Any]:
    """What a config file's mix will train on, per dataset: images accepted and rejected (by
    reason), repeats, samples per epoch and their share, buckets; the plan's steps per rank,
    its fingerprint and the command line's overrides. Nothing is decoded."""
    rows = []
    for k, d in enumerate(spec.datasets):
        plan, mine = plans[d.name], dataset.dataset_of == k
        ids = dataset.bucket_id[mine]
        reasons, examples = _rejected(plan)
        accepted = int((ids >= 0).sum())
        rows.append({
            "name": d.name, "source": d.source, "accepted": accepted,
            "rejected": sum(reasons.values()), "reasons": reasons, "examples": examples,
            "repeats": d.repeats, "samples": accepted * d.repeats,
            "buckets": len(np.unique(ids[ids >= 0])),
        })
    total = sum(r["samples"] for r in rows) or 1.0
    for r in rows:
        r["share"] = r["samples"] / total
    return {"schema": schema, "config": spec.path, "model": spec.model,
            "batch_size": spec.batch_size, "max_pixels_per_batch": spec.max_pixels_per_batch,
            "seed": spec.seed, "world_size": spec.world_size, "last_batch": spec.last_batch,
            "steps_per_rank": len(sampler), "plan_fingerprint": dataset.plan_fingerprint,
            "overrides": notes, "datasets": rows}


def _rejected(plan: Any) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Counts of every file the scan or ``assign`` rejected, by reason (``too_small``,
    ``extreme_aspect``, ``too_large``, ...), and up to three files of each."""
    reasons: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    found = [(r.reason, r.path) for r in plan.index.rejections]
    rejected = np.flatnonzero(np.asarray(plan.assignment.bucket_id) < 0).tolist()
    found += [(str(plan.assignment.reasons[i] or "rejected"), plan.index.paths[i])
              for i in rejected]
    for reason, path in found:
        reasons[reason] = reasons.get(reason, 0) + 1
        if len(examples.setdefault(reason, [])) < 3:
            examples[reason].append(path)
    return dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))), examples


def render_mix(figures: Mapping[str, Any]) -> str:
    """The text table of :func:`mix_figures`: per dataset its images, rejections, repeats and
    share; the steps per rank, the plan's fingerprint and what the command line overrode."""
    size = (f"batch size {figures['batch_size']}" if figures["batch_size"] else
            f"{figures['max_pixels_per_batch']} pixels per batch")
    lines = [f"{figures['config']}: model {figures['model']}, {size}, seed {figures['seed']}, "
             f"world size {figures['world_size']}, last batch {figures['last_batch']}"]
    lines += [f"  overridden: {note}" for note in figures["overrides"]]
    lines.append(f"{'dataset':<20} {'images':>7} {'rejected':>8} {'repeats':>7} "
                 f"{'per epoch':>9} {'share':>6} {'buckets':>7}")
    for r in figures["datasets"]:
        lines.append(f"{r['name'][:20]:<20} {r['accepted']:>7} {r['rejected']:>8} "
                     f"{r['repeats']:>7g} {r['samples']:>9g} {r['share']:>6.1%} "
                     f"{r['buckets']:>7}")
        if r["reasons"]:
            lines.append("    rejected: " + ", ".join(f"{k} {v}" for k, v in r["reasons"].items()))
            for reason, paths in r.get("examples", {}).items():
                more = r["reasons"][reason] - len(paths)
                lines.append(f"      {reason}: " + ", ".join(escape(p) for p in paths)
                             + (f" (+{more} more)" if more > 0 else ""))
    lines.append(f"steps per epoch per rank: {figures['steps_per_rank']}")
    lines.append(f"plan fingerprint: {figures['plan_fingerprint']}")
    return "\n".join(lines) + "\n"
