"""Sampler state: an O(1), JSON-safe resume position plus a fingerprint of the configuration.

A state names where an epoch stands: ``epoch``, the global steps ``consumed`` of the plan made
for ``world_size``, and ``history``, the ``[world_size, consumed]`` segments of the same epoch
that ran before an elastic resume re-planned the rest. It never holds index lists. The
fingerprint (a hash of the bucket ids, a hash of the per-rank batch sizes, the seed, shuffle
and drop_last) lets ``load_state_dict`` refuse, with a message naming what differs, a state
saved for other data or settings instead of silently resuming the wrong plan.
"""

from __future__ import annotations

import hashlib
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

STATE_VERSION = 1

_FIELDS = {
    "data": "bucket ids (a different data set or assignment)",
    "num_indices": "number of indices",
    "batch_sizes": "per-rank batch sizes (batch_size, max_pixels_per_batch, max_batch_size "
    "or the bucket shapes)",
    "seed": "seed",
    "shuffle": "shuffle",
    "drop_last": "drop_last",
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
    seed: int,
    shuffle: bool,
    drop_last: bool,
) -> dict[str, Any]:
    """The configuration a state belongs to (everything except epoch, world size and rank)."""
    return {
        "data": data,
        "num_indices": int(num_indices),
        "batch_sizes": digest(np.asarray(batch_sizes, dtype="<i8")),
        "seed": int(seed),
        "shuffle": bool(shuffle),
        "drop_last": bool(drop_last),
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
            f"sampler state version {state['version']!r} is not supported "
            f"(expected {STATE_VERSION})"
        )
    saved = state["fingerprint"]
    diffs = [
        f"{label}: saved {saved.get(k)!r}, this sampler {fp[k]!r}"
        for k, label in _FIELDS.items()
        if saved.get(k) != fp[k]
    ]
    if diffs:
        raise ValueError(
            "sampler state was saved for a different configuration; differences: "
            + "; ".join(diffs)
            + ". Build the sampler with the same data and settings to resume, or do not load it."
        )
    segments = state.get("history", [])
    if not isinstance(segments, (list, tuple)) or any(
        not isinstance(seg, (list, tuple)) or len(seg) != 2 for seg in segments
    ):
        raise ValueError(
            f"sampler state history must be [[world_size, consumed], ...], got {segments!r}"
        )
    try:
        return Position(
            epoch=check_int(state["epoch"], "epoch", 0),
            world_size=check_int(state["world_size"], "world_size", 1),
            consumed=check_int(state["consumed"], "consumed", 0),
            history=tuple(
                (check_int(w, "history world_size", 1), check_int(k, "history consumed", 0))
                for w, k in segments
            ),
        )
    except (TypeError, ValueError) as e:  # a corrupted state is a bad value, whatever the field
        raise ValueError(f"sampler state field {e}") from None


def check_int(value: Any, name: str, minimum: int) -> int:
    """``value`` as an int >= ``minimum``: TypeError for a non-integer (bool included),
    ValueError below ``minimum``; both name ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)
