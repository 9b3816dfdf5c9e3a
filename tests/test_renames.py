"""Renamed options: the new name works, the old one still does for a release, with a
DeprecationWarning, and giving both is an error."""

from __future__ import annotations

import pytest

from bucketing.assign import assign
from bucketing.cli import caption as caption_cli
from bucketing.ladder import BucketLadder
from bucketing.pipeline.dataset import TextToImageDataset
from bucketing.scan import scan


class _Texts:
    """Stands in for an encoder cache's text half (the dataset only asks it for captions)."""

    def text_sample(self, caption: str) -> dict:
        return {"prompt_embeds": caption.upper()}


def test_dataset_encoder_cache_and_its_old_name(examples_dir):
    index = scan(examples_dir, workers=0)
    assignment = assign(index, BucketLadder.for_model("flux", max_area=128 * 128))
    texts = _Texts()
    new = TextToImageDataset(index, assignment, encoder_cache=texts)
    with pytest.warns(DeprecationWarning, match="encoder_cache"):
        old = TextToImageDataset(index, assignment, cache=texts)
    assert new.encoder_cache is texts and old.encoder_cache is texts
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="encoder_cache="):
        TextToImageDataset(index, assignment, encoder_cache=texts, cache=texts)


def test_bucket_caption_captioner_and_its_old_name(tmp_path, capsys):
    missing = str(tmp_path / "no-model")
    assert caption_cli.main([str(tmp_path), "--captioner", missing]) == 2
    assert "model folder not found" in capsys.readouterr().err
    with pytest.warns(DeprecationWarning, match="--captioner"):
        assert caption_cli.main([str(tmp_path), "--model", missing]) == 2
    err = capsys.readouterr().err
    assert "--model is now --captioner" in err and "model folder not found" in err
    with pytest.raises(SystemExit), pytest.warns(DeprecationWarning):
        caption_cli.main([str(tmp_path), "--model", missing, "--captioner", missing])
    with pytest.raises(SystemExit):
        caption_cli.main([str(tmp_path)])
    assert "required: --captioner" in capsys.readouterr().err
