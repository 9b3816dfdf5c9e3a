"""Dataset config files: TOML into (MixedDataset, sampler), the same plan as the Python API,
and errors that name the key and the line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bucketing import MixedDataset, from_config, load_config, text_to_image_dataset
from bucketing.pipeline.config import part_seed
from bucketing.pipeline.spec import ConfigError, LadderSpec
from samplers import BucketBatchSampler
from transforms import FluxTokenizer

CONFIG = """\
model = "flux"
batch_size = 2
seed = 5
tokenizers = "tokenizers"
scan_workers = 0

[[datasets]]
name = "me"
source = "me"
resolution = 256
[datasets.captions]
template = "a photo of sks person, {caption}"
dropout = 0.0

[[datasets]]
source = "regularisation"
crop = "center"
[datasets.ladder]
max_area = 36864   # 192²
max_aspect = 2.0
[datasets.captions]
shuffle_parts = true
keep_parts = 1
tag_dropout = 0.5
"""


@pytest.fixture()
def project(tmp_path: Path, examples_dir: Path, flux_tokenizer_dir: Path) -> Path:
    """A user's folder: two photo folders, the tokenizers and the config file."""
    images = sorted(p for p in examples_dir.iterdir() if p.suffix in (".jpg", ".png"))
    for i, path in enumerate(images):
        folder = tmp_path / ("me" if i % 2 else "regularisation")
        folder.mkdir(exist_ok=True)
        for file in examples_dir.glob(path.stem + ".*"):
            shutil.copy(file, folder / file.name)
    (tmp_path / "tokenizers").symlink_to(flux_tokenizer_dir)
    (tmp_path / "data.toml").write_text(CONFIG)
    return tmp_path


def python_api(project: Path) -> tuple[MixedDataset, BucketBatchSampler]:
    """What CONFIG says, written with the Python API."""
    tokenizer = FluxTokenizer.from_flux_dir(project / "tokenizers")
    me = text_to_image_dataset(
        tokenizer, source=project / "me", model="flux", ladder={"max_area": 256 * 256},
        captions={"template": "a photo of sks person, {caption}", "dropout": 0.0},
        seed=part_seed(5, 0), scan_workers=0,
    )
    reg = text_to_image_dataset(
        tokenizer, source=project / "regularisation", model="flux",
        ladder={"max_area": 192 * 192, "max_aspect": 2.0}, crop="center",
        captions={"shuffle_parts": True, "keep_parts": 1, "tag_dropout": 0.5},
        seed=part_seed(5, 1), scan_workers=0,
    )
    mixed = MixedDataset({"me": me, "regularisation": reg})
    return mixed, BucketBatchSampler(mixed, batch_size=2, seed=5)


def test_config_round_trips_into_the_python_api_plan(project):
    dataset, sampler = from_config(project / "data.toml")
    ours, theirs = python_api(project)
    assert dataset.names == ["me", "regularisation"]
    assert np.array_equal(dataset.bucket_id, ours.bucket_id)
    assert np.array_equal(dataset.ladder.buckets, ours.ladder.buckets)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        theirs.set_epoch(epoch)
        dataset.set_epoch(epoch)
        ours.set_epoch(epoch)
        plan = list(sampler)
        assert plan == list(theirs) and plan
        for i in plan[0] + plan[-1]:
            a, b = dataset[i], ours[i]
            assert torch.equal(a["pixel_values"], b["pixel_values"])
            assert a["caption"] == b["caption"] and a["dataset"] == b["dataset"]
            assert torch.equal(a["t5_input_ids"], b["t5_input_ids"])
    # Each dataset keeps its own ladder and captions.
    me = dataset.dataset_of == 0
    assert (dataset.bucket_wh[me & (dataset.bucket_id >= 0)].prod(axis=1) <= 256 * 256).all()
    reg = ~me & (dataset.bucket_id >= 0)
    assert (dataset.bucket_wh[reg].prod(axis=1) <= 192 * 192).all()
    wh = dataset.bucket_wh[reg]
    assert (np.maximum(wh[:, 0] / wh[:, 1], wh[:, 1] / wh[:, 0]) <= 2.0).all()
    row = int(np.flatnonzero(me & (dataset.bucket_id >= 0))[0])
    assert dataset[row]["caption"].startswith("a photo of sks person, ")


def test_load_config_values(project):
    config = load_config(project / "data.toml")
    assert config.model == "flux" and config.batch_size == 2 and config.seed == 5
    me, reg = config.datasets
    assert (me.name, reg.name) == ("me", "regularisation")
    assert me.source == str(project / "me")  # relative to the file's folder
    assert me.ladder == LadderSpec(max_area=256 * 256) and me.crop == "random"
    assert reg.ladder == LadderSpec(max_area=36864, max_aspect=2.0) and reg.crop == "center"
    assert config.tokenizers == str(project / "tokenizers")


def test_repeats_per_dataset(project):
    text = CONFIG.replace('name = "me"', 'name = "me"\nrepeats = 3').replace(
        'source = "regularisation"', 'source = "regularisation"\nrepeats = 0.5')
    (project / "data.toml").write_text(text)
    dataset, sampler = from_config(project / "data.toml", model_transform=None)
    ours, _ = python_api(project)
    same = BucketBatchSampler(ours, batch_size=2, seed=5, repeats=ours.row_repeats([3, 0.5]))
    plan = list(sampler)
    assert plan == list(same)
    counts = np.bincount([int(i) for batch in plan for i in batch], minlength=len(dataset))
    me = (dataset.dataset_of == 0) & (dataset.bucket_id >= 0)
    assert (counts[me] >= 3).all()
    assert counts[(dataset.dataset_of == 1)].max() <= 1 + 1  # (at most one pad duplicate)
    # a repeated row's occurrences are told apart, so each draws its own crop and caption
    occurrences = {}
    for i in (i for batch in plan for i in batch):
        occurrences.setdefault(int(i), []).append(i.occurrence)
    row = int(np.flatnonzero(me)[0])
    assert sorted(occurrences[row])[:3] == [0, 1, 2]


@pytest.mark.parametrize(("old", "new", "line", "message"), [
    ('model = "flux"', 'model = "flux2"', 1, "model: must be one of flux, flux-schnell"),
    ("batch_size = 2", "batch_size = 0", 2, "batch_size: must be >= 1"),
    ("batch_size = 2", "batch_size = 2\nmax_pixels_per_batch = 100", 3,
     "max_pixels_per_batch: give exactly one of"),
    ("seed = 5", 'seed = "five"', 3, "seed: must be an int, got 'five'"),
    ("resolution = 256", "resolution = 8", 10, "datasets[0].resolution: must be >= 16"),
    ("resolution = 256", "resolution = 256\nrepeats = -1", 11,
     "datasets[0].repeats: must be a number in [0, 65536], got -1"),
    ("dropout = 0.0", "dropuot = 0.0", 13, "datasets[0].captions.dropuot: unknown key"),
    ('crop = "center"', 'crop = "middle"', 17, "datasets[1].crop: must be one of random, center"),
    ("max_aspect = 2.0", "max_aspect = 2.0\nsteps = 3", 21, "datasets[1].ladder.steps: unknown"),
    ('source = "me"', 'path = "me"', 9, "datasets[0].path: unknown key"),
    ("workers = 0", "workers = 0\nbatchsize = 2", 6, "batchsize: unknown key; known: model"),
    ('crop = "center"', 'crop = "center"\ncaption_extension = "txt"', 18,
     "datasets[1].caption_extension: must look like '.txt'"),
    ("template = ", "template = 'no placeholder'\n#", 11,
     "datasets[0].captions: template must be a string containing '{caption}'"),
    ("max_aspect = 2.0", "max_aspect = 0.5", 20,
     "datasets[1].ladder.max_aspect: must be >= 1, got 0.5"),
    ("tag_dropout = 0.5", "tag_dropout = 1.5", 24,
     "datasets[1].captions.tag_dropout: must be a number in [0, 1], got 1.5"),
    ("tag_dropout = 0.5", 'tag_dropout = "0.5"', 24,
     "datasets[1].captions.tag_dropout: must be a number, got '0.5'"),
    ("scan_workers = 0", "scan_workers = 0\nworkers = 0", 6, "workers: give scan_workers only"),
    ("batch_size = 2", "batch_size = 2\ndrop_last = true\nlast_batch = 'pad'", 3,
     "drop_last: give last_batch only"),
])
def test_errors_name_the_key_and_the_line(project, old, new, line, message):
    path = project / "data.toml"
    path.write_text(CONFIG.replace(old, new, 1))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert f"{path}:{line}: {message}" in str(error.value)


def test_file_level_errors(project):
    path = project / "data.toml"
    path.write_text('model = "flux"\nbatch_size = 2\n')
    with pytest.raises(ConfigError, match=r"datasets: no \[\[datasets\]\]"):
        load_config(path)
    path.write_text('model = "flux\n')
    with pytest.raises(ConfigError, match=r"not valid TOML.*line 1"):
        load_config(path)
    path.write_text(CONFIG.replace('name = "me"', 'name = "regularisation"'))
    with pytest.raises(ConfigError, match=r"data.toml:16: datasets\[1\].source: two datasets"):
        load_config(path)
    path.write_text(CONFIG.replace("[[datasets]]\nname", "[datasets]\nname", 1).split(
        "[[datasets]]")[0])
    with pytest.raises(ConfigError, match="datasets: must be an array of"):
        load_config(path)


def test_bucket_report_shows_the_mix_per_dataset(project, repo_root):
    env = {**os.environ, "PYTHONPATH": str(repo_root)}

    proc = subprocess.run([sys.executable, "-m", "bucketing.cli.report", "--config",
                           str(project / "data.toml"), "--json", "-"],
                          capture_output=True, text=True, timeout=120, cwd=project, env=env)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    me, reg = figures["datasets"]
    dataset, sampler = from_config(project / "data.toml", model_transform=None)
    assert figures["plan_fingerprint"] == dataset.plan_fingerprint
    accepted = [int(((dataset.dataset_of == k) & (dataset.bucket_id >= 0)).sum()) for k in (0, 1)]
    assert (me["accepted"], reg["accepted"]) == tuple(accepted)
    assert me["share"] + reg["share"] == pytest.approx(1.0)
    assert figures["steps_per_rank"] == len(sampler)
    assert me["buckets"] == len(np.unique(dataset.bucket_id[(dataset.dataset_of == 0)
                                                            & (dataset.bucket_id >= 0)]))
    proc = subprocess.run([sys.executable, "-m", "bucketing.cli.report", "--config",
                           str(project / "data.toml"), "--world-size", "2"],
                          capture_output=True, text=True, timeout=120, cwd=project, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "regularisation" in proc.stdout and "world size 2" in proc.stdout
    assert f"{'me':<20} {accepted[0]:>7}" in proc.stdout
    (project / "data.toml").write_text(CONFIG.replace("seed = 5", "seed = -1"))
    bad = subprocess.run([sys.executable, "-m", "bucketing.cli.report", "--config",
                          str(project / "data.toml")], capture_output=True, text=True,
                         timeout=120, cwd=project, env=env)
    assert bad.returncode == 2 and "data.toml:3: seed: must be >= 0" in bad.stderr


def test_the_docs_show_the_example_config_file(repo_root):
    page = (repo_root / "docs" / "configs.md").read_text()
    shown = page.split("```toml\n", 1)[1].split("```", 1)[0]
    assert shown == (repo_root / "examples" / "dataset.toml").read_text()
    config = load_config(repo_root / "examples" / "dataset.toml")
    assert [d.name for d in config.datasets] == ["photos", "regularisation"]


YAML = """\
model: flux
batch_size: 2
seed: 5
tokenizers: tokenizers
scan_workers: 0
datasets:
  - name: me
    source: me
    resolution: 256
    captions:
      template: "a photo of sks person, {caption}"
      dropout: 0.0
  - source: regularisation
    crop: center
    ladder: {max_area: 36864, max_aspect: 2.0}
    captions: {shuffle_parts: true, keep_parts: 1, tag_dropout: 0.5}
"""


def test_yaml_reads_the_same_as_toml(project):
    (project / "data.yaml").write_text(YAML)
    assert load_config(project / "data.yaml").datasets == load_config(
        project / "data.toml").datasets
    (project / "data.yml").write_text(YAML.replace("dropout: 0.0", "dropout: 2.0"))
    with pytest.raises(ConfigError, match=r"data.yml:12: datasets\[0\].captions.dropout: must"):
        load_config(project / "data.yml")
    (project / "data.yml").write_text(YAML.replace("crop: center", "crop: middle"))
    with pytest.raises(ConfigError, match=r"data.yml:14: datasets\[1\].crop"):
        load_config(project / "data.yml")
    (project / "data.yml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="a table of keys"):
        load_config(project / "data.yml")


def test_the_older_scan_names_still_work_with_a_warning(project):
    path = project / "data.toml"
    path.write_text(CONFIG.replace("scan_workers = 0", "workers = 0").replace(
        'source = "me"', 'source = "me"\ncache = "scan.parquet"'))
    with pytest.warns(DeprecationWarning) as record:
        config = load_config(path)
    said = " ".join(str(w.message) for w in record)
    assert "'workers' is now 'scan_workers'" in said and "'cache' is now 'scan_cache'" in said
    assert config.scan_workers == 0
    assert config.datasets[0].scan_cache == str(project / "scan.parquet")
    with pytest.warns(DeprecationWarning, match="'workers' is now 'scan_workers'"):
        text_to_image_dataset(source=project / "me", workers=0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'cahce'"):
        text_to_image_dataset(source=project / "me", cahce="x")
