"""Sampler state: an O(1), JSON-safe resume position plus a fingerprint of the configuration.

A state names where an epoch stands: ``epoch``, the global steps ``consumed`` of the plan made
for ``world_size``, and ``history``, the ``[world_size, consumed]`` segments of the same epoch
that ran before an elastic resume re-planned the rest. It never holds index lists. The
fingerprint (the planning algorithm's version, a hash of the bucket ids, of the per-rank batch
sizes and of the repeats, the seed, shuffle and last_batch) lets ``load_state_dict`` refuse,
with a message naming what differs, a state saved for other data, settings or planning
algorithm instead of silently resuming the wrong plan. Every field of a loaded state is checked
against fixed bounds before anything is allocated for it.
"""

from __future__ import annotations

import hashlib
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from samplers.plan import PLAN_VERSION

STATE_VERSION = 1
MAX_WORLD_SIZE = 2**20  # ranks: far above any cluster, far below what a plan could hold
MAX_HISTORY = 256  # elastic re-plans within one epoch
MAX_EPOCH = 2**63 - 1

_FIELDS = {
    "data": "bucket ids (a different data set or assignment)",
    "num_indices": "number of indices",
    "batch_sizes": "per-rank batch sizes (the batching rule or the bucket shapes)",
    "repeats": "repeats",
    "seed": "seed",
    "shuffle": "shuffle",
    "last_batch": "last_batch",
}


@dataclass(frozen=True)
class Position:
    """Where an epoch stands: ``history`` segments, then ``consumed`` steps at ``world_size``."""

    epoch: int
    world_size: int
    consumed: int
    history: tuple[tuple[int, int], ...] = ()


def digest(array: np.ndarray) -> str:
    """A short content hash of an array: dtype, shape and bytes (blake2b, 128 bits, hex)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{array.dtype.str}{array.shape}".encode())
    h.update(np.ascontiguousarray(array).data)
    return h.hexdigest()


def fingerprint(
    *,
    data: str,
    num_indices: int,
    batch_sizes: np.ndarray,
    repeats: np.ndarray | None,
    seed: int,
    shuffle: bool,
    last_batch: str,
    plan: str | None = None,
) -> dict[str, Any]:
    """The configuration a state belongs to (everything except epoch, world size and rank).

    ``batch_sizes`` should be 0 for buckets without members, so that only what the plan uses
    counts. ``plan`` is the data set's plan fingerprint when known (a string from the
    caller: its rows, buckets and sample settings), compared when both sides have one.
    """
    return {
        "plan_version": PLAN_VERSION,
        "data": data,
        "num_indices": int(num_indices),
        "batch_sizes": digest(np.asarray(batch_sizes, dtype="<i8")),
        "repeats": None if repeats is None else digest(np.asarray(repeats, dtype="<f8")),
        "seed": int(seed),
        "shuffle": bool(shuffle),
        "last_batch": last_batch,
        "plan": plan,
    }


def to_state(position: Position, fp: dict[str, Any]) -> dict[str, Any]:
    """The state dict for ``position`` (plain ints, lists and strings: JSON and torch.save safe)."""
    return {
        "version": STATE_VERSION,
        "epoch": position.epoch,
        "world_size": position.world_size,
        "consumed": position.consumed,
        "history": [list(seg) for seg in position.history],
        "fingerprint": dict(fp),
    }


def from_state(state: dict[str, Any], fp: dict[str, Any]) -> Position:
    """Validate ``state`` against this sampler's fingerprint ``fp`` and return its position.

    Raises ValueError for a state that is not a sampler state, has another version, or was saved
    for different data or settings (naming each field that differs).
    """
    if not isinstance(state, dict):
        raise ValueError(f"sampler state must be a dict, got {type(state).__name__}")
    missing = [
        k for k in ("version", "epoch", "world_size", "consumed", "fingerprint") if k not in state
    ]
    if missing:
        raise ValueError(f"not a BucketBatchSampler state: missing {', '.join(missing)}")
    if state["version"] != STATE_VERSION:
        raise ValueError(
            f"sampler state version {_short(state['version'])} is not supported "
            f"(expected {STATE_VERSION})"
        )
    saved = state["fingerprint"]
    if not isinstance(saved, dict):
        raise ValueError(f"sampler state fingerprint must be a dict, got {type(saved).__name__}")
    if saved.get("plan_version", 1) != PLAN_VERSION:
        raise ValueError(
            f"sampler state was saved by planning algorithm version "
            f"{saved.get('plan_version', 1)!r}; this sampler plans with version {PLAN_VERSION}, "
            "whose batches differ, so resuming would not continue the same plan. Resume with "
            "the library version that saved it, or start the epoch again without loading it."
        )
    diffs = [
        f"{label}: saved {_short(saved.get(k))}, this sampler {fp[k]!r}"
        for k, label in _FIELDS.items()
        if saved.get(k) != fp[k]
    ]
    if saved.get("plan") is not None and fp["plan"] is not None and saved["plan"] != fp["plan"]:
        diffs.append(f"plan fingerprint (the data set's rows, buckets and sample settings, e.g. "
                     f"a config's datasets in another order): saved {_short(saved['plan'])}, "
                     f"this sampler {fp['plan']!r}")
    if diffs:
        raise ValueError(
            "sampler state was saved for a different configuration; differences: "
            + "; ".join(diffs)
            + ". Build the sampler with the same data and settings to resume, or do not load it."
        )
    segments = state.get("history", [])
    if (
        not isinstance(segments, (list, tuple))
        or len(segments) > MAX_HISTORY
        or any(not isinstance(seg, (list, tuple)) or len(seg) != 2 for seg in segments)
    ):
        raise ValueError(
            "sampler state history must be [[world_size, consumed], ...] with at most "
            f"{MAX_HISTORY} entries, got {_short(segments)}"
        )
    try:
        return Position(
            epoch=check_int(state["epoch"], "epoch", 0, MAX_EPOCH),
            world_size=check_int(state["world_size"], "world_size", 1, MAX_WORLD_SIZE),
            consumed=check_int(state["consumed"], "consumed", 0),
            history=tuple(
                (
                    check_int(w, "history world_size", 1, MAX_WORLD_SIZE),
                    check_int(k, "history consumed", 0),
                )
                for w, k in segments
            ),
        )
    except (TypeError, ValueError) as e:  # a corrupted state is a bad value, whatever the field
        raise ValueError(f"sampler state field {e}") from None


def check_int(value: Any, name: str, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an int in [minimum, maximum]: TypeError for a non-integer (bool included),
    ValueError out of range; both name ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return int(value)


def _short(value: Any) -> str:
    """``repr(value)``, cut to 80 characters (a corrupted field may be huge)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
