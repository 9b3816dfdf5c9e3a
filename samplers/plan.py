"""The epoch plan of the bucket batch sampler, as pure numpy functions.

An epoch is a pure function of (rows grouped by bucket, repeats, per-rank batch sizes, world
size, seed, epoch, shuffle, last_batch):

- row i appears ``c_i`` times in the epoch: its repeat count, whose fractional part is drawn
  per (seed, epoch, row) (1 without repeats). The copies of bucket b's rows are its ``n_b``
  *units*, each a (row, occurrence) pair with occurrence in [0, c_i) (the :class:`Layout`);
- bucket b's units are shuffled (slot q holds unit ``perm_b(q)``) and cut into global steps of
  ``g_b = world_size * batch_size_b`` slots;
- the last, partial global step of a bucket is, by ``last_batch``:
  ``"short"``: split as evenly as possible across the ranks (rank r gets ``r_b // W`` or one
  more of its ``r_b`` units); a rank left with none takes one padding slot, so duplicates exist
  only when the step holds fewer units than ranks;
  ``"pad"``: filled to ``g_b`` slots; ``"drop"``: left out;
- a padding slot q >= n_b holds the unit of slot ``q mod n_b`` again, as a new occurrence
  (``occurrence + (q // n_b) * c_i``), so every yielded (row, occurrence) pair is unique;
- the ``T = sum_b steps_b`` global steps are shuffled; at step t rank r takes its slots of t.

Nothing of size T or of the units is materialised: :class:`Plan` holds O(buckets) numbers and
the layout O(rows) (int32 where it fits), and :func:`rank_batches` computes the rows and
occurrences of any range of steps for one rank on demand with the keyed permutations of
:mod:`samplers.permutation`. That is what makes iteration lazy, resume O(1) and a rank's epoch
cost proportional to N / world_size. :func:`remaining_units` gives the not-yet-seen units after
k steps, which an elastic resume plans again for a new world size.

``PLAN_VERSION`` names this algorithm; it is part of the sampler's fingerprint and changes
whenever the batches a configuration yields change, so a checkpoint of another version is
refused instead of resuming a different plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from samplers.permutation import permute, uniform

PLAN_VERSION = 2
LAST_BATCH = ("short", "pad", "drop")
MAX_REPEATS = 2**16  # per row and epoch

_GROUP_CHUNK = 1 << 16  # indices per chunk of the grouping sort
_STREAM_REPEATS = 2**32 - 1  # key stream of the repeat draws (plan segments use 0, 1, ...)


@dataclass(frozen=True, eq=False)
class Layout:
    """The units of one epoch: bucket b's are ``[offsets[b], offsets[b + 1])``.

    ``members`` are rows grouped by bucket; ``ends`` the running total of their repeat counts
    (None when every row appears once, and unit u is then row ``members[u]``).
    """

    members: np.ndarray
    ends: np.ndarray | None
    offsets: np.ndarray

    def lookup(self, units: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, occurrence, repeat count of the row) of each unit id."""
        if self.ends is None:
            return (
                self.members[units],
                np.zeros(len(units), np.int64),
                np.ones(len(units), np.int64),
            )
        # same dtype as ends, or numpy would convert (copy) all of ends on every call
        pos = np.searchsorted(self.ends, units.astype(self.ends.dtype), side="right")
        end = self.ends[pos].astype(np.int64)
        count = end - np.where(pos > 0, self.ends[np.maximum(pos - 1, 0)], 0)
        return self.members[pos], units - (end - count), count


@dataclass(frozen=True, eq=False)
class Plan:
    """One epoch (or the rest of one, after an elastic resume) for a given world size.

    Bucket b's units are ``units[offsets[b]:offsets[b + 1]]`` (ids into ``layout``), or the
    layout's own range when ``units`` is None; ``keys`` hold one permutation key per bucket and
    ``step_key`` the key of the step order.
    """

    layout: Layout
    units: np.ndarray | None
    offsets: np.ndarray
    batch_sizes: np.ndarray
    world_size: int
    keys: np.ndarray
    step_key: int
    shuffle: bool
    last_batch: str

    @cached_property
    def counts(self) -> np.ndarray:
        """Units per bucket, (K,) int64."""
        return np.diff(self.offsets)

    @property
    def step_sizes(self) -> np.ndarray:
        """Slots per full global step of each bucket: world_size * batch size, (K,) int64."""
        return self.world_size * self.batch_sizes

    @cached_property
    def steps(self) -> np.ndarray:
        """Global steps per bucket, (K,) int64."""
        counts, size = self.counts, self.step_sizes
        return counts // size if self.last_batch == "drop" else -(-counts // size)

    @cached_property
    def last_units(self) -> np.ndarray:
        """Units in each bucket's last global step (0 for a bucket without steps), (K,) int64."""
        return np.where(self.steps > 0, self.counts - (self.steps - 1) * self.step_sizes, 0)

    @cached_property
    def slots(self) -> np.ndarray:
        """Slots each bucket's steps hold, padding included, (K,) int64."""
        full = self.steps * self.step_sizes
        if self.last_batch != "short":
            return full
        last = np.maximum(self.last_units, self.world_size)  # a rank pads only when it has none
        return np.where(self.steps > 0, full - self.step_sizes + last, 0)

    @cached_property
    def step_offsets(self) -> np.ndarray:
        """First global step id of each bucket (before the step shuffle), (K + 1,) int64."""
        return np.concatenate([[0], np.cumsum(self.steps)])

    @cached_property
    def num_steps(self) -> int:
        """Global steps T in the plan: the number of batches every rank yields."""
        return int(self.steps.sum())

    @property
    def padded(self) -> np.ndarray:
        """Duplicate slots added to each bucket's last step, (K,) int64."""
        return np.maximum(self.slots - self.counts, 0)

    @property
    def dropped(self) -> np.ndarray:
        """Units of each bucket left out of every step, (K,) int64 (0 unless "drop")."""
        return np.maximum(self.counts - self.slots, 0)

    @property
    def short(self) -> np.ndarray:
        """Whether a rank's batch in each bucket's last step is below its batch size, (K,)."""
        return (
            (self.last_batch == "short")
            & (self.last_units < self.step_sizes)
            & (self.batch_sizes > 1)
            & (self.steps > 0)
        )


def canonical_ids(bucket_ids: np.ndarray) -> np.ndarray:
    """Codes ``bucket_id + 1`` (0 = excluded) in the smallest unsigned dtype that holds them.

    The representation depends on the values only, so it is what the fingerprint hashes, and
    numpy radix-sorts uint8 / uint16 keys, which makes :func:`group_by_bucket` fast.
    """
    bound = int(bucket_ids.max()) + 2
    for dtype in (np.uint8, np.uint16):
        if bound <= np.iinfo(dtype).max + 1:
            codes = bucket_ids.astype(dtype)  # -1 wraps to the dtype's max ...
            codes += 1  # ... and back to 0: no int64 temporary of size N
            return codes
    return bucket_ids + 1


def group_by_bucket(codes: np.ndarray, num_buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """Dataset indices grouped by bucket, ascending within each, and the bucket offsets.

    ``codes`` are :func:`canonical_ids` (bucket id + 1, every id < ``num_buckets``); excluded
    entries are left out. A stable counting sort done in cache-sized chunks, so the only
    array of size N it allocates is the result. Returns (members, offsets): members int32 when
    N < 2**31 (else int64), bucket b being ``members[offsets[b]:offsets[b + 1]]``; offsets
    (K + 1,) int64.
    """
    starts = range(0, len(codes), _GROUP_CHUNK)
    chunk_counts = [np.bincount(codes[i : i + _GROUP_CHUNK], minlength=num_buckets + 1)
                    for i in starts]  # fmt: skip
    counts = np.sum(chunk_counts, axis=0)[1:]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    members = np.empty(offsets[-1], dtype=_index_dtype(len(codes)))
    write = offsets[:-1].copy()
    for i, local_counts in zip(starts, chunk_counts, strict=True):
        order = np.argsort(codes[i : i + _GROUP_CHUNK], kind="stable")
        cuts = np.cumsum(local_counts)
        for b in np.flatnonzero(local_counts[1:]):
            part = order[cuts[b] : cuts[b + 1]]
            members[write[b] : write[b] + len(part)] = part + i
            write[b] += len(part)
    return members, offsets


def make_layout(
    members: np.ndarray,
    offsets: np.ndarray,
    repeats: np.ndarray | None,
    *,
    seed: int,
    epoch: int,
) -> Layout:
    """The units of ``epoch``: row i repeated ``floor(r_i)`` times, plus once more with
    probability ``frac(r_i)`` (drawn from (seed, epoch, i) alone). ``repeats`` is None (once
    each), a 0-d array (every row) or one value per dataset row."""
    if repeats is None:
        return Layout(members, None, np.asarray(offsets, dtype=np.int64))
    if repeats.ndim == 0:
        frac = np.broadcast_to(repeats - np.floor(repeats), members.shape)
        counts = np.full(len(members), int(repeats), dtype=np.int32)
    else:  # temporaries: one float64 and one int32 per member
        frac = repeats[members]
        counts = frac.astype(np.int32)  # floor: repeats are >= 0
        frac -= counts
    key = int(_key_state(seed, epoch, _STREAM_REPEATS, 1)[0])
    for i in range(0, len(members), _GROUP_CHUNK):  # in chunks: bounded temporaries
        drawn = np.flatnonzero(frac[i : i + _GROUP_CHUNK] > 0) + i
        counts[drawn] += uniform(members[drawn], key) < frac[drawn]
    del frac
    ends = np.cumsum(counts, dtype=_index_dtype(int(counts.sum(dtype=np.int64))))
    del counts
    offsets = np.asarray(offsets, dtype=np.int64)
    starts = np.where(offsets > 0, ends[np.maximum(offsets - 1, 0)] if len(ends) else 0, 0)
    return Layout(members, ends, starts.astype(np.int64))


def make_plan(
    layout: Layout,
    batch_sizes: np.ndarray,
    world_size: int,
    *,
    seed: int,
    epoch: int,
    units: tuple[np.ndarray, np.ndarray] | None = None,
    segment: int = 0,
    shuffle: bool = True,
    last_batch: str = "short",
) -> Plan:
    """The plan for ``epoch`` at ``world_size``; keys come from (seed, epoch, segment) only.

    ``units`` = (unit ids, offsets) from :func:`remaining_units` plans only those (an elastic
    re-plan; ``segment`` numbers the re-plans of one epoch, 0 = the epoch's own plan).
    """
    if last_batch not in LAST_BATCH:
        raise ValueError(f"last_batch must be one of {LAST_BATCH}, got {last_batch!r}")
    offsets = layout.offsets if units is None else units[1]
    num_buckets = len(offsets) - 1
    state = _key_state(seed, epoch, segment, num_buckets + 1)
    return Plan(
        layout=layout,
        units=None if units is None else units[0],
        offsets=np.asarray(offsets, dtype=np.int64),
        batch_sizes=np.asarray(batch_sizes, dtype=np.int64),
        world_size=int(world_size),
        keys=state[:num_buckets],
        step_key=int(state[num_buckets]),
        shuffle=shuffle,
        last_batch=last_batch,
    )


def step_buckets(plan: Plan, t0: int, t1: int) -> tuple[np.ndarray, np.ndarray]:
    """Bucket and within-bucket step number of global steps ``t0 <= t < t1``, each (t1 - t0,)."""
    step_id = _step_ids(plan, t0, t1)
    step_offsets = plan.step_offsets
    bucket = np.searchsorted(step_offsets, step_id, side="right") - 1
    return bucket, step_id - step_offsets[bucket]


def rank_batches(
    plan: Plan, rank: int, t0: int, t1: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank ``rank``'s batches for global steps ``t0 <= t < t1``, concatenated.

    Returns (rows, occurrences, bounds): batch i is ``rows[bounds[i]:bounds[i + 1]]``.
    """
    bucket, local = step_buckets(plan, t0, t1)
    sizes = plan.batch_sizes[bucket]
    first = local * plan.step_sizes[bucket] + rank * sizes
    if plan.last_batch == "short":
        last = (local == plan.steps[bucket] - 1) & (
            plan.last_units[bucket] < plan.step_sizes[bucket]
        )
        if last.any():  # the last step's r units, split evenly; a rank without one pads
            r = plan.last_units[bucket[last]]
            q, rem = np.divmod(r, plan.world_size)
            start = rank * q + np.minimum(rank, rem) + np.maximum(0, rank - r)
            first[last] = local[last] * plan.step_sizes[bucket[last]] + start
            sizes[last] = np.maximum(1, q + (rank < rem))
    return _units_at(plan, bucket, first, sizes)


def remaining_units(plan: Plan, consumed: int) -> tuple[np.ndarray, np.ndarray]:
    """Units not seen in the first ``consumed`` global steps, grouped like the plan's.

    A unit counts as seen when any consumed step held it, padding included. Within a bucket
    the survivors keep their slot order in ``plan``, so the result is a pure function of
    (plan, consumed). Work and memory are O(units), whatever the world size or batch sizes.
    Returns (unit ids, offsets) for :func:`make_plan`.
    """
    if not 0 <= consumed <= plan.num_steps:
        raise ValueError(f"consumed steps {consumed} not in [0, {plan.num_steps}]")
    taken = np.zeros(plan.num_steps, dtype=bool)
    taken[_step_ids(plan, 0, consumed)] = True
    counts, sizes, slots = plan.counts, plan.step_sizes, plan.slots
    parts, new_counts = [], np.zeros(len(counts), dtype=np.int64)
    for b in np.flatnonzero(counts):
        n, size = int(counts[b]), int(sizes[b])
        taken_b = taken[plan.step_offsets[b] : plan.step_offsets[b + 1]]
        seen = np.zeros(n, dtype=bool)
        in_steps = min(n, int(slots[b]))
        seen[:in_steps] = taken_b[np.arange(in_steps, dtype=np.int64) // size]
        if slots[b] > n and taken_b[-1]:  # padding wrapped onto the first slots
            seen[: min(n, int(slots[b]) - n)] = True
        slot = np.flatnonzero(~seen)
        if plan.shuffle:
            slot = permute(slot, n, plan.keys[b])
        parts.append(_unit_ids(plan, np.full(len(slot), b), slot))
        new_counts[b] = len(slot)
    dtype = _index_dtype(int(plan.layout.offsets[-1]))
    units = np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
    return units, np.concatenate([[0], np.cumsum(new_counts)])


def _step_ids(plan: Plan, t0: int, t1: int) -> np.ndarray:
    """Step ids (bucket-major numbering, before the shuffle) of global steps ``t0 <= t < t1``."""
    t = np.arange(t0, t1, dtype=np.int64)
    return permute(t, plan.num_steps, plan.step_key) if plan.shuffle and t.size else t


def _unit_ids(plan: Plan, bucket: np.ndarray, slot: np.ndarray) -> np.ndarray:
    """Layout unit ids at (already permuted) slots ``slot`` of buckets ``bucket``."""
    position = plan.offsets[bucket] + slot
    return position if plan.units is None else plan.units[position].astype(np.int64)


def _units_at(
    plan: Plan, bucket: np.ndarray, first_slot: np.ndarray, sizes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows and occurrences at slots ``first_slot[i] + range(sizes[i])`` of bucket ``bucket[i]``
    (slots past the bucket's units wrap around as new occurrences), and the batch bounds."""
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    owner = np.repeat(np.arange(len(sizes)), sizes)
    slot = np.arange(bounds[-1], dtype=np.int64) - bounds[owner] + first_slot[owner]
    member_bucket = bucket[owner]
    n = plan.counts[member_bucket]
    wrap, slot = np.divmod(slot, n)
    if plan.shuffle:
        slot = permute(slot, n, plan.keys[member_bucket])
    rows, occurrence, count = plan.layout.lookup(_unit_ids(plan, member_bucket, slot))
    return rows, occurrence + wrap * count, bounds


def _key_state(seed: int, epoch: int, stream: int, count: int) -> np.ndarray:
    """``count`` uint64 keys from (seed, epoch, stream), each split into fixed 32-bit words so
    that no two different triples share an entropy pool (seed 2**32 is not epoch 1)."""
    words = [PLAN_VERSION, seed & 0xFFFFFFFF, seed >> 32, epoch & 0xFFFFFFFF, epoch >> 32, stream]
    return np.random.SeedSequence(words).generate_state(count, dtype=np.uint64)


def _index_dtype(bound: int) -> type:
    """int32 for ids below ``bound`` < 2**31, else int64."""
    return np.int32 if bound < 2**31 else np.int64
