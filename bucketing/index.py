"""The columnar result of a scan: accepted images with oriented sizes and captions,
plus every rejected file with a reason.

Paths and captions live in contiguous buffers (:class:`TextColumn`: one byte buffer and
int64 offsets; :class:`CaptionColumn`: row offsets into a :class:`TextColumn`), sizes in
numpy arrays: no Python object per row. So an index of millions of rows costs a few tens
of bytes per row beyond its text, and a forked DataLoader worker that reads every row
shares the parent's pages instead of copying them (reading a Python object writes its
reference count, which copies the page it lives on; reading a buffer writes nothing).
An index saved to a ``.arrow`` file is memory-mapped when loaded: every process on the
machine that loads it shares one copy in the page cache.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bucketing.members import parse_member, read_member
from bucketing.table_file import (
    ARROW_SUFFIX,
    TableFileError,
    column_names,
    load_table,
    save_table,
)

__all__ = ["CaptionColumn", "ImageIndex", "Rejection", "TextColumn", "utf8_text"]

INDEX_FORMAT = "aspect-bucketing/index"
INDEX_VERSION = 2
_INDEX_COLUMNS = ("path", "width", "height", "captions", "reason", "detail")
_MASK_COLUMN = "loss_mask"
_INDEX_TYPES = {"path": pa.large_binary(), "width": pa.int64(), "height": pa.int64(),
                "captions": pa.large_list(pa.large_string()), "reason": pa.string(),
                "detail": pa.string()}


def utf8_text(text: str) -> str:
    """``text`` as valid UTF-8 for parquet string columns: lone surrogates (a file name that
    is not UTF-8, decoded with ``surrogateescape``; a JSON ``\\udce9`` escape) become
    backslash escapes such as ``\\udce9``, readable and never a crash on save."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _encode(text: str) -> bytes:
    """UTF-8 bytes of ``text``; surrogates from ``surrogateescape`` (undecodable file-name
    bytes) become those bytes again, so ``os.fsencode(path)`` is what is stored."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate no decoder produced (a JSON escape)
        return utf8_text(text).encode("utf-8")


class _Rows(Sequence):
    """A read-only column: a subclass gives ``__len__`` and ``_row(i)`` for ``0 <= i < n``;
    negative indices, slices (a list), iteration and equality with any sequence follow."""

    __slots__ = ()

    @abstractmethod
    def _row(self, i: int) -> Any:
        """Row ``i``, ``0 <= i < len(self)``."""

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self._row(k) for k in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for {n} rows")
        return self._row(int(i) % n)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # compared by value, like a list


class TextColumn(_Rows):
    """Strings in one UTF-8 byte buffer: string ``i`` is ``data[offsets[i]:offsets[i + 1]]``,
    decoded on access (undecodable bytes come back as ``surrogateescape`` surrogates, as
    ``os.fsdecode`` gives them). Reading a row creates only the returned ``str``."""

    __slots__ = ("data", "offsets")

    def __init__(self, offsets: np.ndarray, data: np.ndarray) -> None:
        self.offsets = np.asarray(offsets, dtype=np.int64).reshape(-1)
        self.data = np.asarray(data, dtype=np.uint8).reshape(-1)
        if len(self.offsets) == 0 or self.offsets[0] < 0 or self.offsets[-1] > len(self.data):
            raise ValueError("TextColumn offsets must hold n + 1 positions within the data")

    @classmethod
    def from_strings(cls, items: Iterable[str]) -> TextColumn:
        """A column holding ``items`` (str, in order)."""
        encoded = [_encode(s) for s in items]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        return cls(offsets, np.frombuffer(b"".join(encoded), dtype=np.uint8))

    @classmethod
    def from_arrow(cls, array: pa.Array | pa.ChunkedArray) -> TextColumn:
        """A column over an Arrow string/binary array (nulls read as ""); zero-copy for a
        single-chunk ``large_string``/``large_binary`` array (e.g. a memory-mapped file)."""
        if isinstance(array, pa.ChunkedArray):
            array = array.chunk(0) if array.num_chunks == 1 else array.combine_chunks()
        if not (pa.types.is_large_binary(array.type) or pa.types.is_large_string(array.type)):
            array = array.cast(pa.large_binary())
        if array.null_count:
            array = pc.fill_null(array.cast(pa.large_binary()), b"")
        _, offsets, data = array.buffers()
        offsets = np.frombuffer(offsets, dtype=np.int64)[
            array.offset : array.offset + len(array) + 1
        ]
        data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
        return cls(offsets, data)

    def to_arrow(self) -> pa.LargeBinaryArray:
        """The column as an Arrow ``large_binary`` array over the same buffers (no copy)."""
        return pa.LargeBinaryArray.from_buffers(
            pa.large_binary(),
            len(self),
            [None, pa.py_buffer(self.offsets), pa.py_buffer(self.data)],
        )

    def to_arrow_text(self) -> pa.LargeStringArray:
        """The column as valid UTF-8 text (``large_string``): rows holding undecodable bytes
        are rewritten with :func:`utf8_text` (backslash escapes)."""
        try:
            return self.to_arrow().cast(pa.large_string())
        except pa.ArrowInvalid:  # some row is not UTF-8
            return pa.array([utf8_text(s) for s in self], pa.large_string())

    @property
    def nbytes(self) -> int:
        """Bytes held: the text plus 8 per row."""
        return self.offsets.nbytes + self.data.nbytes

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _row(self, i: int) -> str:
        return (
            self.data[self.offsets[i] : self.offsets[i + 1]]
            .tobytes()
            .decode("utf-8", "surrogateescape")
        )

    def __iter__(self) -> Iterator[str]:
        data, n, block = self.data, len(self), 1 << 16  # offsets as ints a block at a time
        for lo in range(0, n, block):
            offsets = self.offsets[lo : min(n, lo + block) + 1].tolist()
            for a, b in zip(offsets[:-1], offsets[1:], strict=True):
                yield data[a:b].tobytes().decode("utf-8", "surrogateescape")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TextColumn):
            return len(self) == len(other) and all(
                np.array_equal(x, y)
                for x, y in ((self.offsets - self.offsets[0], other.offsets - other.offsets[0]),
                             (self._text(), other._text()))
            )  # fmt: skip
        return super().__eq__(other)

    __hash__ = None  # type: ignore[assignment]

    def _text(self) -> np.ndarray:
        return self.data[self.offsets[0] : self.offsets[-1]]

    def __repr__(self) -> str:
        return f"TextColumn({len(self)} rows, {self.nbytes} bytes)"


class CaptionColumn(_Rows):
    """Per-row caption lists: row ``i`` is ``texts[rows[i]:rows[i + 1]]``, read as a new list
    of ``str`` on access (changing it changes nothing stored)."""

    __slots__ = ("rows", "texts")

    def __init__(self, rows: np.ndarray, texts: TextColumn) -> None:
        self.rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        self.texts = texts
        if len(self.rows) == 0 or self.rows[0] < 0 or self.rows[-1] > len(texts):
            raise ValueError("CaptionColumn rows must hold n + 1 positions within the texts")

    @classmethod
    def from_lists(cls, lists: Iterable[Sequence[str]]) -> CaptionColumn:
        """A column holding ``lists`` (one sequence of captions per row)."""
        lists = list(lists)
        rows = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum([len(c) for c in lists], out=rows[1:])
        return cls(rows, TextColumn.from_strings(c for caps in lists for c in caps))

    @classmethod
    def from_arrow(cls, array: pa.Array | pa.ChunkedArray) -> CaptionColumn:
        """A column over an Arrow ``list<string>`` array (null lists are empty); zero-copy
        for a single-chunk ``large_list<large_string>`` without nulls."""
        if isinstance(array, pa.ChunkedArray):
            array = array.chunk(0) if array.num_chunks == 1 else array.combine_chunks()
        if not pa.types.is_large_list(array.type):
            array = array.cast(pa.large_list(array.type.value_type))
        if array.null_count or array.offset:
            counts = pc.fill_null(pc.list_value_length(array), 0).to_numpy()
            rows = np.zeros(len(array) + 1, dtype=np.int64)
            np.cumsum(counts, out=rows[1:])
            return cls(rows, TextColumn.from_arrow(array.flatten()))
        return cls(np.frombuffer(array.buffers()[1], np.int64)[: len(array) + 1],
                   TextColumn.from_arrow(array.values))  # fmt: skip

    def to_arrow(self) -> pa.LargeListArray:
        """The column as Arrow ``large_list<large_string>`` (text as in
        :meth:`TextColumn.to_arrow_text`)."""
        return pa.LargeListArray.from_arrays(pa.array(self.rows), self.texts.to_arrow_text())

    def counts(self) -> np.ndarray:
        """Number of captions of each row (int64)."""
        return np.diff(self.rows)

    @property
    def nbytes(self) -> int:
        """Bytes held: the text plus 8 per row and 8 per caption."""
        return self.rows.nbytes + self.texts.nbytes

    def __len__(self) -> int:
        return len(self.rows) - 1

    def _row(self, i: int) -> list[str]:
        return [self.texts._row(k) for k in range(self.rows[i], self.rows[i + 1])]

    def __repr__(self) -> str:
        return f"CaptionColumn({len(self)} rows, {len(self.texts)} captions, {self.nbytes} bytes)"


class Rejection(NamedTuple):
    """A file that will not be trained on, and why (``reason`` is a short stable code)."""

    path: str
    reason: str
    detail: str


@dataclass(eq=False)
class ImageIndex:
    """Accepted images (``paths``, oriented ``width``/``height``, ``captions``) and ``rejections``.

    ``paths`` and ``captions`` may be given as lists; they are stored as a
    :class:`TextColumn` and a :class:`CaptionColumn` (``index.paths[i]`` is a ``str``,
    ``index.captions[i]`` a new ``list[str]``; both compare equal to lists).
    ``blob`` optionally maps a row to its encoded bytes, for sources whose images
    live inside another container (a ``datasets.Dataset`` without file paths).
    Such an index cannot be saved (:meth:`save` says so); rebuild it with ``scan``.
    ``scan_stats`` is the :class:`bucketing.scan.ScanStats` of the ``scan`` call that built
    the index; None for an index built otherwise or loaded from disk.

    Paired files, columnar like ``paths``: ``conditioning`` holds K :class:`TextColumn`
    (``conditioning[k][i]`` is row i's k-th conditioning image; K is fixed per index, 0
    without pairs); ``loss_mask`` a :class:`TextColumn` of mask paths (``""``: no mask for
    that row, ``ALPHA_MASK``: the image's alpha) or None when no row has one.
    """

    paths: TextColumn
    width: np.ndarray
    height: np.ndarray
    captions: CaptionColumn
    rejections: list[Rejection] = field(default_factory=list)
    blob: Callable[[int], bytes] | None = None
    scan_stats: Any = field(default=None, repr=False)
    conditioning: list[TextColumn] = field(default_factory=list)
    loss_mask: TextColumn | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.paths, TextColumn):
            self.paths = TextColumn.from_strings(self.paths)
        self.conditioning = [c if isinstance(c, TextColumn) else TextColumn.from_strings(c)
                             for c in self.conditioning]  # fmt: skip
        if self.loss_mask is not None and not isinstance(self.loss_mask, TextColumn):
            self.loss_mask = TextColumn.from_strings(self.loss_mask)
        if not isinstance(self.captions, CaptionColumn):
            self.captions = CaptionColumn.from_lists(self.captions)
        self.width = np.asarray(self.width, dtype=np.int64).reshape(-1)
        self.height = np.asarray(self.height, dtype=np.int64).reshape(-1)
        self.rejections = [Rejection(*r) for r in self.rejections]
        n = len(self.paths)
        paired = [len(c) for c in self.conditioning] + (
            [len(self.loss_mask)] if self.loss_mask is not None else []
        )
        if not (len(self.width) == len(self.height) == len(self.captions) == n) or any(
            m != n for m in paired
        ):
            raise ValueError(
                f"ImageIndex columns differ in length: paths={n}, width={len(self.width)}, "
                f"height={len(self.height)}, captions={len(self.captions)}, paired={paired}"
            )

    @property
    def has_pairs(self) -> bool:
        """True when rows carry conditioning images or loss masks."""
        return bool(self.conditioning) or self.loss_mask is not None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def sizes(self) -> np.ndarray:
        """(N, 2) int64 array of oriented (width, height)."""
        return np.stack([self.width, self.height], axis=1)

    @property
    def nbytes(self) -> int:
        """Bytes held by the accepted rows' columns (text included, rejections excluded)."""
        paired = sum(c.nbytes for c in self.conditioning) + (
            self.loss_mask.nbytes if self.loss_mask is not None else 0
        )
        return (self.paths.nbytes + self.captions.nbytes + self.width.nbytes
                + self.height.nbytes + paired)  # fmt: skip

    def image_source(self, i: int) -> str | bytes:
        """What ``transforms.load_image`` should open for row ``i``: a path or encoded bytes
        (a dataset's blob, or a tar member's bytes read in place: see ``bucketing.members``)."""
        if self.blob is not None:
            return self.blob(i)
        path = self.paths[i]
        return read_member(path) if parse_member(path) is not None else path

    def rejection_counts(self) -> dict[str, int]:
        """Number of rejected files per reason, most common first."""
        counts: dict[str, int] = {}
        for r in self.rejections:
            counts[r.reason] = counts.get(r.reason, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def save(self, path: str | os.PathLike) -> None:
        """Write accepted rows, then rejections, to one file, atomically.

        Parquet, or with a ``.arrow`` suffix an uncompressed Arrow file that :meth:`load`
        memory-maps (every rank and worker on a machine then shares its pages). Paths are
        stored as the bytes ``os.fsencode`` gives, so any file name round-trips; captions,
        reasons and details as UTF-8 text (see :func:`utf8_text`). An index that reads its
        images through ``blob`` (a ``datasets.Dataset`` with embedded bytes) is refused:
        its paths are labels, so a loaded copy could not read a single image.
        """
        if self.blob is not None:
            raise ValueError(
                "this index reads its images from inside a datasets.Dataset (embedded bytes, "
                "paths such as 'dataset[12]' are only labels), so a saved copy could not read "
                "them; rebuild it with scan(dataset) instead of saving it"
            )
        n, rej = len(self), self.rejections
        zeros = np.zeros(len(rej), np.int64)
        rejected_captions = pa.array([[]] * len(rej), pa.large_list(pa.large_string()))
        blanks = pa.array([b""] * len(rej), pa.large_binary())
        paired = {f"conditioning_{k}": pa.concat_arrays([c.to_arrow(), blanks])
                  for k, c in enumerate(self.conditioning)}  # fmt: skip
        if self.loss_mask is not None:
            paired[_MASK_COLUMN] = pa.concat_arrays([self.loss_mask.to_arrow(), blanks])
        table = pa.table(
            {
                "path": pa.concat_arrays([
                    self.paths.to_arrow(),
                    pa.array([_encode(r.path) for r in rej], pa.large_binary()),
                ]),
                "width": pa.array(np.concatenate([self.width, zeros])),
                "height": pa.array(np.concatenate([self.height, zeros])),
                "captions": pa.concat_arrays([self.captions.to_arrow(), rejected_captions]),
                "reason": pa.array([None] * n + [utf8_text(r.reason) for r in rej], pa.string()),
                "detail": pa.array([None] * n + [utf8_text(r.detail) for r in rej], pa.string()),
                **paired,
            }
        )  # fmt: skip
        meta = {"format": INDEX_FORMAT, "version": str(INDEX_VERSION)}
        save_table(path, table, meta, arrow=os.fspath(path).endswith(ARROW_SUFFIX))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ImageIndex:
        """Read an index written by :meth:`save` (an Arrow file is memory-mapped, not copied);
        raises ``ValueError`` for a file of another format or version."""
        extra = [c for c in column_names(path)[len(_INDEX_COLUMNS) :]
                 if c.startswith("conditioning_") or c == _MASK_COLUMN]  # fmt: skip
        table = load_table(
            path,
            {"format": INDEX_FORMAT, "version": str(INDEX_VERSION)},
            (*_INDEX_COLUMNS, *extra),
            f"an aspect-bucketing index (version {INDEX_VERSION})",
            _INDEX_TYPES,
        )
        for name in ("path", "width", "height"):
            if table[name].null_count:
                raise TableFileError(f"{os.fspath(path)} is a damaged aspect-bucketing index: "
                                     f"{table[name].null_count} rows have no {name}")
        accepted = pc.is_null(table["reason"])
        n = pc.sum(accepted).as_py() or 0
        if n and not pc.all(accepted.slice(0, n)).as_py():  # not written by save: reorder
            table = pa.concat_tables([table.filter(accepted), table.filter(pc.invert(accepted))])
        rows, rest = table.slice(0, n), table.slice(n).to_pydict()
        return cls(
            paths=TextColumn.from_arrow(rows["path"]),
            width=rows["width"].to_numpy(),
            height=rows["height"].to_numpy(),
            captions=CaptionColumn.from_arrow(rows["captions"]),
            rejections=[
                Rejection(os.fsdecode(p), r, d or "")
                for p, r, d in zip(rest["path"], rest["reason"], rest["detail"], strict=True)
            ],
            conditioning=[TextColumn.from_arrow(rows[c]) for c in extra if c != _MASK_COLUMN],
            loss_mask=TextColumn.from_arrow(rows[_MASK_COLUMN]) if _MASK_COLUMN in extra else None,
        )
