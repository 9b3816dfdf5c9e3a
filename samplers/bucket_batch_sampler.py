"""``BucketBatchSampler``: distributed, lock-step, exactly-once, resumable, elastic.

Pass it to ``DataLoader(dataset, batch_sampler=sampler)``. Each epoch is one global plan
(:mod:`samplers.plan`): every bucket's members shuffled and cut into global steps of
``world_size x batch_size_b``, the last step padded within its bucket (or dropped), the steps
shuffled, and rank r taking slice r of each step. So every batch is one bucket, all ranks are
in the same bucket at every step, and every rank yields exactly ``len(sampler)`` batches.

Batches are computed lazily from O(buckets) numbers, so resuming from :meth:`state_dict` slices
the plan instead of replaying it, and a state saved at one world size can be loaded at another:
the not-yet-seen samples of that epoch are planned again for the new world size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from samplers.plan import (
    Plan,
    canonical_ids,
    group_by_bucket,
    make_plan,
    rank_batches,
    remaining_members,
)
from samplers.state import Position, check_int, digest, fingerprint, from_state, to_state

_CHUNK_INDICES = 1 << 15  # indices computed per vectorised call while iterating


@dataclass
class _Pass:
    """One iteration over (the rest of) an epoch; ``next_step`` advances as batches are yielded."""

    plan: Plan
    epoch: int
    history: tuple[tuple[int, int], ...]
    start: int
    next_step: int

    @property
    def done(self) -> bool:
        return self.next_step >= self.plan.num_steps


class BucketBatchSampler(Sampler[list[int]]):
    """Yields this rank's batches of dataset indices, one bucket per batch, in lock-step.

    Args:
        assignment_or_bucket_ids: a ``bucketing.Assignment`` (anything with ``bucket_id`` and
            ``ladder.buckets``) or a 1-D int array of bucket ids; -1 marks excluded entries.
        batch_size: per-rank batch size for every bucket.
        max_pixels_per_batch: instead of ``batch_size``: bucket b's per-rank batch size is
            ``max(1, max_pixels_per_batch // (w_b * h_b))``; needs an Assignment for the shapes.
        max_batch_size: cap on those per-bucket batch sizes.
        world_size, rank: default to ``torch.distributed`` when initialised, else 1 and 0.
        seed: the plan's seed (an int >= 0); the same on every rank.
        shuffle: shuffle members within buckets and the order of steps (else bucket order).
        drop_last: drop each bucket's last partial global step instead of padding it.

    ``len(sampler)`` is the number of batches the next (or running) pass yields on this rank:
    a whole epoch, or what is left of it after :meth:`load_state_dict`. Call :meth:`set_epoch`
    before each epoch. The state from :meth:`state_dict` is the same on every rank.
    """

    def __init__(
        self,
        assignment_or_bucket_ids: Any,
        batch_size: int | None = None,
        *,
        max_pixels_per_batch: int | None = None,
        max_batch_size: int | None = None,
        world_size: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        ids, shapes = _bucket_ids(assignment_or_bucket_ids)
        num_buckets = len(shapes) if shapes is not None else int(ids.max()) + 1
        self._batch_sizes = _batch_sizes(
            num_buckets, shapes, batch_size, max_pixels_per_batch, max_batch_size
        )
        self._world_size, self._rank = _world(world_size, rank)
        self._seed = check_int(seed, "seed", 0)
        self._shuffle = bool(shuffle)
        self._drop_last = bool(drop_last)
        self._bucket_wh = shapes
        self._num_indices = len(ids)
        codes = canonical_ids(ids)
        self._members, self._offsets = group_by_bucket(codes, num_buckets)
        self._fingerprint = fingerprint(
            data=digest(codes),
            num_indices=len(ids),
            batch_sizes=self._batch_sizes,
            seed=self._seed,
            shuffle=self._shuffle,
            drop_last=self._drop_last,
        )
        self._epoch = 0
        self._pending: Position | None = None
        self._active: _Pass | None = None
        self._plans: dict[tuple[int, tuple[tuple[int, int], ...]], Plan] = {}

    # -- configuration ---------------------------------------------------------------------

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def shuffle(self) -> bool:
        return self._shuffle

    @property
    def drop_last(self) -> bool:
        return self._drop_last

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def batch_sizes(self) -> np.ndarray:
        """Per-rank batch size of each bucket, (K,) int64 (bucket id = position)."""
        return self._batch_sizes.copy()

    # -- iteration -------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Plan ``epoch`` next. A no-op for the current epoch, so a resume position survives."""
        epoch = check_int(epoch, "epoch", 0)
        if epoch != self._epoch:
            self._epoch, self._pending, self._active = epoch, None, None

    def __iter__(self) -> Iterator[list[int]]:
        return self._batches()

    def _batches(self) -> Iterator[list[int]]:
        # A generator: the position is taken at the first next(), not at iter(). DataLoader
        # calls iter() more than once before using the last iterator, and a resume position
        # must go to the iterator that actually runs.
        position = self._pending or Position(self._epoch, self._world_size, 0)
        self._pending = None
        plan = self._plan(position.epoch, position.history)
        p = _Pass(plan, position.epoch, position.history, position.consumed, position.consumed)
        self._active = p
        rank, total = self._rank, plan.num_steps
        chunk = max(1, _CHUNK_INDICES // int(plan.batch_sizes.max()))
        t = p.next_step
        while t < total:
            stop = min(total, t + chunk)
            flat, bounds = rank_batches(plan, rank, t, stop)
            # Lists are cut one at a time as they are asked for: building thousands at once
            # (e.g. a 2-D tolist) wakes the cyclic garbage collector over and over.
            values, cuts = flat.tolist(), bounds.tolist()
            for i in range(stop - t):
                p.next_step = t + i + 1  # counted before the yield: the caller has it once asked
                yield values[cuts[i] : cuts[i + 1]]
            t = stop

    def __len__(self) -> int:
        if self._pending is not None:
            plan = self._plan(self._pending.epoch, self._pending.history)
            return plan.num_steps - self._pending.consumed
        if self._active is not None and not self._active.done:
            return self._active.plan.num_steps - self._active.start
        return self._plan(self._epoch, ()).num_steps

    # -- state -----------------------------------------------------------------------------

    def state_dict(self, received: int | None = None) -> dict[str, Any]:
        """O(1) resume state: epoch, global steps consumed, world size, fingerprint.

        By default it counts every batch the latest iterator handed out. That is exact under
        ``StatefulDataLoader`` (it snapshots this state as it takes each batch) and with
        ``num_workers=0``; a plain ``DataLoader`` with workers prefetches ahead of the training
        loop, so pass ``received``: the batches the loop has received from the current
        iteration (like ``num_samples`` in mosaicml-streaming's ``StreamingDataset.state_dict``).
        The state is plain JSON (and ``torch.save``) data, identical on every rank.
        """
        a = self._active
        if self._pending is not None or a is None or a.epoch != self._epoch:
            position = self._pending or Position(self._epoch, self._world_size, 0)
            if received:
                raise ValueError(
                    f"received={received}, but no iteration has started since the last "
                    "set_epoch or load_state_dict"
                )
        else:
            handed_out = a.next_step - a.start
            if received is None:
                received = handed_out
            elif not 0 <= received <= handed_out:
                raise ValueError(
                    f"received={received}, but this iteration has handed out {handed_out} batches"
                )
            position = Position(a.epoch, self._world_size, a.start + received, a.history)
        return to_state(position, self._fingerprint)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume where ``state_dict`` was taken: the next iteration yields the remaining batches.

        At a different world size the epoch's not-yet-seen samples are planned again for this
        one (elastic resume). A finished epoch resumes at the start of the next. Raises
        ValueError for a state saved with different data or settings, naming what differs.
        """
        saved = from_state(state_dict, self._fingerprint)
        segments = [seg for seg in (*saved.history, (saved.world_size, saved.consumed)) if seg[1]]
        if segments and segments[-1][0] == self._world_size:
            history, consumed = tuple(segments[:-1]), segments[-1][1]
        else:
            history, consumed = tuple(segments), 0
        total = self._plan(saved.epoch, history).num_steps
        if consumed > total:
            raise ValueError(
                f"sampler state says {consumed} steps consumed, but epoch {saved.epoch} has only "
                f"{total} at world size {self._world_size}"
            )
        if consumed == total:  # that epoch is over
            position = Position(saved.epoch + 1, self._world_size, 0)
        else:
            position = Position(saved.epoch, self._world_size, consumed, history)
        self._epoch, self._pending, self._active = position.epoch, position, None

    # -- reporting -------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The current epoch's plan at this world size, in plain ints (JSON-safe).

        ``steps`` is the number of batches per rank; per bucket with members: ``count``,
        ``batch_size`` (per rank), ``steps``, ``padded`` (duplicate slots added to fill the last
        global step), ``dropped`` (left out with ``drop_last``) and ``wh`` when shapes are known.
        """
        plan = self._plan(self._epoch, ())
        counts, steps = plan.counts, plan.steps
        padded, dropped = plan.padded, plan.dropped
        buckets = [
            {
                "bucket": int(b),
                "wh": None if self._bucket_wh is None else self._bucket_wh[b].tolist(),
                "count": int(counts[b]),
                "batch_size": int(self._batch_sizes[b]),
                "steps": int(steps[b]),
                "padded": int(padded[b]),
                "dropped": int(dropped[b]),
            }
            for b in np.flatnonzero(counts)
        ]
        return {
            "epoch": self._epoch,
            "world_size": self._world_size,
            "num_indices": self._num_indices,
            "accepted": int(counts.sum()),
            "excluded": self._num_indices - int(counts.sum()),
            "steps": plan.num_steps,
            "padded": int(padded.sum()),
            "dropped": int(dropped.sum()),
            "buckets": buckets,
        }

    def __repr__(self) -> str:
        return (
            f"BucketBatchSampler(indices={self._num_indices}, buckets={len(self._batch_sizes)}, "
            f"world_size={self._world_size}, rank={self._rank}, seed={self._seed}, "
            f"shuffle={self._shuffle}, drop_last={self._drop_last}, epoch={self._epoch})"
        )

    def _plan(self, epoch: int, history: tuple[tuple[int, int], ...]) -> Plan:
        """The plan for ``epoch`` at this world size after elastic ``history`` (cached)."""
        key = (epoch, history)
        if key not in self._plans:
            members, offsets = self._members, self._offsets
            common = {
                "seed": self._seed,
                "epoch": epoch,
                "shuffle": self._shuffle,
                "drop_last": self._drop_last,
            }
            for segment, (world_size, consumed) in enumerate(history):
                plan = make_plan(
                    members, offsets, self._batch_sizes, world_size, segment=segment, **common
                )
                if consumed > plan.num_steps:
                    raise ValueError(
                        f"sampler state history says {consumed} steps consumed at world size "
                        f"{world_size}, but that plan has only {plan.num_steps}"
                    )
                members, offsets = remaining_members(plan, consumed)
            plan = make_plan(
                members,
                offsets,
                self._batch_sizes,
                self._world_size,
                segment=len(history),
                **common,
            )
            if len(self._plans) >= 4:
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = plan
        return self._plans[key]


def _bucket_ids(obj: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """Validated (N,) int64 bucket ids and the (K, 2) bucket shapes when ``obj`` carries them."""
    shapes = None
    if hasattr(obj, "bucket_id"):
        ladder = getattr(obj, "ladder", None)
        if ladder is not None:
            shapes = np.asarray(ladder.buckets, dtype=np.int64).reshape(-1, 2)
        obj = obj.bucket_id
    ids = np.asarray(obj)
    if ids.ndim != 1:
        raise ValueError(f"bucket ids must be a 1-D array, got shape {ids.shape}")
    if len(ids) == 0:
        raise ValueError("bucket ids are empty: there is nothing to sample")
    if ids.dtype.kind not in "iu":
        raise ValueError(f"bucket ids must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    low, high = int(ids.min()), int(ids.max())
    if low < -1:
        at = int(np.flatnonzero(ids < -1)[0])
        raise ValueError(f"bucket ids must be >= -1 (-1 = excluded); index {at} has {ids[at]}")
    if high < 0:
        raise ValueError(f"no accepted indices: all {len(ids)} bucket ids are -1 (excluded)")
    if shapes is not None and high >= len(shapes):
        at = int(np.flatnonzero(ids >= len(shapes))[0])
        raise ValueError(
            f"bucket id {ids[at]} at index {at} is out of range for a ladder of "
            f"{len(shapes)} buckets"
        )
    return ids, shapes


def _batch_sizes(
    num_buckets: int,
    shapes: np.ndarray | None,
    batch_size: int | None,
    max_pixels_per_batch: int | None,
    max_batch_size: int | None,
) -> np.ndarray:
    """Per-rank batch size of each bucket, (K,) int64."""
    if (batch_size is None) == (max_pixels_per_batch is None):
        raise ValueError("pass exactly one of batch_size or max_pixels_per_batch")
    if batch_size is not None:
        if max_batch_size is not None:
            raise ValueError("max_batch_size only applies with max_pixels_per_batch")
        return np.full(num_buckets, check_int(batch_size, "batch_size", 1), dtype=np.int64)
    pixels = check_int(max_pixels_per_batch, "max_pixels_per_batch", 1)
    if shapes is None:
        raise ValueError(
            "max_pixels_per_batch needs the bucket shapes: pass a bucketing.Assignment, "
            "not bare bucket ids"
        )
    sizes = np.maximum(1, pixels // np.maximum(1, shapes[:, 0] * shapes[:, 1]))
    if max_batch_size is not None:
        sizes = np.minimum(sizes, check_int(max_batch_size, "max_batch_size", 1))
    return sizes.astype(np.int64)


def _world(world_size: int | None, rank: int | None) -> tuple[int, int]:
    """(world_size, rank), defaulting to torch.distributed when it is initialised."""
    if world_size is None or rank is None:
        import torch.distributed as dist

        live = dist.is_available() and dist.is_initialized()
        if world_size is None:
            world_size = dist.get_world_size() if live else 1
        if rank is None:
            rank = dist.get_rank() if live else 0
    world_size = check_int(world_size, "world_size", 1)
    rank = check_int(rank, "rank", -(2**63))
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    return world_size, rank
