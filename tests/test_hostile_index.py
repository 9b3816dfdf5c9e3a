"""A memory-mapped ``.arrow`` index damaged on disk: validated when opened (offsets, lengths,
types), so a bad file is a clear error, never a crash, bytes read from outside a buffer or a
silently emptied caption list."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bucketing.index import CaptionColumn, ImageIndex, Rejection, TextColumn

N = 6


def _index() -> ImageIndex:
    paths = [f"/data/photos/image_{i:03d}.jpg" for i in range(N)]
    captions = [[f"caption {i} a"] + ([f"caption {i} b"] if i % 2 else []) for i in range(N)]
    return ImageIndex(paths=TextColumn.from_strings(paths), width=np.arange(N) + 100,
                      height=np.arange(N) + 200, captions=CaptionColumn.from_lists(captions),
                      rejections=[Rejection("/data/photos/bad.jpg", "not_an_image", "junk")])


@pytest.fixture()
def saved(tmp_path):
    path = tmp_path / "index.arrow"
    _index().save(path)
    return path


def _offsets_at(data: bytes, offsets: list[int]) -> int:
    """Where an int64 offsets buffer sits in the file."""
    at = data.find(np.asarray(offsets, np.int64).tobytes())
    assert at > 0
    return at


def _patch(path, offsets: list[int], k: int, value: int) -> None:
    data = bytearray(path.read_bytes())
    at = _offsets_at(bytes(data), offsets) + 8 * k
    data[at : at + 8] = np.int64(value).tobytes()
    path.write_bytes(bytes(data))


def _all_rows(index: ImageIndex) -> list:
    return [(index.paths[i], index.captions[i]) for i in range(len(index))]


@pytest.mark.parametrize("k,value", [(2, 10**6), (2, 3), (N, 10**9), (1, -5)])
def test_path_offsets_out_of_order_or_out_of_the_buffer_are_refused(saved, k, value):
    index = _index()
    _patch(saved, index.paths.offsets.tolist(), k, value)
    with pytest.raises(ValueError, match="damaged"):
        ImageIndex.load(saved)


def test_caption_list_offsets_that_would_empty_a_row_are_refused(saved):
    index = _index()
    rows = index.captions.rows.tolist()  # [0, 1, 3, 4, 6, ...]: patch row 2's start past row 3
    _patch(saved, rows, 2, rows[4])
    with pytest.raises(ValueError, match="damaged"):
        ImageIndex.load(saved)


def test_a_column_of_another_type_is_refused(tmp_path):
    index = _index()
    index.save(tmp_path / "ok.arrow")
    table = pa.ipc.open_file(pa.memory_map(str(tmp_path / "ok.arrow"))).read_all()
    table = table.set_column(1, "width", table["width"].cast(pa.float64()))
    with pa.OSFile(str(tmp_path / "bad.arrow"), "wb") as sink, \
            pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    with pytest.raises(ValueError, match="column width is double, expected int64"):
        ImageIndex.load(tmp_path / "bad.arrow")


@settings(max_examples=40, deadline=None, database=None)
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                      min_size=1, max_size=4))
def test_sweep_random_corruptions_load_whole_or_are_refused(tmp_path_factory, flips):
    """Bytes changed anywhere: ``load`` refuses the file, or every row reads back; a path
    never holds bytes from outside the paths buffer."""
    path = tmp_path_factory.mktemp("arrow") / "index.arrow"
    _index().save(path)
    data = bytearray(path.read_bytes())
    for where, value in flips:
        data[int(where * len(data))] = value
    path.write_bytes(bytes(data))
    try:
        index = ImageIndex.load(path)
    except (ValueError, OSError):
        return
    rows = _all_rows(index)
    assert len(rows) == len(index) <= N
    for p, caps in rows:
        assert len(p) <= 64 and all(len(c) <= 64 for c in caps)
