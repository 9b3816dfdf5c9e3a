"""bucket-caption: a tiny random BLIP (the real transformers classes, save_pretrained) writes
sidecars for the images without captions, never touching an existing caption unless asked."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bucketing import scan
from bucketing.cli.caption import caption_folder, main

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "tree", "sky", "person", "car"]


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    out = tmp_path_factory.mktemp("tiny-blip")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    processor = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}),
                              BertTokenizer(str(out / "vocab.txt"), bos_token="[DEC]"))
    torch.manual_seed(0)
    config = BlipConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 2,
                     "encoder_hidden_size": 16, "bos_token_id": 5, "eos_token_id": 3,
                     "sep_token_id": 3, "pad_token_id": 0, "max_position_embeddings": 64},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    BlipForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture()
def folder(tmp_path, examples_dir) -> Path:
    """Two captioned images (.txt and .caption), three without, one broken file."""
    for name in ("flower.jpg", "flower.txt", "portrait_exif3.jpg", "portrait_exif3.caption",
                 "coffee.png", "rocket.jpg", "china.jpg"):
        shutil.copy(examples_dir / name, tmp_path / name)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return tmp_path


def test_captions_only_the_uncaptioned(folder, tiny_blip, repo_root):
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    proc = subprocess.run([sys.executable, "-m", "bucketing.cli.caption", str(folder),
                           "--captioner", str(tiny_blip), "--batch-size", "2",
                           "--max-new-tokens", "6", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "3 captions written, 2 images kept their caption, 1 unreadable" in proc.stdout
    assert "broken.jpg" in proc.stdout
    for name, data in before.items():  # nothing that existed was touched
        assert (folder / name).read_bytes() == data
    for stem in ("coffee", "rocket", "china"):
        words = (folder / f"{stem}.txt").read_text().split()
        assert words and set(words) <= set(WORDS)
    assert not (folder / "broken.txt").exists()
    index = scan(folder, workers=0)  # the folder is now a captioned dataset
    assert all(index.captions[i] for i in range(len(index)))
    again = caption_folder(folder, tiny_blip, max_new_tokens=6, device="cpu")
    assert again.written == [] and len(again.kept) == 5


def test_overwrite_replaces_only_when_asked(folder, tiny_blip):
    original = (folder / "flower.txt").read_text()
    run = caption_folder(folder, tiny_blip, overwrite=True, batch_size=4, max_new_tokens=6,
                         device="cpu")
    assert len(run.written) == 5 and run.kept == []
    assert "dahlia" in original and set((folder / "flower.txt").read_text().split()) <= set(WORDS)
    # the .caption sidecar stays; the new .txt (read first by scan) holds the generated one
    assert (folder / "portrait_exif3.caption").exists() and (folder / "portrait_exif3.txt").exists()


def test_errors(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        caption_folder(folder, tmp_path / "no-model")
    with pytest.raises(ValueError, match="batch_size"):
        caption_folder(folder, tmp_path, batch_size=0)


def test_trigger_word_written_into_created_captions(folder, tiny_blip, capsys):
    assert main([str(folder), "--captioner", str(tiny_blip), "--max-new-tokens", "6",
                 "--device", "cpu", "--template", "photo of sks dog, {caption}"]) == 0
    assert "3 captions written" in capsys.readouterr().out
    for stem in ("coffee", "rocket", "china"):
        text = (folder / f"{stem}.txt").read_text().strip()
        assert text.startswith("photo of sks dog, ")
        assert set(text.removeprefix("photo of sks dog, ").split()) <= set(WORDS)
    assert "sks" not in (folder / "flower.txt").read_text()  # an existing caption is untouched
    run = caption_folder(folder, tiny_blip, overwrite=True, max_new_tokens=6, device="cpu",
                         prefix="sks dog, ")
    assert len(run.written) == 5
    assert (folder / "flower.txt").read_text().startswith("sks dog, ")
    with pytest.raises(ValueError, match=r"\{caption\}"):
        caption_folder(folder, tiny_blip, template="photo of sks dog")


def test_symlinked_sidecars_are_never_followed_or_written_through(tmp_path, examples_dir,
                                                                  tiny_blip, capsys):
    from bucketing.cli.caption import main

    folder, outside = tmp_path / "photos", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    for stem in ("dangling", "linked", "in_linked_dir", "\x1b[31mred"):
        shutil.copy(examples_dir / "coffee.png", folder / f"{stem}.png")
    (folder / "dangling.txt").symlink_to(outside / "new" / "deep" / "x.txt")
    (outside / "victim.txt").write_text("keep me\n")
    (folder / "linked.txt").symlink_to(outside / "victim.txt")
    shutil.copy(examples_dir / "coffee.png", outside / "elsewhere.png")
    (folder / "sub").symlink_to(outside, target_is_directory=True)  # a folder link out
    (folder / "\x1b]0;x\x07broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    argv = [str(folder), "--captioner", str(tiny_blip), "--max-new-tokens", "6", "--device", "cpu"]
    assert main([*argv, "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert (outside / "victim.txt").read_text() == "keep me\n"
    assert not (outside / "new").exists() and not (outside / "elsewhere.txt").exists()
    assert "dangling.png: dangling.txt is a symlink" in out
    assert "linked.png: linked.txt is a symlink" in out
    assert "would be written outside" in out
    assert "\x1b" not in out and "\x07" not in out and "\\x1b]0;x\\x07broken.jpg" in out
    assert (folder / "\x1b[31mred.txt").is_file() and (folder / "in_linked_dir.txt").is_file()
