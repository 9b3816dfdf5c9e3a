"""Streaming: tar shards, a streaming HF dataset and lists of rows become same-shape batches
through bounded per-bucket buffers; workers and ranks never share a row; a state restored in a
fresh process continues exactly; two gloo ranks with unequal shards end the epoch together."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from bucketing import (
    BucketLadder,
    StreamingBucketDataset,
    TextToImageDataset,
    assign,
    scan,
    text_to_image_dataset,
)
from bucketing.pipeline.stream.buffers import BucketBuffers
from bucketing.pipeline.stream.shards import TarShard, tar_key
from transforms import BucketResizeCrop, CaptionTransform, FluxTokenizer

SCRIPT = Path(__file__).parent / "distributed" / "stream_run.py"
_spec = importlib.util.spec_from_file_location("stream_run", SCRIPT)
run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run)
LADDER = BucketLadder.for_model("flux", max_area=64 * 64)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("shards")
    return root, run.make(root)


def _jpeg(w: int, h: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG")
    return out.getvalue()


def _keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


@pytest.mark.parametrize("workers", [0, 2])
def test_every_row_once_one_shape_per_batch(shards, workers: int) -> None:
    root, keys = shards
    data = run.dataset(root)
    batches = list(DataLoader(data, batch_size=None, num_workers=workers))
    assert Counter(_keys(batches)) == Counter(keys)  # each row exactly once, across workers
    for b in batches:
        (w, h), = {tuple(s) for s in b["target_size"].flip(1).tolist()}
        assert b["pixel_values"].shape[1:] == (3, h, w)
        assert [w, h] in LADDER.buckets.tolist()
        assert 1 <= len(b["key"]) <= run.BATCH_SIZE
        assert b["buffered_rows"] <= data.max_rows
    assert sum(len(b["key"]) == run.BATCH_SIZE for b in batches) >= len(batches) // 2


def test_same_seed_same_batches_other_seed_other_draws(shards) -> None:
    root, _ = shards
    first = [run.summary(b) for b in run.dataset(root)]
    assert first == [run.summary(b) for b in run.dataset(root)]
    data = run.dataset(root)
    data.set_epoch(1)  # another epoch: another shard order, other crops and captions
    assert first != [run.summary(b) for b in data]


def test_buckets_and_fit_are_the_map_style_ones(shards, tmp_path: Path) -> None:
    """A streamed row lands in the bucket assign gives its size, with the crop the params
    drawn for its key give."""
    root, _ = shards
    data = StreamingBucketDataset(root, batch_size=2, ladder=LADDER, max_buffered_rows=100)
    for batch in data:
        for key, size, target in zip(batch["key"], batch["original_size"].tolist(),
                                     batch["target_size"].tolist(), strict=True):
            expected = assign(np.asarray([size[::-1]]), LADDER).bucket_wh[0].tolist()
            assert target[::-1] == expected, key


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(st.tuples(st.integers(0, 6), st.integers(1, 50)), max_size=60),
    batch_size=st.integers(1, 5),
    max_rows=st.integers(1, 12),
    max_bytes=st.one_of(st.none(), st.integers(1, 200)),
)
def test_buffers_stay_bounded_and_lose_nothing(rows, batch_size, max_rows, max_bytes) -> None:
    buffers = BucketBuffers(batch_size, max_rows, max_bytes)
    out = []
    for i, (bucket, size) in enumerate(rows):
        buffers.add(bucket, i, {"x": torch.zeros(size, dtype=torch.uint8)})
        while (b := buffers.ready()) is not None:
            batch = buffers.take(b)
            assert 1 <= len(batch) <= batch_size
            out.append((b, [ref for ref, _ in batch]))
        assert buffers.rows <= max_rows
        assert max_bytes is None or buffers.bytes <= max_bytes or buffers.rows == 0
        assert all(len(items) < batch_size for items in buffers.buckets.values())
    while buffers.buckets:
        b = min(buffers.buckets)
        out.append((b, [ref for ref, _ in buffers.take(b)]))
    served = [ref for _, refs in out for ref in refs]
    assert sorted(served) == list(range(len(rows)))  # every row once
    for b, refs in out:
        assert {rows[r][0] for r in refs} == {b}  # one bucket per batch
        assert refs == sorted(refs)  # oldest first


def test_memory_bound_flushes_the_fullest_bucket_short(shards) -> None:
    root, keys = shards
    data = StreamingBucketDataset(root, batch_size=4, ladder=LADDER, max_buffered_rows=2)
    batches = list(data)
    assert Counter(_keys(batches)) == Counter(keys)
    assert all(b["buffered_rows"] <= 2 for b in batches)
    assert data.peak_buffered_rows <= 3  # the bound, plus the row that just arrived
    assert any(len(b["key"]) < 4 for b in batches[:-3])  # short batches before the end
    one = 3 * 64 * 64  # bytes of the largest sample's pixels
    data = StreamingBucketDataset(root, batch_size=4, ladder=LADDER, max_buffered_bytes=one)
    batches = list(data)
    assert Counter(_keys(batches)) == Counter(keys)
    assert data.peak_buffered_bytes <= 2 * one
    assert all(b["buffered_bytes"] <= one for b in batches)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_in_a_fresh_process_continues_exactly(shards, tmp_path: Path, workers) -> None:
    root, _ = shards
    reference = [run.summary(b) for b in
                 StatefulDataLoader(run.dataset(root), batch_size=None, num_workers=workers)]
    stop = len(reference) // 2
    loader = StatefulDataLoader(run.dataset(root), batch_size=None, num_workers=workers)
    seen = []
    for batch in loader:
        seen.append(run.summary(batch))
        if len(seen) == stop:
            state = loader.state_dict()
            break
    del loader
    assert seen == reference[:stop]
    text = json.dumps(state, default=str)
    assert "pixel" not in text and len(text) < 6000  # positions and keys, no pixels
    assert '"buffers": [[' in text  # stopped with rows waiting in a buffer: they come back
    torch.save(state, tmp_path / "state.pt")
    out = tmp_path / "rest.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "resume", str(root), str(workers),
                           str(tmp_path / "state.pt"), str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text()) == reference[stop:]


def test_state_holds_buffered_positions_and_restores_them(shards) -> None:
    root, _ = shards
    data = run.dataset(root)
    iterator = iter(data)
    head = [run.summary(next(iterator)) for _ in range(3)]
    state = data.state_dict()
    buffered = sum(len(refs) for _, refs in state["buffers"])
    assert buffered == data._live["buffers"].rows > 0
    rest = [run.summary(b) for b in iterator]
    again = run.dataset(root)
    again.load_state_dict(json.loads(json.dumps(state)))  # survives JSON
    assert [run.summary(b) for b in again] == rest
    assert head
    other = StreamingBucketDataset(root, batch_size=2, ladder=LADDER)
    with pytest.raises(ValueError, match="another setup"):
        other.load_state_dict(state)


def _hf_rows(n: int) -> dict:
    sizes = [(96, 64), (64, 96), (80, 80)]
    return {
        "image": [{"bytes": _jpeg(*sizes[i % 3], seed=i), "path": None} for i in range(n)],
        "text": [[f"first {i}", f"second {i}", f"third {i}"] for i in range(n)],
        "id": [f"row{i}" for i in range(n)],
    }


def test_hf_streaming_dataset_rows_with_several_prompts(tmp_path: Path) -> None:
    table = datasets.Dataset.from_dict(_hf_rows(12)).cast_column("image", datasets.Image())
    stream = table.to_iterable_dataset(num_shards=3)
    data = StreamingBucketDataset(stream, batch_size=2, ladder=LADDER,
                                  caption_transform=CaptionTransform())
    for workers in (0, 2):
        batches = list(DataLoader(data, batch_size=None, num_workers=workers))
        assert sorted(_keys(batches)) == sorted(f"row{i}" for i in range(12))
    picks = {}
    for epoch in range(4):
        data.set_epoch(epoch)
        for b in data:
            for key, caption in zip(b["key"], b["captions"], strict=True):
                assert caption in {f"{w} {key[3:]}" for w in ("first", "second", "third")}
                picks.setdefault(key, []).append(caption)
    assert any(len(set(c)) > 1 for c in picks.values())  # each epoch picks again
    data.set_epoch(2)
    assert [b["captions"] for b in data] == [b["captions"] for b in data]


def test_one_shard_is_split_by_rows_across_workers(shards) -> None:
    root, keys = shards
    data = StreamingBucketDataset([str(root / "00003.tar")], batch_size=2, ladder=LADDER)
    batches = list(DataLoader(data, batch_size=None, num_workers=2))
    assert Counter(_keys(batches)) == Counter(k for k in keys if k.startswith("03"))
    assert data.plan(0, 2, 0) == ([0], 2)


def test_bad_rows_are_rejected_with_reasons(tmp_path: Path) -> None:
    good = _jpeg(80, 80)
    rows = [
        {"image": good, "caption": "ok", "key": "a"},
        {"image": b"not an image", "caption": "x", "key": "broken"},
        {"image": _jpeg(8, 8), "key": "tiny"},
        {"caption": "no image at all", "key": "none"},
        {"image": good, "width": 200, "height": 100, "key": "lies"},
        {"image": good, "width": "wide", "height": 3, "key": "nonsense"},
        {"image": str(tmp_path / "missing.jpg"), "key": "gone"},
        {"image": good, "caption": ["one", "two"], "key": "b"},
    ]
    data = StreamingBucketDataset(rows, batch_size=2, ladder=LADDER)
    batches = list(data)
    assert _keys(batches) == ["a", "b"]
    reasons = dict(r for b in batches for r in b["rejected"])
    assert set(reasons) == {"broken", "tiny", "none", "lies", "nonsense", "gone"}
    assert reasons["tiny"].startswith("too_small")
    assert reasons["none"].startswith("no_image")
    assert reasons["broken"].startswith("not_an_image")
    assert reasons["lies"].startswith("decode_failed") and "200x100" in reasons["lies"]
    assert reasons["nonsense"].startswith("bad_size")
    assert reasons["gone"].startswith("missing_file")


def test_rejections_after_the_last_batch_warn(tmp_path: Path) -> None:
    rows = [{"image": _jpeg(80, 80), "key": "a"}, {"image": b"junk", "key": "z"}]
    with pytest.warns(UserWarning, match="rejected after this stream's last batch"):
        assert _keys(list(StreamingBucketDataset(rows, batch_size=1, ladder=LADDER))) == ["a"]


def test_tar_shards_are_named_as_the_map_style_source_names_them(shards) -> None:
    root, keys = shards
    for source in (root, str(root / "*.tar"), str(root / "{00000..00004}.tar")):
        assert [s.name for s in StreamingBucketDataset(source, batch_size=2).shards] == [
            f"{k:05d}.tar" for k in range(5)]


def test_tar_rows_resume_from_their_byte_offset(shards) -> None:
    root, keys = shards
    shard = TarShard(root / "00001.tar")
    rows = list(shard.rows())
    assert [r.data["__key__"] for r in rows] == [k for k in keys if k.startswith("01")]
    assert rows[0].data["width"] and rows[0].data["caption"][0].startswith("a photo")
    later = list(shard.rows(rows[4].ordinal, rows[4].token))
    assert [r.data for r in later] == [r.data for r in rows[4:]]
    assert shard.fetch([rows[2].token])[rows[2].token] == rows[2].data
    assert tar_key("a/b/000012.seg.jpg") == ("a/b/000012", "seg.jpg")


def test_bad_configuration_raises_at_construction(shards, tmp_path: Path) -> None:
    root, _ = shards
    with pytest.raises(ValueError, match="batch_size"):
        StreamingBucketDataset(root, batch_size=0)
    with pytest.raises(ValueError, match="not a .tar file"):
        StreamingBucketDataset(tmp_path, batch_size=2)
    with pytest.raises(TypeError, match="to_iterable_dataset"):
        StreamingBucketDataset(datasets.Dataset.from_dict({"a": [1]}), batch_size=2)
    with pytest.raises(TypeError, match="BucketResizeCrop"):
        StreamingBucketDataset(root, batch_size=2, image_transform=lambda s: s)
    with pytest.raises(ValueError, match="last_batch"):
        StreamingBucketDataset(root, batch_size=2, last_batch="pad")
    with pytest.raises(ValueError, match="rank"):
        StreamingBucketDataset(root, batch_size=2, rank=2, world_size=2)


def test_builder_streaming_tokenizes_and_drops_the_tail(shards, flux_tokenizer_dir) -> None:
    root, keys = shards
    tokenizer = FluxTokenizer.from_flux_dir(flux_tokenizer_dir, t5_max_length=32)
    data = text_to_image_dataset(tokenizer, source=str(root), streaming=True, batch_size=3,
                                 ladder={"max_area": 64 * 64}, last_batch="drop", seed=3)
    assert isinstance(data, StreamingBucketDataset)
    batches = list(data)
    assert batches and all(len(b["key"]) == 3 for b in batches)
    assert batches[0]["t5_input_ids"].shape == (3, 32)
    with pytest.raises(ValueError, match="batch_size"):
        text_to_image_dataset(source=str(root), streaming=True)


def test_streamed_pixels_equal_the_map_style_datasets(tmp_path: Path) -> None:
    """The same file, bucket and params give the same pixels as TextToImageDataset's."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "p.jpg").write_bytes(_jpeg(96, 64))
    index = scan(str(folder), workers=0)
    mapped = TextToImageDataset(index, assign(index, LADDER), image_transform=BucketResizeCrop())
    streamed = next(iter(StreamingBucketDataset([{"image": str(folder / "p.jpg")}],
                                                batch_size=1, ladder=LADDER)))
    assert torch.equal(streamed["pixel_values"][0], mapped[0]["pixel_values"])


@pytest.mark.slow
def test_two_gloo_ranks_with_unequal_shards_end_together(shards, tmp_path: Path) -> None:
    root, keys = shards
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("torchrun is not installed next to this python")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    out = tmp_path / "ddp.json"
    proc = subprocess.run([exe, "--standalone", "--nproc-per-node=2", str(SCRIPT), "ddp",
                           str(root), str(out)], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["keys"] == sorted(keys)  # split with no overlap, nothing lost
    assert result["free"][0] != result["free"][1]
    assert result["locked"] == [min(result["free"])] * 2


def test_scanning_a_streaming_dataset_points_here() -> None:
    stream = datasets.Dataset.from_dict({"text": ["a"]}).to_iterable_dataset()
    with pytest.raises(TypeError, match="StreamingBucketDataset"):
        scan(stream)


def test_rows_without_a_key_are_named_by_their_image_path(tmp_path: Path) -> None:
    (tmp_path / "p.jpg").write_bytes(_jpeg(80, 80))
    rows = [{"image": str(tmp_path / "p.jpg")}, {"image": {"bytes": _jpeg(80, 80)}}]
    data = StreamingBucketDataset(rows, batch_size=2, ladder=LADDER)
    assert [b["key"] for b in data] == [[str(tmp_path / "p.jpg"), "rows:1"]]


def test_a_cut_tar_shard_serves_what_it_has_and_rejects_the_rest(shards, tmp_path) -> None:
    root, keys = shards
    whole = (root / "00003.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: len(whole) // 2 + 700])  # inside a member's data
    data = StreamingBucketDataset([str(cut)], batch_size=2, ladder=LADDER)
    batches = list(data)  # no exception mid-stream
    served = _keys(batches)
    rejected = [r for b in batches for r in b["rejected"]]
    ours = [k for k in keys if k.startswith("03")]
    assert served and set(served) < set(ours)
    assert len(rejected) == 1 and rejected[0][1].startswith("unreadable_shard")
    assert rejected[0][0] in ours and rejected[0][0] not in served  # the row it cut


def test_builder_streams_what_load_dataset_builds(tmp_path: Path) -> None:
    for k, (w, h) in enumerate([(96, 64), (64, 96), (80, 80)]):
        (tmp_path / f"{k}.jpg").write_bytes(_jpeg(w, h, seed=k))
    data = text_to_image_dataset(source="imagefolder", data_dir=str(tmp_path), streaming=True,
                                 batch_size=1, ladder={"max_area": 64 * 64})
    assert isinstance(data.shards[0].dataset, datasets.IterableDataset)
    assert sorted(Path(k).name for b in data for k in b["key"]) == ["0.jpg", "1.jpg", "2.jpg"]
