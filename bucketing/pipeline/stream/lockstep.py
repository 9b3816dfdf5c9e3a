"""End a streamed epoch at the same step on every rank.

Streams of different lengths (shards of unequal sizes, rows rejected on one rank) would let
one rank leave the epoch while the others wait in DDP's gradient all-reduce forever. The
policy here: before each step every rank says whether it has a batch, and the epoch ends for
all at the first step where one has none (one all-reduce of one integer, ``MIN``, per step).
The batches the other ranks held then are not trained on this epoch: streaming gives up
exactly-once per epoch for this, as it does for the buffers' order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
_END = object()


def in_lockstep(batches: Iterable[T], group: Any = None) -> Iterator[T]:
    """``batches`` until any rank of ``group`` (default: the whole world) has run out; every
    rank stops at the same step. Without ``torch.distributed`` initialised, ``batches``
    as they are. On NCCL the flag travels on the current CUDA device."""
    iterator = iter(batches)
    if not (dist.is_available() and dist.is_initialized()):
        yield from iterator
        return
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend(group) == "nccl" else torch.device("cpu"))
    while True:
        batch = next(iterator, _END)
        flag = torch.tensor([0 if batch is _END else 1], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        if int(flag.item()) == 0:
            return
        yield batch  # type: ignore[misc]
