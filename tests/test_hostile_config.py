"""Hostile config files: sizes, alias bombs, recursive aliases, pathological lines, deep
nesting, odd keys and numbers; every failure a ConfigError naming the file, the key and the
line, in bounded time; then sweeps over random TOML and YAML text."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bucketing.ladder import MAX_BUCKETS, BucketLadder
from bucketing.pipeline.config import ConfigError, load_config, mix_figures, render_mix
from bucketing.pipeline.config_files import MAX_CONFIG_BYTES

GOOD = 'model = "flux"\nbatch_size = 2\n\n[[datasets]]\nsource = "photos"\nresolution = 256\n'
GOOD_YAML = "model: flux\nbatch_size: 2\ndatasets:\n  - source: photos\n    resolution: 256\n"


def _load(tmp_path: Path, text: str, name: str = "c.toml", seconds: float = 2.0):
    path = tmp_path / name
    path.write_text(text)
    started = time.perf_counter()
    try:
        return load_config(path)
    finally:
        assert time.perf_counter() - started < seconds


def _refused(tmp_path, text, name, *messages, seconds: float = 2.0) -> str:
    with pytest.raises(ConfigError) as error:
        _load(tmp_path, text, name, seconds)
    said = str(error.value)
    assert said.startswith(str(tmp_path / name)), said
    for message in messages:
        assert message in said, said
    return said


def test_a_file_over_one_mib_is_refused_unread(tmp_path):
    _refused(tmp_path, GOOD + "#" * MAX_CONFIG_BYTES, "c.toml", "at most 1048576 bytes")


def test_a_yaml_alias_bomb_is_refused_fast(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + k)}: &{chr(98 + k)} [{', '.join(['*' + chr(97 + k)] * 9)}]\n"
        for k in range(8))
    assert len(bomb) < 600
    _refused(tmp_path, bomb, "c.yaml", "values once aliases are expanded", seconds=1.0)


def test_a_recursive_yaml_alias_is_refused(tmp_path):
    _refused(tmp_path, "datasets: &a [*a]\n", "c.yaml", "c.yaml:1", "recursive alias")
    _refused(tmp_path, "x: &a {k: *a}\n", "c.yaml", "recursive alias")


def test_a_pathological_toml_line_is_read_in_linear_time(tmp_path):
    text = GOOD.replace("[[datasets]]", "[[" + " " * 20000 + "datasets]]")
    text = text.replace('resolution = 256', 'resolution = 256\n' + "[[" + " " * 20000 + "\n")
    _refused(tmp_path, text, "c.toml", "not valid TOML", seconds=1.0)
    config = _load(tmp_path, GOOD.replace("[[datasets]]", "[[" + " " * 20000 + "datasets]]"),
                   seconds=1.0)
    assert config.datasets[0].ladder == {"max_area": 256 * 256}


@pytest.mark.parametrize("name,text", [
    ("c.toml", "x = " + "[" * 5000 + "]" * 5000 + "\n"),
    ("c.toml", "x = " + "{a = " * 3000 + "1" + "}" * 3000 + "\n"),
    ("c.yaml", "x: " + "[" * 5000 + "]" * 5000 + "\n"),
    ("c.yaml", "x: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n"),
])
def test_deep_nesting_is_refused_before_any_parser_recurses(tmp_path, name, text):
    _refused(tmp_path, text, name, f"{name}:1", "nested deeper than")


@pytest.mark.parametrize("name,text,messages", [
    ("c.yaml", GOOD_YAML + "    1: x\n", ["c.yaml:", "key 1 is not a string"]),
    ("c.yaml", GOOD_YAML + "seed: 1\nseed: 2\n", ["c.yaml:7", "seed: duplicate key (first "
                                                  "on line 6)"]),
    ("c.toml", GOOD + "repeats = inf\n", ["c.toml:7", "datasets[0].repeats: inf is not a "
                                          "finite number"]),
    ("c.yaml", GOOD_YAML + "seed: .nan\n", ["c.yaml:6", "seed: nan is not a finite number"]),
    ("c.toml", GOOD.replace("batch_size = 2", "batch_size = " + "9" * 29),
     ["c.toml:2", "batch_size: " + "9" * 29 + " is out of range"]),
    ("c.toml", GOOD.replace("batch_size = 2", f"batch_size = {2**62 + 1}"),
     ["c.toml:2", "batch_size: must be at most 2**62"]),
    ("c.toml", GOOD + "repeats = 1e6\n", ["c.toml:7", "datasets[0].repeats: must be at most"]),
    ("c.toml", GOOD.replace("256", "3000000000"), ["c.toml:6", "resolution: must be at most "
                                                   "MAX_SIDE"]),
    ("c.toml", GOOD.replace("256", "200000"), ["c.toml:6", f"more than {MAX_BUCKETS} buckets"]),
    ("c.toml", GOOD.replace("resolution = 256",
                            "[datasets.ladder]\nmax_area = 4611686018427387904"),
     ["c.toml:6", "ladder: max_area 4611686018427387904 has a side above MAX_SIDE"]),
    ("c.toml", GOOD + "column_map = {image = 'file', prompt = 'text'}\n",
     ["c.toml:7", "datasets[0].column_map.prompt: keys are image, caption"]),
    ("c.toml", GOOD + "column_map = {image = 3}\n",
     ["c.toml:7", "datasets[0].column_map.image: keys are"]),
])
def test_odd_keys_and_numbers_are_config_errors_naming_key_and_line(tmp_path, name, text,
                                                                    messages):
    _refused(tmp_path, text, name, *messages)


def test_from_data_refuses_a_fractional_bucket_budget():
    with pytest.raises(TypeError, match="max_buckets must be an int, got 1.5"):
        BucketLadder.from_data([(512, 512)], max_buckets=1.5)


_ALPHABET = "[]{}=\"'#.:&*-!,|>? \n\tabdemnostuxy0129_\\"
_FRAGMENTS = st.sampled_from([
    "[[datasets]]\n", "[datasets.captions]\n", 'source = "p"\n', "repeats = 1e309\n",
    "batch_size = 99999999999999999999999\n", "resolution = 100000\n", "x = [[[[[1]]]]]\n",
    "seed = -1\n", "datasets: &a [*a]\n", "- source: p\n", "  - {a: *b}\n", "a: &b [1, 2]\n",
    "model: flux\n", "batch_size: 2\n", "1: 2\n", "? [a]\n: b\n", "x: !!python/object {}\n",
])


def _never_worse_than_a_config_error(tmp_path: Path, text: str, name: str) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    started = time.perf_counter()
    try:
        load_config(path)
    except ConfigError as error:
        assert str(error).startswith(str(path))
    assert time.perf_counter() - started < 2.0


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.one_of(_FRAGMENTS, st.text(_ALPHABET, max_size=40)), max_size=12),
       yaml_file=st.booleans())
def test_sweep_random_toml_and_yaml_documents(tmp_path, parts, yaml_file):
    """Random text built from config fragments and junk: a Config or a ConfigError naming the
    file, within bounded time; never another exception."""
    _never_worse_than_a_config_error(tmp_path, "".join(parts), "c.yaml" if yaml_file else
                                     "c.toml")


def test_the_mix_names_each_rejection_reason_and_its_files(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, size in (("ok.png", (320, 256)), ("tiny.png", (8, 8)), ("strip.png", (900, 20))):
        Image.new("RGB", size).save(photos / name)
    (photos / "junk.jpg").write_bytes(b"not an image")
    (tmp_path / "c.toml").write_text(GOOD.replace("photos", str(photos)))
    figures = mix_figures(tmp_path / "c.toml")
    (row,) = figures["datasets"]
    assert "not_assigned" not in row["reasons"]
    assert row["reasons"] == {"not_an_image": 1, "too_small": 2}
    assert sorted(Path(p).name for p in row["examples"]["too_small"]) == ["strip.png",
                                                                          "tiny.png"]
    text = render_mix(figures)
    assert "rejected: too_small 2, not_an_image 1" in text
    assert "too_small: " in text and "tiny.png" in text and "junk.jpg" in text
