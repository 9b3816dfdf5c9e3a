"""resolve_source on real files: folders, every manifest format, lists, datasets.Dataset,
captions from each source kind, hostile names and layouts, base_dir containment."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pickle
import shutil
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from bucketing.sources import Entry, image_extensions, resolve_source


def write_image(path: Path, size: tuple[int, int] = (8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = Image.registered_extensions()[path.suffix.lower()]
    Image.new("RGB", size, (200, 30, 60)).save(path, format=fmt)
    return path


def reasons(resolved) -> dict[str, str]:
    return {os.path.basename(r.path): r.reason for r in resolved.rejections}


# --------------------------------------------------------------------------- folders


def test_folder_recursive_sorted_case_insensitive(tmp_path: Path) -> None:
    for name in ["b/z.PNG", "a.JPG", "b/a.webp", "c.Jpeg", "d.gif", "e.bmp", "f.tif", "g.TIFF"]:
        write_image(tmp_path / name)
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / "h.psd").write_bytes(b"8BPS")
    resolved = resolve_source(tmp_path)
    names = [os.path.relpath(e.path, tmp_path) for e in resolved.entries]
    assert names == ["a.JPG", "b/a.webp", "b/z.PNG", "c.Jpeg", "d.gif", "e.bmp", "f.tif", "g.TIFF"]
    assert all(os.path.isabs(e.path) and e.row is None for e in resolved.entries)
    assert resolved.rejections == [] and resolved.blobs is None
    assert resolve_source(str(tmp_path)).entries == resolved.entries  # deterministic


def test_avif_listed_when_pillow_reads_it(tmp_path: Path) -> None:
    if ".avif" not in image_extensions():
        pytest.skip("this Pillow build cannot read AVIF, so .avif files are not listed")
    write_image(tmp_path / "x.avif")
    assert [os.path.basename(e.path) for e in resolve_source(tmp_path).entries] == ["x.avif"]


def test_folder_captions_from_each_kind(tmp_path: Path) -> None:
    write_image(tmp_path / "txt.png")
    (tmp_path / "txt.txt").write_text("first caption\n\n  second caption  \n\n")
    write_image(tmp_path / "cap.jpg")
    (tmp_path / "cap.caption").write_text("from a .caption file\n")
    write_image(tmp_path / "both.png")
    (tmp_path / "both.txt").write_text("txt wins")
    (tmp_path / "both.caption").write_text("caption loses")
    write_image(tmp_path / "sub" / "meta.png")
    write_image(tmp_path / "sub" / "deeper" / "meta2.png")
    write_image(tmp_path / "sub" / "plain.png")
    (tmp_path / "sub" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "meta.png", "text": "from metadata.jsonl"})
        + "\n\n"
        + json.dumps({"file_name": "deeper/meta2.png", "caption": ["one", "two"]})
        + "\n"
    )
    got = {os.path.basename(e.path): e.captions for e in resolve_source(tmp_path).entries}
    assert got == {
        "txt.png": ["first caption", "second caption"],
        "cap.jpg": ["from a .caption file"],
        "both.png": ["txt wins"],
        "meta.png": ["from metadata.jsonl"],
        "meta2.png": ["one", "two"],
        "plain.png": [],
    }


def test_caption_encodings(tmp_path: Path) -> None:
    write_image(tmp_path / "latin1.png")
    (tmp_path / "latin1.txt").write_bytes("café crème, naïve façade".encode("latin-1"))
    write_image(tmp_path / "cp1252.png")
    (tmp_path / "cp1252.txt").write_bytes("“quoted” – dash".encode("cp1252"))
    write_image(tmp_path / "bom.png")
    (tmp_path / "bom.txt").write_bytes("ﬁne ✓".encode("utf-8-sig"))
    write_image(tmp_path / "undefined.png")  # 0x81 is unassigned in cp1252: Latin-1 fallback
    (tmp_path / "undefined.txt").write_bytes(b"a\x81b")
    got = {os.path.basename(e.path): e.captions for e in resolve_source(tmp_path).entries}
    assert got["latin1.png"] == ["café crème, naïve façade"]
    assert got["cp1252.png"] == ["“quoted” – dash"]
    assert got["bom.png"] == ["ﬁne ✓"]
    assert got["undefined.png"] == ["a\x81b"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX byte file names")
def test_non_utf8_file_name_round_trips(tmp_path: Path) -> None:
    folder = os.fsencode(tmp_path)
    name = os.path.join(folder, b"caf\xe9 \xff.png")
    with open(name, "wb") as f:
        Image.new("RGB", (5, 3)).save(f, format="PNG")
    with open(os.path.join(folder, b"caf\xe9 \xff.txt"), "wb") as f:
        f.write(b"caption for a Latin-1 name")
    (entry,) = resolve_source(tmp_path).entries
    assert os.fsencode(entry.path) == name
    assert entry.captions == ["caption for a Latin-1 name"]
    with Image.open(entry.path) as img:
        assert img.size == (5, 3)
    # the same str path works as a list source too
    assert resolve_source([entry.path]).entries == [Entry(entry.path, [])]
    assert resolve_source([name]).entries == [Entry(entry.path, [])]  # bytes paths too


def test_symlink_loops_do_not_hang(tmp_path: Path) -> None:
    write_image(tmp_path / "sub" / "a.png")
    os.symlink(tmp_path, tmp_path / "sub" / "up")  # a folder linking to its grandparent
    os.symlink(tmp_path / "sub", tmp_path / "zz")  # a second link to a listed folder
    os.symlink("self.png", tmp_path / "self.png")  # a file linking to itself
    os.symlink("nowhere.png", tmp_path / "dangling.png")
    resolved = resolve_source(tmp_path)
    assert [os.path.relpath(e.path, tmp_path) for e in resolved.entries] == ["sub/a.png"]
    assert reasons(resolved) == {
        "up": "symlink_loop",
        "zz": "duplicate",
        "self.png": "symlink_loop",
        "dangling.png": "missing_file",
    }


def test_symlinked_folder_is_followed(tmp_path: Path) -> None:
    write_image(tmp_path / "elsewhere" / "x.png")
    (tmp_path / "data").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "linked")
    resolved = resolve_source(tmp_path / "data")
    assert [os.path.relpath(e.path, tmp_path) for e in resolved.entries] == ["data/linked/x.png"]
    contained = resolve_source(tmp_path / "data", base_dir=tmp_path / "data")
    assert contained.entries == [] and reasons(contained) == {"x.png": "outside_base_dir"}


def _list_as_nobody(root: Path) -> dict:
    """resolve_source(root) in a forked child that dropped root privileges (uid 65534)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            os.close(read_end)
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            except OSError as e:
                os.write(write_end, json.dumps({"cannot_drop": str(e)}).encode())
                os._exit(0)
            r = resolve_source(root)
            out = {"entries": [e.path for e in r.entries], "rejections": r.rejections}
        except BaseException as e:  # report, the parent decides
            out = {"error": f"{type(e).__name__}: {e}"}
        os.write(write_end, json.dumps(out).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to drop privileges")
def test_unreadable_subfolder_is_a_rejection() -> None:
    root = Path(tempfile.mkdtemp(prefix="sources-perm-"))  # under /tmp: reachable by nobody
    try:
        os.chmod(root, 0o755)
        write_image(root / "ok.png")
        write_image(root / "locked" / "hidden.png")
        os.chmod(root / "locked", 0o000)
        if os.geteuid() != 0:
            out = resolve_source(root)
            result = {"entries": [e.path for e in out.entries], "rejections": out.rejections}
        else:  # root reads anything: list the folder as nobody
            result = _list_as_nobody(root)
            if "cannot_drop" in result:
                pytest.skip(f"root, and cannot drop privileges here: {result['cannot_drop']}")
        assert "error" not in result, result
        assert result["entries"] == [str(root / "ok.png")]
        [[path, reason, detail]] = result["rejections"]
        assert (path, reason) == (str(root / "locked"), "unreadable")
        assert "ermission" in detail
    finally:
        os.chmod(root / "locked", 0o755)
        shutil.rmtree(root)


def test_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_source(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images found"):
        resolve_source(tmp_path / "empty")
    (tmp_path / "m.xlsx").write_bytes(b"PK")
    with pytest.raises(ValueError, match="unknown manifest type '.xlsx'"):
        resolve_source(tmp_path / "m.xlsx")
    with pytest.raises(TypeError, match="unsupported source type int"):
        resolve_source(42)
    with pytest.raises(TypeError, match="item 1 is int"):
        resolve_source(["a.png", 3])
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty"):
        resolve_source(tmp_path / "empty.csv")
    (tmp_path / "bad.json").write_text('{"image": "a.png"}')
    with pytest.raises(ValueError, match="JSON list of objects"):
        resolve_source(tmp_path / "bad.json")


# --------------------------------------------------------------------------- manifests


def write_manifest(path: Path, rows: list[dict], image: str = "image", caption: str = "caption"):
    """Write ``rows`` ({"image": str, "caption": str | list}) in the format of ``path``."""
    recs = [{image: r["image"], caption: r["caption"]} for r in rows]
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    elif path.suffix == ".json":
        path.write_text(json.dumps(recs))
    elif path.suffix == ".parquet":
        pq.write_table(
            pa.table({image: [r[image] for r in recs], caption: [r[caption] for r in recs]}), path
        )
    else:
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter="\t" if path.suffix == ".tsv" else ",")
            writer.writerow([image, caption])
            writer.writerows([r[image], r[caption]] for r in recs)


FORMATS = [".jsonl", ".json", ".csv", ".tsv", ".parquet"]


@pytest.fixture()
def images(tmp_path: Path) -> list[Path]:
    return [write_image(tmp_path / "img" / f"{i}.png", (8 + i, 8)) for i in range(4)]


@pytest.mark.parametrize("suffix", FORMATS)
def test_every_manifest_format(tmp_path: Path, images: list[Path], suffix: str) -> None:
    listed = [images[2], images[0], images[3]]
    rows = [{"image": f"img/{p.name}", "caption": f"a photo, number {p.stem}"} for p in listed]
    write_manifest(tmp_path / f"m{suffix}", rows)
    resolved = resolve_source(tmp_path / f"m{suffix}")
    assert resolved.entries == [Entry(str(p), [f"a photo, number {p.stem}"]) for p in listed]
    assert resolved.rejections == []


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_list_captions_and_column_map(tmp_path: Path, images: list[Path], suffix: str) -> None:
    rows = [{"image": f"img/{images[1].name}", "caption": ["short", "a longer caption"]}]
    write_manifest(tmp_path / f"m{suffix}", rows, image="file", caption="prompts")
    with pytest.raises(ValueError, match=r"columns \['file', 'prompts'\].*column_map"):
        resolve_source(tmp_path / f"m{suffix}")
    with pytest.raises(ValueError, match="no caption column 'alt'"):
        resolve_source(tmp_path / f"m{suffix}", column_map={"image": "file", "caption": "alt"})
    with pytest.raises(ValueError, match="column_map keys"):
        resolve_source(tmp_path / f"m{suffix}", column_map={"img": "file"})
    cmap = {"image": "file", "caption": "prompts"}
    resolved = resolve_source(tmp_path / f"m{suffix}", column_map=cmap)
    assert resolved.entries == [Entry(str(images[1]), ["short", "a longer caption"])]
    # without a caption column the images still resolve, caption-less
    with pytest.warns(UserWarning, match=r"no caption column .* columns \['file', 'prompts'\]"):
        only_image = resolve_source(tmp_path / f"m{suffix}", column_map={"image": "file"})
    assert only_image.entries == [Entry(str(images[1]), [])]


@pytest.mark.parametrize("suffix", [".tsv", ".csv"])
def test_header_less_two_column_file(tmp_path: Path, images: list[Path], suffix: str) -> None:
    sep = "\t" if suffix == ".tsv" else ","
    (tmp_path / f"m{suffix}").write_text(
        f"img/{images[0].name}{sep}first\n\nimg/{images[1].name}{sep}second{sep}third\n"
        f"img/{images[2].name}\n"
    )
    resolved = resolve_source(tmp_path / f"m{suffix}")
    assert resolved.entries == [  # everything after the first separator is one caption
        Entry(str(images[0]), ["first"]),
        Entry(str(images[1]), [f"second{sep}third"]),
        Entry(str(images[2]), []),
    ]


def test_default_column_names(tmp_path: Path, images: list[Path]) -> None:
    for image_col, caption_col in [("file_name", "text"), ("path", "prompt"), ("url", "caption")]:
        write_manifest(
            tmp_path / "m.csv",
            [{"image": f"img/{images[0].name}", "caption": "c"}],
            image=image_col,
            caption=caption_col,
        )
        assert resolve_source(tmp_path / "m.csv").entries == [Entry(str(images[0]), ["c"])]


def test_relative_paths_resolve_against_manifest_folder(
    tmp_path: Path, images: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "lists").mkdir()
    rows = [
        {"image": f"../img/{images[0].name}", "caption": "up and over"},
        {"image": str(images[1]), "caption": "absolute"},
        {"image": f"./../img/./{images[2].name}", "caption": "dotted"},
    ]
    write_manifest(tmp_path / "lists" / "m.jsonl", rows)
    monkeypatch.chdir(tmp_path / "img")  # the current folder must not matter
    resolved = resolve_source(Path("..") / "lists" / "m.jsonl")
    assert [e.path for e in resolved.entries] == [str(p) for p in images[:3]]


def test_duplicates_merge_captions_and_are_recorded(tmp_path: Path, images: list[Path]) -> None:
    a, b = images[0].name, images[1].name
    rows = [
        {"image": f"img/{a}", "caption": "one"},
        {"image": f"img/{b}", "caption": "other image"},
        {"image": f"./img/{a}", "caption": "two"},
        {"image": str(images[0]), "caption": "one"},
    ]
    write_manifest(tmp_path / "m.jsonl", rows)
    resolved = resolve_source(tmp_path / "m.jsonl")
    assert resolved.entries == [
        Entry(str(images[0]), ["one", "two"]),
        Entry(str(images[1]), ["other image"]),
    ]
    assert [(r.path, r.reason) for r in resolved.rejections] == [(str(images[0]), "duplicate")] * 2
    assert "line 3 repeats line 1" in resolved.rejections[0].detail


def test_blank_rows_and_rows_without_image(tmp_path: Path, images: list[Path]) -> None:
    (tmp_path / "m.csv").write_text(
        f"image,caption\nimg/{images[0].name},kept\n,\n   ,  \n,orphan caption\nimg/nope.png,x\n"
    )
    resolved = resolve_source(tmp_path / "m.csv")
    assert resolved.entries == [Entry(str(images[0]), ["kept"])]
    got = [(os.path.basename(r.path), r.reason) for r in resolved.rejections]
    assert got == [("m.csv:line 5", "no_image"), ("nope.png", "missing_file")]

    (tmp_path / "m.jsonl").write_text(
        f'{{"image": "img/{images[0].name}"}}\n\n{{}}\n{{"image": null, "caption": null}}\n'
        '{"image": null, "caption": "orphan"}\n{broken\n["a list"]\n{"image": 7}\n'
    )
    resolved = resolve_source(tmp_path / "m.jsonl")
    assert resolved.entries == [Entry(str(images[0]), [])]
    got = sorted((r.path.rsplit(":", 1)[1], r.reason) for r in resolved.rejections)
    assert got == [
        ("line 5", "no_image"),
        ("line 6", "bad_row"),
        ("line 7", "bad_row"),
        ("line 8", "no_image"),
    ]


def test_manifest_with_only_blank_rows_raises(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text("\n{}\n\n")
    with pytest.raises(ValueError, match="no image column|lists no images"):
        resolve_source(tmp_path / "m.jsonl")


def test_base_dir_containment(tmp_path: Path) -> None:
    base = tmp_path / "base"
    inside = write_image(base / "in.png")
    outside = write_image(tmp_path / "out.png")
    os.symlink(outside, base / "link_out.png")
    os.symlink(inside, base / "link_in.png")
    rows = [
        {"image": "in.png", "caption": "fine"},
        {"image": "../out.png", "caption": "climbs out"},
        {"image": "../../../../../../etc/passwd", "caption": "classic"},
        {"image": "/etc/passwd", "caption": "absolute"},
        {"image": str(outside), "caption": "absolute out"},
        {"image": "link_out.png", "caption": "symlink out"},
        {"image": "link_in.png", "caption": "symlink within"},
    ]
    write_manifest(base / "m.jsonl", rows)
    resolved = resolve_source(base / "m.jsonl", base_dir=base)
    assert [e.path for e in resolved.entries] == [str(inside), str(base / "link_in.png")]
    assert [r.reason for r in resolved.rejections] == ["outside_base_dir"] * 5
    assert all(
        not os.path.realpath(r.path).startswith(str(base) + os.sep) or "link" in r.path
        for r in resolved.rejections
    )
    # without base_dir every existing file is accepted (the two /etc/passwd and out.png
    # spellings are duplicates of each other)
    unguarded = resolve_source(base / "m.jsonl")
    assert len(unguarded.entries) == 5
    assert [r.reason for r in unguarded.rejections] == ["duplicate"] * 2
    # lists: relative paths resolve against base_dir, and the same rule applies
    listed = resolve_source(["in.png", "../out.png", "link_out.png"], base_dir=base)
    assert [e.path for e in listed.entries] == [str(inside)]
    assert [r.reason for r in listed.rejections] == ["outside_base_dir"] * 2
    # folders too (a symlink out of the folder)
    folder = resolve_source(base, base_dir=base)
    assert sorted(os.path.basename(e.path) for e in folder.entries) == ["in.png", "link_in.png"]
    assert reasons(folder) == {"link_out.png": "outside_base_dir"}


@settings(deadline=None, max_examples=15)
@given(
    picks=st.lists(
        st.tuples(
            st.integers(0, 3),
            st.text(
                st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zl", "Zp")),
                min_size=1,
                max_size=30,
            ).filter(lambda s: s.strip() == s and s),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_formats_agree_on_random_manifests(picks, tmp_path_factory) -> None:
    """Whatever the rows, every format yields the same entries (captions merged per image)."""
    tmp = tmp_path_factory.mktemp("agree")
    imgs = [write_image(tmp / f"{i}.png") for i in range(4)]
    rows = [{"image": imgs[i].name, "caption": cap} for i, cap in picks]
    expected: dict[str, list[str]] = {}
    for i, cap in picks:
        caps = expected.setdefault(str(imgs[i]), [])
        if cap not in caps:
            caps.append(cap)
    for suffix in FORMATS:
        write_manifest(tmp / f"m{suffix}", rows)
        resolved = resolve_source(tmp / f"m{suffix}")
        assert {e.path: e.captions for e in resolved.entries} == expected, suffix
        assert len(resolved.rejections) == len(rows) - len(expected)


# --------------------------------------------------------------------------- lists


def test_list_of_paths(tmp_path: Path, images: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    resolved = resolve_source([images[3], f"img/{images[1].name}", "img/missing.png", "", "img"])
    assert resolved.entries == [Entry(str(images[3]), []), Entry(str(images[1]), [])]
    assert [r.reason for r in resolved.rejections] == ["no_image", "missing_file", "not_a_file"]
    assert resolve_source((str(images[0]),)).entries == [Entry(str(images[0]), [])]


# --------------------------------------------------------------------------- datasets


def test_dataset_with_image_column_bytes_and_paths(tmp_path: Path, images: list[Path]) -> None:
    datasets = pytest.importorskip("datasets")
    blob = images[1].read_bytes()
    features = datasets.Features({"picture": datasets.Image(), "text": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(
        {
            "picture": [
                {"bytes": blob, "path": None},  # bytes only
                {"bytes": None, "path": str(images[2])},  # a real file
                {"bytes": blob, "path": "gone/away.png"},  # stale path, bytes win
                {"bytes": None, "path": str(tmp_path / "missing.png")},  # nothing usable
                {"bytes": blob, "path": images[3].name},  # a relative name is only a label
                {"bytes": blob, "path": str(images[3])},  # an absolute existing path is used
            ],
            "text": ["zero", "one", None, "three", "four", "five"],
        },
        features=features,
    )
    resolved = resolve_source(ds, base_dir=images[0].parent)
    assert resolved.entries == [
        Entry("dataset[0]", ["zero"], 0),
        Entry(str(images[2]), ["one"], 1),
        Entry("dataset[2]:gone/away.png", [], 2),
        Entry(f"dataset[4]:{images[3].name}", ["four"], 4),
        Entry(str(images[3]), ["five"], 5),
    ]
    assert [(r.reason, r.detail) for r in resolved.rejections] == [
        ("missing_file", "row 3: no such file")
    ]
    blobs = resolved.blobs
    assert blobs is not None
    assert blobs(0) == blob and blobs(1) == images[2].read_bytes() and blobs(2) == blob
    taken = pickle.loads(pickle.dumps(blobs.take([e.row for e in resolved.entries][::-1])))
    assert len(taken) == 5
    assert [taken(i) for i in range(2, 5)] == [blob, images[2].read_bytes(), blob]
    assert taken.take([3])(0) == images[2].read_bytes()
    assert taken(0) == images[3].read_bytes()  # row 5: read from its absolute path


def test_dataset_path_rows_only_needs_no_blobs(tmp_path: Path, images: list[Path]) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(
        {"image": [str(p) for p in images], "caption": [["a", "b"], [], ["c"], ["d"]]}
    ).cast_column("image", datasets.Image())
    resolved = resolve_source(ds, base_dir=images[0].parent)
    assert resolved.blobs is None
    assert resolved.entries == [
        Entry(str(images[0]), ["a", "b"], 0),
        Entry(str(images[1]), [], 1),
        Entry(str(images[2]), ["c"], 2),
        Entry(str(images[3]), ["d"], 3),
    ]
    outside = resolve_source(ds, base_dir=tmp_path / "elsewhere")
    assert outside.entries == [] and {r.reason for r in outside.rejections} == {"outside_base_dir"}


def test_dataset_with_string_paths_and_errors(tmp_path: Path, images: list[Path]) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"file_name": [images[0].name, "nope.png"], "text": ["x", "y"]})
    resolved = resolve_source(ds, base_dir=images[0].parent)
    assert resolved.entries == [Entry(str(images[0]), ["x"])]
    assert [r.reason for r in resolved.rejections] == ["missing_file"]
    with pytest.raises(ValueError, match=r"columns \['file_name', 'text'\]"):
        resolve_source(ds, column_map={"image": "img"})
    with pytest.raises(TypeError, match="pick a split"):
        resolve_source(datasets.DatasetDict({"train": ds}))


# --------------------------------------------------------------------------- rows that do not fit


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_rows_that_do_not_fit_the_header_are_never_cut(
    tmp_path: Path, images: list[Path], suffix: str
) -> None:
    sep = "," if suffix == ".csv" else "\t"
    a, b, c, d = (f"img/{p.name}" for p in images)
    (tmp_path / f"m{suffix}").write_text(
        f"image{sep}caption\n{a}{sep}a red car{sep} parked\n{b}{sep}trailing{sep}{sep}\n"
        f'{c}{sep}"a quote never closed\n{d}{sep}after it\n'
    )
    resolved = resolve_source(tmp_path / f"m{suffix}")
    assert resolved.entries == [
        Entry(str(images[0]), [f"a red car{sep} parked"]),  # the caption read whole
        Entry(str(images[1]), ["trailing"]),  # empty trailing cells hold nothing
        Entry(str(images[3]), ["after it"]),  # the stray quote swallowed nothing
    ]
    assert [(r.path.rsplit(":", 1)[1], r.reason) for r in resolved.rejections] == [
        ("line 4", "bad_row")
    ]
    # header-less: everything after the first separator is the one caption
    (tmp_path / f"n{suffix}").write_text(f"{a}{sep}a red car{sep} parked\n")
    assert resolve_source(tmp_path / f"n{suffix}").entries == [
        Entry(str(images[0]), [f"a red car{sep} parked"])
    ]
    # extra cells that cannot belong to the caption: the row is rejected by line
    (tmp_path / f"s{suffix}").write_text(
        f"image{sep}caption{sep}score\n{a}{sep}a red car{sep} parked{sep}5\n{b}{sep}x{sep}1\n"
    )
    resolved = resolve_source(tmp_path / f"s{suffix}")
    assert resolved.entries == [Entry(str(images[1]), ["x"])]
    (bad,) = resolved.rejections
    assert bad.path.endswith(f"s{suffix}:line 2") and bad.reason == "bad_row"
    assert "4 cells under the 3 columns" in bad.detail


def test_a_repeated_column_name_is_an_error_not_a_dropped_file(
    tmp_path: Path, images: list[Path]
) -> None:
    (tmp_path / "m.csv").write_text(f"image,image,caption\nimg/{images[0].name},img/x.png,c\n")
    with pytest.raises(ValueError, match=r"column 'image' is named 2 times .*\[1, 2\]"):
        resolve_source(tmp_path / "m.csv")
    (tmp_path / "m.csv").write_text(f"image,caption,note,note\nimg/{images[0].name},c,1,2\n")
    assert resolve_source(tmp_path / "m.csv").entries == [Entry(str(images[0]), ["c"])]
    # in JSON a repeated key is one bad row
    (tmp_path / "m.jsonl").write_text(
        f'{{"image": "img/{images[0].name}", "image": "img/{images[1].name}"}}\n'
        f'{{"image": "img/{images[2].name}"}}\n'
    )
    resolved = resolve_source(tmp_path / "m.jsonl")
    assert resolved.entries == [Entry(str(images[2]), [])]
    assert [(r.reason, r.detail) for r in resolved.rejections] == [
        ("bad_row", "key 'image' appears more than once")
    ]


def test_one_deeply_nested_row_costs_one_rejection(tmp_path: Path, images: list[Path]) -> None:
    deep = "[" * 50_000 + '"deep"' + "]" * 50_000
    ok = [f'{{"image": "img/{p.name}", "caption": "fine"}}' for p in images[:2]]
    nested = f'{{"image": "img/{images[2].name}", "caption": {deep}}}'
    (tmp_path / "m.jsonl").write_text("\n".join([ok[0], nested, ok[1]]) + "\n")
    (tmp_path / "m.json").write_text("[" + ",\n".join([ok[0], nested, ok[1], '"a string"']) + "]")
    for name, where in [("m.jsonl", "line 2"), ("m.json", "item 1")]:
        resolved = resolve_source(tmp_path / name)
        assert resolved.entries == [Entry(str(p), ["fine"]) for p in images[:2]], name
        assert resolved.rejections[0].path.endswith(f"{name}:{where}")
        assert resolved.rejections[0].reason == "bad_row"
        assert "nested deeper" in resolved.rejections[0].detail
    assert resolved.rejections[1].detail.startswith("expected an object")
    # nesting the reader can parse is flattened, in order, without recursion
    moderate = "[" * 300 + '"b"' + "]" * 300
    (tmp_path / "n.jsonl").write_text(
        f'{{"image": "img/{images[0].name}", "caption": ["a", {moderate}, ["c"]]}}\n'
    )
    assert resolve_source(tmp_path / "n.jsonl").entries == [Entry(str(images[0]), ["a", "b", "c"])]


def test_a_folder_nested_a_thousand_levels_deep(tmp_path: Path) -> None:
    top = tmp_path / "deep"
    levels = [str(top)] + [os.path.join(str(top), *["d"] * i) for i in range(1, 1001)]
    try:
        for level in levels:  # os.makedirs would recurse once per level
            os.mkdir(level)
        write_image(Path(levels[-1]) / "bottom.png")
        write_image(top / "top.png")
        resolved = resolve_source(top)
        assert [e.path for e in resolved.entries] == [
            os.path.join(levels[-1], "bottom.png"),
            str(top / "top.png"),
        ]
    finally:  # pytest's own clean-up (shutil.rmtree) recurses once per level: undo it here
        for level in reversed(levels):
            for name in ("bottom.png", "top.png"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(level, name))
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(level)


def test_paths_no_file_can_have_are_rejections_naming_the_row(
    tmp_path: Path, images: list[Path]
) -> None:
    good = f"img/{images[0].name}"
    (tmp_path / "m.jsonl").write_text(
        f'{{"image": "img/a\\u0000b.png"}}\n{{"image": "img/\\ud800.png"}}\n{{"image": "{good}"}}\n'
    )
    (tmp_path / "m.csv").write_text(f"image,caption\nimg/a\0b.png,x\n{good},y\n")
    for name, rows in [("m.jsonl", ["line 1", "line 2"]), ("m.csv", ["line 2"])]:
        resolved = resolve_source(tmp_path / name)
        assert [e.path for e in resolved.entries] == [str(images[0])]
        assert [r.path for r in resolved.rejections] == [f"{tmp_path / name}:{w}" for w in rows]
        assert {r.reason for r in resolved.rejections} == {"bad_row"}
        assert all("NUL" in r.detail or "\\ud800" in r.detail for r in resolved.rejections)
        assert all(os.fsencode(r.path) for r in resolved.rejections)  # an index can save them
    listed = resolve_source(["a\0b.png", "\udc80\ud800.png", str(images[0])])
    assert [r.path for r in listed.rejections] == ["list:item 0", "list:item 1"]


def test_dataset_with_an_unrecognised_caption_column_says_so(
    tmp_path: Path, images: list[Path]
) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"image": [str(images[0])], "prompt_en": ["a red car"]})
    with pytest.warns(UserWarning, match=r"columns \['image', 'prompt_en'\]; using 'image'"):
        resolved = resolve_source(ds)
    assert resolved.entries == [Entry(str(images[0]), [])]
    picked = resolve_source(ds, column_map={"caption": "prompt_en"})
    assert picked.entries == [Entry(str(images[0]), ["a red car"])]
    both = datasets.Dataset.from_dict(
        {"image": [str(images[0])], "caption": ["short"], "text": ["long"]}
    )
    with pytest.warns(UserWarning, match=r"read from 'caption', not from \['text'\]"):
        resolve_source(both)


def test_utf16_manifest_from_a_spreadsheet(tmp_path: Path, images: list[Path]) -> None:
    text = f"image\tcaption\nimg/{images[0].name}\tcafé\n"
    (tmp_path / "m.tsv").write_bytes(b"\xff\xfe" + text.encode("utf-16-le"))
    assert resolve_source(tmp_path / "m.tsv").entries == [Entry(str(images[0]), ["café"])]


# --------------------------------------------------------------------------- the sweep

# captions with everything a hand-written or exported manifest may hold
_NASTY_TEXT = st.text(
    st.one_of(
        st.sampled_from(list(',\t;"\'\\\r\n\x00\x0b\x1c\u2028\ufeff[]{} ')),
        st.characters(codec="utf-8", exclude_categories=("Cs",)),
    ),
    max_size=20,
)


@settings(deadline=None, max_examples=25)
@given(
    rows=st.lists(st.tuples(st.integers(0, 3), _NASTY_TEXT), min_size=1, max_size=5),
    encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16"]),
)
def test_sweep_written_manifests_read_back_exactly(rows, encoding, tmp_path_factory) -> None:
    """Any caption a csv/json writer can write reads back as that caption (stripped), in
    every format and encoding: separators, quotes, newlines, NULs and BOMs included."""
    tmp = tmp_path_factory.mktemp("sweep")
    imgs = [write_image(tmp / f"{i}.png") for i in range(4)]
    expected: dict[str, list[str]] = {}
    for i, cap in rows:
        caps = expected.setdefault(str(imgs[i]), [])
        if cap.strip() and cap.strip() not in caps:
            caps.append(cap.strip())
    recs = [{"image": imgs[i].name, "caption": cap} for i, cap in rows]
    for suffix in [".jsonl", ".json", ".csv", ".tsv"]:
        if suffix in (".jsonl", ".json"):
            lines = [json.dumps(r) for r in recs]
            text = "\n".join(lines) if suffix == ".jsonl" else "[" + ",\n".join(lines) + "]"
        else:
            buf = io.StringIO(newline="")
            writer = csv.writer(buf, delimiter="," if suffix == ".csv" else "\t")
            writer.writerow(["image", "caption"])
            writer.writerows([r["image"], r["caption"]] for r in recs)
            text = buf.getvalue()
        (tmp / f"m{suffix}").write_bytes(text.encode(encoding))
        resolved = resolve_source(tmp / f"m{suffix}")
        got = {e.path: e.captions for e in resolved.entries}
        assert got == expected, (suffix, encoding)


_TOKENS = st.sampled_from(
    ["[", "]", "{", "}", '"', ",", "\t", "\n", "\r", ":", "\\", "\x00", "\ud800", "\udcff",
     "image", "caption", "0.png", "img/1.png", " ", "null", "1e999", "[" * 3000, "\\u0000"]
)


@settings(deadline=None, max_examples=60)
@given(parts=st.lists(_TOKENS, max_size=30), suffix=st.sampled_from(FORMATS[:4]))
def test_sweep_hostile_manifest_text_is_rows_or_a_clear_error(parts, suffix, tmp_path_factory):
    """Random manifest text: a ResolvedSource, or a ValueError saying what is wrong; never
    another exception; every rejection names something an index can save."""
    tmp = tmp_path_factory.mktemp("hostile")
    for i in range(2):
        write_image(tmp / "img" / f"{i}.png")
    write_image(tmp / "0.png")
    path = tmp / f"m{suffix}"
    path.write_bytes("".join(parts).encode("utf-8", "surrogatepass"))
    try:
        resolved = resolve_source(path)
    except ValueError as e:
        assert str(e)
        return
    for r in resolved.rejections:
        os.fsencode(r.path)
    for e in resolved.entries:
        assert os.path.isfile(e.path) and all(isinstance(c, str) for c in e.captions)


@settings(deadline=None, max_examples=40)
@given(
    names=st.lists(
        st.one_of(
            st.text(max_size=12),
            st.sampled_from(["a\x00b.png", "\ud800.png", "x\ny.png", "é.png", "a" * 300,
                             "../" * 40 + "etc/passwd", "0.png", "./0.png", "sub/../0.png"]),
        ),
        max_size=6,
    )
)
def test_sweep_any_list_of_paths_is_entries_or_rejections(names, tmp_path_factory) -> None:
    """Every non-blank item is one entry or one rejection, whatever characters it holds."""
    tmp = tmp_path_factory.mktemp("paths")
    write_image(tmp / "0.png")
    resolved = resolve_source(names, base_dir=tmp)
    blank = sum(not n.strip() for n in names)
    assert len(resolved.entries) + len(resolved.rejections) == len(names)
    assert sum(r.reason == "no_image" for r in resolved.rejections) == blank
    for r in resolved.rejections:
        os.fsencode(r.path)


def test_a_caption_with_a_lone_surrogate_becomes_text_a_tokenizer_takes(
    tmp_path: Path, images: list[Path], flux_tokenizer_dir: Path
) -> None:
    from transformers import AutoTokenizer

    row = f'{{"image": "img/{images[0].name}", "caption": "a \\ud800 car"}}\n'
    (tmp_path / "m.jsonl").write_text(row)
    (entry,) = resolve_source(tmp_path / "m.jsonl").entries
    assert entry.captions == ["a \ufffd car"]
    for sub in ("tokenizer", "tokenizer_2"):
        assert AutoTokenizer.from_pretrained(flux_tokenizer_dir / sub)(entry.captions)["input_ids"]


def test_a_huge_caption_sidecar_is_refused_not_read(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    with open(tmp_path / "a.txt", "wb") as f:
        f.truncate((1 << 20) + 1)  # sparse: a caption file of a megabyte and a byte
    resolved = resolve_source(tmp_path)
    assert resolved.entries == [Entry(str(tmp_path / "a.png"), [])]
    assert [(r.reason, "larger than" in r.detail) for r in resolved.rejections] == [
        ("unreadable_caption", True)
    ]
