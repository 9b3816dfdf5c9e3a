"""One spec, one plan: every door reads the same options, a flag is honoured or refused, an
encoder cache built for another plan is refused before any worker starts, a resume state from
another plan is refused, and docs/configs.md's key table is the spec's."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from captioned_photos import write_captioned_photos
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bucketing.cli.report as report_cli
from bucketing import (
    BucketLadder,
    EncoderCache,
    MixedDataset,
    TextToImageDataset,
    assign,
    build_cache,
    from_config,
    load_config,
    scan,
    text_to_image_dataset,
)
from bucketing.cli.cache import build_parser as cache_parser
from bucketing.cli.cache import main as cache_main
from bucketing.pipeline import spec as spec_module
from bucketing.pipeline.spec import ConfigError, key_table
from samplers import BucketBatchSampler

SIZES = [(160, 128), (128, 160), (192, 128), (140, 100), (100, 140), (128, 128)]
T5_LENGTH = 32


def write_images(folder: Path, sizes=SIZES, seed: int = 0) -> Path:
    return write_captioned_photos(folder, sizes, seed)


def test_the_docs_key_table_is_the_specs(repo_root):
    page = (repo_root / "docs" / "configs.md").read_text()
    table = key_table()
    assert table in page
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    assert rows == [line for line in table.splitlines() if line.startswith("| `")]
    # every option of every spec class is a row, and each row names at least one door
    for cls in (spec_module.Spec, spec_module.DatasetSpec, spec_module.LadderSpec,
                spec_module.CaptionSpec):
        for name in spec_module.options(cls):
            assert any(f".{name}`" in r or f"| `{name}`" in r or f".{name}." in r
                       for r in rows), name
    assert all("✓" in r for r in rows)


def test_one_config_error_and_generated_flags():
    assert report_cli.ConfigError is ConfigError
    assert issubclass(ConfigError, ValueError)
    error = ConfigError("must be >= 1, got 0", file="a.toml", key="batch_size", line=3)
    assert str(error) == "a.toml:3: batch_size: must be >= 1, got 0"
    report = report_cli.build_parser().format_help()
    cache = cache_parser().format_help()
    for flag in ("--scan-cache", "--scan-workers", "--max-buckets", "--model", "--seed"):
        assert flag in report and flag in cache, flag
    for flag in ("--template", "--prefix", "--config"):
        assert flag in cache, flag
    with pytest.warns(DeprecationWarning, match="--cache is now --scan-cache"):
        args = report_cli.build_parser().parse_args(["x", "--cache", "c.parquet"])
    assert args.scan_cache == "c.parquet"


CONFIG = """\
model = "flux"
batch_size = 2
seed = 0
scan_workers = 0

[[datasets]]
name = "me"
source = "me"
[datasets.ladder]
max_area = 16384
levels = [4096, 16384]
[datasets.captions]
template = "a photo of sks, {caption}"
dropout = 0.5

[[datasets]]
name = "other"
source = "other"
crop = "center"
[datasets.ladder]
max_area = 4096
"""


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    write_images(tmp_path / "me", seed=0)
    write_images(tmp_path / "other", seed=1)
    (tmp_path / "data.toml").write_text(CONFIG)
    return tmp_path


def test_a_file_fits_a_ladder_to_its_data(project):
    path = project / "data.toml"
    path.write_text(CONFIG.replace("levels = [4096, 16384]", "max_buckets = 2"))
    dataset, _ = from_config(path, model_transform=None)
    mine = dataset.bucket_id[(dataset.dataset_of == 0) & (dataset.bucket_id >= 0)]
    assert len(np.unique(mine)) == 2 and len(mine) == len(SIZES)
    path.write_text(CONFIG.replace("levels = [4096, 16384]", 'fit = "best"'))
    with pytest.raises(ConfigError, match=r"data.toml:11: datasets\[0\].ladder.fit: must be one"
                       r" of data, preset, native, got 'best'"):
        from_config(path, model_transform=None)


def test_report_config_honours_or_refuses_every_flag(project, capsys):
    config = str(project / "data.toml")
    out = project / "out"
    out.mkdir()
    argv = ["--config", config, "--json", str(out / "r.json"), "--plot", str(out / "p.png"),
            "--preview", str(out / "v.png"), "--batch-size", "3", "--model", "sdxl"]
    assert report_cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "model sdxl from the command line (the file says flux)" in text
    assert "batch_size 3 from the command line (the file says 2)" in text
    figures = json.loads((out / "r.json").read_text())
    assert (figures["model"], figures["batch_size"]) == ("sdxl", 3)
    assert [d["name"] for d in figures["datasets"]] == ["me", "other"]
    assert f"plan fingerprint: {figures['plan_fingerprint']}" in text
    for png in ("p.png", "v.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the model changes the plan: sdxl's 64-multiple ladder is another fingerprint
    assert report_cli.main(["--config", config, "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["plan_fingerprint"] != figures["plan_fingerprint"]
    for flag in (["--max-area", "4096"], ["--levels", "32"], ["--max-buckets", "2"],
                 ["--min-bucket-size", "2"], ["--repeats", "2"], ["--allow-upscale"],
                 ["--scan-cache", "s.parquet"], ["--estimate-cache"], ["--column", "caption=t"]):
        assert report_cli.main(["--config", config, *flag]) == 2
        assert f"{flag[0]} does not apply with --config" in capsys.readouterr().err
    # --column names one SOURCE's columns in bucket-cache too
    assert cache_main(["--config", config, "--weights", str(out), "--column", "caption=t"]) == 2
    assert "--column does not apply with --config" in capsys.readouterr().err
    # an output over one of the file's inputs is refused before anything is written
    assert report_cli.main(["--config", config, "--json", config]) == 2
    assert "is an input of this report" in capsys.readouterr().err


def test_a_cache_built_for_another_ladder_is_refused_at_construction(tmp_path, flux):
    write_images(tmp_path / "photos")
    index = scan(str(tmp_path / "photos"), workers=0)
    small = BucketLadder.from_buckets([(64, 64), (96, 64), (64, 96)], multiple=16)
    other = BucketLadder.from_buckets([(64, 64), (128, 96), (96, 128)], multiple=16)
    cache = build_cache(index, assign(index, small), flux, tmp_path / "c", progress=False,
                        plan_fingerprint="feedfacecafebeef")
    assert cache.meta["plan"] == {"fingerprint": "feedfacecafebeef", "missing": []}
    TextToImageDataset(index, assign(index, small), encoder_cache=cache)  # the same plan: accepted
    with pytest.raises(ValueError) as error:
        TextToImageDataset(index, assign(index, other),
                           encoder_cache=EncoderCache.open(tmp_path / "c"))
    message = str(error.value)
    assert "built for another plan (feedfacecafebeef)" in message
    assert "rows are cached in another bucket" in message and "96x64 -> 128x96" in message
    assert "bucket-cache --config" in message
    # a row the cache never saw (its ladder rejected it, or it was not in the index) is named
    extra = write_images(tmp_path / "more", seed=3)
    (extra / "im0.png").rename(tmp_path / "photos" / "new.png")
    grown = scan(str(tmp_path / "photos"), workers=0)
    with pytest.raises(ValueError, match=r"1 accepted rows are not in the cache \(e.g. .*new"):
        TextToImageDataset(grown, assign(grown, small), encoder_cache=cache)


@pytest.mark.slow
def test_bucket_cache_config_embeds_the_templated_captions(project, tiny_encoders_dirs, flux,
                                                          capsys):
    path = project / "data.toml"
    path.write_text(CONFIG.replace("scan_workers = 0", 'scan_workers = 0\nencoder_cache = "enc"'))
    argv = ["--config", str(path), "--weights", str(tiny_encoders_dirs["flux"]), "--dtype",
            "float32", "--t5-length", str(T5_LENGTH), "--loader-workers", "0"]
    assert cache_main(argv) == 0
    text = capsys.readouterr().out
    dataset, sampler = from_config(path, model_transform=None)
    assert f"plan fingerprint: {dataset.plan_fingerprint}" in text
    cache = EncoderCache.open(project / "enc")
    assert cache.meta["plan"]["fingerprint"] == dataset.plan_fingerprint
    templated = "a photo of sks, a photo number 1"
    want = flux.encode_text([templated])
    got = cache.text(templated)
    n = int(want["text_lengths"][0])
    torch.testing.assert_close(got["prompt_embeds"], want["prompt_embeds"][0, :n])
    torch.testing.assert_close(got["pooled_prompt_embeds"], want["pooled_prompt_embeds"][0])
    assert cache.has_caption("a photo number 1")  # "other" has no template: raw captions
    assert cache.has_caption("")  # "me" drops captions out
    # the trainer's samples come from the cache, templated for "me", as they are for "other"
    for batch in sampler:
        for i in batch:
            sample = dataset[i]
            assert "latents" in sample
            if sample["dataset"] == "me" and sample["caption"]:
                assert sample["caption"].startswith("a photo of sks, ")
    # flags that are per-dataset options cannot apply to a file
    assert cache_main([*argv, "--template", "x {caption}"]) == 2
    assert "--template does not apply with --config" in capsys.readouterr().err
    # the same file with another ladder: the trainer refuses the cache before any worker
    path.write_text(path.read_text().replace("max_area = 4096", "max_area = 16384"))
    with pytest.raises(ValueError, match="built for another plan"):
        from_config(path, model_transform=None)


def test_a_resume_state_from_another_plan_is_refused(tmp_path):
    a = write_images(tmp_path / "a", seed=0)
    b = write_images(tmp_path / "b", seed=1)  # the same sizes: the same bucket ids

    def mix(first: Path, second: Path) -> MixedDataset:
        return MixedDataset({p.name: text_to_image_dataset(
            source=p, scan_workers=0, ladder={"max_area": 128 * 128})
                             for p in (first, second)})

    ab, ba = mix(a, b), mix(b, a)
    assert np.array_equal(ab.bucket_id, ba.bucket_id)  # what the old fingerprint hashed
    assert ab.plan_fingerprint != ba.plan_fingerprint
    saved = BucketBatchSampler(ab, batch_size=2, seed=0)
    next(iter(saved))
    state = saved.state_dict(received=1)
    BucketBatchSampler(mix(a, b), batch_size=2, seed=0).load_state_dict(state)  # same plan
    with pytest.raises(ValueError, match="plan fingerprint"):
        BucketBatchSampler(ba, batch_size=2, seed=0).load_state_dict(state)
    # bare bucket ids carry no plan: their states resume as before
    ids = BucketBatchSampler(ab.bucket_id, batch_size=2, seed=0)
    ids.load_state_dict(BucketBatchSampler(ab.bucket_id, batch_size=2, seed=0).state_dict())


def test_the_report_prints_the_datasets_plan_fingerprint(project, capsys):
    source = str(project / "me")
    assert report_cli.main([source, "--max-area", "16384", "--seed", "3", "--json", "-"]) == 0
    figures = json.loads(capsys.readouterr().out)
    dataset = text_to_image_dataset(source=source, ladder={"max_area": 16384}, seed=3,
                                    scan_workers=0)
    assert figures["plan_fingerprint"] == dataset.plan_fingerprint
    other = text_to_image_dataset(source=source, ladder={"max_area": 16384}, seed=4,
                                  scan_workers=0)
    assert other.plan_fingerprint != dataset.plan_fingerprint


_VALUES = st.one_of(st.integers(-3, 70000), st.floats(-2, 5, allow_nan=False), st.booleans(),
                    st.sampled_from(["", "x", "{caption}", "a, {caption}", "center", "pad"]),
                    st.lists(st.integers(-1, 5000), max_size=3))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=st.sampled_from(["", "ladder", "captions"]), data=st.data())
def test_any_value_of_any_key_loads_or_names_its_key_and_line(tmp_path, table, data):
    cls = {"": spec_module.DatasetSpec, "ladder": spec_module.LadderSpec,
           "captions": spec_module.CaptionSpec}[table]
    keys = [k for k, f in spec_module.options(cls).items()
            if "file" in f.metadata["doors"] and k not in ("ladder", "captions", "source")]
    key, value = data.draw(st.sampled_from(keys)), data.draw(_VALUES)
    header = f"[datasets.{table}]\n" if table else ""
    text = ('batch_size = 2\n[[datasets]]\nsource = "me"\n' + header +
            f"{key} = {json.dumps(value)}\n")
    path = tmp_path / "fuzz.toml"
    path.write_text(text)
    try:
        loaded = load_config(path)
    except ConfigError as error:
        # the file, a line, and the key (or, for a ladder the model refuses, its table)
        where = f"datasets[0]{'.' + table if table else ''}"
        assert re.match(rf"{re.escape(str(path))}:\d+: {re.escape(where)}", str(error)), error
        return
    got = loaded.datasets[0]
    got = getattr(got, table) if table else got
    assert got is not None
