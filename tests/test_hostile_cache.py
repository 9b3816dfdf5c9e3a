"""Hostile states of an encoder cache folder: files changed after the build, rebuilds killed
between tables, folders that only look like caches, concurrent builds, edited shard headers,
prune under the shard byte cap; then a sweep over random folder states and kill points."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from captioned_photos import write_captioned_photos
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import bucketing.pipeline.encoder_cache.store as store
from bucketing import BucketLadder, EncoderCache, TextToImageDataset, assign, build_cache, scan
from bucketing.pipeline.dataset import SubstitutionWarning
from bucketing.pipeline.encoder_cache.store import build_lock

SIZES = [(80, 64), (64, 80), (96, 64), (70, 50), (50, 70), (64, 64)]
LADDER = BucketLadder.from_buckets([(32, 32), (48, 32), (32, 48)], multiple=16)


def _write(folder: Path, sizes=SIZES, seed: int = 0) -> Path:
    return write_captioned_photos(folder, sizes, seed)


@pytest.fixture(scope="module")
def built(tmp_path_factory, flux):
    """A photo folder and a finished cache of it (copied by the tests that damage it)."""
    root = tmp_path_factory.mktemp("hostile-cache")
    photos = _write(root / "photos")
    index = scan(str(photos), workers=0)
    assignment = assign(index, LADDER)
    build_cache(index, assignment, flux, root / "cache", progress=False, shard_size=2)
    return photos, root / "cache"


def _copy(built, tmp_path) -> tuple[Path, Path]:
    """The module's photos (left as they are) and a copy of their cache."""
    photos, cache = built
    shutil.copytree(cache, tmp_path / "cache")
    return photos, tmp_path / "cache"


def _index(photos: Path):
    index = scan(str(photos), workers=0)
    return index, assign(index, LADDER)


def test_a_file_changed_after_the_build_is_never_served_its_old_latents(tmp_path, flux):
    photos, out = _write(tmp_path / "photos"), tmp_path / "cache"
    build_cache(*_index(photos), flux, out, progress=False)
    victim = photos / "im0.png"
    before = victim.stat()
    new = np.full((SIZES[0][1], SIZES[0][0], 3), 7, np.uint8)  # same size, other pixels
    Image.fromarray(new).save(victim)
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    for index, assignment in (_index(photos),):  # rescanned: the index agrees with the file
        row = index.paths.index(str(victim))
        ds = TextToImageDataset(index, assignment, encoder_cache=EncoderCache.open(out))
        with pytest.warns(SubstitutionWarning, match="changed after the cache was built"):
            sample = ds[row]
        assert sample["substituted"] and sample["index"] != row
        strict = TextToImageDataset(index, assignment, encoder_cache=ds.encoder_cache,
                                    on_error="raise")
        with pytest.raises(Exception, match="stale"):
            strict[row]
    index, assignment = _index(photos)
    cache = build_cache(index, assignment, flux, out, progress=False)  # a rebuild re-encodes it
    assert cache.build_stats["latents_encoded"] == 1
    assert TextToImageDataset(index, assignment, encoder_cache=cache)[row]["substituted"] is False


def test_a_rebuild_killed_between_the_tables_and_cache_json_is_refused(built, tmp_path, flux):
    photos, out = _copy(built, tmp_path)
    index, assignment = _index(photos)
    other = build_cache(index, assignment, flux, tmp_path / "other", progress=False, flip_p=0.5)
    # the state a kill leaves after the new rows were written and before the new cache.json
    shutil.copy(tmp_path / "other" / "rows.parquet", out / "rows.parquet")
    with pytest.raises(ValueError, match="belongs to another build"):
        EncoderCache.open(out)
    rebuilt = build_cache(index, assignment, flux, out, progress=False, flip_p=0.5)
    assert rebuilt.rows["latent_keys"] == other.rows["latent_keys"]


def test_a_folder_that_only_looks_like_a_cache_is_never_adopted(built, tmp_path, flux):
    photos, out = _copy(built, tmp_path)
    user = tmp_path / "mine"
    (user / "shards").mkdir(parents=True)
    shutil.copy(out / "rows.parquet", user / "rows.parquet")
    save_file({"weights": torch.ones(3)}, str(user / "shards" / "model.safetensors"))
    before = {p: p.read_bytes() for p in user.rglob("*") if p.is_file()}
    index, assignment = _index(photos)
    with pytest.raises(FileExistsError, match="nothing there is overwritten"):
        build_cache(index, assignment, flux, user, progress=False)
    with pytest.raises(FileNotFoundError, match="not an encoder cache"):
        EncoderCache.open(user)
    assert {p: p.read_bytes() for p in user.rglob("*") if p.is_file()} == before


def test_a_second_build_of_one_folder_is_refused_and_leaves_the_first_alone(built, tmp_path,
                                                                             flux):
    photos, out = _copy(built, tmp_path)
    index, assignment = _index(photos)
    in_progress = out / "shards" / ".r0-abc.safetensors.tmp"
    in_progress.write_bytes(b"half a shard")
    with build_lock(out):  # the first build, holding the folder
        with pytest.raises(RuntimeError, match="another build is writing"):
            build_cache(index, assignment, flux, out, progress=False, flip_p=0.5)
        with pytest.raises(RuntimeError, match="another build is writing"):
            EncoderCache.open(out).prune()
        assert in_progress.read_bytes() == b"half a shard"
    build_cache(index, assignment, flux, out, progress=False)  # its own leftovers: cleared
    assert not in_progress.exists()


def _edit_header(shard: Path, edit) -> None:
    data = shard.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (n - len(text))
    assert len(text) == n
    shard.write_bytes(data[:8] + text + data[8 + n :])


@pytest.mark.parametrize("edit", ["dtype", "shape"])
def test_a_shard_header_edited_to_another_dtype_or_shape_is_refused(built, tmp_path, edit):
    photos, out = _copy(built, tmp_path)
    index, assignment = _index(photos)
    cache = EncoderCache.open(out)
    key = cache.rows["latent_keys"][0][0]
    name = f"{key}.latents"

    def change(header):
        if edit == "dtype":
            header[name]["dtype"] = "I32"
        else:
            c, h, w = header[name]["shape"]
            header[name]["shape"] = [c, w, h] if h != w else [c * h, 1, w]

    _edit_header(out / "shards" / cache._entries[key], change)
    ds = TextToImageDataset(index, assignment, encoder_cache=EncoderCache.open(out),
                            on_error="raise")
    with pytest.raises(Exception, match="damaged or edited"):
        ds[0]


def test_prune_writes_shards_under_the_byte_cap(built, tmp_path, flux, monkeypatch):
    photos, out = built[0], tmp_path / "cache"
    index, assignment = _index(photos)
    build_cache(index, assignment, flux, out, progress=False, flip_p=0.5, shard_size=64)
    cache = build_cache(index, assignment, flux, out, progress=False)  # flips: unreferenced
    one = cache.latents(cache.rows["path"][0])[0].nbytes
    monkeypatch.setattr(store, "SHARD_BYTES", 2 * one)
    before = set((out / "shards").iterdir())
    counts = cache.prune()
    assert counts["removed"] > 0
    new = [p for p in (out / "shards").iterdir() if p not in before]
    assert len(new) >= 2  # the survivors of one rewritten 64-entry shard: several shards
    for shard in new:
        with safe_open(str(shard), "pt") as f:
            sizes = [f.get_tensor(n).nbytes for n in f.keys()]  # noqa: SIM118 - not a dict
        assert sum(sizes) - max(sizes) < 2 * one  # flushed once the cap was reached
    ds = TextToImageDataset(index, assignment, encoder_cache=EncoderCache.open(out),
                            on_error="raise")
    assert all(not ds[i]["substituted"] for i in range(len(ds)))


# -- sweep: random folder states and kill points ---------------------------------------------

_DAMAGE = st.sampled_from(["none", "drop_cache_json", "start_mark", "drop_rows", "drop_texts",
                           "foreign_rows", "truncate_shard", "drop_shard", "garbage_json",
                           "stray_tmp", "drop_entries"])


def _damage(out: Path, other: Path, how: str, which: int) -> None:
    shards = sorted((out / "shards").glob("*.safetensors"))
    shard = shards[which % len(shards)]
    if how == "drop_cache_json":
        (out / "cache.json").unlink()
    elif how == "start_mark":
        (out / "cache.json").write_text(json.dumps(store.start_mark()))
    elif how in ("drop_rows", "drop_texts", "drop_entries"):
        (out / f"{how.split('_')[1]}.parquet").unlink()
    elif how == "foreign_rows":
        shutil.copy(other / "rows.parquet", out / "rows.parquet")
    elif how == "truncate_shard":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif how == "drop_shard":
        shard.unlink()
    elif how == "garbage_json":
        (out / "cache.json").write_bytes(b"\x00{not json")
    elif how == "stray_tmp":
        (out / "shards" / ".r0-x.safetensors.tmp").write_bytes(b"x")


@settings(max_examples=10, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(how=st.lists(_DAMAGE, min_size=1, max_size=3), which=st.integers(0, 50))
def test_sweep_random_cache_states_open_clean_or_refuse(built, tmp_path_factory, flux, how,
                                                        which):
    """Every damaged folder either opens and serves each row (its latents or a flagged
    substitute of the same bucket), or is refused with a clear error; a rebuild then gives
    the clean cache's view."""
    photos, clean = built
    tmp = tmp_path_factory.mktemp("sweep")
    out = tmp / "cache"
    shutil.copytree(clean, out)
    other = tmp / "other"
    shutil.copytree(clean, other)
    meta = json.loads((other / "cache.json").read_text())
    (other / "rows.parquet").unlink()
    table = pq.read_table(clean / "rows.parquet")
    pq.write_table(table.replace_schema_metadata({"build": "another"}), other / "rows.parquet")
    assert meta["build"] != "another"
    for h in how:
        if (out / "cache.json").exists() or h != "garbage_json":
            with contextlib.suppress(FileNotFoundError, IndexError):  # already gone
                _damage(out, other, h, which)
    index, assignment = _index(photos)
    try:
        cache = EncoderCache.open(out)
    except (FileNotFoundError, ValueError):
        cache = None
    if cache is not None:
        ds = TextToImageDataset(index, assignment, encoder_cache=cache)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SubstitutionWarning)
            for i in range(len(ds)):
                try:
                    s = ds[i]
                except (RuntimeError, KeyError, ValueError) as error:
                    # no substitute left in a small bucket, or a caption's entry lost
                    assert "no substitute" in str(error) or "rebuild" in str(error)
                    continue
                assert tuple(assignment.bucket_wh[s["index"]]) == tuple(assignment.bucket_wh[i])
    try:
        rebuilt = build_cache(index, assignment, flux, out, progress=False)
    except (FileExistsError, ValueError) as error:  # not ours any more: never adopted
        assert "cache.json" in str(error) or "unreadable" in str(error)
        return
    assert rebuilt.rows["latent_keys"] == EncoderCache.open(clean).rows["latent_keys"]
