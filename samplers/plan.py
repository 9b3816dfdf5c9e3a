"""The epoch plan of the bucket batch sampler, as pure numpy functions.

An epoch is a pure function of (members grouped by bucket, per-rank batch sizes, world size,
seed, epoch, shuffle, drop_last):

- bucket b's ``n_b`` members are shuffled (slot q holds member ``perm_b(q)``);
- its slots are cut into global steps of ``g_b = world_size * batch_size_b``; the last, partial
  step is padded by wrapping around the bucket (slot q >= n_b holds slot ``q mod n_b``), or
  dropped with ``drop_last``;
- the ``T = sum_b steps_b`` global steps are shuffled; at step t rank r takes slots
  ``[r * bs_b, (r + 1) * bs_b)`` of global step t.

Nothing of size N or T is ever materialised: :class:`Plan` holds O(buckets) numbers, and
:func:`rank_batches` computes the indices of any range of steps for one rank on demand with
the keyed permutations of :mod:`samplers.permutation`. That is what makes iteration lazy,
resume O(1) and a rank's epoch cost proportional to N / world_size.
:func:`remaining_members` gives the not-yet-seen members after k steps, which an elastic resume
plans again for a new world size.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from samplers.permutation import permute

_GROUP_CHUNK = 1 << 16  # indices per chunk of the grouping sort


@dataclass(frozen=True, eq=False)
class Plan:
    """One epoch (or the rest of one, after an elastic resume) for a given world size.

    ``members`` are dataset indices grouped by bucket (bucket b is
    ``members[offsets[b]:offsets[b + 1]]``); ``keys`` hold one permutation key per bucket and
    ``step_key`` the key of the step order.
    """

    members: np.ndarray
    offsets: np.ndarray
    batch_sizes: np.ndarray
    world_size: int
    keys: np.ndarray
    step_key: int
    shuffle: bool
    drop_last: bool

    @cached_property
    def counts(self) -> np.ndarray:
        """Members per bucket, (K,) int64."""
        return np.diff(self.offsets)

    @property
    def step_sizes(self) -> np.ndarray:
        """Indices per global step of each bucket: world_size * batch size, (K,) int64."""
        return self.world_size * self.batch_sizes

    @cached_property
    def steps(self) -> np.ndarray:
        """Global steps per bucket, (K,) int64."""
        counts, size = self.counts, self.step_sizes
        return counts // size if self.drop_last else -(-counts // size)

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
        """Duplicate slots added to each bucket's last step, (K,) int64 (0 with drop_last)."""
        return np.maximum(self.steps * self.step_sizes - self.counts, 0)

    @property
    def dropped(self) -> np.ndarray:
        """Members of each bucket left out of every step, (K,) int64 (0 without drop_last)."""
        return np.maximum(self.counts - self.steps * self.step_sizes, 0)


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
    members = np.empty(offsets[-1], dtype=np.int32 if len(codes) < 2**31 else np.int64)
    write = offsets[:-1].copy()
    for i, local_counts in zip(starts, chunk_counts, strict=True):
        order = np.argsort(codes[i : i + _GROUP_CHUNK], kind="stable")
        cuts = np.cumsum(local_counts)
        for b in np.flatnonzero(local_counts[1:]):
            part = order[cuts[b] : cuts[b + 1]]
            members[write[b] : write[b] + len(part)] = part + i
            write[b] += len(part)
    return members, offsets


def make_plan(
    members: np.ndarray,
    offsets: np.ndarray,
    batch_sizes: np.ndarray,
    world_size: int,
    *,
    seed: int,
    epoch: int,
    segment: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
) -> Plan:
    """The plan for ``epoch`` at ``world_size``; keys come from (seed, epoch, segment) only.

    ``segment`` numbers the re-plans of one epoch after elastic resumes (0 = the epoch's own plan).
    """
    num_buckets = len(offsets) - 1
    state = np.random.SeedSequence([seed, epoch, segment]).generate_state(
        num_buckets + 1, dtype=np.uint64
    )
    return Plan(
        members=members,
        offsets=np.asarray(offsets, dtype=np.int64),
        batch_sizes=np.asarray(batch_sizes, dtype=np.int64),
        world_size=int(world_size),
        keys=state[:num_buckets],
        step_key=int(state[num_buckets]),
        shuffle=shuffle,
        drop_last=drop_last,
    )


def step_buckets(plan: Plan, t0: int, t1: int) -> tuple[np.ndarray, np.ndarray]:
    """Bucket and within-bucket step number of global steps ``t0 <= t < t1``, each (t1 - t0,)."""
    step_id = _step_ids(plan, t0, t1)
    step_offsets = plan.step_offsets
    bucket = np.searchsorted(step_offsets, step_id, side="right") - 1
    return bucket, step_id - step_offsets[bucket]


def rank_batches(plan: Plan, rank: int, t0: int, t1: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank ``rank``'s batches for global steps ``t0 <= t < t1``, concatenated.

    Returns (indices, bounds): batch i is ``indices[bounds[i]:bounds[i + 1]]``.
    """
    bucket, local = step_buckets(plan, t0, t1)
    sizes = plan.batch_sizes[bucket]
    first_slot = local * plan.step_sizes[bucket] + rank * sizes
    return _members_at(plan, bucket, first_slot, sizes)


def step_indices(plan: Plan, t0: int, t1: int) -> tuple[np.ndarray, np.ndarray]:
    """All ranks' indices of global steps ``t0 <= t < t1`` (rank 0's slice first), concatenated.

    Returns (indices, bounds) like :func:`rank_batches`, one entry per global step.
    """
    bucket, local = step_buckets(plan, t0, t1)
    sizes = plan.step_sizes[bucket]
    return _members_at(plan, bucket, local * sizes, sizes)


def remaining_members(plan: Plan, consumed: int) -> tuple[np.ndarray, np.ndarray]:
    """Members not seen in the first ``consumed`` global steps, grouped like ``plan.members``.

    A member counts as seen when any consumed step held it, padding included. Within a bucket
    the survivors keep their slot order in ``plan``, so the result is a pure function of
    (plan, consumed). Returns (members, offsets) ready for :func:`make_plan`.
    """
    if not 0 <= consumed <= plan.num_steps:
        raise ValueError(f"consumed steps {consumed} not in [0, {plan.num_steps}]")
    taken = np.zeros(plan.num_steps, dtype=bool)
    taken[_step_ids(plan, 0, consumed)] = True
    steps, sizes, step_offsets, counts = (
        plan.steps,
        plan.step_sizes,
        plan.step_offsets,
        plan.counts,
    )
    parts, new_counts = [], np.zeros(len(counts), dtype=np.int64)
    for b in np.flatnonzero(counts):
        n, size, s = int(counts[b]), int(sizes[b]), int(steps[b])
        taken_b = taken[step_offsets[b] : step_offsets[b + 1]]
        seen = np.zeros(n, dtype=bool)
        in_step = min(n, s * size)
        seen[:in_step] = np.repeat(taken_b, size)[:in_step]
        if s * size > n and taken_b[-1]:  # the padded last step wrapped onto early slots
            seen[np.arange(n, s * size) % n] = True
        slots = np.flatnonzero(~seen)
        if plan.shuffle:
            slots = permute(slots, n, plan.keys[b])
        parts.append(plan.members[plan.offsets[b] + slots])
        new_counts[b] = len(slots)
    members = np.concatenate(parts) if parts else plan.members[:0]
    return members.astype(plan.members.dtype, copy=False), np.concatenate(
        [[0], np.cumsum(new_counts)]
    )


def _step_ids(plan: Plan, t0: int, t1: int) -> np.ndarray:
    """Step ids (bucket-major numbering, before the shuffle) of global steps ``t0 <= t < t1``."""
    t = np.arange(t0, t1, dtype=np.int64)
    return permute(t, plan.num_steps, plan.step_key) if plan.shuffle and t.size else t


def _members_at(
    plan: Plan, bucket: np.ndarray, first_slot: np.ndarray, sizes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Members at slots ``first_slot[i] + range(sizes[i])`` of bucket ``bucket[i]``, wrapped."""
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    owner = np.repeat(np.arange(len(sizes)), sizes)
    slot = np.arange(bounds[-1], dtype=np.int64) - bounds[owner] + first_slot[owner]
    member_bucket = bucket[owner]
    n = plan.counts[member_bucket]
    slot %= n
    if plan.shuffle:
        slot = permute(slot, n, plan.keys[member_bucket])
    return plan.members[plan.offsets[member_bucket] + slot], bounds
