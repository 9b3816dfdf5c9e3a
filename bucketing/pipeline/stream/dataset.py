"""``StreamingBucketDataset``: batches of one bucket each from a source read front to back.

No scan and no plan: each row is given its bucket when it arrives (from the width and height
it carries, else from its image's header), decoded and fitted to it at once (the params drawn
by ``BucketResizeCrop.make_params`` from ``sample_rng(seed, epoch, key)``, applied by
``transforms.resize_crop.decode_and_fit``, the map-style dataset's decode), captioned and
tokenized, and put in its bucket's buffer (:mod:`.buffers`). A bucket that holds
``batch_size`` samples is emitted as one collated batch; when the buffers pass their bound
(``max_buffered_rows`` samples or ``max_buffered_bytes`` bytes) the fullest bucket is
emitted short. At the end of the stream every bucket's remainder is emitted short
(``last_batch="short"``) or dropped (``"drop"``).

Splitting: each DataLoader worker of each rank is one *stream*
(``rank * num_workers + worker``, of ``world_size * num_workers``). With at least as many
shards as streams, the shards (in an order shuffled per (seed, epoch)) are dealt to the
streams; with fewer, every stream reads every shard and keeps every n-th row. Either way no
row goes to two streams.

Resume: ``state_dict()`` is the stream's epoch, its position (shard, row, byte offset) and the
buffered rows' positions (O(buffers), no pixels); ``load_state_dict`` makes the next iteration
read those rows again, fit them with the same draws, and continue from the position, so the
batches that follow are the ones the interrupted run would have yielded.
``torchdata.stateful_dataloader.StatefulDataLoader`` saves and restores it per worker (same
``num_workers``, same world size).
"""

from __future__ import annotations

import hashlib
import operator
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from bucketing.assign import assign
from bucketing.headers import read_header
from bucketing.ladder import BucketLadder
from bucketing.pipeline.stream.buffers import BucketBuffers
from bucketing.pipeline.stream.rows import RowReader, StreamRow
from bucketing.pipeline.stream.shards import HFShard, RawRow, RowsShard, TarShard
from bucketing.sources.tar import tar_shards
from transforms.collate import collate
from transforms.image import DecodeSettings, ImageDecodeError
from transforms.resize_crop import BucketResizeCrop, decode_and_fit
from transforms.rng import sample_rng

STATE_VERSION = 1
DEFAULT_MAX_BYTES = 2**30  # per stream (DataLoader worker)
_LAST_BATCH = ("short", "drop")
_TRANSIENT = ("captions", "rng")
_MEMO = 1 << 16  # (w, h) -> bucket answers kept


class StreamRejectionWarning(UserWarning):
    """Rows were rejected after the last batch of a stream, with no batch left to carry them."""


def row_index(key: str) -> int:
    """The integer a row's ``key`` gives ``sample_rng`` (64 bits of its BLAKE2b)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def make_shards(source: Any) -> list[Any]:
    """The shards of ``source``: a ``datasets.IterableDataset`` (one per ``num_shards``), tar
    shards as the map-style source names them (``bucketing.sources.tar.tar_shards``: a file,
    a folder of them, a glob, a brace range such as ``"s/{00000..00099}.tar"``, a list), a
    list of row mappings (one shard), or a list of such lists (one shard each)."""
    if hasattr(source, "num_shards") and hasattr(source, "shard") and hasattr(source, "skip"):
        return _hf_shards(source)
    if hasattr(source, "features") and hasattr(source, "to_iterable_dataset"):
        raise TypeError("a map-style datasets.Dataset: stream it with "
                        "dataset.to_iterable_dataset(num_shards=N), or use TextToImageDataset")
    tars = tar_shards(source)
    if tars is not None:
        missing = [p for p in tars if not os.path.isfile(p)]
        if missing:
            raise ValueError(f"tar shards not found: {missing[:3]}")
        return [TarShard(p) for p in tars]
    if isinstance(source, (str, os.PathLike)):
        raise ValueError(f"{os.fspath(source)}: not a .tar file, a folder of .tar shards, a "
                         "glob or a brace range of them")
    if isinstance(source, Sequence) and not isinstance(source, (bytes, str)) and source:
        if all(isinstance(r, Mapping) for r in source):
            return [RowsShard(source)]
        if all(isinstance(s, Sequence) and all(isinstance(r, Mapping) for r in s)
               for s in source):
            return [RowsShard(s, f"rows{k}") for k, s in enumerate(source)]
    raise TypeError(
        f"cannot stream {type(source).__name__}: give a datasets.IterableDataset, tar shards "
        "(a file, a folder or a list of paths), or a list of row dicts")


def _hf_shards(dataset: Any) -> list[HFShard]:
    import datasets

    image = next((c for c, f in (dataset.features or {}).items()
                  if isinstance(f, datasets.Image)), None)
    if image is not None:
        dataset = dataset.cast_column(image, datasets.Image(decode=False))
    return [HFShard(dataset, k, image) for k in range(dataset.num_shards)]


class StreamingBucketDataset(IterableDataset):
    """Same-shape batches from a streamed source; iterate it with
    ``DataLoader(dataset, batch_size=None, num_workers=...)`` (it yields whole batches).

    ``source``: see :func:`make_shards`. ``ladder``: the buckets (default: ``model``'s preset,
    ``BucketLadder.for_model(model)``). ``batch_size``: samples per batch.
    ``image_transform``: a ``BucketResizeCrop`` (its crop, flip, filter and upscaling);
    ``caption_transform`` (e.g. ``CaptionTransform``) and ``model_transform`` (e.g. a
    tokenizer) as for ``TextToImageDataset``. ``decode``: the ``DecodeSettings``.
    ``max_buffered_rows`` (default 32 x ``batch_size``) and ``max_buffered_bytes`` (default
    1 GiB) bound each stream's buffers; ``last_batch``: ``"short"`` emits the buffers' last
    samples at the end of the stream, ``"drop"`` drops them. ``column_map`` / ``base_dir``:
    see :mod:`.rows`. ``rank`` / ``world_size`` default to ``torch.distributed``'s.
    ``shuffle_shards``: deal the shards in an order drawn per (seed, epoch).

    Each batch is ``transforms.collate`` of its samples plus ``key`` (the rows' keys) and
    ``rejected``: ``(key, reason)`` of the rows this stream rejected since its previous batch
    (no image, unreadable header, too small for every bucket, failed decode).
    """

    def __init__(
        self,
        source: Any,
        *,
        batch_size: int,
        model: str = "flux",
        ladder: BucketLadder | None = None,
        image_transform: BucketResizeCrop | None = None,
        caption_transform: Callable[[dict], dict] | None = None,
        model_transform: Callable[[dict], dict] | None = None,
        seed: int = 0,
        decode: DecodeSettings | None = None,
        max_buffered_rows: int | None = None,
        max_buffered_bytes: int | None = DEFAULT_MAX_BYTES,
        last_batch: str = "short",
        column_map: Mapping[str, str] | None = None,
        base_dir: str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle_shards: bool = True,
    ) -> None:
        super().__init__()
        batch_size = operator.index(batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if last_batch not in _LAST_BATCH:
            raise ValueError(f"last_batch must be one of {_LAST_BATCH}, got {last_batch!r}")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        max_rows = 32 * batch_size if max_buffered_rows is None else int(max_buffered_rows)
        if max_rows < 1 or (max_buffered_bytes is not None and max_buffered_bytes < 1):
            raise ValueError("max_buffered_rows and max_buffered_bytes must be >= 1")
        image_transform = image_transform or BucketResizeCrop()
        if not isinstance(image_transform, BucketResizeCrop):
            raise TypeError("image_transform must be a BucketResizeCrop (its params are drawn "
                            f"before decoding), got {image_transform!r}")
        for name, transform in (("caption_transform", caption_transform),
                                ("model_transform", model_transform)):
            if transform is not None and not callable(transform):
                raise TypeError(f"{name} must be callable (sample -> sample), got {transform!r}")
        self.shards = make_shards(source)
        self.ladder = ladder if ladder is not None else BucketLadder.for_model(model)
        self.batch_size = batch_size
        self.image_transform = image_transform
        self.caption_transform = caption_transform
        self.model_transform = model_transform
        self.seed = int(seed)
        self.decode = decode or DecodeSettings()
        self.max_rows = max_rows
        self.max_bytes = None if max_buffered_bytes is None else int(max_buffered_bytes)
        self.last_batch = last_batch
        self.reader = RowReader(column_map, base_dir)
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.shuffle_shards = bool(shuffle_shards)
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._pending: dict[str, Any] | None = None
        self._live: dict[str, Any] | None = None
        self._memo: dict[tuple[int, int], tuple[int, str | None]] = {}
        self.peak_buffered_rows = 0
        self.peak_buffered_bytes = 0

    # -- epochs and state ---------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """The epoch of the shard order and every per-sample draw (shared with workers)."""
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` from the next iteration on (call before creating the iterator)."""
        epoch = operator.index(epoch)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch[0] = epoch

    def state_dict(self) -> dict[str, Any]:
        """Where this stream is: epoch, position, buffered rows' positions (no pixels)."""
        if self._live is None:
            stream, streams = self._stream()
            return self._state(stream, streams, self.epoch, _start(), [], [])
        live = self._live
        return self._state(live["stream"], live["streams"], live["epoch"], dict(live["cursor"]),
                           live["buffers"].refs(), list(live["rejected"]))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (of ``state_dict``) at the next iteration."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"not a streaming state of version {STATE_VERSION}: {state!r:.200}")
        mine = self._fingerprint()
        if state["fingerprint"] != mine:
            raise ValueError(f"this state was saved by another setup ({state['fingerprint']}); "
                             f"this dataset is {mine}")
        self._pending = dict(state)
        self._live = None

    def _state(self, stream: int, streams: int, epoch: int, cursor: dict, refs: list,
               rejected: list) -> dict[str, Any]:
        return {"version": STATE_VERSION, "fingerprint": self._fingerprint(), "stream": stream,
                "streams": streams, "epoch": epoch, "cursor": cursor, "buffers": refs,
                "rejected": rejected}

    def _fingerprint(self) -> dict[str, Any]:
        """What a state must have been saved by: whatever decides the batches."""
        ladder = hashlib.blake2b(self.ladder.buckets.tobytes(), digest_size=8).hexdigest()
        return {"seed": self.seed, "shards": [s.name for s in self.shards],
                "batch_size": self.batch_size, "rank": self.rank,
                "world_size": self.world_size, "ladder": ladder, "max_rows": self.max_rows,
                "max_bytes": self.max_bytes}

    def _stream(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    # -- iteration ----------------------------------------------------------------------

    def plan(self, stream: int, streams: int, epoch: int) -> tuple[list[int], int]:
        """(the shard ids ``stream`` reads, in order; the row stride: 1 when it reads whole
        shards, ``streams`` when every stream reads every shard and keeps every n-th row)."""
        n = len(self.shards)
        order = (sample_rng(self.seed, epoch, 0, "shards").permutation(n) if self.shuffle_shards
                 else np.arange(n))
        if n >= streams:
            return order[stream::streams].tolist(), 1
        return order.tolist(), streams

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """This stream's batches: set up now (a loaded state is used here, its buffered rows
        fitted again), read as the iterator is consumed."""
        state, self._pending = self._pending, None
        stream, streams = self._stream()
        epoch = self.epoch
        if state is not None:
            if (state["stream"], state["streams"]) != (stream, streams):
                raise ValueError(
                    f"this state is stream {state['stream']} of {state['streams']} (rank x "
                    f"DataLoader worker); this iterator is stream {stream} of {streams}: "
                    "restore with the same world size and num_workers")
            epoch = int(state["epoch"])
        buffers = BucketBuffers(self.batch_size, self.max_rows, self.max_bytes)
        live = {"stream": stream, "streams": streams, "epoch": epoch,
                "cursor": _start() if state is None else dict(state["cursor"]),
                "buffers": buffers,
                "rejected": [] if state is None else [tuple(r) for r in state["rejected"]]}
        if state is not None:
            self._refill(buffers, state["buffers"], epoch)
        self._live = live
        return self._run(live)

    def _run(self, live: dict[str, Any]) -> Iterator[dict[str, Any]]:
        stream, buffers, rejected, epoch = (live["stream"], live["buffers"], live["rejected"],
                                            live["epoch"])
        mine, stride = self.plan(stream, live["streams"], epoch)
        yield from self._ready(buffers, live)
        while live["cursor"]["k"] < len(mine):
            k = live["cursor"]["k"]
            shard_id = mine[k]
            shard = self.shards[shard_id]
            for raw in shard.rows(live["cursor"]["ordinal"], live["cursor"]["token"]):
                seen = live["cursor"]["seen"]
                live["cursor"] = _after(raw, k, seen)
                if seen % stride != stream % stride:
                    continue
                prepared = self._prepare(shard, raw, epoch)
                if isinstance(prepared[0], str):
                    rejected.append(prepared)
                    continue
                bucket, sample = prepared
                buffers.add(bucket, [shard_id, raw.ordinal, raw.token], sample)
                yield from self._ready(buffers, live)
            if live["cursor"]["k"] == k:  # a shard without rows
                live["cursor"] = {**_start(), "k": k + 1, "seen": live["cursor"]["seen"]}
        for items in buffers.drain():
            if self.last_batch == "drop" and len(items) < self.batch_size:
                continue
            yield self._batch(items, live)
        self._note_peaks(buffers)
        if rejected:
            warnings.warn(f"{len(rejected)} rows rejected after this stream's last batch: "
                          f"{rejected[:5]}", StreamRejectionWarning, stacklevel=2)
            rejected.clear()

    def _ready(self, buffers: BucketBuffers, live: dict) -> Iterator[dict[str, Any]]:
        while (bucket := buffers.ready()) is not None:
            self._note_peaks(buffers)
            yield self._batch(buffers.take(bucket), live)

    def _note_peaks(self, buffers: BucketBuffers) -> None:
        self.peak_buffered_rows = max(self.peak_buffered_rows, buffers.peak_rows)
        self.peak_buffered_bytes = max(self.peak_buffered_bytes, buffers.peak_bytes)

    def _batch(self, items: list, live: dict) -> dict[str, Any]:
        batch = collate([sample for _, sample in items])
        batch["rejected"] = list(live["rejected"])
        live["rejected"].clear()
        batch["buffered_rows"] = live["buffers"].rows
        batch["buffered_bytes"] = live["buffers"].bytes
        return batch

    def _refill(self, buffers: BucketBuffers, refs: list, epoch: int) -> None:
        """Put the rows of a state's buffers back, fitted again with the same draws."""
        wanted: dict[int, list[tuple[int, int]]] = {}
        for _, bucket_refs in refs:
            for shard_id, ordinal, token in bucket_refs:
                wanted.setdefault(int(shard_id), []).append((int(ordinal), int(token)))
        fetched = {sid: self.shards[sid].fetch(t for _, t in rows) for sid, rows in wanted.items()}
        for bucket, bucket_refs in refs:
            for shard_id, ordinal, token in bucket_refs:
                raw = RawRow(int(ordinal), int(token), None, fetched[int(shard_id)][int(token)])
                prepared = self._prepare(self.shards[int(shard_id)], raw, epoch)
                if isinstance(prepared[0], str) or prepared[0] != bucket:
                    raise ValueError(f"row {shard_id}:{ordinal} no longer gives what it gave "
                                     "when the state was saved (the source changed)")
                buffers.add(int(bucket), [int(shard_id), int(ordinal), int(token)], prepared[1])

    # -- one row ------------------------------------------------------------------------

    def _prepare(self, shard: Any, raw: RawRow, epoch: int
                 ) -> tuple[int, dict[str, Any]] | tuple[str, str]:
        """(bucket, finished sample) of a raw row, or (key, reason) when it is rejected."""
        row = self.reader(raw.data, f"{shard.name}:{raw.ordinal}")
        if isinstance(row, tuple):
            return row
        size = row.size
        if size is None:
            header = read_header(row.image, max_pixels=self.decode.max_pixels)
            if not header.ok:
                return row.key, f"{header.reason}: {header.detail}"
            size = (header.width, header.height)
        bucket, reason = self._bucket_of(size)
        if bucket < 0:
            return row.key, f"{reason}: {size[0]}x{size[1]} fits no bucket"
        try:
            sample = self._fit(row, size, bucket, epoch)
        except (ImageDecodeError, ValueError) as error:
            detail = error.reason if isinstance(error, ImageDecodeError) else str(error)
            return row.key, f"decode_failed: {detail}"
        return bucket, sample

    def _bucket_of(self, size: tuple[int, int]) -> tuple[int, str | None]:
        if size not in self._memo:
            if len(self._memo) >= _MEMO:
                self._memo.clear()
            result = assign(np.asarray([size], dtype=np.int64), self.ladder,
                            allow_upscale=self.image_transform.allow_upscale)
            self._memo[size] = (int(result.bucket_id[0]), result.reasons[0])
        return self._memo[size]

    def _fit(self, row: StreamRow, size: tuple[int, int], bucket: int, epoch: int
             ) -> dict[str, Any]:
        index = row_index(row.key)
        wh = tuple(int(v) for v in self.ladder.buckets[bucket])
        params = self.image_transform.make_params(
            size, wh, sample_rng(self.seed, epoch, index, "image"))
        sample = decode_and_fit(row.image, params, self.decode,
                                resample=self.image_transform.resample, expected_size=size)
        sample["key"] = row.key
        if self.caption_transform is None:
            sample["caption"] = row.captions[0] if row.captions else ""
        else:
            rng = sample_rng(self.seed, epoch, index, "caption")
            out = self.caption_transform({**sample, "captions": list(row.captions), "rng": rng})
            if not isinstance(out, Mapping) or not isinstance(out.get("caption"), str):
                raise TypeError("caption_transform must return the sample with a str 'caption'")
            sample = {k: v for k, v in out.items() if k not in _TRANSIENT}
        if self.model_transform is not None:
            sample = self.model_transform(sample)
        return sample

    def __repr__(self) -> str:
        return (f"StreamingBucketDataset({len(self.shards)} shards, {len(self.ladder.buckets)} "
                f"buckets, batch_size={self.batch_size}, rank {self.rank} of {self.world_size})")


def _start() -> dict[str, Any]:
    return {"k": 0, "ordinal": 0, "token": None, "seen": 0}


def _after(raw: RawRow, k: int, seen: int) -> dict[str, Any]:
    """The cursor once ``raw`` (of the k-th shard of the stream's list) has been read."""
    if raw.next_token is None:
        return {"k": k + 1, "ordinal": 0, "token": None, "seen": seen + 1}
    return {"k": k, "ordinal": raw.ordinal + 1, "token": raw.next_token, "seen": seen + 1}


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size): as given, else ``torch.distributed``'s when initialised, else (0, 1)."""
    if rank is None or world_size is None:
        initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
        world_size = world_size if world_size is not None else (
            torch.distributed.get_world_size() if initialised else 1)
        rank = rank if rank is not None else (torch.distributed.get_rank() if initialised else 0)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    return int(rank), int(world_size)
