"""``BucketBatchSampler``: distributed, lock-step, exactly-once, resumable, elastic.

Pass it to ``DataLoader(dataset, batch_sampler=sampler)``. Each epoch is one global plan
(:mod:`samplers.plan`): every bucket's rows (times their repeats) shuffled and cut into global
steps of ``world_size x batch_size_b``, the last step split across ranks (``last_batch="short"``),
padded within its bucket (``"pad"``) or dropped (``"drop"``), the steps shuffled, and rank r
taking its share of each step. So every batch is one bucket, all ranks are in the same bucket
at every step, and every rank yields exactly ``len(sampler)`` batches of
:class:`~samplers.SampleIndex` (ints that carry their occurrence within the epoch).

Batches are computed lazily from O(buckets) numbers, so resuming from :meth:`state_dict` slices
the plan instead of replaying it, and a state saved at one world size can be loaded at another:
the not-yet-seen samples of that epoch are planned again for the new world size.
"""

from __future__ import annotations

import numbers
import sys
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import chain
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from samplers.batching import MAX_SIZE, BatchingRule
from samplers.plan import (
    LAST_BATCH,
    MAX_REPEATS,
    Layout,
    Plan,
    canonical_ids,
    group_by_bucket,
    make_layout,
    make_plan,
    rank_batches,
    remaining_units,
)
from samplers.sample_index import SampleBatch, SampleIndex, batch_class
from samplers.state import (
    MAX_EPOCH,
    MAX_WORLD_SIZE,
    Position,
    check_int,
    digest,
    fingerprint,
    from_state,
    to_state,
)

_CHUNK_INDICES = 1 << 15  # indices computed per vectorised call while iterating
EMIT = ("rank", "all_ranks")


@dataclass
class _Pass:
    """One iteration over (the rest of) an epoch. The batches of steps ``t0 .. t0 + size`` are
    made lazily from ``starts`` (a list iterator over their first positions), so the steps
    asked for so far are read off it: a step counts once any of its batches has been asked."""

    plan: Plan
    epoch: int
    history: tuple[tuple[int, int], ...]
    start: int
    t0: int
    size: int = 0
    starts: Any = field(default_factory=lambda: iter(()))

    @property
    def next_step(self) -> int:
        return self.t0 + self.size - self.starts.__length_hint__()

    @property
    def done(self) -> bool:
        return self.next_step >= self.plan.num_steps


class BucketBatchSampler(Sampler[list[SampleIndex]]):
    """Yields this rank's batches of dataset indices, one bucket per batch, in lock-step.

    Args:
        assignment_or_bucket_ids: a ``bucketing.Assignment`` (anything with ``bucket_id`` and
            ``ladder.buckets``), a dataset with ``bucket_id`` and per-row ``bucket_wh`` (like
            ``TextToImageDataset``), or a 1-D int array of bucket ids; -1 marks excluded rows.
        batch_size: per-rank batch size for every bucket.
        max_pixels_per_batch: instead of ``batch_size``: bucket b's per-rank batch size is
            ``max(1, max_pixels_per_batch // (w_b * h_b))``; needs the bucket shapes.
        max_batch_size: cap on those per-bucket batch sizes.
        batching: a :class:`BatchingRule` instead of the three keywords above (it also offers
            a cost quadratic in pixels, for attention).
        world_size, rank: default to ``torch.distributed`` when initialised, else 1 and 0.
        seed: the plan's seed (an int in [0, 2**64)); the same on every rank.
        shuffle: shuffle rows within buckets and the order of steps (else bucket order).
        last_batch: what happens to each bucket's last, partial global step: ``"short"`` (the
            default) splits it as evenly as possible across ranks (a rank pads with one
            duplicate only when the step has fewer images than ranks: never at world size 1);
            ``"pad"`` fills it with duplicates from the same bucket (fixed batch shapes);
            ``"drop"`` leaves it out.
        drop_last: ``True`` is the older spelling of ``last_batch="drop"``.
        repeats: how many times each row appears per epoch: a number for every row or one per
            row, each in [0, 2**16]; a fractional part f adds one more appearance with
            probability f, drawn per (seed, epoch, row), so ``len(sampler)`` may change from
            epoch to epoch (:meth:`total_steps` sums a run).

        emit: ``"rank"`` (the default) yields this rank's batches; ``"all_ranks"`` yields, for
            each step, every rank's batch in rank order (``world_size`` batches per step), for a
            loader wrapper that hands batch ``j`` to process ``j % world_size`` itself:
            accelerate's ``accelerator.prepare(loader)``. Iterating the default mode under
            accelerate's ``BatchSamplerShard`` raises (it would shard the rank's batches again
            and lose data without a word), naming ``emit="all_ranks"``.

    Batches are :class:`SampleBatch` lists of :class:`SampleIndex`: ints that carry the
    ``epoch`` (so a dataset's random draws follow :meth:`set_epoch` alone) and an
    ``occurrence`` that tells a row's occurrences in the epoch apart (0 for a row that appears
    once; its repeats and padding duplicates numbered 1, 2, ...); each (row, occurrence) pair
    appears at most once per epoch. ``len(sampler)`` is the number of batches the next (or
    running) pass yields: a whole epoch, or what is left of it after :meth:`load_state_dict`.
    Call :meth:`set_epoch` before each epoch. The state from :meth:`state_dict` is the same on
    every rank.
    """

    def __init__(
        self,
        assignment_or_bucket_ids: Any,
        batch_size: int | None = None,
        *,
        max_pixels_per_batch: int | None = None,
        max_batch_size: int | None = None,
        batching: BatchingRule | None = None,
        world_size: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        last_batch: str | None = None,
        drop_last: bool = False,
        repeats: Any = None,
        emit: str = "rank",
    ) -> None:
        super().__init__()
        if emit not in EMIT:
            raise ValueError(f"emit must be one of {EMIT}, got {emit!r}")
        self._emit = emit
        ids, shapes = _bucket_ids(assignment_or_bucket_ids)
        num_buckets = len(shapes) if shapes is not None else int(ids.max()) + 1
        self._batching = _rule(batching, batch_size, max_pixels_per_batch, max_batch_size)
        if self._batching.needs_shapes and shapes is None:
            raise ValueError(
                "max_pixels_per_batch needs the bucket shapes: pass a bucketing.Assignment "
                "(or a dataset with bucket_wh), not bare bucket ids"
            )
        self._batch_sizes = self._batching.batch_sizes(
            np.zeros((num_buckets, 2)) if shapes is None else shapes
        )
        self._world_size, self._rank = _world(world_size, rank)
        _check_step(self._batch_sizes, self._world_size)
        self._seed = check_int(seed, "seed", 0, 2**64 - 1)
        self._shuffle = bool(shuffle)
        self._last_batch = _last_batch(last_batch, drop_last)
        self._repeats = _repeats(repeats, ids >= 0)
        self._bucket_wh = shapes
        self._num_indices = len(ids)
        codes = canonical_ids(ids)
        self._members, self._offsets = group_by_bucket(codes, num_buckets)
        self._fingerprint = fingerprint(
            data=digest(codes),
            num_indices=len(ids),
            batch_sizes=np.where(np.diff(self._offsets) > 0, self._batch_sizes, 0),
            repeats=self._repeats,
            seed=self._seed,
            shuffle=self._shuffle,
            last_batch=self._last_batch,
        )
        self._epoch = 0
        self._asked: int | None = None  # set_epoch's epoch until an iteration starts
        self._pending: Position | None = None
        self._active: _Pass | None = None
        self._plans: dict[tuple[int, tuple[tuple[int, int], ...]], Plan] = {}
        self._layouts: dict[int, Layout] = {}

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
    def last_batch(self) -> str:
        """``"short"``, ``"pad"`` or ``"drop"``."""
        return self._last_batch

    @property
    def drop_last(self) -> bool:
        """Whether ``last_batch == "drop"`` (the older spelling)."""
        return self._last_batch == "drop"

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def emit(self) -> str:
        """``"rank"`` (this rank's batches) or ``"all_ranks"`` (every rank's, step by step)."""
        return self._emit

    @property
    def batching(self) -> BatchingRule:
        """The rule that sized the batches (ask it for other shapes: ``batch_sizes(wh)``)."""
        return self._batching

    @property
    def batch_sizes(self) -> np.ndarray:
        """Per-rank batch size of each bucket, (K,) int64 (bucket id = position)."""
        return self._batch_sizes.copy()

    # -- iteration -------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Plan ``epoch`` next. A no-op for the current epoch, so a resume position survives."""
        epoch = check_int(epoch, "epoch", 0, MAX_EPOCH)
        self._asked = epoch
        if epoch != self._epoch:
            self._epoch, self._pending, self._active = epoch, None, None

    def __iter__(self) -> Iterator[list[SampleIndex]]:
        _check_driver(self, sys._getframe(1))
        return self._batches()

    def _batches(self) -> Iterator[list[SampleIndex]]:
        # A generator: the position is taken at the first next(), not at iter(). DataLoader
        # calls iter() more than once before using the last iterator, and a resume position
        # must go to the iterator that actually runs.
        position = self._pending or Position(self._epoch, self._world_size, 0)
        plan = self._plan(position.epoch, position.history)
        if position.consumed < plan.num_steps:  # a finished epoch stays finished until set_epoch
            self._pending = None
        self._asked = None
        ranks = range(self._world_size) if self._emit == "all_ranks" else (self._rank,)
        p = _Pass(plan, position.epoch, position.history, position.consumed, position.consumed)
        self._active = p
        total, epoch = plan.num_steps, position.epoch
        chunk = max(1, _CHUNK_INDICES // (int(plan.batch_sizes.max()) * len(ranks)))
        for t in range(position.consumed, total, chunk):
            stop = min(total, t + chunk)
            # Batches are made one at a time as they are asked for (and dropped by the caller):
            # thousands alive at once would wake the cyclic garbage collector over and over.
            per_rank = [_chunk_batches(plan, r, t, stop, epoch) for r in ranks]
            p.t0, p.size, p.starts = t, stop - t, per_rank[0][0]
            if len(ranks) == 1:
                yield from per_rank[0][1]
            else:  # step by step, rank by rank
                yield from chain.from_iterable(zip(*(b for _, b in per_rank), strict=True))

    def __len__(self) -> int:
        if self._pending is not None:
            plan = self._plan(self._pending.epoch, self._pending.history)
            steps = plan.num_steps - self._pending.consumed
        elif self._active is not None and not self._active.done:
            steps = self._active.plan.num_steps - self._active.start
        else:
            steps = self._plan(self._epoch, ()).num_steps
        return steps * (self._world_size if self._emit == "all_ranks" else 1)

    def total_steps(self, epochs: int) -> int:
        """Batches per rank over epochs 0 .. ``epochs - 1`` at this world size (what a learning
        rate schedule needs). Equal to ``epochs * len(sampler)`` unless repeats are fractional,
        whose draws change each epoch's length; then it costs O(rows) per epoch."""
        epochs = check_int(epochs, "epochs", 0, MAX_EPOCH)
        fixed = self._repeats is None or not np.any(self._repeats % 1)
        if fixed:
            return epochs * self._plan(0, ()).num_steps if epochs else 0
        return sum(self._plan_of(self._layout(e), e, None, 0).num_steps for e in range(epochs))

    # -- state -----------------------------------------------------------------------------

    def state_dict(self, received: int | None = None) -> dict[str, Any]:
        """O(1) resume state: epoch, global steps consumed, world size, fingerprint.

        By default it counts every batch the latest iterator handed out. That is exact under
        ``StatefulDataLoader`` (it snapshots this state as it takes each batch) and with
        ``num_workers=0``; a plain ``DataLoader`` with workers prefetches ahead of the training
        loop, so pass ``received``: the batches the loop has received from the current
        iteration (like ``num_samples`` in mosaicml-streaming's ``StreamingDataset.state_dict``;
        with ``emit="all_ranks"``, the batches one process received). Called without it while
        an iteration is under way (other than by ``StatefulDataLoader``), it warns that the
        batches handed out count as consumed. The state is plain JSON (and ``torch.save``)
        data, identical on every rank.
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
                if handed_out and not a.done and not _from_torchdata(sys._getframe(1)):
                    warnings.warn(
                        f"state_dict() without received= counts the {handed_out} batches this "
                        "iteration handed out as consumed; a DataLoader with workers prefetches "
                        "some of them ahead of the training loop, and a resume would skip those. "
                        "Pass received=<batches the loop received>, or use torchdata's "
                        "StatefulDataLoader",
                        stacklevel=2,
                    )
            elif not 0 <= received <= handed_out:
                raise ValueError(
                    f"received={received}, but this iteration has handed out {handed_out} batches"
                )
            position = Position(a.epoch, self._world_size, a.start + received, a.history)
        return to_state(position, self._fingerprint)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume where ``state_dict`` was taken: the next iteration yields the remaining batches.

        At a different world size the epoch's not-yet-seen samples are planned again for this
        one (elastic resume). A state taken on an epoch's last batch leaves that epoch with
        nothing left: the usual loop (``for epoch in range(saved_epoch, E)``, ``set_epoch`` each
        epoch) yields nothing more for it and goes on with the next. (``StatefulDataLoader``
        loads the state only when its iterator is made, after that loop's ``set_epoch``; if the
        epoch set then is already a later one, the state leaves it alone.) Raises ValueError
        for a state saved with different data, settings or planning algorithm (naming what
        differs), or with a field out of range (checked before any planning).
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
        asked, self._asked = self._asked, None
        if consumed == total and asked is not None and asked > saved.epoch:
            self._epoch, self._pending, self._active = asked, None, None  # already moved on
            return
        position = Position(saved.epoch, self._world_size, consumed, history)
        self._epoch, self._pending, self._active = position.epoch, position, None

    # -- reporting -------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The current epoch's plan at this world size, in plain ints (JSON-safe).

        ``steps`` is the number of batches per rank; ``samples`` the occurrences the repeats
        give (``accepted`` rows without repeats), ``padded`` the duplicates added (all ranks
        together), ``dropped`` the occurrences left out, ``short_steps`` the steps where some
        rank's batch is below its batch size. Per bucket with members: ``count`` (rows),
        ``samples``, ``batch_size`` (per rank), ``steps``, ``padded``, ``dropped``, ``short``
        (whether its last step is short) and ``wh`` when shapes are known.
        """
        plan = self._plan(self._epoch, ())
        rows = np.diff(self._offsets)
        samples, steps = plan.counts, plan.steps
        padded, dropped, short = plan.padded, plan.dropped, plan.short
        buckets = [
            {
                "bucket": int(b),
                "wh": None if self._bucket_wh is None else self._bucket_wh[b].tolist(),
                "count": int(rows[b]),
                "samples": int(samples[b]),
                "batch_size": int(self._batch_sizes[b]),
                "steps": int(steps[b]),
                "padded": int(padded[b]),
                "dropped": int(dropped[b]),
                "short": bool(short[b]),
            }
            for b in np.flatnonzero(rows)
        ]
        return {
            "epoch": self._epoch,
            "world_size": self._world_size,
            "last_batch": self._last_batch,
            "batching": asdict(self._batching),
            "repeats": self._repeats is not None,
            "num_indices": self._num_indices,
            "accepted": int(rows.sum()),
            "excluded": self._num_indices - int(rows.sum()),
            "samples": int(samples.sum()),
            "steps": plan.num_steps,
            "padded": int(padded.sum()),
            "dropped": int(dropped.sum()),
            "short_steps": int(short.sum()),
            "buckets": buckets,
        }

    def __repr__(self) -> str:
        return (
            f"BucketBatchSampler(indices={self._num_indices}, buckets={len(self._batch_sizes)}, "
            f"world_size={self._world_size}, rank={self._rank}, seed={self._seed}, "
            f"shuffle={self._shuffle}, last_batch={self._last_batch!r}, "
            f"repeats={self._repeats is not None}, emit={self._emit!r}, epoch={self._epoch})"
        )

    def _layout(self, epoch: int) -> Layout:
        """The units (rows times their repeats) of ``epoch`` (the last two cached)."""
        if epoch not in self._layouts:
            if len(self._layouts) >= 2:
                self._layouts.pop(next(iter(self._layouts)))
            self._layouts[epoch] = make_layout(
                self._members, self._offsets, self._repeats, seed=self._seed, epoch=epoch
            )
        return self._layouts[epoch]

    def _plan_of(
        self, layout: Layout, epoch: int, units: tuple | None, segment: int, world_size: int = 0
    ) -> Plan:
        """The plan of ``units`` of ``layout`` (all when None) at ``world_size`` (default: ours)."""
        return make_plan(
            layout,
            self._batch_sizes,
            world_size or self._world_size,
            seed=self._seed,
            epoch=epoch,
            units=units,
            segment=segment,
            shuffle=self._shuffle,
            last_batch=self._last_batch,
        )

    def _plan(self, epoch: int, history: tuple[tuple[int, int], ...]) -> Plan:
        """The plan for ``epoch`` at this world size after elastic ``history`` (cached)."""
        key = (epoch, history)
        if key not in self._plans:
            layout, units = self._layout(epoch), None
            for segment, (world_size, consumed) in enumerate(history):
                plan = self._plan_of(layout, epoch, units, segment, world_size)
                if consumed > plan.num_steps:
                    raise ValueError(
                        f"sampler state history says {consumed} steps consumed at world size "
                        f"{world_size}, but that plan has only {plan.num_steps}"
                    )
                units = remaining_units(plan, consumed)
            plan = self._plan_of(layout, epoch, units, len(history))
            if len(self._plans) >= 4:
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = plan
        return self._plans[key]


def _chunk_batches(
    plan: Plan, rank: int, t0: int, t1: int, epoch: int
) -> tuple[Iterator[int], Iterator[SampleBatch]]:
    """Rank ``rank``'s batches of steps ``t0 <= t < t1``, made lazily at C speed (in Python only
    where a row is a repeat or padding), and the iterator over their start positions they
    consume one by one."""
    rows, occurrences, bounds = rank_batches(plan, rank, t0, t1)
    values, cuts = rows.tolist(), bounds.tolist()
    starts = iter(cuts[:-1])
    slices = map(slice, starts, cuts[1:])
    if not occurrences.any():
        return starts, map(batch_class(epoch), map(values.__getitem__, slices))
    repeated = occurrences.tolist()
    return starts, (SampleBatch(values[s], epoch, repeated[s]) for s in slices)


def _from_torchdata(caller: Any) -> bool:
    """Whether ``caller`` (the frame calling ``state_dict``) is torchdata's StatefulDataLoader,
    which snapshots the sampler as it takes each batch, so its count is exact."""
    return caller is not None and str(caller.f_globals.get("__name__", "")).startswith("torchdata")


def _check_driver(sampler: BucketBatchSampler, caller: Any) -> None:
    """Refuse to be sharded a second time by accelerate's ``BatchSamplerShard`` (the frame that
    calls ``iter(sampler)``): it hands process p every ``num_processes``-th batch it gets, which
    is exact only for ``emit="all_ranks"`` at this world size."""
    shard = caller.f_locals.get("self") if caller is not None else None
    module = type(shard).__module__ or ""
    if not module.startswith("accelerate") or getattr(shard, "batch_sampler", None) is not sampler:
        return
    processes = int(getattr(shard, "num_processes", 1))
    if getattr(shard, "split_batches", False):
        raise RuntimeError(
            "accelerate's split_batches=True cuts each batch into per-process pieces, which "
            "breaks BucketBatchSampler's per-bucket batches; use split_batches=False with "
            'BucketBatchSampler(..., emit="all_ranks")'
        )
    if sampler.emit == "rank" and processes > 1:
        raise RuntimeError(
            f"accelerate's accelerator.prepare(loader) shards batches over {processes} "
            "processes, but this BucketBatchSampler already yields only its rank's batches: "
            f"each process would get one in {processes} batches of its own plan and miss the "
            "rest. Build "
            'it with BucketBatchSampler(..., emit="all_ranks") (every rank\'s batch of each '
            "step, in rank order, so accelerate hands each process exactly its own), or do "
            "not pass the loader to prepare"
        )
    if sampler.emit == "all_ranks" and processes != sampler.world_size:
        raise RuntimeError(
            f"accelerate shards over {processes} processes, but this BucketBatchSampler plans "
            f"for world_size={sampler.world_size}: pass world_size={processes}"
        )


def bucket_batch_sampler(
    dataset: Any,
    batch_size: int | None = None,
    *,
    max_pixels_per_batch: int | None = None,
    max_batch_size: int | None = None,
    batching: BatchingRule | None = None,
    seed: int = 0,
    shuffle: bool = True,
    last_batch: str = "short",
    repeats: Any = None,
    world_size: int | None = None,
    rank: int | None = None,
    emit: str = "rank",
) -> BucketBatchSampler:
    """Builder (torchtune style: a plain function, instantiable from a YAML ``_component_``):
    the sampler for ``dataset``, read from its ``assignment`` attribute when it has one, else
    from its ``bucket_id`` and per-row ``bucket_wh`` (a ``TextToImageDataset`` has both). The
    other arguments are :class:`BucketBatchSampler`'s.

    Example: ``DataLoader(ds, batch_sampler=bucket_batch_sampler(ds, 4), collate_fn=collate)``.
    """
    source = getattr(dataset, "assignment", None)
    if source is None:
        if not hasattr(dataset, "bucket_id"):
            raise TypeError(
                f"bucket_batch_sampler needs a dataset with an assignment or bucket_id "
                f"(like TextToImageDataset), got {type(dataset).__name__}"
            )
        source = dataset
    return BucketBatchSampler(
        source,
        batch_size,
        max_pixels_per_batch=max_pixels_per_batch,
        max_batch_size=max_batch_size,
        batching=batching,
        world_size=world_size,
        rank=rank,
        seed=seed,
        shuffle=shuffle,
        last_batch=last_batch,
        repeats=repeats,
        emit=emit,
    )


def _bucket_ids(obj: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """Validated (N,) int64 bucket ids and the (K, 2) bucket shapes when ``obj`` carries them
    (``ladder.buckets``, or per-row ``bucket_wh`` next to ``bucket_id``)."""
    shapes = per_row_wh = None
    if hasattr(obj, "bucket_id"):
        ladder = getattr(obj, "ladder", None)
        if ladder is not None:
            shapes = np.asarray(ladder.buckets, dtype=np.int64).reshape(-1, 2)
        else:
            per_row_wh = getattr(obj, "bucket_wh", None)
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
    if shapes is None and high >= MAX_BUCKET_ID:
        at = int(np.argmax(ids))
        raise ValueError(
            f"bucket id {high} at index {at}: bare bucket ids must be below {MAX_BUCKET_ID} "
            "(the sampler keeps arrays as long as the largest id); number the buckets densely, "
            "e.g. np.unique(ids, return_inverse=True)"
        )
    if per_row_wh is not None:
        shapes = _shapes_from_rows(ids, per_row_wh)
    return ids, shapes


MAX_BUCKET_ID = 2**20  # bare ids: per-bucket arrays are sized by the largest id


def _check_step(batch_sizes: np.ndarray, world_size: int) -> None:
    """Refuse a global step (``world_size x batch size``) that int64 arithmetic cannot hold."""
    largest = int(batch_sizes.max())
    if largest * world_size > MAX_SIZE:
        raise ValueError(
            f"batch size x world size = {largest} x {world_size} = {largest * world_size} "
            f"overflows the sampler's int64 arithmetic (at most 2**62 slots a step)"
        )


def _shapes_from_rows(ids: np.ndarray, per_row_wh: Any) -> np.ndarray:
    """(K, 2) bucket shapes from one (w, h) per row; (0, 0) for buckets without rows."""
    wh = np.asarray(per_row_wh, dtype=np.int64)
    if wh.shape != (len(ids), 2):
        raise ValueError(f"bucket_wh must have shape ({len(ids)}, 2), got {wh.shape}")
    accepted = ids >= 0
    shapes = np.zeros((int(ids.max()) + 1, 2), dtype=np.int64)
    shapes[ids[accepted]] = wh[accepted]
    clash = np.flatnonzero(np.any(shapes[ids[accepted]] != wh[accepted], axis=1))
    if clash.size:
        at = int(np.flatnonzero(accepted)[clash[0]])
        raise ValueError(
            f"row {at} of bucket {ids[at]} has bucket_wh {wh[at].tolist()}, but other rows of "
            f"that bucket have {shapes[ids[at]].tolist()}"
        )
    return shapes


def _rule(
    batching: BatchingRule | None,
    batch_size: int | None,
    max_pixels_per_batch: int | None,
    max_batch_size: int | None,
) -> BatchingRule:
    """The batching rule: ``batching`` itself, or the one the three keywords describe."""
    if batching is None:
        return BatchingRule(batch_size, max_pixels_per_batch, max_batch_size)
    if not isinstance(batching, BatchingRule):
        raise TypeError(f"batching must be a BatchingRule, got {type(batching).__name__}")
    if (batch_size, max_pixels_per_batch, max_batch_size) != (None, None, None):
        raise ValueError(
            "pass batching=BatchingRule(...) or batch_size / max_pixels_per_batch / "
            "max_batch_size, not both"
        )
    return batching


def _last_batch(last_batch: str | None, drop_last: bool) -> str:
    """The ``last_batch`` mode, with ``drop_last=True`` meaning ``"drop"``."""
    if drop_last:
        if last_batch not in (None, "drop"):
            raise ValueError(f"drop_last=True contradicts last_batch={last_batch!r}")
        return "drop"
    if last_batch is None:
        return "short"
    if last_batch not in LAST_BATCH:
        raise ValueError(f"last_batch must be one of {LAST_BATCH}, got {last_batch!r}")
    return last_batch


def _repeats(repeats: Any, accepted: np.ndarray) -> np.ndarray | None:
    """Validated repeats: None (every row once), a 0-d or an (N,) float64 array."""
    num_indices = len(accepted)
    if repeats is None:
        return None
    if isinstance(repeats, numbers.Real) and not isinstance(repeats, bool):
        value = np.asarray(float(repeats))
    else:
        value = np.asarray(repeats)
        if value.dtype.kind not in "iuf" or value.shape != (num_indices,):
            raise ValueError(
                f"repeats must be a number or {num_indices} numbers (one per row), got "
                f"{value.shape} of {value.dtype}"
            )
        value = value.astype(np.float64)
    bad = np.flatnonzero(~((value >= 0) & (value <= MAX_REPEATS)).reshape(-1))
    if bad.size:
        at = int(bad[0])
        shown = value.reshape(-1)[at]
        where = "" if value.ndim == 0 else f" at row {at}"
        raise ValueError(f"repeats must be in [0, {MAX_REPEATS}], got {shown}{where}")
    if not np.any((value > 0) & accepted):
        raise ValueError("repeats are 0 for every accepted row: there is nothing to sample")
    return None if np.all(value == 1) else value


def _world(world_size: int | None, rank: int | None) -> tuple[int, int]:
    """(world_size, rank), defaulting to torch.distributed when it is initialised."""
    if world_size is None or rank is None:
        import torch.distributed as dist

        live = dist.is_available() and dist.is_initialized()
        if world_size is None:
            world_size = dist.get_world_size() if live else 1
        if rank is None:
            rank = dist.get_rank() if live else 0
    world_size = check_int(world_size, "world_size", 1, MAX_WORLD_SIZE)
    rank = check_int(rank, "rank", -(2**63))
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    return world_size, rank
